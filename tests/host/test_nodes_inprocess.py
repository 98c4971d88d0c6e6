"""The fine-tune, sampler and distance nodes called in-process on real ModelPatchers (the server tier runs them through the API)."""
import logging
import os
from pathlib import Path

import pytest
import torch

from dev.datasets import make_dataset
from tests.host.models import as_parameterization, fine_tune_inputs, load_checkpoint

pytestmark = pytest.mark.host

TRAIN_DEFAULTS = dict(steps=4, learning_rate=1e-3, rank=4, alpha=4.0, batch_size=2, resolution=64,
                      resize_mode="center_crop", seed=0, feature_layer="mid_block", t_prime="uniform", t_prime_min=0.0,
                      t_prime_max=1.0, distance="mse", normalize_features=False, mse_weight=0.0,
                      gradient_checkpointing=True, training_dtype="auto", overwrite=False, save_every=0,
                      preview_every=0)


@pytest.fixture(scope="module")
def models(comfy, tiny_models):
    return load_checkpoint(str(tiny_models["checkpoint"]))


@pytest.fixture(scope="module")
def photos(comfy):
    return make_dataset(comfy / "input" / "photos").name


class node:
    """A node class as ComfyUI's executor runs it: hidden inputs set, execute under inference_mode."""

    def __init__(self, pack, name):
        import selfperc_pack.nodes as n

        self.cls = getattr(n, name).PREPARE_CLASS_CLONE({"unique_id": "1"})

    def execute(self, **kw):
        with torch.inference_mode():
            return self.cls.execute(**kw)


def train(pack, model, vae, folder, **kw):
    args = dict(TRAIN_DEFAULTS, lora_name=kw.pop("lora_name", "t/run"))
    args.update(kw)
    return node(pack, "SelfPerceptualFineTune").execute(model=model, vae=vae, dataset_folder=folder,
                                                        **fine_tune_inputs(**args))


def sample_base(model, seed=3):
    import comfy.sample

    latent = torch.zeros(1, 4, 8, 8)
    cond = [[torch.zeros(1, 77, 768), {}]]
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), 3, 1.0, "euler", "normal", cond, cond,
                               latent, disable_pbar=True, seed=seed)


@pytest.mark.parametrize("kind", ["eps", "v_zsnr", "flow"])
def test_fine_tune_saves_a_lora_core_loraloader_loads_fully_and_base_is_untouched(pack, models, photos, comfy,
                                                                                 kind, caplog):
    import folder_paths
    from safetensors import safe_open

    from nodes import LoraLoaderModelOnly

    model, clip, vae = models
    model = as_parameterization(model, kind)
    before = sample_base(model)
    out = train(pack, model, vae, photos, clip=clip, lora_name=f"t/{kind}")
    tuned, lora_sd, loss_map, name = out.args[:4]
    assert name == f"t/{kind}.safetensors"
    assert len(loss_map["loss"]) == 4 and all(torch.isfinite(torch.tensor(loss_map["loss"])))
    path = folder_paths.get_full_path_or_raise("loras", name)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # as any file the server creates, not 0600
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(lora_sd)
    assert meta["steps"] == "4" and meta["feature_layer"] == "mid_block" and len(meta["base_model_hash"]) == 16
    assert meta["parameterization"] == {"eps": "eps", "v_zsnr": "v", "flow": "flow"}[kind]
    assert meta["mse_space"] == "native"

    with caplog.at_level(logging.WARNING):
        loaded = LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)[0]
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    n_adapted = sum(1 for k in lora_sd if k.endswith(".lora_up.weight"))
    assert len(loaded.patches) == n_adapted > 20

    after = sample_base(model)
    assert torch.equal(before, after), "the base MODEL samples differently after training"
    assert not torch.equal(sample_base(tuned), before), "the trained LoRA changes nothing"
    torch.testing.assert_close(sample_base(loaded), sample_base(tuned), rtol=1e-5, atol=1e-5)


def test_the_mse_baseline_trains_in_the_chosen_space_and_records_it(pack, models, photos):
    """perceptual_weight 0, mse_weight 1: native and x0 space are different losses on the same draws (x0 space is
    c_out(sigma)^2 = sigma^2 times the eps-MSE per image for this eps model), and the file says which it was."""
    import json

    import folder_paths
    from safetensors import safe_open

    model, clip, vae = models
    runs = {space: train(pack, model, vae, photos, lora_name=f"space/{space}", steps=2, perceptual_weight=0.0,
                         mse_weight=1.0, mse_space=space).args for space in ("native", "x0")}
    native, x0 = runs["native"][2]["loss"], runs["x0"][2]["loss"]
    assert all(a > 0 for a in native + x0) and native[0] != pytest.approx(x0[0], rel=1e-2)
    for space in runs:
        with safe_open(folder_paths.get_full_path_or_raise("loras", f"space/{space}.safetensors"), "pt") as f:
            meta = f.metadata()
        assert meta["mse_space"] == space and json.loads(meta["settings"])["mse_space"] == space


