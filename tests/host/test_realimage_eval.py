"""The sampler's real-image A/B modes (SDEdit, ILVR, inversion) and the Evaluate node, in-process on the tiny
SD1.x checkpoint re-parameterized as eps, v (zero terminal SNR) and flow."""
import json

import pytest
import torch

from dev.datasets import make_dataset, photo
from tests.host.models import PARAMETERIZATIONS, as_parameterization, load_checkpoint

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def models(comfy, tiny_models):
    return load_checkpoint(str(tiny_models["checkpoint"]))


class node:
    """A node class as ComfyUI's executor runs it: hidden inputs set, execute under inference_mode."""

    def __init__(self, name):
        import selfperc_pack.nodes as n

        self.cls = getattr(n, name).PREPARE_CLASS_CLONE({"unique_id": "1"})

    def execute(self, **kw):
        with torch.inference_mode():
            return self.cls.execute(**kw)


def encoded(vae, name="astronaut", size=64):
    img = torch.from_numpy(photo(name)).float()[None] / 255
    img = torch.nn.functional.interpolate(img.permute(0, 3, 1, 2), size=(size, size), mode="area")
    return {"samples": vae.encode(img.permute(0, 2, 3, 1))}


SAMPLE = dict(seed=5, steps=4, sampler_name="euler", scheduler="normal", cfg=1.0, cfg_rescale=0.0, denoise=1.0)


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
def test_sdedit_at_strength_zero_returns_the_input(pack, models, kind):
    model, _, vae = models
    model = as_parameterization(model, kind)
    lat = encoded(vae)
    smp = node("SelfPerceptualSampler")
    out, grid = smp.execute(model=model, base_model=model, latent=lat, vae=vae, **dict(SAMPLE, denoise=0.0)).args
    assert torch.equal(out["samples"], lat["samples"])
    half = smp.execute(model=model, latent=lat, **dict(SAMPLE, denoise=0.5)).args[0]
    assert not torch.equal(half["samples"], lat["samples"])


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
def test_ilvr_weight_zero_is_plain_sampling_and_weight_one_takes_the_reference_layout(pack, models, kind):
    from selfperc_pack.selfperc_core.realimage import low_pass

    model, _, vae = models
    model = as_parameterization(model, kind)
    ref = encoded(vae)
    smp = node("SelfPerceptualSampler")
    plain = smp.execute(model=model, latent={"samples": torch.zeros_like(ref["samples"])}, **SAMPLE).args[0]
    off = smp.execute(model=model, latent=ref, mode="ilvr", ilvr_weight=0.0, **SAMPLE).args[0]
    assert torch.equal(off["samples"], plain["samples"])
    on, grid = smp.execute(model=model, base_model=model, latent=ref, mode="ilvr", ilvr_weight=1.0, ilvr_factor=2,
                           vae=vae, **SAMPLE).args

    def gap(x):
        return float((low_pass(x["samples"], 2) - low_pass(ref["samples"], 2)).norm())
    assert gap(on) < 0.5 * gap(plain), (gap(on), gap(plain))
    assert grid.shape[2] > 3 * 64  # reference | base | fine-tuned


def exact_gaussian(model, var=1.0):
    """``model`` with its denoiser replaced (ComfyUI's model_function_wrapper: apply_model's input x, sigma ->
    denoised) by the exact E[x0 | x, sigma] of a N(0, var) prior, in the model's own noise form (x0 + sigma eps for
    eps and v models, (1 - sigma) x0 + sigma eps for flow). Its ODE is smooth, so what inversion + reconstruction
    loses is the integrator's own error, and the test sees ComfyUI's whole path (guider, schedule, latent scaling)
    around it."""
    import comfy.model_sampling as ms_mod

    flow = isinstance(model.get_model_object("model_sampling"), ms_mod.CONST)
    m = model.clone()

    def wrapper(apply, args):
        x, sigma = args["input"], args["timestep"]
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x)
        a = 1 - s if flow else torch.ones_like(s)
        return a * var / (a**2 * var + s**2) * x
    m.set_model_unet_function_wrapper(wrapper)
    return m


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
def test_inversion_then_reconstruction_with_the_same_model_returns_the_image(pack, models, kind):
    """Through ComfyUI's guider with an exact denoiser: the round trip returns the latent, closer with more steps
    (Euler / DDIM is first order). On the tiny random UNet itself (no smooth ODE) the modes still run."""
    model, _, vae = models
    model = as_parameterization(model, kind)
    lat = encoded(vae)
    smp = node("SelfPerceptualSampler")
    errs = []
    for steps in (10, 100):
        out = smp.execute(model=exact_gaussian(model), latent=lat, mode="invert", **dict(SAMPLE, steps=steps)).args[0]
        errs.append(float((out["samples"] - lat["samples"]).norm() / lat["samples"].norm()))
    print(kind, "round-trip relative error at 10 and 100 steps", errs)
    assert errs[1] < 0.05 and errs[1] < errs[0] / 3, errs
    out = smp.execute(model=model, latent=lat, mode="invert", **SAMPLE).args[0]
    assert out["samples"].shape == lat["samples"].shape and torch.isfinite(out["samples"]).all()


