"""The shipped example workflows: served by ComfyUI's template browser, in step with the nodes, and runnable."""
import json

import pytest
from PIL import Image

from dev import workflows
from dev.datasets import make_dataset, photo
from dev.host import PACK_DIRNAME, execution_error

pytestmark = pytest.mark.e2e
NAMES = sorted(p.name for p in workflows.WORKFLOWS.glob("*.json"))


def test_three_workflows_ship():
    assert NAMES == ["selfperc_fine_tune_compare.json", "selfperc_load_lora_compare.json",
                     "selfperc_perceptual_distance.json"]


def test_template_browser_lists_and_serves_them(server):
    listed = server.get("/workflow_templates")
    assert sorted(listed[PACK_DIRNAME]) == sorted(n[:-5] for n in NAMES)
    for name in NAMES:
        served = server.get(f"/api/workflow_templates/{PACK_DIRNAME}/{name}")
        assert served == workflows.load(name)


@pytest.mark.parametrize("name", NAMES)
def test_workflow_files_match_the_live_node_definitions(server, name):
    spec = next(s for s in workflows.SPECS if s["title"] + ".json" == name)
    assert workflows.build(spec, server.get("/object_info")) == workflows.load(name), \
        "regenerate with `python -m dev.workflows`"


def test_fine_tune_workflow_then_load_lora_workflow_run(server):
    info = server.get("/object_info")
    folder = make_dataset(server.base / "input" / "wf_photos", names=["astronaut", "coffee", "camera"]).name
    prompt = workflows.set_widgets(workflows.to_api(workflows.load("selfperc_fine_tune_compare.json"), info),
                   ckpt_name="tiny_sd15.safetensors", dataset_folder=folder, resolution=64, width=64, height=64,
                   batch_size=1, lora_name="selfperc/wf_lora", steps=2)
    prompt["4"]["inputs"]["steps"] = 2
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    assert (server.base / "models" / "loras" / "selfperc" / "wf_lora.safetensors").is_file()

    prompt = workflows.set_widgets(workflows.to_api(workflows.load("selfperc_load_lora_compare.json"), info),
                   ckpt_name="tiny_sd15.safetensors", lora_name="selfperc/wf_lora.safetensors", width=64, height=64,
                   batch_size=1, steps=2)
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    assert entry["outputs"]["5"]["images"]


def test_distance_workflow_runs(server):
    info = server.get("/object_info")
    a = Image.fromarray(photo("coffee")).resize((96, 64))
    a.save(server.base / "input" / "wf_a.png")
    b = a.copy()
    b.paste((255, 0, 0), (10, 10, 40, 40))
    b.save(server.base / "input" / "wf_b.png")
    prompt = workflows.set_widgets(workflows.to_api(workflows.load("selfperc_perceptual_distance.json"), info),
                   ckpt_name="tiny_sd15.safetensors")
    prompt["2"]["inputs"]["image"], prompt["3"]["inputs"]["image"] = "wf_a.png", "wf_b.png"
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    assert entry["outputs"]["5"]["images"]
    json.dumps(entry)