def test_resume_continues_exactly(pack, models, photos):
    """4 steps straight == 2 steps, then resume for 2 (same seed): same LoRA, same loss curve."""
    model, clip, vae = models
    straight = train(pack, model, vae, photos, lora_name="r/straight", steps=4).args
    half = train(pack, model, vae, photos, lora_name="r/half", steps=2).args
    resumed = train(pack, model, vae, photos, lora_name="r/resumed", steps=2, resume_from="r/half.safetensors").args
    assert resumed[2]["loss"] == pytest.approx(straight[2]["loss"], rel=1e-5)
    for k in straight[1]:
        torch.testing.assert_close(resumed[1][k], straight[1][k], rtol=1e-5, atol=1e-7)
    assert half[2]["loss"] == pytest.approx(straight[2]["loss"][:2], rel=1e-6)


def test_absurd_learning_rate_stops_with_the_step_named_and_keeps_last_checkpoint(pack, models, photos):
    import folder_paths

    model, clip, vae = models
    with pytest.raises(FloatingPointError, match=r"at step \d+") as e:
        train(pack, model, vae, photos, lora_name="nan/run", steps=40, learning_rate=1.0, save_every=1,
              mse_weight=1.0)
    assert "last finite checkpoint is run.safetensors" in str(e.value)
    path = folder_paths.get_full_path_or_raise("loras", "nan/run.safetensors")
    import comfy.utils
    sd = comfy.utils.load_torch_file(path)
    assert all(torch.isfinite(v).all() for v in sd.values())


def test_existing_file_is_not_overwritten(pack, models, photos):
    model, clip, vae = models
    a = train(pack, model, vae, photos, lora_name="same/name", steps=1).args[3]
    b = train(pack, model, vae, photos, lora_name="same/name", steps=1).args[3]
    assert (a, b) == ("same/name.safetensors", "same/name_00001.safetensors")
    c = train(pack, model, vae, photos, lora_name="same/name", steps=1, overwrite=True).args[3]
    assert c == a


@pytest.mark.parametrize("bad", ["../evil", "/abs/path", "a/b/c", "..", "x/../../y", ""])
def test_lora_names_that_escape_models_loras_are_refused(pack, models, photos, bad):
    model, clip, vae = models
    with pytest.raises(ValueError, match="not allowed|escapes"):
        train(pack, model, vae, photos, lora_name=bad, steps=1)


def test_dataset_outside_input_directory_is_refused(pack, models, tmp_path, monkeypatch):
    model, clip, vae = models
    make_dataset(tmp_path / "outside", names=["astronaut"])
    with pytest.raises(PermissionError, match="outside ComfyUI's input directory"):
        train(pack, model, vae, "../" + tmp_path.name, steps=1)
    with pytest.raises(PermissionError, match="SELFPERC_ALLOW_ANY_DATASET_PATH"):
        train(pack, model, vae, "", dataset_path=str(tmp_path / "outside"), steps=1)
    monkeypatch.setenv("SELFPERC_ALLOW_ANY_DATASET_PATH", "1")
    out = train(pack, model, vae, "", dataset_path=str(tmp_path / "outside"), steps=1, lora_name="abs/ok")
    assert out.args[3] == "abs/ok.safetensors"


def test_distance_identical_images_zero_and_local_edit_lights_up(pack, models):
    from dev.datasets import photo

    model, clip, vae = models
    img = torch.from_numpy(photo("astronaut")).float()[None] / 255
    img = torch.nn.functional.interpolate(img.permute(0, 3, 1, 2), size=(128, 128)).permute(0, 2, 3, 1)
    edited = img.clone()
    edited[:, 80:120, 80:120, :] = torch.tensor([0.0, 1.0, 0.0])  # a green patch, bottom right
    dist = node(pack, "PerceptualDistance")
    kw = dict(model=model, vae=vae, noise_level=0.2, seed=0, feature_layer="mid_block", distance="mse", overlay=1.0)
    heat_same, d_same = dist.execute(image_a=img, image_b=img.clone(), **kw).args
    assert d_same == 0.0
    assert torch.allclose(heat_same, heat_same[0, 0, 0])  # a flat map
    heat, d = dist.execute(image_a=img, image_b=edited, **kw).args
    assert d > 0 and heat.shape == img.shape
    brightness = heat.mean(-1)[0]
    inside = brightness[80:120, 80:120].mean()
    outside = brightness[:48, :48].mean()
    assert inside > 2 * outside, (inside, outside)


