"""Prompt-to-Prompt Guider and Attention Maps in-process with the real host: the tiny SD1.x checkpoint (its real
CLIP tokenizer), sampled through core SamplerCustomAdvanced as a workflow runs it."""
import pytest
import torch

from tests.host.test_realimage_eval import encoded, node

pytestmark = pytest.mark.host
SRC = "a photo of a cat riding a bicycle"
STEPS = 6


def guider(models, neg, target=SRC, source=SRC, mode="replace", cfg=7.5, cross=0.8, self_=0.4, reweight="",
           blend="", threshold=0.3, inversion=None, model=None):
    return node("SelfPerceptualPromptToPrompt").execute(
        model=model or models[0], clip=models[1], source_prompt=source, target_prompt=target, negative=neg, mode=mode,
        cfg=cfg, cross_replace=cross, self_replace=self_, reweight=reweight, blend_words=blend,
        blend_threshold=threshold, inversion=inversion).args[0]


class SameNoise:
    """RandomNoise's first image's noise for every image of the batch (what P2P gives both of its branches)."""
    seed = 3

    def generate_noise(self, latent):
        from comfy_extras.nodes_custom_sampler import RandomNoise

        one = RandomNoise.execute(self.seed).args[0].generate_noise({"samples": latent["samples"][:1]})
        return torch.cat([one] * latent["samples"].shape[0])


def sample(model, g, batch=1, sampler="euler", noise=None, latent=None, sigmas=None):
    from comfy_extras.nodes_custom_sampler import BasicScheduler, KSamplerSelect, RandomNoise, SamplerCustomAdvanced

    sigmas = sigmas if sigmas is not None else BasicScheduler.execute(model, "normal", STEPS, 1.0).args[0]
    latent = latent or {"samples": torch.zeros(batch, 4, 16, 16)}
    with torch.inference_mode():
        return SamplerCustomAdvanced.execute(noise or RandomNoise.execute(3).args[0], g,
                                             KSamplerSelect.execute(sampler).args[0], sigmas,
                                             latent).args[0]["samples"]


def plain(models, neg, text, batch):
    from comfy_extras.nodes_custom_sampler import CFGGuider

    clip = models[1]
    pos = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    return sample(models[0], CFGGuider.execute(models[0], pos, neg, 7.5).args[0], batch, noise=SameNoise())


def test_the_source_branch_is_a_plain_sample_and_the_target_never_reaches_it(models, neg):
    out = sample(models[0], guider(models, neg, target="a photo of a dog riding a bicycle"))
    assert out.shape == (2, 4, 16, 16)
    # core CFGGuider at the same batch size (two rows, the same noise): bit-identical
    assert torch.equal(out[0], plain(models, neg, SRC, 2)[0])
    same = sample(models[0], guider(models, neg))
    assert torch.equal(out[0], same[0])  # the target prompt changes nothing in the source row
    assert (out[1] - same[1]).abs().max() > 1e-3  # ... and the target row changes


def test_identical_prompts_every_mode_and_identity_edit_agree_exactly(models, neg):
    rep = sample(models[0], guider(models, neg, mode="replace"))
    # refine's word map is the identity here: every token takes the source's map, as replace does
    assert torch.equal(sample(models[0], guider(models, neg, mode="refine")), rep)
    # reweight 1.0 scales nothing: the same as no reweighting at all
    own = sample(models[0], guider(models, neg, mode="reweight"))
    assert torch.equal(sample(models[0], guider(models, neg, mode="reweight", reweight="cat:1.0")), own)
    assert not torch.equal(sample(models[0], guider(models, neg, mode="reweight", reweight="cat:2.0")), own)
    # the target row's edited attention is computed in float32 by the pack, the source's by the host's kernel
    torch.testing.assert_close(rep[1], rep[0], rtol=0, atol=5e-3)


