"""Imagic's Optimize Embedding in-process with the real host on the tiny SD1.x checkpoint (as eps, v with zero
terminal SNR, and flow): the embedding trained by the pack's loop, measured by core's own apply_model."""
import pytest
import torch

from tests.host.models import PARAMETERIZATIONS, as_parameterization
from tests.host.test_realimage_eval import encoded, node

pytestmark = pytest.mark.host
PROMPT = "a photo of a dog"


def text(clip, t):
    return clip.encode_from_tokens_scheduled(clip.tokenize(t))


def optimize(model, lat, cond, steps=30, lr=5e-2, objective="denoising", seed=0):
    return node("SelfPerceptualOptimizeEmbedding").execute(model=model, latent=lat, conditioning=cond, steps=steps,
                                                           learning_rate=lr, seed=seed, objective=objective)


def native_loss(model, lat, cond, seed=123, draws=12):
    """The model's own denoising loss of ``cond`` on the image at fixed (sigma, noise) draws, through core's
    apply_model (what sampling calls) and model_sampling, not through the pack's loop."""
    from selfperc_pack.nodes import bridge

    ms = bridge.model_sampling(model)
    x0 = model.model.process_latent_in(lat["samples"].float())
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for _ in range(draws):
            t = float(torch.rand((), generator=g)) * 0.85 + 0.05
            sigma = torch.tensor([float(ms.percent_to_sigma(1.0 - t))])
            eps = torch.randn(x0.shape, generator=g)
            x = ms.noise_scaling(sigma, eps, x0)
            d = model.model.apply_model(x, sigma, c_crossattn=cond[0][0])
            c_out = bridge.output_scale_fn(ms)(sigma)
            total += float(((d - x0) / c_out.view(-1, 1, 1, 1)).square().mean())
    return total / draws


def test_zero_steps_return_the_input_conditioning_untouched(models):
    model, clip, vae = models
    cond = text(clip, PROMPT)
    out = optimize(model, encoded(vae, "chelsea"), cond, steps=0)
    assert out.args[0] is cond and out.args[1] == {"loss": []}


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
def test_the_optimised_embedding_reconstructs_the_image_better(models, kind):
    model, clip, vae = models
    model = as_parameterization(model, kind)
    lat, cond = encoded(vae, "chelsea"), text(clip, PROMPT)
    out = optimize(model, lat, cond)
    (opt,) = out.args[0]
    assert opt[0].shape == cond[0][0].shape and opt[0].dtype == cond[0][0].dtype
    assert torch.equal(opt[1]["pooled_output"], cond[0][1]["pooled_output"])  # only the embedding trains
    assert not torch.equal(opt[0], cond[0][0])
    before, after = native_loss(model, lat, cond), native_loss(model, lat, out.args[0])
    assert after < 0.95 * before, (before, after)
    assert len(out.args[1]["loss"]) == 30 and "(input embedding) ->" in out.ui["text"][0]
    assert tuple(out.args[2].shape[-1:]) == (3,)


def test_the_self_perceptual_objective_trains_the_embedding_against_a_fixed_target(models):
    model, clip, vae = models
    lat, cond = encoded(vae, "chelsea"), text(clip, PROMPT)
    out = optimize(model, lat, cond, steps=20, objective="self-perceptual", seed=0xFFFFFFFFFFFFFFFF)  # the widget's max
    losses = out.args[1]["loss"]
    assert len(losses) == 20 and all(v == v for v in losses)
    assert not torch.equal(out.args[0][0][0], cond[0][0])


def test_the_trained_view_reads_the_current_embedding_and_the_frozen_branch_the_input_one(comfy, pack):
    import comfy.conds
    from selfperc_pack.nodes.imagic import embedding_view
    from selfperc_pack.selfperc_core.model_view import ModelView

    fixed = torch.randn(1, 77, 8)
    emb = torch.nn.Parameter(torch.zeros(1, 77, 8))
    base = {"c_crossattn": comfy.conds.CONDCrossAttn(fixed)}
    view = ModelView(None, lambda x, sigma, cond: cond["c_crossattn"], None, None, "eps")
    v = embedding_view(view, base, emb, unet=True)
    batch = v.collate([base, base])
    assert batch["c_crossattn"].shape == (2, 77, 8)
    batch["c_crossattn"].sum().backward()
    assert torch.equal(emb.grad, torch.full_like(emb, 2.0))  # gradients reach the trained embedding
    with torch.no_grad():
        emb.add_(1.0)
    assert torch.equal(v.collate([base])["c_crossattn"], emb.detach())  # rebuilt from its current value
    seen = v.frozen_features(torch.zeros(3, 4), None, batch)
    assert torch.equal(seen, fixed.expand(3, -1, -1))  # the frozen branch: always the input embedding


def test_interpolation_at_one_is_the_target_and_at_zero_the_optimised(models):
    from nodes import ConditioningAverage

    model, clip, vae = models
    target = text(clip, PROMPT)
    opt = optimize(model, encoded(vae, "chelsea"), target, steps=3).args[0]
    with torch.inference_mode():
        at = {s: ConditioningAverage().addWeighted(target, opt, s)[0][0][0] for s in (0.0, 1.0)}
    assert torch.equal(at[1.0], target[0][0]) and torch.equal(at[0.0], opt[0][0])


def test_bad_input_is_refused_before_work_naming_it(models):
    model, clip, vae = models
    lat, cond = encoded(vae, "chelsea"), text(clip, PROMPT)
    two = {"samples": torch.cat([lat["samples"]] * 2)}
    with pytest.raises(ValueError, match="the latent holds 2 images"):
        optimize(model, two, cond, steps=1)
    with pytest.raises(ValueError, match="the conditioning has 2 entries"):
        optimize(model, lat, cond + text(clip, "a cat"), steps=1)
    with pytest.raises(ValueError, match="unknown objective 'clip'"):
        optimize(model, lat, cond, steps=1, objective="clip")
    with pytest.raises(ValueError, match="steps 20000 is outside"):
        optimize(model, lat, cond, steps=20000)
    bad = [[torch.full_like(cond[0][0], float("nan")), cond[0][1]]]
    with pytest.raises(ValueError, match="NaN or Inf"):
        optimize(model, lat, bad, steps=1)
