"""Pix2Pix-Zero Guider in-process with the real host: the tiny SD1.x checkpoint and its real CLIP, sampled through
core SamplerCustomAdvanced as a workflow runs it."""
import pytest
import torch

from selfperc_core.attention_edit import edit_direction
from tests.host.test_prompt_to_prompt import STEPS, SameNoise, plain, sample
from tests.host.test_realimage_eval import encoded, node

pytestmark = pytest.mark.host
SRC = "a photo of a cat"
CATS = "a photo of a cat\na cat on the grass\n\na close-up photo of a cat"
DOGS = "a photo of a dog\na dog on the grass\na close-up photo of a dog"


def guider(models, neg, source=CATS, target=DOGS, strength=1.0, guidance=0.1, cfg=7.5, inversion=None, model=None,
           prompt=SRC):
    return node("SelfPerceptualPix2PixZero").execute(
        model=model or models[0], clip=models[1], source_prompt=prompt, source_sentences=source,
        target_sentences=target, negative=neg, cfg=cfg, strength=strength, guidance=guidance,
        inversion=inversion).args


def test_the_edited_conditioning_is_the_prompt_plus_the_difference_of_sentence_means(models, neg):
    clip = models[1]
    enc = lambda t: clip.encode_from_tokens_scheduled(clip.tokenize(t))[0]  # noqa: E731
    g, edited = guider(models, neg, strength=0.5)
    cats, dogs = [enc(t) for t in CATS.split("\n") if t], [enc(t) for t in DOGS.split("\n")]
    direction = edit_direction([c[0] for c in cats], [d[0] for d in dogs])
    torch.testing.assert_close(edited[0][0], enc(SRC)[0] + 0.5 * direction)
    pooled = edit_direction([c[1]["pooled_output"] for c in cats], [d[1]["pooled_output"] for d in dogs])
    torch.testing.assert_close(edited[0][1]["pooled_output"], enc(SRC)[1]["pooled_output"] + 0.5 * pooled)
    # the same sets, or strength 0: the source prompt's tensors bit for bit
    for g, edited in (guider(models, neg, target=CATS), guider(models, neg, strength=0.0)):
        assert torch.equal(edited[0][0], enc(SRC)[0]) and torch.equal(g.plan.target.cond, g.plan.source.cond)


def test_a_zero_direction_reconstructs_exactly_and_the_guidance_gradient_is_exactly_zero(models, neg):
    g = guider(models, neg, target=CATS, guidance=1.0)[0]
    out = sample(models[0], g)
    assert len(g.losses) == STEPS and all(v == 0.0 for v in g.losses)
    assert torch.equal(out[1], out[0])
    # the source row is core CFGGuider's sample of the prompt at the same batch, bit for bit
    assert torch.equal(out[0], plain(models, neg, SRC, 2)[0])


def test_a_direction_edits_the_image_and_the_guidance_pulls_its_maps_to_the_sources(models, neg):
    free, _ = guider(models, neg, guidance=0.0)
    out_free = sample(models[0], free)
    guided, _ = guider(models, neg, guidance=10.0)  # the tiny random UNet's maps move little with the latent
    out = sample(models[0], guided)
    assert torch.equal(out[0], out_free[0])  # the source row never moves
    assert (out[1] - out[0]).abs().max() > 1e-3 and (out[1] - out_free[1]).abs().max() > 1e-4
    assert guided.losses[0] > 0 and free.losses == []

    def gap(g):  # the edit's summed map-level maps against the source's
        return float((g.run.maps[1] - g.run.maps[0]).square().sum())
    assert gap(guided) < gap(free), (gap(guided), gap(free))
    # the guidance pass reads every cross-attention layer at every step; the kept maps are the map level's only
    calls = guided.run.calls
    assert {s for kind, _, s in calls if kind == "guide"} == set(range(STEPS))
    assert len([c for c in calls if c[0] == "guide"]) == STEPS * len(guided.keys)
    assert {lvl for kind, lvl, _ in calls if kind == "cross"} == {guided.run.level}