def test_without_edits_the_target_is_a_plain_sample_of_the_target_prompt(models, neg):
    tgt = "a photo of a dog riding a bicycle"
    out = sample(models[0], guider(models, neg, target=tgt, cross=0.0, self_=0.0))
    # no edit reaches the target's attention: it is the host's own sampling of the target prompt, bit for bit
    assert torch.equal(out[1], plain(models, neg, tgt, 2)[0])
    edited = sample(models[0], guider(models, neg, target=tgt, cross=1.0, self_=1.0))
    assert (edited[1] - out[1]).abs().max() > 1e-3
    assert torch.equal(edited[0], out[0])


def test_reweight_scales_only_the_chosen_word(models, neg):
    g = guider(models, neg, mode="reweight", reweight="cat:3.0")
    w = g.plan.weights
    cat = [j for j, lab in zip(g.plan.target.real, g.plan.target.labels) if lab == "cat"]
    assert len(cat) == 1 and w[cat[0]] == 3.0 and int((w != 1).sum()) == 1
    out = sample(models[0], g)
    assert (out[1] - out[0]).abs().max() > 1e-3


def test_local_blend_keeps_the_source_exactly_outside_the_mask(models, neg):
    g = guider(models, neg, target="a photo of a dog riding a bicycle", blend="cat, dog",
                threshold=0.9)  # the tiny random model's maps are nearly flat: a high threshold makes a region
    out = sample(models[0], g, sampler="dpmpp_2m")
    mask = g.run.mask.bool().expand_as(out[:1])
    assert 0 < mask.float().mean() < 1, "the mask is neither empty nor everything"
    assert torch.equal(out[1][~mask[0]], out[0][~mask[0]])
    assert (out[1][mask[0]] - out[0][mask[0]]).abs().max() > 1e-3


def test_word_alignment_uses_the_real_clip_tokenizer(models):
    from selfperc_pack.nodes import prompt_to_prompt as p2p
    from selfperc_pack.nodes import prompt_tokens as tok

    clip = models[1]
    word = "hippopotamus"
    toks = [t for t, seg in tok._flat(clip.tokenize(word, return_word_ids=True), "l") if seg]
    assert len(toks) > 1, "the test needs a word CLIP splits into several tokens"
    src = tok.encode(clip, f"a {word} in a river", "source")
    tgt = tok.encode(clip, f"a big grey {word} in a river", "target")
    pos_s, pos_t = tok.word_positions(clip, src, word), tok.word_positions(clip, tgt, word)
    assert len(pos_s) == len(pos_t) == len(toks)
    mapper = p2p.make_plan(clip, src.text, tgt.text, "refine", 0.8, 0.4, "", "").mapper
    assert [mapper[j] for j in pos_t] == pos_s  # every token of the multi-token word keeps its source map
    added = [j for j, lab in zip(tgt.real, tgt.labels) if lab in ("big", "grey")]
    assert len(added) == 2 and all(mapper[j] == -1 for j in added)
    assert mapper[0] == 0  # the start token
    # a whitespace split would pair word 4 with word 2; the tokenizer's positions are what the maps are indexed by
    assert len(tgt.real) == len(src.real) + 2


def test_a_real_image_reconstructs_from_its_inversion_and_is_edited(models, neg):
    from comfy_extras.nodes_custom_sampler import DisableNoise

    model, clip, vae = models
    lat = encoded(vae, "chelsea", 32)
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
    inv, noise, sigmas = node("SelfPerceptualInvert").execute(model=model, latent=lat, positive=pos, negative=neg,
                                                              steps=STEPS, scheduler="normal", cfg=1.0).args
    same = sample(model, guider(models, neg, "a photo of a cat", "a photo of a cat", inversion=inv),
                  noise=DisableNoise.execute().args[0], latent=noise, sigmas=sigmas)
    x = lat["samples"]
    # float rounding only, as for the Inversion Guider's direct method (the tiny random UNet's steep Jacobian x
    # cfg 7.5 amplifies the start's rounding): the source row, and the target with the same prompt, return the image
    tol = 1e-2 * float(x.abs().max())
    for row in same:
        assert float((row[None] - x).abs().max()) < tol
    edit = sample(model, guider(models, neg, "a photo of a cat", "a photo of a dog", inversion=inv),
                  noise=DisableNoise.execute().args[0], latent=noise, sigmas=sigmas)
    assert float((edit[0][None] - x).abs().max()) < tol
    assert float((edit[1][None] - x).abs().max()) > 10 * tol


