"""Invert / Null-text Inversion / Inversion Guider in-process with the real host: the tiny SD1.x checkpoint as eps,
v (zero terminal SNR) and flow, a tiny SD3 (flow transformer) and Flux (guidance-distilled); replay through core
SamplerCustomAdvanced + KSamplerSelect + DisableNoise, as a workflow runs them."""
import pytest
import torch

from tests.host.models import PARAMETERIZATIONS, as_parameterization
from tests.host.test_realimage_eval import encoded, node

pytestmark = pytest.mark.host
CFG = 7.5


def text(clip, t):
    return clip.encode_from_tokens_scheduled(clip.tokenize(t))


def invert(model, lat, pos, neg, steps=6, cfg=1.0):
    return node("SelfPerceptualInvert").execute(model=model, latent=lat, positive=pos, negative=neg, steps=steps,
                                                scheduler="normal", cfg=cfg).args


def null_text(model, inv, cfg=CFG, inner_steps=5, lr=0.05):
    return node("SelfPerceptualNullTextInversion").execute(model=model, inversion=inv, cfg=cfg,
                                                           inner_steps=inner_steps, learning_rate=lr,
                                                           early_stop=1e-5).args


def replay(model, inv, pos, sigmas, noise, method, cfg=CFG, sampler="euler", negative=None):
    from comfy_extras.nodes_custom_sampler import DisableNoise, KSamplerSelect, SamplerCustomAdvanced

    guider = node("SelfPerceptualInversionGuider").execute(model=model, inversion=inv, positive=pos, method=method,
                                                           cfg=cfg, negative=negative).args[0]
    with torch.inference_mode():
        return SamplerCustomAdvanced.execute(DisableNoise.execute().args[0], guider,
                                             KSamplerSelect.execute(sampler).args[0], sigmas, noise).args[0]["samples"]


def mse(a, b):
    return float(torch.mean((a.float() - b.float()) ** 2))


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
def test_null_text_reconstructs_at_cfg_several_times_better_than_plain_inversion(models, kind):
    model, clip, vae = models
    model = as_parameterization(model, kind)
    lat, pos, neg = encoded(vae), text(clip, "a photo of an astronaut"), text(clip, "")
    inv, noise, sigmas = invert(model, lat, pos, neg)
    assert torch.equal(inv.pivots[-1], model.model.process_latent_in(lat["samples"]).float())
    inv2, recon, err, plain_err = null_text(model, inv)
    assert err < plain_err / 3, (err, plain_err)  # measured 4.6-7.2x lower here (6 steps, 5 inner, lr 0.05)
    assert len(inv2.nulls) == 6 and inv2.null_cfg == CFG
    # the guider replays the fitted embeddings through core sampling to the node's own reconstruction
    # (to float rounding amplified by cfg: the fit runs the two branches as separate batches, sampling together)
    again = replay(model, inv2, pos, sigmas, noise, "null-text")
    scale = float(recon["samples"].abs().max())
    torch.testing.assert_close(again, recon["samples"], rtol=0, atol=1e-3 * scale)
    plain = replay(model, inv, pos, sigmas, noise, "plain")
    lat_in = model.model.process_latent_in
    assert mse(lat_in(again), inv.pivots[-1]) == pytest.approx(err, rel=1e-2)
    assert mse(lat_in(plain), inv.pivots[-1]) == pytest.approx(plain_err, rel=1e-4)
    # the input's conditioning objects are untouched (the embeddings live in the inversion)
    assert torch.equal(neg[0][0], text(clip, "")[0][0])


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
def test_direct_inversion_with_the_source_prompt_returns_the_input(models, kind):
    model, clip, vae = models
    model = as_parameterization(model, kind)
    lat, pos, neg = encoded(vae), text(clip, "a photo of an astronaut"), text(clip, "")
    inv, noise, sigmas = invert(model, lat, pos, neg)
    same = replay(model, inv, pos, sigmas, noise, "direct")
    plain = replay(model, inv, pos, sigmas, noise, "plain")
    # float rounding only: the start's rounding (x = noise * scale, 5e-4 at v's sigma_max 4500) grows through the
    # random tiny UNet's steep Jacobian x cfg 7.5 (about 10x a step, measured); MSE 1e8-1e9 below plain's
    assert float((same - lat["samples"]).abs().max()) < 1e-2 * float(lat["samples"].abs().max())
    assert mse(same, lat["samples"]) < 1e-6 * mse(plain, lat["samples"])
    edit = replay(model, inv, text(clip, "a watercolor painting of a dog"), sigmas, noise, "direct")
    assert not torch.allclose(edit, lat["samples"], atol=1e-3)  # another prompt does edit


