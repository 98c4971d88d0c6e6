"""The super-resolution fine-tune (SR3 / CDM) on a tiny SD x4 upscaler built in-process from ComfyUI's own class:
it learns to upscale (beats bicubic on held-out pairs, and needs its low-res condition to), every step draws a new
condition (resumed runs the same ones), the LoRA loads in core nodes as trained, and bad input is refused before
work, naming it."""
import dataclasses
import logging

import pytest
import torch

from dev.datasets import make_dataset
from dev.stand_ins import PatchVAE
from dev.tiny_families import tiny_model
from tests.host.models import watch_trainers
from tests.host.test_nodes_inprocess import train

pytestmark = pytest.mark.host
F, SIDE = 4, 16  # the upscaler's factor; the toy high-res side (a 4x4 low-res image)


def toy_pairs(n: int, seed: int):
    """High-res images of 4x4-pixel cells (a low-res image upscaled by nearest neighbour): their low-res image
    determines them, and bicubic interpolation blurs every cell edge. Latent = (RGB, grey) at the high-res size."""
    from selfperc_pack.selfperc_core.super_resolution import downscale

    g = torch.Generator().manual_seed(seed)
    cells = torch.rand((n, 3, SIDE // F, SIDE // F), generator=g) * 2 - 1
    high = cells.repeat_interleave(F, -1).repeat_interleave(F, -2)
    return torch.cat([high, high.mean(1, keepdim=True)], 1), downscale(high, F)


def upscale(mp, low: torch.Tensor, seed: int) -> torch.Tensor:
    """Core sampling of the upscaler from noise with the low-res condition as SD_4XUpscale_Conditioning gives it
    (no augmentation), in the model's latent space."""
    import comfy.sample

    out = []
    for j in range(len(low)):
        c = [[torch.zeros(1, 3, 64), {"concat_image": low[j:j + 1], "noise_augmentation": 0.0}]]
        lat = torch.zeros(1, 4, SIDE, SIDE)
        out.append(comfy.sample.sample(mp, comfy.sample.prepare_noise(lat, seed + j), 10, 1.0, "euler", "karras", c,
                                       c, lat, disable_pbar=True, seed=seed + j))
    return mp.model.process_latent_in(torch.cat(out))


def test_a_tiny_upscaler_trained_on_pairs_beats_bicubic_and_needs_its_low_res_condition(pack):
    """The pack's loop (the plain-MSE baseline, all weights) with the SR condition (drawn per step, augmented)
    trains the upscaler to beat bicubic on held-out pairs; with the condition zeroed it loses that."""
    from selfperc_pack.nodes import inputs
    from selfperc_pack.nodes import super_resolution as sr
    from selfperc_pack.selfperc_core.loop import SampleExtras, Trainer, TrainSettings
    from selfperc_pack.selfperc_core.super_resolution import Degradation, bicubic

    from tests.host.models import session

    mp = tiny_model("sd_x4")
    x0, low = toy_pairs(64, 0)
    task = sr.SuperResolution(Degradation(noise_augmentation_max=0.1))
    with torch.inference_mode(False), session(pack, mp, adapter=False, checkpointing=False) as ses:
        base = inputs.model_inputs(ses.mp, [[torch.zeros(1, 3, 64), {}]], (4, SIDE, SIDE))
        condition = sr.condition_fn(ses.mp, list(low), [(4, SIDE, SIDE)] * len(low), task)
        params = list(ses.mp.model.diffusion_model.parameters())
        for p in params:
            p.requires_grad_(True)
        settings = TrainSettings(steps=500, learning_rate=2e-3, batch_size=8, perceptual_weight=0.0, mse_weight=1.0)
        trainer = Trainer(params, list(x0), [base] * len(x0), ses.view, settings, conditions=SampleExtras(fresh=condition))
        for _ in range(settings.steps):
            trainer.step()
        for p in params:
            p.requires_grad_(False)
        held_x0, held_low = toy_pairs(16, 1)
        target = held_x0[:, :3]
        model_mse = (upscale(ses.mp, held_low, 0)[:, :3] - target).pow(2).mean().item()
        blind_mse = (upscale(ses.mp, torch.zeros_like(held_low), 0)[:, :3] - target).pow(2).mean().item()
    bicubic_mse = (bicubic(held_low, F) - target).pow(2).mean().item()
    print(f"held-out MSE: upscaler {model_mse:.4f}, bicubic {bicubic_mse:.4f}, condition zeroed {blind_mse:.4f}")
    assert model_mse < 0.8 * bicubic_mse, (model_mse, bicubic_mse)
    assert blind_mse > 2 * bicubic_mse, (blind_mse, bicubic_mse)


def test_every_step_draws_a_new_condition_and_a_resumed_run_draws_the_same(pack):
    """The augmentation level (the model's y) and the degraded low-res image change per step and sample; 2 steps,
    the state, and 2 more equal 4 straight (losses and weights)."""
    from selfperc_pack.nodes import inputs
    from selfperc_pack.nodes import super_resolution as sr
    from selfperc_pack.selfperc_core.loop import SampleExtras, Trainer, TrainSettings
    from selfperc_pack.selfperc_core.super_resolution import Degradation

    from tests.host.models import session

    x0, low = toy_pairs(4, 2)
    task = sr.SuperResolution(Degradation(blur_max=1.0, noise_augmentation_max=0.5, jpeg_min_quality=50))
    settings = TrainSettings(steps=4, learning_rate=1e-2, batch_size=2, seed=3)

    def run(steps: list[int]):
        seen, losses = [], []
        with torch.inference_mode(False), session(pack, tiny_model("sd_x4"), rank=2, alpha=2.0) as ses:
            base = inputs.model_inputs(ses.mp, [[torch.zeros(1, 3, 64), {}]], (4, SIDE, SIDE))
            every = sr.condition_fn(ses.mp, list(low), [(4, SIDE, SIDE)] * 4, task)

            def condition(i, c, seed):
                out = every(i, c, seed)
                seen.append((int(out["y"].cond), out["c_concat"].cond.clone()))
                return out
            read = []  # the low-res input each pass read: the online model's, then the frozen model's

            def spy(fn):
                return lambda x, sg, c: read.append(c["c_concat"].clone()) or fn(x, sg, c)
            view = dataclasses.replace(ses.view, predict_x0=spy(ses.view.predict_x0),
                                       frozen_features=spy(ses.view.frozen_features))
            state = None
            for n in steps:
                tr = Trainer(ses.params, list(x0), [base] * 4, view, settings, conditions=SampleExtras(fresh=condition))
                if state is not None:
                    tr.load_state_dict(state)
                while tr.step_count < n:
                    losses.append(tr.step().loss.item())
                state = tr.state_dict()
            # each step: the online pass, then the frozen passes of the real and the estimated image, all on the
            # step's own degraded low-res input
            assert len(read) == 3 * len(losses) and all(torch.equal(a, b) for k in range(0, len(read), 3)
                                                        for a, b in ((read[k], read[k + 1]), (read[k], read[k + 2])))
            assert torch.equal(read[0], torch.cat([c for _, c in seen[:2]]))
            return seen, losses, [p.detach().clone() for p in ses.params]

    seen, straight, weights = run([4])
    levels = [y for y, _ in seen]
    assert len(seen) == 8 and len(set(levels)) >= 6 and all(0 <= y <= 175 for y in levels), levels  # 0.5 x 350
    concat = [c for _, c in seen]
    assert all(not torch.equal(concat[k], concat[k + 1]) for k in range(len(concat) - 1))
    _, resumed, weights2 = run([2, 4])
    assert resumed == straight
    assert all(torch.equal(a, b) for a, b in zip(weights, weights2))


@pytest.fixture(scope="module")
def high_res(comfy):
    return make_dataset(comfy / "input" / "sr_photos", names=["astronaut", "coffee", "chelsea"]).name


def sr_args(**over):
    from selfperc_pack.nodes.super_resolution import SuperResolution
    from selfperc_pack.selfperc_core.super_resolution import Degradation

    task = SuperResolution(Degradation(blur_max=0.5, noise_augmentation_max=0.2, jpeg_min_quality=70))
    return dict(dict(super_resolution=task, resolution=64, steps=3, rank=4, alpha=4.0, learning_rate=1e-2,
                     validation_split=0.34, preview_every=3), **over)


@pytest.fixture(scope="module")
def trained(pack, high_res):
    """(base upscaler, its VAE, the fine-tune node's outputs)."""
    mp, vae = tiny_model("sd_x4"), PatchVAE((1, 4, 16, 16), F)
    return mp, vae, train(pack, mp, vae, high_res, lora_name="sr/run", **sr_args()).args


def test_the_upscaler_fine_tune_saves_a_lora_that_core_loaders_apply_as_trained(trained, caplog):
    import json

    import folder_paths
    from safetensors import safe_open

    from nodes import LoraLoaderModelOnly

    mp, vae, (tuned, lora_sd, loss_map, name, *_) = trained
    assert len(loss_map["loss"]) == 3 and all(torch.isfinite(torch.tensor(loss_map["loss"])))
    with safe_open(folder_paths.get_full_path_or_raise("loras", name), "pt") as f:
        meta = f.metadata()
    assert meta["super_resolution_factor"] == "4" and meta["base_model_type"] == "SD_X4Upscaler"
    assert json.loads(meta["super_resolution"]) == {"blur_max": 0.5, "noise_augmentation_max": 0.2,
                                                    "jpeg_min_quality": 70}
    assert len(json.loads(meta["validation"])) == 2  # the held-out image, at fixed conditions
    with caplog.at_level(logging.WARNING):
        loaded = LoraLoaderModelOnly().load_lora_model_only(mp, name, 1.0)[0]
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(loaded.patches) == sum(1 for k in lora_sd if k.endswith(".lora_up.weight")) > 10
    low = torch.rand(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(5)) * 2 - 1
    ref, base = upscale(loaded, low, 7), upscale(mp, low, 7)
    torch.testing.assert_close(upscale(tuned, low, 7), ref, rtol=1e-5, atol=1e-5)
    assert (ref - base).abs().mean() > 1e-3, "the trained LoRA changes nothing"


def test_bad_super_resolution_input_is_refused_before_work_naming_it(pack, comfy, high_res, models):
    from selfperc_pack.nodes.super_resolution import SuperResolution
    from selfperc_pack.selfperc_core.super_resolution import Degradation

    mp, vae = tiny_model("sd_x4"), PatchVAE((1, 4, 16, 16), F)
    sd15, _, sd_vae = models
    small = make_dataset(comfy / "input" / "sr_small", names=["coffee"], sizes={"coffee": (48, 40)}).name
    cases = [
        (sd15, sd_vae, high_res, sr_args(), "SD15 has no low-res concat input"),
        (mp, vae, high_res, sr_args(resolution=24), "resolution 24 .* too small for factor 4"),
        (mp, vae, high_res, sr_args(super_resolution=SuperResolution(Degradation(blur_max=-1.0))),
         "blur_max -1.0"),
        (mp, vae, high_res, sr_args(super_resolution=SuperResolution(Degradation(jpeg_min_quality=101))),
         "jpeg_min_quality 101"),
        (mp, vae, small, sr_args(), "coffee.*48x40 would be enlarged to cover 64x64"),
    ]
    for model, v, folder, args, message in cases:
        with pytest.raises(ValueError, match=message):
            train(pack, model, v, folder, lora_name="sr/refused", **args)
    assert not list((comfy / "models" / "loras" / "sr").glob("refused*"))


def test_upscale_evaluate_reports_psnr_and_feature_distance_with_paired_spread(pack, comfy, trained, models):
    """Bicubic's PSNR equals its definition on the box-averaged images; a model against itself differs by exactly
    0 (the pairing); the fine-tune's rows are there, with a spread."""
    import json

    from selfperc_pack.nodes.upscale_evaluate import SelfPerceptualUpscaleEvaluate
    from selfperc_pack.selfperc_core.dataset import as_float, load_dataset
    from selfperc_pack.selfperc_core.super_resolution import bicubic, downscale, psnr

    mp, vae, (tuned, *_) = trained
    folder = make_dataset(comfy / "input" / "sr_held_out", names=["camera", "astronaut", "coffee"], captions=False)
    args = dict(base_model=mp, vae=vae, dataset_folder=folder.name, resolution=64, seed=1, steps=3,
                sampler_name="euler", scheduler="normal", cfg=1.0, noise_augmentation=0.0, bootstraps=50,
                noise_levels="0.3, 0.6")
    out = SelfPerceptualUpscaleEvaluate.execute(model=tuned, baseline_model=mp, **args)
    table, text, grid = out.args
    report = json.loads(text)
    assert report["images"] == 3 and report["factor"] == 4
    high = torch.stack([as_float(x)[..., :3] for x in load_dataset(folder, 64).images]).movedim(-1, 1)
    up = ((bicubic(downscale(high * 2 - 1, 4), 4) + 1) / 2).clamp(0, 1)
    psnr_rows = report["metrics"]["PSNR (dB)"]
    assert psnr_rows["bicubic"]["value"] == pytest.approx(float(psnr(up, high, 1.0).mean()), rel=1e-5)
    for rows in report["metrics"].values():
        assert set(rows) == {"bicubic", "base", "fine-tuned", "baseline", "bicubic - base", "fine-tuned - base",
                             "baseline - base", "fine-tuned - baseline"}
        same = rows["baseline - base"]  # the base model twice: paired by image and noise
        assert same["value"] == 0.0 and same["p05"] == 0.0 and same["p95"] == 0.0
        assert rows["fine-tuned - base"]["value"] != 0.0 and rows["fine-tuned - base"]["std"] > 0
    assert grid.shape[2] >= 6 * 64 and grid.shape[1] >= 3 * 64  # low-res | bicubic | 3 models | high-res, per image
    with pytest.raises(ValueError, match="SD15 has no low-res concat input"):
        SelfPerceptualUpscaleEvaluate.execute(model=tuned, **dict(args, base_model=models[0]))


def test_each_sample_is_conditioned_on_its_own_image_with_held_out_and_repeated_images(pack, comfy, monkeypatch):
    """Trainer index k is dataset image train_idx[k] (held-out images left out, N_name folders repeated): with no
    degradation, each sample's low-res input is its own image's box average, which the stand-in VAE's latent is a
    projection of."""

    folder = comfy / "input" / "sr_repeats"
    make_dataset(folder / "2_twice", names=["astronaut", "coffee"], captions=False)
    make_dataset(folder, names=["chelsea", "camera"], captions=False)
    trainers = watch_trainers(monkeypatch)
    vae = PatchVAE((1, 4, 16, 16), F)
    from selfperc_pack.nodes.super_resolution import SuperResolution

    mp = tiny_model("sd_x4")
    train(pack, mp, vae, folder.name, lora_name="sr/repeats",
          **sr_args(super_resolution=SuperResolution(), steps=1, validation_split=0.25, repeat_folders=True))
    (tr,) = trainers
    assert len(tr.latents) in (4, 5)  # 4 images, 1 held out, the 2_twice ones twice
    for k, lat in enumerate(tr.latents):
        low = tr.condition(k, tr.conds[k], 11)["c_concat"].cond[0]
        want = mp.model.process_latent_in(torch.einsum("cr,rhw->chw", vae.proj, low)[None])[0]
        torch.testing.assert_close(want, lat, rtol=1e-4, atol=1e-5)


def test_a_run_resumes_only_in_the_task_it_was_started_in(pack, comfy, trained, high_res):
    from selfperc_pack.nodes.super_resolution import SuperResolution
    from selfperc_pack.selfperc_core.super_resolution import Degradation

    mp, vae, _ = trained
    with pytest.raises(ValueError, match="was trained as an upscaler"):
        train(pack, mp, vae, high_res, lora_name="sr/again", **dict(sr_args(), super_resolution=None,
                                                                    resume_from="sr/run.safetensors"))
    with pytest.raises(ValueError, match="was trained with the degradation"):
        train(pack, mp, vae, high_res, lora_name="sr/again", **sr_args(
            super_resolution=SuperResolution(Degradation(blur_max=1.0)), resume_from="sr/run.safetensors"))
