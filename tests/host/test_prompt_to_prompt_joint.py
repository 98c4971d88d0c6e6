"""Prompt-to-Prompt on joint attention (experimental) in-process: tiny random Flux.1 and SD3 models of the host's
own classes with tiny text encoders of the host's classes and the real tokenizers (Flux: the maps index T5's 256
positions; SD3: CLIP's 77 positions then T5's 77), sampled through core SamplerCustomAdvanced."""
import pytest
import torch

from tests.host.test_prompt_to_prompt import SameNoise, guider, sample
from tests.host.test_realimage_eval import node

pytestmark = pytest.mark.host
SRC = "a photo of a cat riding a bicycle"
DOG = "a photo of a dog riding a bicycle"


SPANS = {"flux": (("t5xxl", 0, 256),), "sd3": (("l", 0, 77), ("t5xxl", 77, 154))}
SPANS["sd35"] = SPANS["sd3"]


# SD3.5's first blocks add an image-only self-attention, which the edit leaves to the host
@pytest.fixture(scope="module", params=["flux", "sd3", "sd35"])
def flux(request, comfy, pack):
    from dev.tiny_clips import model_for, tiny_clip

    model, clip = model_for(request.param), tiny_clip(request.param)
    # at the tiny models' N(0, 0.02) the random Flux barely reads its prompt (two prompts' samples differ by 1e-4);
    # N(0, 0.06) matrices make it read it (1e-2) so that edits show
    with torch.no_grad():
        for p in model.model.diffusion_model.parameters():
            if p.ndim == 2:
                p.mul_(3.0)
    return (model, clip), clip.encode_from_tokens_scheduled(clip.tokenize("")), request.param


def latent(batch=1, side=8):
    return {"samples": torch.zeros(batch, 16, side, side)}


def run(models, neg, cfg=1.0, sampler="euler", side=8, **kw):
    g = guider(models, neg, cfg=cfg, **kw)
    return g, sample(models[0], g, sampler=sampler, noise=SameNoise(), latent=latent(side=side))


def plain(models, neg, text, cfg=1.0):
    from comfy_extras.nodes_custom_sampler import CFGGuider

    clip = models[1]
    pos = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    return sample(models[0], CFGGuider.execute(models[0], pos, neg, cfg).args[0], noise=SameNoise(),
                  latent=latent(2))


@pytest.mark.parametrize("cfg", [1.0, 3.5])
def test_the_source_is_a_plain_flux_sample_and_the_edit_reaches_only_the_target(flux, cfg):
    models, neg, family = flux
    g, out = run(models, neg, cfg, target=DOG)
    assert g.plan.source.spans == SPANS[family]
    assert torch.equal(out[0], plain(models, neg, SRC, cfg)[0])  # core CFGGuider, the same batch and noise
    _, same = run(models, neg, cfg)
    assert torch.equal(same[0], out[0]) and (out[1] - same[1]).abs().max() > 1e-4
    # no edit steps: the target is the host's own sample of the target prompt, bit for bit
    _, free = run(models, neg, cfg, target=DOG, cross=0.0, self_=0.0)
    assert torch.equal(free[1], plain(models, neg, DOG, cfg)[0])
    assert (out[1] - free[1]).abs().max() > 1e-4  # ... and the edit moved it


def test_a_negative_of_another_length_runs_beside_the_edit(flux):
    from comfy_extras.nodes_custom_sampler import CFGGuider

    models, _, family = flux
    clip = models[1]
    long_neg = clip.encode_from_tokens_scheduled(clip.tokenize(", ".join(["a blurry red picture"] * 70)))
    assert long_neg[0][0].shape[1] != SPANS[family][-1][-1]  # so ComfyUI runs it in a model call of its own
    _, out = run(models, long_neg, 3.5, target=DOG)
    pos = clip.encode_from_tokens_scheduled(clip.tokenize(SRC))
    ref = sample(models[0], CFGGuider.execute(models[0], pos, long_neg, 3.5).args[0], noise=SameNoise(),
                 latent=latent(2))
    assert torch.equal(out[0], ref[0])


def test_identity_edits_are_exact_and_identical_prompts_give_the_source(flux):
    models, neg, family = flux
    _, rep = run(models, neg, mode="replace")
    _, ref = run(models, neg, mode="refine")
    assert torch.equal(rep, ref)  # refine's word map is the identity for identical prompts
    _, own = run(models, neg, mode="reweight")
    _, one = run(models, neg, mode="reweight", reweight="cat:1.0")
    assert torch.equal(own, one)
    _, two = run(models, neg, mode="reweight", reweight="cat:3.0")
    assert (two[1] - own[1]).abs().max() > 1e-5
    # the target's rows are recomputed in float32 by the pack, the source's by the host's kernel
    torch.testing.assert_close(rep[1], rep[0], rtol=0, atol=1e-4)