def test_same_inversion_on_base_and_base_plus_lora_differs_only_by_the_lora(models):
    """The A/B: one inversion, two guiders; a weight patch (as a LoRA loader makes) changes the edit, and the
    replay is deterministic."""
    from selfperc_pack.nodes import lora as lora_mod  # noqa: F401  the pack is importable

    model, clip, vae = models
    lat, pos, neg = encoded(vae), text(clip, "a photo of an astronaut"), text(clip, "")
    inv, noise, sigmas = invert(model, lat, pos, neg)
    tuned = model.clone()
    dm = tuned.model.diffusion_model
    key = next(k for k, _ in dm.named_parameters() if k.endswith("attn2.to_k.weight"))
    w = dm.get_parameter(key)
    tuned.add_patches({f"diffusion_model.{key}": (torch.randn(w.shape, generator=torch.Generator().manual_seed(3)) * 0.2,)}, 1.0)
    target = text(clip, "a watercolor painting of a dog")
    base_edit = replay(model, inv, target, sigmas, noise, "direct")
    tuned_edit = replay(tuned, inv, target, sigmas, noise, "direct")
    assert not torch.allclose(base_edit, tuned_edit, atol=1e-4)
    assert torch.equal(replay(model, inv, target, sigmas, noise, "direct"), base_edit)  # deterministic


def test_a_batch_of_photos_gets_one_embedding_per_photo(models):
    import comfy.utils

    model, clip, vae = models
    lat = {"samples": torch.cat([encoded(vae)["samples"], encoded(vae, "coffee")["samples"]])}
    pos = text(clip, "a photo")
    pos = [[comfy.utils.repeat_to_batch_size(pos[0][0], 2), pos[0][1]]]
    inv, noise, sigmas = invert(model, lat, pos, text(clip, ""), steps=4)
    inv2, recon, err, plain_err = null_text(model, inv, inner_steps=3)
    assert all(t.shape[0] == 2 for step in inv2.nulls for t in step)
    assert not torch.equal(inv2.nulls[-1][0][0], inv2.nulls[-1][0][1])  # each photo its own
    assert err < plain_err
    again = replay(model, inv2, pos, sigmas, noise, "null-text")
    torch.testing.assert_close(again, recon["samples"], rtol=0, atol=1e-3 * float(recon["samples"].abs().max()))


def test_flow_transformer_sd3_direct_and_null_text(comfy, pack):
    from dev.tiny_families import latent_shape, tiny_conditioning, tiny_model

    mp = tiny_model("sd3")
    g = torch.Generator().manual_seed(0)
    lat = {"samples": torch.randn(latent_shape("sd3", mp, side=4), generator=g)}
    pos, neg = tiny_conditioning("sd3", mp, seed=1), tiny_conditioning("sd3", mp, seed=2)
    inv, noise, sigmas = invert(mp, lat, pos, neg, steps=5)
    same = replay(mp, inv, pos, sigmas, noise, "direct")
    assert float((same - lat["samples"]).abs().max()) < 1e-4 * float(lat["samples"].abs().max())
    # The random tiny SD3's output hardly depends on its token stream (its cfg drift comes from the pooled
    # vector, which null-text leaves alone): the fit runs through the transformer's conds and never makes the
    # reconstruction worse, but a gain cannot be shown on this model.
    inv2, recon, err, plain_err = null_text(mp, inv, inner_steps=5)
    assert len(inv2.nulls) == 5 and err <= plain_err


def test_guidance_distilled_flux_is_refused_by_null_text_but_direct_works(comfy, pack):
    from dev.tiny_families import latent_shape, tiny_conditioning, tiny_model

    mp = tiny_model("flux")
    lat = {"samples": torch.randn(latent_shape("flux", mp, side=4), generator=torch.Generator().manual_seed(0))}
    pos = tiny_conditioning("flux", mp, seed=1)
    inv, noise, sigmas = invert(mp, lat, pos, pos, steps=4)
    with pytest.raises(ValueError, match="guidance-distilled"):
        null_text(mp, inv)
    same = replay(mp, inv, pos, sigmas, noise, "direct", cfg=1.0)
    assert float((same - lat["samples"]).abs().max()) < 1e-4 * float(lat["samples"].abs().max())