def test_maps_are_kept_only_at_the_map_level_and_the_steps_that_use_them(models, neg):
    g = guider(models, neg, target="a photo of a dog riding a bicycle", cross=0.5, self_=0.34)
    sample(models[0], g, batch=2)
    run = g.run
    # one (rows, positions, tokens) sum over steps: 2 branches x 2 images, the map level's grid, 77 tokens
    assert tuple(run.maps.shape) == (4, 16 * 16, 77) and run.grid == (16, 16)
    self_steps = {s for kind, _, s in run.calls if kind == "self"}
    assert self_steps == {0, 1}  # round(0.34 * 6) = 2 steps of self-attention injection, none after
    # cross-attention maps: every step at the map level (the map image and local blending read them)
    assert {s for kind, _, s in run.calls if kind == "cross"} == set(range(STEPS))
    assert {lvl for _, lvl, _ in run.calls} == {run.level}


def test_attention_maps_image_shows_every_word(models, neg):
    from selfperc_pack.nodes.attention_maps import LABEL, TILE

    g = guider(models, neg, target="a photo of a dog riding a bicycle", blend="dog")
    out = sample(models[0], g)
    img = node("SelfPerceptualAttentionMaps").execute(guider=g, samples={"samples": out}).args[0]
    words = len(g.plan.target.real) + 1  # and the blend mask
    assert tuple(img.shape) == (1, 2 * (TILE + LABEL), words * TILE, 3)
    assert img.std() > 0.05
    with pytest.raises(ValueError, match="made 2"):
        node("SelfPerceptualAttentionMaps").execute(guider=g, samples={"samples": out[:1]})


def test_bad_input_is_refused_before_work_naming_it(models, neg, monkeypatch):
    import comfy.samplers

    from dev.tiny_families import tiny_model

    def no_sampling(*a, **k):
        raise AssertionError("sampling started")
    with pytest.raises(ValueError, match="source prompt has 8 tokens and the target 9"):
        guider(models, neg, target="a photo of a fluffy cat riding a bicycle", mode="replace")
    with pytest.raises(ValueError, match="'zebra' is not in the target prompt"):
        guider(models, neg, mode="reweight", reweight="zebra:2")
    with pytest.raises(ValueError, match="'zebra' is in neither"):
        guider(models, neg, blend="zebra")
    with pytest.raises(ValueError, match="weight 'lots' of 'cat'"):
        guider(models, neg, mode="reweight", reweight="cat:lots")
    with pytest.raises(ValueError, match="ComfyUI encodes in chunks of 77"):
        guider(models, neg, target=" ".join(["a photo of a cat"] * 20), mode="refine")
    with pytest.raises(ValueError, match="QwenImage .* not a UNet"):
        guider(models, neg, model=tiny_model("qwen_image"))
    with pytest.raises(ValueError, match="the CLIP's text is 768 wide but SD3 reads 64-wide text"):
        guider(models, neg, model=tiny_model("sd3"))
    patched = models[0].clone()
    patched.set_model_attn2_replace(lambda q, k, v, e: q, "middle", 0)
    with pytest.raises(ValueError, match="already has attention replace patches"):
        guider(models, neg, model=patched)
    from tests.host.models import as_parameterization

    model, clip, vae = models
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
    inv = node("SelfPerceptualInvert").execute(model=model, latent=encoded(vae, "chelsea", 32), positive=pos,
                                               negative=neg, steps=2, scheduler="normal", cfg=1.0).args[0]
    monkeypatch.setattr(comfy.samplers.CFGGuider, "outer_sample", no_sampling)
    with pytest.raises(ValueError, match="Prompt-to-Prompt: the inversion was made with"):
        guider(models, neg, inversion=inv, model=as_parameterization(model, "flow"))
    with pytest.raises(ValueError, match="sampler 'euler_ancestral' adds its own noise"):
        sample(models[0], guider(models, neg), sampler="euler_ancestral")