def test_maps_local_blend_and_the_map_image(flux):
    models, neg, family = flux
    # the random model's pooled word maps span 0.34-1 of their maximum at this size: 0.85 makes a region
    g, out = run(models, neg, target=DOG, blend="cat, dog", threshold=0.85, sampler="dpmpp_2m", side=16)
    r = g.run
    # 16x16 latent in 2x2 patches; every text position
    assert r.grid == (8, 8) and r.maps.shape == (2, 64, SPANS[family][-1][-1])
    kinds = {c[:2] for c in r.calls}
    assert kinds == ({("joint", "double"), ("joint", "single")} if family == "flux" else {("joint", None)})
    mask = r.mask.bool().expand_as(out[:1])[0]
    if not 0 < mask.float().mean() < 1:
        pytest.fail(f"the blend mask covers {float(mask.float().mean()):.2f} of the latent; pick a threshold "
                    "inside the tiny model's map range")
    assert torch.equal(out[1][~mask], out[0][~mask]) and (out[1][mask] - out[0][mask]).abs().max() > 1e-5
    img = node("SelfPerceptualAttentionMaps").execute(guider=g, samples={"samples": out}).args[0]
    words = len(g.plan.source.real)
    assert img.shape[0] == 1 and img.shape[2] == 96 * max(words, len(g.plan.target.real) + 1)


def test_flux_refusals_name_the_problem(flux):
    from dev.tiny_families import tiny_model

    models, neg, family = flux
    with pytest.raises(ValueError, match="Pix2Pix-Zero's map guidance here differentiates UNet"):
        node("SelfPerceptualPix2PixZero").execute(
            model=models[0], clip=models[1], source_prompt=SRC, source_sentences="a cat", target_sentences="a dog",
            negative=neg, cfg=1.0, strength=1.0, guidance=1.0, inversion=None)
    with pytest.raises(ValueError, match="Flux.2, Chroma"):
        guider((tiny_model("qwen_image"), models[1]), neg)
    m = models[0].clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = lambda f, *a, **k: f(*a, **k)
    with pytest.raises(ValueError, match="already has an attention override"):
        guider((m, models[1]), neg)
    with pytest.raises(ValueError, match="sampler 'euler_ancestral' adds its own noise"):
        run(models, neg, sampler="euler_ancestral")


def test_a_latent_reconstructs_from_its_inversion_on_flux_and_is_edited(flux):
    from comfy_extras.nodes_custom_sampler import DisableNoise

    models, neg, family = flux
    model, clip = models
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    pos = clip.encode_from_tokens_scheduled(clip.tokenize(SRC))
    inv, noise, sigmas = node("SelfPerceptualInvert").execute(model=model, latent={"samples": x}, positive=pos,
                                                              negative=neg, steps=6, scheduler="simple",
                                                              cfg=1.0).args

    def edit(target):
        g = guider(models, neg, source=SRC, target=target, cfg=1.0, inversion=inv)
        return sample(model, g, noise=DisableNoise.execute().args[0], latent=noise, sigmas=sigmas)
    same, dog = edit(SRC), edit(DOG)
    err = max(float((row[None] - x).abs().max()) for row in (*same, dog[0]))
    # the source rows (and a target of the same prompt) return the latent to float rounding; the edit moves it
    assert err < 1e-3 * float(x.abs().max())
    assert float((dog[1][None] - x).abs().max()) > 10 * err, (err, float((dog[1][None] - x).abs().max()))


def test_labels_are_t5_words(flux):
    from selfperc_pack.nodes import prompt_tokens as tok

    models, _, family = flux
    p = tok.encode(models[1], "a cat on a hippopotamus", "source")
    # T5 splits off a bare word-start piece before some words; it is labelled '_'. SD3: CLIP's words, then T5's
    words = "acatonahippopotamus" * len(SPANS[family])
    assert "".join(p.labels).replace("_", "") == words and len(p.labels) > 5
    pos = tok.word_positions(models[1], p, "hippopotamus")
    ends = [end for _, _, end in SPANS[family]]
    for _, start, end in SPANS[family]:  # the word's tokens are the last real ones of each stream
        inside = [j for j in pos if start <= j < end]
        assert inside and inside == [j for j in p.real if start <= j < end][-len(inside):], (pos, ends)
