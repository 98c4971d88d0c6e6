"""The real ComfyUI server with this pack: node registry, the harness graph, and every node through the API."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dev.datasets import make_dataset, photo
from dev.host import comfyui_path, execution_error, prepare_base_dir
from tests.e2e import graphs

pytestmark = pytest.mark.e2e
OUR_NODES = {"SelfPerceptualFineTune": "selfperc/training", "SelfPerceptualSampler": "selfperc/sampling",
             "SelfPerceptualDistance": "selfperc/analysis", "SelfPerceptualEvaluate": "selfperc/analysis",
             "SelfPerceptualObjective": "selfperc/training/options",
             "SelfPerceptualTrainingOptions": "selfperc/training/options",
             "SelfPerceptualLoraOptions": "selfperc/training/options",
             "SelfPerceptualMonitoring": "selfperc/training/options"}
# The fine-tune node's inputs in version 0.2.0 (before the option nodes): every one is still offered under its name.
INPUTS_0_2_0 = [
    "model", "vae", "dataset_folder", "steps", "learning_rate", "rank", "alpha", "batch_size", "resolution",
    "resize_mode", "seed", "feature_layer", "t_prime", "t_prime_min", "t_prime_max", "distance", "normalize_features",
    "mse_weight", "gradient_checkpointing", "training_dtype", "lora_name", "overwrite", "save_every", "preview_every",
    "clip", "resume_from", "batched_frozen", "dataset_path", "conditioning", "tap_depth", "optimizer", "lr_schedule",
    "warmup_steps", "gradient_accumulation", "ema_decay", "save_weights", "algorithm", "lora_dtype", "save_format",
    "init_lora", "sample_prompts", "sample_every", "validation_split", "validation_every", "guidance",
    "perceptual_weight"]


def inputs_of(spec: dict) -> dict:
    return {**spec["input"]["required"], **spec["input"].get("optional", {})}


def outputs_of(entry: dict, node: str) -> dict:
    return entry.get("outputs", {}).get(node, {})


def assert_success(server, entry):
    err = execution_error(entry)
    assert err is None, f"{err and err.get('exception_message')}\n{server.log_tail(3000)}"


def test_object_info_lists_our_nodes_with_tooltips(server):
    info = server.get("/object_info")
    for node_id, category in OUR_NODES.items():
        assert node_id in info, node_id
        assert (Path(__file__).parents[2] / "web" / "docs" / f"{node_id}.md").is_file(), f"{node_id}: no help page"
        spec = info[node_id]
        assert spec["category"] == category
        for name, (typ, *opts) in inputs_of(spec).items():
            assert opts and opts[0].get("tooltip"), f"{node_id}.{name} has no tooltip"
    core = info["SaveLoRA"]["input"]["required"]["lora"][0]
    assert info["SelfPerceptualFineTune"]["output"][1] == core  # LORA_MODEL: plugs into core Save LoRA
    assert info["SelfPerceptualFineTune"]["output"][2] == info["LossGraphNode"]["input"]["required"]["loss"][0]


def test_the_fine_tune_node_shows_at_most_16_inputs_and_every_earlier_input_is_still_offered(server):
    """The node keeps what a first run needs; each option node plugs into its own input with its own type; every
    input of version 0.2.0 (and mse_space) is an input of some pack node under the same name."""
    info = server.get("/object_info")
    tune = inputs_of(info["SelfPerceptualFineTune"])
    assert len(tune) <= 16, sorted(tune)
    offered = {name for node in OUR_NODES for name in inputs_of(info[node])}
    assert not set(INPUTS_0_2_0 + ["mse_space"]) - offered
    for group, node in graphs.OPTION_NODES.items():
        out_type = info[node]["output"][0]
        assert out_type == f"SELFPERC_{group.upper()}" and tune[group][0] == out_type  # their own custom type
        assert group in info["SelfPerceptualFineTune"]["input"]["optional"]


def test_a_prompt_with_the_earlier_inputs_is_refused_naming_where_they_live_now(server, photos):
    """An API prompt written for version 0.2.0 (every setting on the node): a clear error, nothing trained."""
    g = graphs.fine_tune("eps", photos, "e2e/old_layout", steps=1)
    g["10"]["inputs"].update(mse_weight=1.0, perceptual_weight=0.0, optimizer="sgd", alpha=4.0)
    for key in [k for k in g if k.startswith("10") and k != "10"]:
        del g[key]
    for group in graphs.OPTION_NODES:
        g["10"]["inputs"].pop(group, None)
    text = run_expecting_error(server, g)
    assert "saved with an earlier version of Self-Perceptual Fine-Tune" in text, text
    assert "Self-Perceptual Objective (mse_weight=1.0, perceptual_weight=0.0)" in text, text
    assert "Self-Perceptual Training Options (optimizer='sgd')" in text and "LoRA Options (alpha=4.0)" in text, text
    assert not (server.base / "models" / "loras" / "e2e" / "old_layout.safetensors").exists()


def test_harness_core_graph_saves_an_image(server):
    entry = server.run(graphs.core_sampling())
    assert_success(server, entry)
    img = outputs_of(entry, "7")["images"][0]
    assert (server.base / "output" / img["subfolder"] / img["filename"]).is_file()


def test_quick_test_for_ci_imports_the_pack_without_errors(tmp_path):
    base = prepare_base_dir(tmp_path / "base")
    res = subprocess.run([sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--base-directory", str(base),
                          "--database-url", "sqlite:///:memory:"], cwd=comfyui_path(), capture_output=True,
                         text=True, timeout=300)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    line = [ln for ln in log.splitlines() if "comfyui-selfperc" in ln]
    assert line and not any("IMPORT FAILED" in ln for ln in line), log[-3000:]


@pytest.fixture(scope="module")
def photos(server):
    return make_dataset(server.base / "input" / "photos").name


@pytest.mark.parametrize("kind", ["eps", "v_zsnr", "flow"])
def test_fine_tune_compare_and_reload_through_the_api(server, photos, kind):
    entry = server.run(graphs.fine_tune(kind, photos, f"e2e/{kind}"))
    assert_success(server, entry)
    lora_file = f"e2e/{kind}.safetensors"
    assert (server.base / "models" / "loras" / lora_file).is_file()
    assert (server.base / "models" / "loras" / "e2e" / f"{kind}.selfperc_state").is_file()
    grid = outputs_of(entry, "13")["images"][0]
    with Image.open(server.base / "output" / grid["subfolder"] / grid["filename"]) as im:
        assert im.width > 2 * 64  # base | fine-tuned
    assert "saved e2e/" in outputs_of(entry, "10")["text"][0]
    # core LoraLoader lists the new file at once and loads it with no unloaded keys
    assert lora_file in server.get("/object_info/LoraLoaderModelOnly")["LoraLoaderModelOnly"]["input"]["required"][
        "lora_name"][0]
    entry, log = server.run_logged(graphs.load_lora_and_sample(kind, lora_file))
    assert_success(server, entry)
    assert "lora key not loaded" not in log


def test_unconditional_fine_tune_without_clip(server, photos):
    import safetensors.torch

    entry = server.run(graphs.fine_tune("eps", photos, "e2e/uncond", clip=False, steps=2))
    assert_success(server, entry)
    assert "saved e2e/uncond.safetensors (2 steps, final loss" in outputs_of(entry, "10")["text"][0]
    sd = safetensors.torch.load_file(str(server.base / "models" / "loras" / "e2e" / "uncond.safetensors"))
    assert sum(k.endswith(".lora_up.weight") for k in sd) > 20 and all(v.isfinite().all() for v in sd.values())
    grid = outputs_of(entry, "13")["images"][0]
    with Image.open(server.base / "output" / grid["subfolder"] / grid["filename"]) as im:
        assert im.width > 2 * 64  # base | fine-tuned


@pytest.mark.parametrize("kind", ["eps", "v_zsnr", "flow"])
def test_perceptual_distance_through_the_api(server, kind):
    a = Image.fromarray(photo("astronaut")).resize((128, 128))
    b = a.copy()
    b.paste((0, 255, 0), (80, 80, 120, 120))
    a.save(server.base / "input" / "dist_a.png")
    b.save(server.base / "input" / "dist_b.png")
    entry = server.run(graphs.distance("dist_a.png", "dist_b.png", kind, overlay=1.0))  # the heatmap alone
    assert_success(server, entry)
    img = outputs_of(entry, "33")["images"][0]
    with Image.open(server.base / "output" / img["subfolder"] / img["filename"]) as im:
        heat = np.asarray(im.convert("RGB"), dtype=np.float32).sum(-1)  # the colour map brightens with distance
    assert heat.shape == (128, 128)
    assert outputs_of(entry, "32")["images"]  # the heatmap is shown in the node
    edited = np.zeros(heat.shape, bool)
    edited[80:120, 80:120] = True
    far = np.ones(heat.shape, bool)
    far[64:, 64:] = False  # the quarter holding the edit (features spread a little beyond it) left out
    assert heat[edited].mean() > 3 * heat[far].mean(), (heat[edited].mean(), heat[far].mean())
    peak = np.unravel_index(heat.argmax(), heat.shape)
    assert 64 <= peak[0] < 128 and 64 <= peak[1] < 128, peak


def run_expecting_error(server, graph) -> str:
    """Queue a graph that must fail; return the error text (validation or execution); the server stays up."""
    from dev.host import PromptRejected

    try:
        entry = server.run(graph)
    except PromptRejected as e:
        text = str(e)
    else:
        err = execution_error(entry)
        assert err is not None, "the graph was expected to fail"
        text = f"{err['exception_type']}: {err['exception_message']}"
    assert server.alive()
    assert server.get("/system_stats")
    return text


def test_missing_dataset_folder_gives_a_clear_error(server):
    text = run_expecting_error(server, graphs.fine_tune("eps", "no_such_folder", "e2e/x"))
    assert "no_such_folder" in text
