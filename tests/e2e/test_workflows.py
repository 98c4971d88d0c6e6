"""The shipped example workflows: served by ComfyUI's template browser, in step with the nodes, and runnable."""
import json

import pytest
from PIL import Image

from dev import workflows
from dev.datasets import make_dataset, photo
from dev.host import PACK_DIRNAME, execution_error

pytestmark = pytest.mark.e2e
NAMES = sorted(p.name for p in workflows.WORKFLOWS.glob("*.json"))


def test_the_shipped_workflows_are_there_with_what_each_is_for():
    assert NAMES == ["selfperc_diffusion_clip.json", "selfperc_direct_inversion_edit.json", "selfperc_evaluate.json",
                     "selfperc_fine_tune_compare.json", "selfperc_imagic.json", "selfperc_load_lora_compare.json",
                     "selfperc_null_text_edit.json", "selfperc_perceptual_distance.json",
                     "selfperc_pix2pix_zero.json", "selfperc_pix2pix_zero_photo.json",
                     "selfperc_prompt_to_prompt.json", "selfperc_prompt_to_prompt_flux.json",
                     "selfperc_prompt_to_prompt_photo.json", "selfperc_real_image_ab.json",
                     "selfperc_super_resolution.json"]
    kinds = {n: sorted(node["type"] for node in workflows.load(n)["nodes"]) for n in NAMES}
    assert {"SelfPerceptualFineTune", "SelfPerceptualSampler", "LossGraphNode", "SaveImage"} <= set(
        kinds["selfperc_fine_tune_compare.json"])
    assert {"LoraLoaderModelOnly", "SelfPerceptualSampler", "SaveImage"} <= set(kinds["selfperc_load_lora_compare.json"])
    assert {"SelfPerceptualDistance", "LoadImage", "SaveImage"} <= set(kinds["selfperc_perceptual_distance.json"])
    assert {"SelfPerceptualEvaluate", "LoraLoaderModelOnly", "SaveImage"} <= set(kinds["selfperc_evaluate.json"])
    assert {"SelfPerceptualSampler", "LoadImage", "VAEEncode", "SaveImage"} <= set(
        kinds["selfperc_real_image_ab.json"])
    edit = {"LoadImage", "VAEEncode", "SelfPerceptualInvert", "SelfPerceptualInversionGuider", "SamplerCustomAdvanced",
            "KSamplerSelect", "LoraLoaderModelOnly", "SaveImage"}
    assert edit | {"SelfPerceptualNullTextInversion"} <= set(kinds["selfperc_null_text_edit.json"])
    assert edit <= set(kinds["selfperc_direct_inversion_edit.json"])
    assert "SelfPerceptualNullTextInversion" not in kinds["selfperc_direct_inversion_edit.json"]
    p2p = {"SelfPerceptualPromptToPrompt", "SelfPerceptualAttentionMaps", "SamplerCustomAdvanced", "SaveImage"}
    assert p2p | {"EmptyLatentImage", "RandomNoise"} <= set(kinds["selfperc_prompt_to_prompt.json"])
    assert p2p | {"LoadImage", "SelfPerceptualInvert", "DisableNoise"} <= set(
        kinds["selfperc_prompt_to_prompt_photo.json"])
    assert p2p | {"UNETLoader", "DualCLIPLoader", "VAELoader", "EmptySD3LatentImage"} <= set(
        kinds["selfperc_prompt_to_prompt_flux.json"])
    p2z = p2p - {"SelfPerceptualPromptToPrompt"} | {"SelfPerceptualPix2PixZero"}
    assert p2z | {"EmptyLatentImage", "RandomNoise"} <= set(kinds["selfperc_pix2pix_zero.json"])
    assert p2z | {"LoadImage", "SelfPerceptualInvert", "DisableNoise"} <= set(kinds["selfperc_pix2pix_zero_photo.json"])
    assert {"LoadImage", "SelfPerceptualOptimizeEmbedding", "SelfPerceptualFineTune", "ConditioningAverage",
            "SelfPerceptualSampler", "SaveImage"} <= set(kinds["selfperc_imagic.json"])
    assert {"SelfPerceptualDirection", "SelfPerceptualObjective", "SelfPerceptualFineTune", "LoadImage",
            "SelfPerceptualSampler", "SaveImage"} <= set(kinds["selfperc_diffusion_clip.json"])
    assert {"SelfPerceptualSuperResolution", "SelfPerceptualObjective", "SelfPerceptualFineTune",
            "SelfPerceptualUpscaleEvaluate", "SD_4XUpscale_Conditioning", "SelfPerceptualSampler", "SaveImage"} <= set(
        kinds["selfperc_super_resolution.json"])


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
        with Image.open(server.base / img.get("type", "output") / img["subfolder"] / img["filename"]) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float32) / 255
    same, edited = heatmap("wf_a.png"), heatmap("wf_b.png")
    assert same.shape == edited.shape == (64, 96, 3)
    # identical images: distance 0 everywhere, so the overlay is exactly 0.6 * colormap(0) + 0.4 * image_a
    expected = 0.6 * np.array([0, 0, 4], np.float32) / 255 + 0.4 * np.asarray(a, np.float32) / 255
    assert np.abs(same - expected).max() <= 1.5 / 255
    assert np.abs(edited - same).max() > 0.2, "an edited image must light up the map"