def test_inversion_reconstructs_with_another_model_on_the_inverting_schedule(pack, models):
    """Base eps model and a 'fine-tune' with another schedule (v + zero terminal SNR: sigma_max 4518, not 14.6),
    both with the same exact denoiser: the fine-tune must integrate the inverted noise down from the base's
    sigma_max (its own schedule would start 300x higher) and so return the image too."""
    model, _, vae = models
    base, other = exact_gaussian(model), exact_gaussian(as_parameterization(model, "v_zsnr"))
    lat = encoded(vae)
    out, grid = node("SelfPerceptualSampler").execute(model=other, base_model=base, latent=lat, vae=vae,
                                                      mode="invert", **dict(SAMPLE, steps=100)).args
    assert float((out["samples"] - lat["samples"]).norm() / lat["samples"].norm()) < 0.05
    assert grid.shape[2] > 3 * 64  # input | base | fine-tuned


def test_a_partial_inversion_stops_where_ksampler_starts_that_denoise_and_returns_the_image(pack, models):
    """mode invert with denoise < 1 (a DiffusionCLIP LoRA's t0): the levels are core KSampler's for that denoise, and
    with an exact denoiser the shorter round trip returns the latent, closer than the full one at equal steps."""
    import comfy.samplers
    from selfperc_pack.nodes import realimage

    model, _, vae = models
    expected = comfy.samplers.KSampler(model, steps=10, device="cpu", sampler="euler", scheduler="normal",
                                       denoise=0.5).sigmas
    torch.testing.assert_close(realimage.schedule(model, "normal", 10, 0.5), expected.cpu())
    lat = encoded(vae)
    smp = node("SelfPerceptualSampler")
    errs = {}
    for denoise in (0.5, 1.0):
        out = smp.execute(model=exact_gaussian(model), latent=lat, mode="invert",
                          **dict(SAMPLE, steps=10, denoise=denoise)).args[0]
        errs[denoise] = float((out["samples"] - lat["samples"]).norm() / lat["samples"].norm())
    assert errs[0.5] < errs[1.0], errs


def test_real_image_modes_refuse_an_empty_latent(pack, models):
    model, _, _ = models
    with pytest.raises(ValueError, match="needs a real image"):
        node("SelfPerceptualSampler").execute(model=model, latent={"samples": torch.zeros(1, 4, 8, 8)}, mode="invert",
                                              **SAMPLE)


EVAL = dict(resolution=64, sample_count=4, seed=0, steps=3, sampler_name="euler", scheduler="normal", cfg=1.0,
            bootstraps=4, noise_levels="0.2, 0.6")


@pytest.fixture(scope="module")
def eval_folder(comfy):
    return make_dataset(comfy / "input" / "eval_photos", names=["astronaut", "coffee", "camera", "chelsea", "rocket"],
                        captions=False).name


def tiny_clip_vision(tmp_path):
    """A small CLIP ViT vision model of ComfyUI's own class, random weights (no weights can be downloaded)."""
    import comfy.clip_vision

    from dev.tiny_families import _init_params

    cfg = tmp_path / "clip_vision_tiny.json"
    cfg.write_text(json.dumps({"hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 32,
                               "intermediate_size": 64, "layer_norm_eps": 1e-5, "model_type": "clip_vision_model",
                               "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 2, "patch_size": 8,
                               "projection_dim": 16}))
    cv = comfy.clip_vision.ClipVisionModel(str(cfg))
    _init_params(cv.model, seed=0)
    return cv