def test_sampler_uses_identical_noise_and_returns_a_labelled_grid(pack, models):
    model, clip, vae = models
    smp = node(pack, "SelfPerceptualSampler")
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    kw = dict(latent=latent, seed=5, steps=3, sampler_name="euler", scheduler="normal", cfg=1.0, cfg_rescale=0.0,
              denoise=1.0, vae=vae)
    out_latent, grid = smp.execute(model=model, base_model=model, **kw).args
    assert grid.shape[0] == 1 and grid.shape[2] > 2 * 64  # two columns of 64 px images
    left, right = grid[0, 18:, :64], grid[0, 18:, -64:]
    torch.testing.assert_close(left, right)  # same model + same noise -> the same pictures
    alone = smp.execute(model=model, **kw).args[0]
    torch.testing.assert_close(alone["samples"], out_latent["samples"])
    other_seed = smp.execute(model=model, **dict(kw, seed=6)).args[0]
    assert not torch.equal(other_seed["samples"], out_latent["samples"])


def test_out_of_memory_is_reported_with_what_to_lower_and_leaves_the_model_clean(pack, models, photos, monkeypatch):
    """A GPU OOM cannot happen on this CPU machine: inject torch's own OOM error into a training step."""
    import comfy.model_management
    from selfperc_pack.selfperc_core import loop

    model, clip, vae = models
    before = sample_base(model)

    def oom(self):
        raise comfy.model_management.OOM_EXCEPTION("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(loop.Trainer, "step", oom)
    with pytest.raises(MemoryError, match="batch_size .*resolution.*gradient_checkpointing"):
        train(pack, model, vae, photos, lora_name="oom/run", batch_size=2)
    assert not any(getattr(m, "weight_function", []) or m._forward_hooks for m in model.model.modules())
    assert torch.equal(sample_base(model), before)


def test_progress_bar_gets_every_step_and_a_sample_preview(pack, models, photos, monkeypatch):
    import comfy.utils

    seen = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: seen.append((value, total, preview)))
    model, clip, vae = models
    train(pack, model, vae, photos, lora_name="pbar/run", steps=4, preview_every=2)
    steps = [v for v, t, p in seen if t == 4]
    assert steps[-4:] == [1, 2, 3, 4]
    previews = [p for v, t, p in seen if t == 4 and p is not None]
    assert len(previews) == 2 and previews[0][0] == "JPEG" and previews[0][1].size == (64, 64)


def test_accumulation_schedule_and_optimizer_through_the_node(pack, models, photos):
    """gradient_accumulation k x batch 1 == batch k through the node; the schedule and optimizer are recorded."""
    import folder_paths
    from safetensors import safe_open

    model, clip, vae = models
    big = train(pack, model, vae, photos, lora_name="acc/big", steps=2, batch_size=2).args
    acc = train(pack, model, vae, photos, lora_name="acc/acc", steps=2, batch_size=1, gradient_accumulation=2,
                optimizer="adamw", lr_schedule="cosine", warmup_steps=1).args
    # 2 steps, 1 of warm-up: factors (0+1)/1 = 1 and cosine at p = 0, 1: the same updates as constant
    assert acc[2]["loss"] == pytest.approx(big[2]["loss"], rel=1e-5)
    # AdamW's first steps move a weight by ~lr * sign(grad): a gradient that is ~0 may flip (float sums in
    # another order), up to 2 * lr * steps for that weight; all others agree
    diffs = torch.cat([(acc[1][k] - big[1][k]).abs().flatten() for k in big[1]])
    assert diffs.max() <= 2 * 1e-3 * 2 + 1e-6 and diffs.mean() < 1e-6
    with safe_open(folder_paths.get_full_path_or_raise("loras", acc[3]), "pt") as f:
        meta = f.metadata()
    assert meta["gradient_accumulation"] == "2"
    assert '"lr_schedule": "cosine"' in meta["settings"] and '"warmup_steps": 1' in meta["settings"]
    sgd = train(pack, model, vae, photos, lora_name="acc/sgd", steps=2, optimizer="sgd").args
    assert all(torch.isfinite(torch.tensor(sgd[2]["loss"])))