@pytest.fixture(scope="module")
def eval_lora(server):
    """A LoRA of the tiny checkpoint, saved by the fine-tune workflow (2 steps)."""
    info = server.get("/object_info")
    folder = make_dataset(server.base / "input" / "wf_eval", names=["astronaut", "coffee", "camera", "chelsea"],
                          captions=False).name
    prompt = workflows.set_widgets(workflows.to_api(workflows.load("selfperc_fine_tune_compare.json"), info),
                                   ckpt_name="tiny_sd15.safetensors", dataset_folder=folder, resolution=64, width=64,
                                   height=64, batch_size=1, lora_name="selfperc/wf_eval_lora", steps=2,
                                   learning_rate=1e-2, overwrite=True)
    prompt["4"]["inputs"]["steps"] = 1
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    return folder, "selfperc/wf_eval_lora.safetensors"


def saved(server, entry, node):
    img = entry["outputs"][node]["images"][0]
    with Image.open(server.base / "output" / img["subfolder"] / img["filename"]) as im:
        return im.size


def test_evaluate_workflow_runs_and_bad_input_is_an_error_not_a_crash(server, eval_lora):
    folder, lora = eval_lora
    info = server.get("/object_info")
    prompt = workflows.set_widgets(workflows.to_api(workflows.load("selfperc_evaluate.json"), info),
                                   ckpt_name="tiny_sd15.safetensors", lora_name=lora, dataset_folder=folder,
                                   resolution=64, sample_count=4, steps=2, bootstraps=3)
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    w, h = saved(server, entry, "4")  # the table
    assert w > 200 and h > 100
    assert saved(server, entry, "5")[0] > 2 * 64  # base | fine-tuned columns

    one = make_dataset(server.base / "input" / "wf_eval_one", names=["coffee"], captions=False).name
    bad = workflows.set_widgets(json.loads(json.dumps(prompt)), dataset_folder=one)
    err = execution_error(server.run(bad))
    assert err is not None and "at least 2" in err["exception_message"] and "wf_eval_one" in err["exception_message"]
    assert execution_error(server.run(prompt)) is None  # the server keeps working


@pytest.mark.parametrize("mode,denoise", [("sample", 0.6), ("ilvr", 1.0), ("invert", 1.0)])
def test_real_image_ab_workflow_runs_in_each_mode(server, eval_lora, mode, denoise):
    _, lora = eval_lora
    Image.fromarray(photo("chelsea")).resize((64, 64)).save(server.base / "input" / "wf_real.png")
    info = server.get("/object_info")
    prompt = workflows.set_widgets(workflows.to_api(workflows.load("selfperc_real_image_ab.json"), info),
                                   ckpt_name="tiny_sd15.safetensors", lora_name=lora, image="wf_real.png",
                                   steps=3, denoise=denoise, mode=mode)
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    columns = 3 if mode != "sample" else 2  # reference/input | base | fine-tuned
    assert saved(server, entry, "6")[0] > columns * 64