def test_bad_input_is_refused_before_work_with_a_message_naming_it(models, monkeypatch):
    import comfy.samplers

    model, clip, vae = models
    lat, pos, neg = encoded(vae), text(clip, "a photo"), text(clip, "")
    calls = []
    orig = comfy.samplers.calc_cond_batch
    monkeypatch.setattr(comfy.samplers, "calc_cond_batch", lambda *a, **k: calls.append(1) or orig(*a, **k))
    with pytest.raises(ValueError, match="16 channels.*another family's VAE"):
        invert(model, {"samples": torch.ones(1, 16, 8, 8)}, pos, neg)
    with pytest.raises(ValueError, match="empty"):
        invert(model, {"samples": torch.zeros(1, 4, 8, 8)}, pos, neg)
    assert not calls
    inv, noise, sigmas = invert(model, lat, pos, None)
    inv_n, _, _ = invert(model, lat, pos, neg)
    calls.clear()
    with pytest.raises(ValueError, match="no negative conditioning"):
        null_text(model, inv)
    with pytest.raises(ValueError, match="cfg 1.0"):
        null_text(model, inv_n, cfg=1.0)
    with pytest.raises(ValueError, match="inner_steps"):
        null_text(model, inv_n, inner_steps=0)
    with pytest.raises(ValueError, match="Null-text Inversion node"):
        replay(model, inv_n, pos, sigmas, noise, "null-text")
    with pytest.raises(ValueError, match="needs a negative"):
        replay(model, inv, pos, sigmas, noise, "direct")
    for name in ("euler_ancestral", "dpmpp_2m", "heun"):
        with pytest.raises(ValueError, match=f"sampler '{name}'"):
            replay(model, inv_n, pos, sigmas, noise, "direct", sampler=name)
    with pytest.raises(ValueError, match="not the inversion's schedule"):
        replay(model, inv_n, pos, sigmas[1:], noise, "direct")
    from dev.tiny_families import tiny_model

    with pytest.raises(ValueError, match="inversion was made with"):
        replay(tiny_model("sdxl"), inv_n, pos, sigmas, noise, "direct")
    assert not calls  # nothing ran the model
    inv2 = null_text(model, inv_n, inner_steps=1)[0]
    with pytest.raises(ValueError, match="fitted for cfg 7.5, not 5"):
        replay(model, inv2, pos, sigmas, noise, "null-text", cfg=5.0)
    with pytest.raises(ValueError, match="leave negative unconnected"):
        replay(model, inv2, pos, sigmas, noise, "null-text", negative=neg)
    assert replay(model, inv_n, pos, sigmas, noise, "direct", sampler="ddim").shape == lat["samples"].shape


def test_null_text_memory_is_one_unconditional_forward_and_backward_at_a_time(models, monkeypatch):
    """Every model call with gradients is the unconditional branch alone on one image's batch (the conditional
    branch runs once per step without gradients), so the graph held is one forward's; and no gradient buffers
    are left on the model's weights."""
    import comfy.samplers

    model, clip, vae = models
    lat, pos, neg = encoded(vae), text(clip, "a photo"), text(clip, "")
    inv = invert(model, lat, pos, neg, steps=3)[0]
    seen = []
    orig = comfy.samplers.calc_cond_batch

    def spy(m, conds, x, ts, opts):
        seen.append((len(conds), torch.is_grad_enabled(), x.shape[0], [c is None for c in conds]))
        return orig(m, conds, x, ts, opts)
    monkeypatch.setattr(comfy.samplers, "calc_cond_batch", spy)
    null_text(model, inv, inner_steps=2, cfg=CFG)
    with_grad = [s for s in seen if s[1]]
    assert len(with_grad) >= 3  # at least one update per step
    assert all(s[0] == 1 and s[2] == 1 for s in with_grad), with_grad
    # without gradients, per step: the conditional branch once, and the step taken with the fitted embedding
    assert sum(1 for s in seen if not s[1] and s[0] == 1) == 2 * 3
    assert all(p.grad is None for p in model.model.parameters())


def test_an_inversion_replays_only_on_its_own_family_and_parameterization(models):
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    from dev.tiny_families import tiny_model

    model, clip, vae = models
    lat, pos, neg = encoded(vae), text(clip, "a photo"), text(clip, "")
    inv, noise, sigmas = invert(model, lat, pos, neg, steps=3)
    as_v = ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]  # the same sigmas, another output
    for other in (as_v, tiny_model("sd20_v")):
        with pytest.raises(ValueError, match="inversion was made with"):
            replay(other, inv, pos, sigmas, noise, "direct")
    import dataclasses

    controlled = dataclasses.replace(inv, negative=[[neg[0][0], dict(neg[0][1], control=object())]])
    with pytest.raises(ValueError, match="negative conditioning carries control"):
        null_text(model, controlled)