def test_ema_weights_saved_beside_or_instead_and_resume_keeps_the_raw_weights(pack, models, photos, caplog):
    import folder_paths
    from safetensors.torch import load_file

    from nodes import LoraLoaderModelOnly

    model, clip, vae = models
    both = train(pack, model, vae, photos, lora_name="ema/both", steps=3, ema_decay=0.5, save_weights="raw+ema").args
    raw = load_file(folder_paths.get_full_path_or_raise("loras", "ema/both.safetensors"))
    ema = load_file(folder_paths.get_full_path_or_raise("loras", "ema/both_ema.safetensors"))
    assert raw.keys() == ema.keys()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if k.endswith("lora_down.weight"))
    for k in raw:
        torch.testing.assert_close(raw[k], both[1][k])  # the node's outputs are the raw weights here
    with caplog.at_level(logging.WARNING):
        LoraLoaderModelOnly().load_lora_model_only(model, "ema/both_ema.safetensors", 1.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    # ema in the LoRA file: a resumed run continues from the raw weights kept in the state
    straight = train(pack, model, vae, photos, lora_name="ema/straight", steps=4, ema_decay=0.5).args
    train(pack, model, vae, photos, lora_name="ema/half", steps=2, ema_decay=0.5, save_weights="ema")
    resumed = train(pack, model, vae, photos, lora_name="ema/resumed", steps=2, ema_decay=0.5,
                    resume_from="ema/half.safetensors").args
    assert resumed[2]["loss"] == pytest.approx(straight[2]["loss"], rel=1e-5)
    with pytest.raises(ValueError, match="needs an EMA"):
        train(pack, model, vae, photos, lora_name="ema/x", steps=1, save_weights="ema")


def test_validation_samples_and_loss_curve(pack, models, comfy):
    import json

    import folder_paths
    from safetensors import safe_open
    from selfperc_pack.nodes.data import held_out

    model, clip, vae = models
    folder = make_dataset(comfy / "input" / "val_photos", names=["astronaut", "coffee", "chelsea"]).name
    out = train(pack, model, vae, folder, clip=clip, lora_name="val/run", steps=2, batch_size=1,
                validation_split=0.34, validation_every=1, sample_prompts="a photo of a cat\n\na red car",
                sample_every=1)
    curve = out.args[4]
    assert curve.shape == (1, 384, 768, 3) and curve.min() < 0.5 < curve.max()  # lines drawn on white
    with safe_open(folder_paths.get_full_path_or_raise("loras", "val/run.safetensors"), "pt") as f:
        val = json.loads(f.metadata()["validation"])
    assert [v["step"] for v in val] == [0, 1, 2]
    assert all(v["self_perceptual"] > 0 and v["mse"] > 0 for v in val)
    assert len({v["self_perceptual"] for v in val}) > 1, "validation must follow the weights"
    shown = out.ui["images"]
    assert [s["filename"] for s in shown] == ["step_000001.png", "step_000002.png"]
    for s in shown:
        from PIL import Image

        with Image.open(Path(folder_paths.get_output_directory()) / s["subfolder"] / s["filename"]) as im:
            assert im.width > 2 * 64  # two prompts side by side
    assert held_out(3, 0.34, 0) == held_out(3, 0.34, 0) and len(held_out(3, 0.34, 0)) == 1
    assert held_out(1, 0.5, 0) == [] and len(held_out(10, 0.5, 1)) == 5
    with pytest.raises(ValueError, match="need the CLIP input"):
        train(pack, model, vae, folder, lora_name="val/x", steps=1, sample_prompts="a cat")


def test_loss_curve_smoothing_formula(pack):
    from selfperc_pack.nodes.plots import smoothed

    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: a constant stays put
    m1, m2 = 0.1 * 1.0, 0.9 * 0.1 + 0.1 * 3.0
    assert smoothed([1.0, 3.0]) == pytest.approx([m1 / 0.1, m2 / (1 - 0.81)])


def test_a_lora_and_state_out_of_step_are_refused(pack, models, photos):
    import folder_paths
    from selfperc_pack.nodes import files

    model, clip, vae = models
    train(pack, model, vae, photos, lora_name="step/a", steps=1)
    train(pack, model, vae, photos, lora_name="step/b", steps=2)
    loras = Path(folder_paths.get_folder_paths("loras")[0]) / "step"
    (loras / "a.selfperc_state").write_bytes((loras / "b.selfperc_state").read_bytes())  # a state of step 2
    with pytest.raises(files.StateFileError, match="a.selfperc_state is at step 2 but a.safetensors at step 1"):
        train(pack, model, vae, photos, lora_name="step/c", steps=1, resume_from="step/a.safetensors")