def _edit_prompt(server, name, lora, steps=3):
    Image.fromarray(photo("chelsea")).resize((64, 64)).save(server.base / "input" / "wf_edit.png")
    info = server.get("/object_info")
    prompt = workflows.set_widgets(workflows.to_api(workflows.load(name), info), ckpt_name="tiny_sd15.safetensors",
                                   lora_name=lora, image="wf_edit.png", steps=steps)
    # beside the workflow: the photo through the VAE alone, what a perfect reconstruction decodes to
    prompt["100"] = {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}}
    prompt["101"] = {"class_type": "SaveImage", "inputs": {"images": ["100", 0], "filename_prefix": "wf_vae"}}
    return prompt


def images(server, entry, node):
    import numpy as np

    out = []
    for img in entry["outputs"][node]["images"]:
        with Image.open(server.base / img.get("type", "output") / img["subfolder"] / img["filename"]) as im:
            out.append(np.asarray(im.convert("RGB"), dtype=np.float32) / 255)
    return out


def test_direct_inversion_workflow_reconstructs_the_photo_and_edits_it(server, eval_lora):
    import numpy as np

    prompt = _edit_prompt(server, "selfperc_direct_inversion_edit.json", eval_lora[1])
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    recon, edit_base, edit_lora = images(server, entry, "23")
    (vae_only,) = images(server, entry, "101")
    assert recon.shape == (64, 64, 3)
    assert np.abs(recon - vae_only).max() <= 2 / 255  # the source prompt at cfg 7.5 returns the photo
    assert np.abs(edit_base - vae_only).max() > 0.05  # the target prompt edits it
    assert np.abs(edit_lora - edit_base).max() > 0  # the LoRA changes the edit (same inversion)


def test_null_text_workflow_runs_and_beats_plain_inversion_at_its_cfg(server, eval_lora):
    import re

    prompt = _edit_prompt(server, "selfperc_null_text_edit.json", eval_lora[1])
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    assert len(images(server, entry, "23")) == 3
    text = entry["outputs"]["9"]["text"][0]
    err, plain = map(float, re.search(r"MSE (\S+) vs plain DDIM inversion (\S+) at cfg 7.5", text).groups())
    assert err < plain, text


def _error_of(server, base):
    """Runs ``base`` changed by a function and returns the execution error's message (there must be one)."""
    def error_of(change):
        prompt = json.loads(json.dumps(base))
        change(prompt)
        err = execution_error(server.run(prompt))
        assert err is not None
        return err["exception_message"]
    return error_of


