"""The shipped example workflows: served by ComfyUI's template browser, in step with the nodes, and runnable."""
import json

import pytest
from PIL import Image

from dev import workflows
from dev.datasets import make_dataset, photo
from dev.host import PACK_DIRNAME, execution_error

pytestmark = pytest.mark.e2e
NAMES = sorted(p.name for p in workflows.WORKFLOWS.glob("*.json"))


def test_three_workflows_ship_with_what_each_is_for():
    assert NAMES == ["selfperc_fine_tune_compare.json", "selfperc_load_lora_compare.json",
                     "selfperc_perceptual_distance.json"]
    kinds = {n: sorted(node["type"] for node in workflows.load(n)["nodes"]) for n in NAMES}
    assert {"SelfPerceptualFineTune", "SelfPerceptualSampler", "LossGraphNode", "SaveImage"} <= set(
        kinds["selfperc_fine_tune_compare.json"])
    assert {"LoraLoaderModelOnly", "SelfPerceptualSampler", "SaveImage"} <= set(kinds["selfperc_load_lora_compare.json"])
    assert {"SelfPerceptualDistance", "LoadImage", "SaveImage"} <= set(kinds["selfperc_perceptual_distance.json"])


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
    import numpy as np

    def heatmap(image_b):
        prompt["2"]["inputs"]["image"], prompt["3"]["inputs"]["image"] = "wf_a.png", image_b
        entry = server.run(prompt)
        assert execution_error(entry) is None, execution_error(entry)
        json.dumps(entry)
        img = entry["outputs"]["5"]["images"][0]
        with Image.open(server.base / "output" / img["subfolder"] / img["filename"]) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float32) / 255
    same, edited = heatmap("wf_a.png"), heatmap("wf_b.png")
    assert same.shape == edited.shape == (64, 96, 3)
    # identical images: distance 0 everywhere, so the overlay is exactly 0.6 * colormap(0) + 0.4 * image_a
    expected = 0.6 * np.array([0, 0, 4], np.float32) / 255 + 0.4 * np.asarray(a, np.float32) / 255
    assert np.abs(same - expected).max() <= 1.5 / 255
    assert np.abs(edited - same).max() > 0.2, "an edited image must light up the map"