def test_evaluate_reports_both_feature_spaces_with_paired_spread(pack, models, eval_folder, tmp_path):
    model, _, vae = models
    other = as_parameterization(model, "v_zsnr")  # a model whose samples differ, same latent space
    table, report, grid = node("SelfPerceptualEvaluate").execute(
        base_model=model, model=other, baseline_model=model, vae=vae, dataset_folder=eval_folder,
        clip_vision=tiny_clip_vision(tmp_path), **EVAL).args
    rep = json.loads(report)
    assert rep["dataset_images"] == 5 and rep["samples"] == 4 and rep["noise_levels"] == [0.2, 0.6]
    for space in ("self", "CLIP"):
        for metric in ("FD", "KID"):
            rows = rep["metrics"][space][metric]
            assert set(rows) == {"base", "fine-tuned", "baseline", "fine-tuned - base", "baseline - base",
                                 "fine-tuned - baseline"}
            # the baseline IS the base model: from the same noise its samples and distances are identical
            assert rows["baseline - base"]["value"] == 0 and rows["baseline - base"]["std"] == 0
            assert rows["fine-tuned - base"]["value"] != 0
            # so fine-tuned - baseline is fine-tuned - base, replicate by replicate
            assert rows["fine-tuned - baseline"] == rows["fine-tuned - base"]
            assert all(v is not None and v == v for r in rows.values() for v in r.values())  # spread, no NaN
    assert rep["metrics"]["self"]["FD"]["base"]["value"] > 0
    assert table.shape[0] == 1 and table.shape[1] > 100
    assert grid.shape[2] > 3 * 64  # base | fine-tuned | baseline
    assert any("biased" in n for n in rep["notes"])  # 4 samples in a wider feature space: FD's caveat is shown


def test_evaluate_is_reproducible_and_eps_v_flow_all_run(pack, models, eval_folder):
    model, _, vae = models
    for kind in PARAMETERIZATIONS:
        m = as_parameterization(model, kind)
        a = node("SelfPerceptualEvaluate").execute(base_model=m, model=m, vae=vae, dataset_folder=eval_folder,
                                                   **dict(EVAL, bootstraps=0)).args[1]
        b = node("SelfPerceptualEvaluate").execute(base_model=m, model=m, vae=vae, dataset_folder=eval_folder,
                                                   **dict(EVAL, bootstraps=0)).args[1]
        assert json.loads(a)["metrics"] == json.loads(b)["metrics"]


def test_evaluate_bad_inputs_are_refused_before_sampling(pack, models, comfy, eval_folder, monkeypatch):
    import comfy.sample as comfy_sample
    from selfperc_pack.selfperc_core.dataset import DatasetError

    model, _, vae = models
    ev = node("SelfPerceptualEvaluate")
    monkeypatch.setattr(comfy_sample, "sample", lambda *a, **k: pytest.fail("sampled before refusing"))
    one = make_dataset(comfy / "input" / "eval_one", names=["coffee"], captions=False).name
    with pytest.raises(ValueError, match="at least 2.*covariance"):
        ev.execute(base_model=model, model=model, vae=vae, dataset_folder=one, **EVAL)
    (comfy / "input" / "eval_empty").mkdir(exist_ok=True)
    with pytest.raises(DatasetError, match="no image files"):
        ev.execute(base_model=model, model=model, vae=vae, dataset_folder="eval_empty", **EVAL)
    with pytest.raises(ValueError, match="noise_levels"):
        ev.execute(base_model=model, model=model, vae=vae, dataset_folder=one, **dict(EVAL, noise_levels="0.2, x"))
    with pytest.raises(ValueError, match="at least 2 samples"):
        ev.execute(base_model=model, model=model, vae=vae, dataset_folder=one, **dict(EVAL, sample_count=1))
    with pytest.raises(ValueError, match="no image embedding"):
        ev.execute(base_model=model, model=model, vae=vae, dataset_folder=eval_folder, clip_vision=NotClip(), **EVAL)
    from dev.tiny_families import tiny_model

    flux = tiny_model("flux")
    with pytest.raises(ValueError, match="latents"):
        ev.execute(base_model=model, model=model, baseline_model=flux, vae=vae, dataset_folder=eval_folder, **EVAL)


class NotClip:
    """A vision model of another kind: hidden states, no projected image embedding."""

    def encode_image(self, image):
        return {"last_hidden_state": torch.zeros(image.shape[0], 5, 8)}


def test_a_vision_model_without_image_embeddings_is_named(pack, models):
    from selfperc_pack.nodes.evaluate import clip_embeddings

    with pytest.raises(ValueError, match="no image embedding.*CLIP ViT"):
        clip_embeddings(NotClip(), torch.zeros(2, 32, 32, 3))