def test_edit_workflows_refuse_bad_input_by_name_and_the_server_keeps_working(server, eval_lora):
    base = _edit_prompt(server, "selfperc_null_text_edit.json", eval_lora[1], steps=2)
    error_of = _error_of(server, base)

    def no_negative(p):
        del p["8"]["inputs"]["negative"]
    assert "no negative conditioning" in error_of(no_negative)
    assert "cfg 1.0" in error_of(lambda p: p["9"]["inputs"].update(cfg=1.0))
    assert "sampler 'euler_ancestral'" in error_of(lambda p: p["13"]["inputs"].update(sampler_name="euler_ancestral"))

    def other_vae(p):
        p["50"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
        p["8"]["inputs"]["latent"] = ["50", 0]
    assert "another family's VAE" in error_of(other_vae)
    entry = server.run(base)
    assert execution_error(entry) is None, execution_error(entry)


def _p2p_prompt(server, name, steps=3):
    Image.fromarray(photo("chelsea")).resize((64, 64)).save(server.base / "input" / "wf_p2p.png")
    info = server.get("/object_info")
    return workflows.set_widgets(workflows.to_api(workflows.load(name), info), ckpt_name="tiny_sd15.safetensors",
                                 image="wf_p2p.png", steps=steps, width=64, height=64)


def test_prompt_to_prompt_workflow_makes_source_and_edit_and_the_map_grid(server):
    prompt = _p2p_prompt(server, "selfperc_prompt_to_prompt.json")
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    source, target = images(server, entry, "10")
    assert source.shape == target.shape == (64, 64, 3)
    assert abs(source - target).max() > 0.01  # cat -> dog changed the target
    (maps,) = images(server, entry, "12")
    words = len("a photo of a dog riding a bicycle".split())  # one CLIP token each here
    assert maps.shape[1] == words * 96 and maps.std() > 0.05


def test_prompt_to_prompt_photo_workflow_returns_the_photo_as_source(server):
    import numpy as np

    prompt = _p2p_prompt(server, "selfperc_prompt_to_prompt_photo.json")
    prompt["100"] = {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": ["1", 2]}}
    prompt["101"] = {"class_type": "SaveImage", "inputs": {"images": ["100", 0], "filename_prefix": "wf_p2p_vae"}}
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    source, target = images(server, entry, "10")
    (vae_only,) = images(server, entry, "101")
    assert np.abs(source - vae_only).max() <= 2 / 255  # Direct Inversion: the source branch is the photo
    assert np.abs(target - vae_only).max() > 0.05  # cat -> tiger edits it


def test_prompt_to_prompt_refuses_bad_input_by_name_and_the_server_keeps_working(server):
    base = _p2p_prompt(server, "selfperc_prompt_to_prompt.json", steps=2)
    error_of = _error_of(server, base)

    assert "source prompt has 8 tokens and the target 9" in error_of(
        lambda p: p["3"]["inputs"].update(target_prompt="a photo of a fluffy dog riding a bicycle"))
    assert "'zebra' is not in the target prompt" in error_of(
        lambda p: p["3"]["inputs"].update(mode="reweight", reweight="zebra:2"))
    assert "'zebra' is in neither" in error_of(lambda p: p["3"]["inputs"].update(blend_words="zebra"))
    assert "sampler 'euler_ancestral' adds its own noise" in error_of(
        lambda p: p["5"]["inputs"].update(sampler_name="euler_ancestral"))

    def transformer(p):
        p["50"] = {"class_type": "SelfPercTestTinyFamily", "inputs": {"family": "qwen_image", "side": 4}}
        p["3"]["inputs"]["model"] = ["50", 0]
    assert "not a UNet" in error_of(transformer)
    entry = server.run(base)
    assert execution_error(entry) is None, execution_error(entry)


def test_prompt_to_prompt_flux_workflow_runs_on_a_tiny_flux_and_refuses_bad_input_by_name(server):
    info = server.get("/object_info")
    base = workflows.set_widgets(workflows.to_api(workflows.load("selfperc_prompt_to_prompt_flux.json"), info),
                                 steps=3, width=64, height=64)
    # the three loaders' files cannot exist here: the tiny Flux of the host's class, its tiny CLIP-L + T5 encoder
    # (the real tokenizers) and the stand-in VAE take their places
    base["1"] = {"class_type": "SelfPercTestTinyFamily", "inputs": {"family": "flux", "side": 8}}
    base["2"] = {"class_type": "SelfPercTestTinyClip", "inputs": {"family": "flux"}}
    del base["13"]
    base["9"]["inputs"]["vae"] = ["1", 2]
    entry = server.run(base)
    assert execution_error(entry) is None, execution_error(entry)
    source, target = images(server, entry, "10")
    assert source.shape == target.shape == (64, 64, 3)
    (maps,) = images(server, entry, "12")
    assert maps.shape[1] % 96 == 0 and maps.shape[1] // 96 >= len("a photo of a dog riding a bicycle".split())
    error_of = _error_of(server, base)
    assert "'zebra' is not in the target prompt" in error_of(
        lambda p: p["3"]["inputs"].update(mode="reweight", reweight="zebra:2"))
    assert "reads 64-wide text" in error_of(lambda p: p["2"]["inputs"].update(family="sd3"))  # another family's CLIP

    def pix2pix_zero(p):
        p["3"] = {"class_type": "SelfPerceptualPix2PixZero",
                  "inputs": {"model": ["1", 0], "clip": ["2", 0], "negative": ["14", 0], "cfg": 1.0,
                             "source_prompt": "a cat", "source_sentences": "a cat", "target_sentences": "a dog",
                             "strength": 1.0, "guidance": 1.0}}
    assert "Pix2Pix-Zero's map guidance here differentiates UNet" in error_of(pix2pix_zero)
    entry = server.run(base)
    assert execution_error(entry) is None, execution_error(entry)


def test_pix2pix_zero_workflow_makes_source_and_edit_and_refuses_bad_input_by_name(server):
    prompt = _p2p_prompt(server, "selfperc_pix2pix_zero.json")
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    source, edit = images(server, entry, "10")
    assert source.shape == edit.shape == (64, 64, 3)
    assert abs(source - edit).max() > 0.01  # the cat -> dog direction changed the edit
    (maps,) = images(server, entry, "12")
    assert maps.shape[1] == len("a photo of a cat".split()) * 96 and maps.std() > 0.05

    error_of = _error_of(server, prompt)
    assert "target_sentences is empty" in error_of(lambda p: p["3"]["inputs"].update(target_sentences=" \n"))
    assert "sampler 'dpmpp_2m'" in error_of(lambda p: p["5"]["inputs"].update(sampler_name="dpmpp_2m"))

    def transformer(p):
        p["50"] = {"class_type": "SelfPercTestTinyFamily", "inputs": {"family": "qwen_image", "side": 4}}
        p["3"]["inputs"]["model"] = ["50", 0]
    assert "not a UNet" in error_of(transformer)
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)


def test_pix2pix_zero_photo_workflow_returns_the_photo_as_source_and_edits_it(server):
    import numpy as np

    prompt = _p2p_prompt(server, "selfperc_pix2pix_zero_photo.json")
    prompt["100"] = {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": ["1", 2]}}
    prompt["101"] = {"class_type": "SaveImage", "inputs": {"images": ["100", 0], "filename_prefix": "wf_p2z_vae"}}
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    source, edit = images(server, entry, "10")
    (vae_only,) = images(server, entry, "101")
    assert np.abs(source - vae_only).max() <= 2 / 255  # Direct Inversion: the source branch is the photo
    assert np.abs(edit - vae_only).max() > 0.05  # the direction edits it


def test_imagic_workflow_optimises_fine_tunes_and_samples_and_refuses_a_batch(server):
    import re

    Image.fromarray(photo("chelsea")).resize((64, 64)).save(server.base / "input" / "wf_imagic.png")
    folder = make_dataset(server.base / "input" / "wf_imagic", names=["chelsea"], captions=False).name
    prompt = workflows.set_widgets(workflows.to_api(workflows.load("selfperc_imagic.json"), server.get("/object_info")),
                                   ckpt_name="tiny_sd15.safetensors", image="wf_imagic.png", dataset_folder=folder,
                                   resolution=64, width=64, height=64, lora_name="selfperc/wf_imagic", steps=3)
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    before, after = map(float, re.search(r"fixed draws (\S+) \(input embedding\) -> (\S+) \(optimised\)",
                                         entry["outputs"]["6"]["text"][0]).groups())
    assert after != before  # the embedding was trained (same draws before and after)
    assert (server.base / "models" / "loras" / "selfperc" / "wf_imagic.safetensors").is_file()
    (grid,) = images(server, entry, "13")
    assert grid.shape[1] >= 2 * 64  # base | fine-tuned

    error_of = _error_of(server, prompt)

    def batch_of_two(p):
        p["50"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["3", 0], "amount": 2}}
        p["6"]["inputs"]["latent"] = ["50", 0]
    assert "the latent holds 2 images" in error_of(batch_of_two)


def test_diffusion_clip_workflow_fine_tunes_along_the_direction_and_edits_the_photo_and_refuses_bad_input(server):
    Image.fromarray(photo("chelsea")).resize((64, 64)).save(server.base / "input" / "wf_dclip.png")
    folder = make_dataset(server.base / "input" / "wf_dclip", names=["chelsea", "coffee"], captions=False).name
    prompt = workflows.set_widgets(
        workflows.to_api(workflows.load("selfperc_diffusion_clip.json"), server.get("/object_info")),
        ckpt_name="tiny_sd15.safetensors", image="wf_dclip.png", dataset_folder=folder, resolution=64,
        lora_name="selfperc/wf_dclip", rollout_steps=2, inversion_steps=2)
    prompt["6"]["inputs"]["steps"] = 3
    prompt["10"]["inputs"]["steps"] = 4
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    lora = server.base / "models" / "loras" / "selfperc" / "wf_dclip.safetensors"
    from safetensors import safe_open
    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["direction_space"] == "denoiser" and f.metadata()["steps"] == "3"
    (grid,) = images(server, entry, "11")
    assert grid.shape[1] >= 3 * 64  # input | base | fine-tuned

    error_of = _error_of(server, prompt)

    def t0_past_the_schedule(p):
        p["4"]["inputs"]["t0"] = 0.95
    assert "t0 0.95 is outside the schedule" in error_of(t0_past_the_schedule)

    def clip_without_vision(p):
        p["4"]["inputs"]["space"] = "clip"
    assert "'clip' needs a CLIP_VISION" in error_of(clip_without_vision)

    def same_texts(p):
        p["4"]["inputs"]["target"] = ["2", 0]
    assert "identical: there is no direction" in error_of(same_texts)
    assert execution_error(server.run(prompt)) is None  # the server keeps working


def test_super_resolution_workflow_fine_tunes_evaluates_and_upscales_a_base_sample_and_refuses_bad_input(server):
    """The upscaler is the tiny SD x4 (the test-only node in the loader's place: no x4 checkpoint can be built
    here with its 1024-wide OpenCLIP); the base model is the tiny SD1.5 checkpoint."""
    folder = make_dataset(server.base / "input" / "wf_highres", names=["chelsea", "coffee"], captions=False).name
    held = make_dataset(server.base / "input" / "wf_held_out", names=["camera", "astronaut"], captions=False).name
    prompt = workflows.to_api(workflows.load("selfperc_super_resolution.json"), server.get("/object_info"))
    prompt["1"] = {"class_type": "SelfPercTestTinyFamily", "inputs": {"family": "sd_x4", "side": 4}}
    prompt["8"]["inputs"]["ckpt_name"] = "tiny_sd15.safetensors"
    prompt = workflows.set_widgets(prompt, resolution=64, width=64, height=64, lora_name="selfperc/wf_upscaler",
                                   bootstraps=10, scale_ratio=2.0)
    prompt["4"]["inputs"].update(steps=2, dataset_folder=folder)
    prompt["6"]["inputs"].update(steps=2, dataset_folder=held)
    for n in ("11", "15"):
        prompt[n]["inputs"]["steps"] = 2
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    from safetensors import safe_open
    with safe_open(str(server.base / "models" / "loras" / "selfperc" / "wf_upscaler.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["super_resolution_factor"] == "4" and json.loads(meta["super_resolution"])["noise_augmentation_max"] == 0.2
    (table,) = images(server, entry, "7")
    assert table.shape[0] > 100  # the evaluator's table
    (grid,) = images(server, entry, "16")
    assert grid.shape[1] >= 2 * 128  # base upscaler | fine-tuned, each 2 x the 64 px base sample

    error_of = _error_of(server, prompt)

    def base_model_as_upscaler(p):
        p["4"]["inputs"]["model"] = ["8", 0]
    assert "has no low-res concat input" in error_of(base_model_as_upscaler)

    small = make_dataset(server.base / "input" / "wf_small", names=["coffee"], captions=False,
                         sizes={"coffee": (60, 48)}).name

    def low_res_targets(p):
        p["4"]["inputs"]["dataset_folder"] = small
    assert "60x48 would be enlarged to cover 64x64" in error_of(low_res_targets)
    assert execution_error(server.run(prompt)) is None  # the server keeps working