def test_each_guided_step_is_an_euler_step_from_the_moved_latent(models, neg):
    """With the map gradient held at a constant g, the edit row must equal a hand-written loop: move the latent by
    guidance (sigma^2 + 1) g (an SGD step in DDPM-scaled latents of this eps model), then one Euler step from the
    moved latent with the edited conditioning, through core's CFG denoiser."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import BasicScheduler, CFGGuider, SamplerCustomAdvanced

    lam = 0.005
    const = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    g, edited = guider(models, neg, guidance=lam)
    g.map_gradient = lambda x, ts, opts: const.to(x)
    out = sample(models[0], g)

    def moved_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            moved = x - lam * (s * s + 1) * const.to(x)
            d = model(moved, sigmas[i] * s_in, **(extra_args or {}))
            x = moved + (s_next - s) / s * (moved - d)
        return x

    model = models[0]
    with torch.inference_mode():
        by_hand = SamplerCustomAdvanced.execute(
            SameNoise(), CFGGuider.execute(model, edited, neg, 7.5).args[0], comfy.samplers.KSAMPLER(moved_euler),
            BasicScheduler.execute(model, "normal", STEPS, 1.0).args[0],
            {"samples": torch.zeros(2, 4, 16, 16)}).args[0]["samples"]
    unguided = sample(model, guider(models, neg, guidance=0.0)[0])
    err, effect = float((out[1] - by_hand[0]).abs().max()), float((out[1] - unguided[1]).abs().max())
    # the move changes the edit by about 25 here; the two loops agree to float rounding (measured 2.4e-4), while a
    # wrong step index or scale would be off by a sizeable part of the move
    assert effect > 1.0 and err < 1e-4 * effect, (err, effect)


def test_the_guidance_step_descends_the_map_distance_along_its_gradient(models, neg):
    g, _ = guider(models, neg, guidance=0.1)
    real, seen = g.map_gradient, []

    def probe(x, ts, opts):  # at the first step, evaluate the map distance again a small step down the gradient
        grad = real(x, ts, opts)
        if not seen:
            n, before = g.run.pairs, g.losses[-1]
            eps = 1e-3 * before / float(grad.square().sum())
            real(torch.cat([x[:n], x[n:] - eps * grad]), ts, opts)
            seen.append((before - g.losses[-1], eps * float(grad.square().sum())))
        return grad
    g.map_gradient = probe
    sample(models[0], g)
    drop, first_order = seen[0]
    assert drop > 0 and abs(drop - first_order) < 0.25 * first_order, seen  # it is the map distance's gradient


def test_a_real_image_is_the_source_and_the_edit_changes_it(models, neg):
    from comfy_extras.nodes_custom_sampler import DisableNoise

    model, clip, vae = models
    lat = encoded(vae, "chelsea", 32)
    pos = clip.encode_from_tokens_scheduled(clip.tokenize(SRC))
    inv, noise, sigmas = node("SelfPerceptualInvert").execute(model=model, latent=lat, positive=pos, negative=neg,
                                                              steps=STEPS, scheduler="normal", cfg=1.0).args
    x = lat["samples"]
    tol = 1e-2 * float(x.abs().max())  # float rounding, as for Prompt-to-Prompt's Direct Inversion
    same = sample(model, guider(models, neg, target=CATS, inversion=inv)[0], noise=DisableNoise.execute().args[0],
                  latent=noise, sigmas=sigmas)
    assert torch.equal(same[1], same[0]) and float((same[0][None] - x).abs().max()) < tol
    edit = sample(model, guider(models, neg, inversion=inv)[0], noise=DisableNoise.execute().args[0], latent=noise,
                  sigmas=sigmas)
    assert float((edit[0][None] - x).abs().max()) < tol
    assert float((edit[1][None] - x).abs().max()) > 10 * tol


def test_the_attention_maps_node_reads_the_guider(models, neg):
    from selfperc_pack.nodes.attention_maps import LABEL, TILE

    g = guider(models, neg)[0]
    out = sample(models[0], g)
    img = node("SelfPerceptualAttentionMaps").execute(guider=g, samples={"samples": out}).args[0]
    assert tuple(img.shape) == (1, 2 * (TILE + LABEL), len(g.plan.source.real) * TILE, 3) and img.std() > 0.05


def test_bad_input_is_refused_before_work_naming_it(models, neg, monkeypatch):
    import comfy.samplers

    from dev.tiny_families import tiny_model

    monkeypatch.setattr(comfy.samplers.CFGGuider, "outer_sample",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampling started")))
    with pytest.raises(ValueError, match="target_sentences is empty"):
        guider(models, neg, target="\n  \n")
    with pytest.raises(ValueError, match="source_sentences, sentence 2 .* encodes to 154 tokens"):
        guider(models, neg, source="a cat\n" + " ".join(["a photo of a cat"] * 20))
    with pytest.raises(ValueError, match="at most 256"):
        guider(models, neg, source="a cat\n" * 300)
    with pytest.raises(ValueError, match="guidance 200 is outside"):
        guider(models, neg, guidance=200.0)
    with pytest.raises(ValueError, match="cfg nan is outside"):
        guider(models, neg, cfg=float("nan"))
    with pytest.raises(ValueError, match="QwenImage .* not a UNet"):
        guider(models, neg, model=tiny_model("qwen_image"))
    with pytest.raises(ValueError, match="sampler 'dpmpp_2m': Pix2Pix-Zero's guidance"):
        sample(models[0], guider(models, neg)[0], sampler="dpmpp_2m")
