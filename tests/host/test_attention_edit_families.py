"""Prompt-to-Prompt and Pix2Pix-Zero on SD2.x and SDXL in-process: tiny random UNets of the host's own model
classes with tiny text encoders of the host's own classes and real tokenizers (dev/tiny_clips.py): OpenCLIP-H's
padding token 0, SDXL's two CLIP streams side by side and its pooled vector."""
import pytest
import torch

from tests.host.test_prompt_to_prompt import SameNoise, guider, sample
from tests.host.test_realimage_eval import node

pytestmark = pytest.mark.host
SRC = "a photo of a cat riding a bicycle"
DOG = "a photo of a dog riding a bicycle"


@pytest.fixture(scope="module", params=["sd20_v", "sdxl"])
def fam(request, comfy, pack):
    from dev.tiny_clips import tiny_clip
    from dev.tiny_families import tiny_model

    model, clip = tiny_model(request.param), tiny_clip(request.param)
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    return request.param, (model, clip), neg


def plain(models, neg, text, batch=2):
    from comfy_extras.nodes_custom_sampler import CFGGuider

    clip = models[1]
    pos = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    return sample(models[0], CFGGuider.execute(models[0], pos, neg, 7.5).args[0], batch, noise=SameNoise())


def test_the_source_is_a_plain_sample_and_identity_edits_are_exact(fam):
    family, models, neg = fam
    out = sample(models[0], guider(models, neg, target=DOG), noise=SameNoise())
    assert torch.equal(out[0], plain(models, neg, SRC)[0])  # core CFGGuider, the same batch and noise
    assert (out[1] - out[0]).abs().max() > 1e-3
    rep = sample(models[0], guider(models, neg, mode="replace"), noise=SameNoise())
    assert torch.equal(sample(models[0], guider(models, neg, mode="refine"), noise=SameNoise()), rep)
    own = sample(models[0], guider(models, neg, mode="reweight"), noise=SameNoise())
    assert torch.equal(sample(models[0], guider(models, neg, mode="reweight", reweight="cat:1.0"),
                              noise=SameNoise()), own)
    torch.testing.assert_close(rep[1], rep[0], rtol=0, atol=5e-3)
    # no edit steps: the target is the host's own sample of the target prompt
    free = sample(models[0], guider(models, neg, target=DOG, cross=0.0, self_=0.0), noise=SameNoise())
    assert torch.equal(free[1], plain(models, neg, DOG)[0])


def test_the_prompts_own_tokens_are_the_ones_between_start_and_end(fam):
    from selfperc_pack.nodes import prompt_to_prompt as p2p
    from selfperc_pack.nodes import prompt_tokens as tok

    family, (model, clip), neg = fam
    p = tok.encode(clip, "a cat !", "source")
    assert p.real == [1, 2, 3] and p.labels == ["a", "cat", "!"]
    # OpenCLIP-H (SD2) pads with token 0 (a vocabulary entry, '!' without end-of-word), CLIP-L with the end token
    assert p.ids[-1] == (0 if family == "sd20_v" else 49407)
    assert tok.word_positions(clip, p, "!") == [p.real[-1]]
    plan = p2p.make_plan(clip, "a cat !", "a big cat !", "refine", 0.8, 0.4, "", "")
    tgt = plan.target
    assert [plan.mapper[j] for j in tgt.real] == [p.real[0], -1, p.real[1], p.real[2]]


def test_local_blend_keeps_the_source_outside_the_mask(fam):
    family, models, neg = fam
    # the tiny random models' maps are nearly flat (the words' summed maps span 0.93-1 of their maximum on SD2,
    # 0.998-1 on SDXL): thresholds inside that span make a region
    g = guider(models, neg, target=DOG, blend="cat, dog", threshold={"sd20_v": 0.98, "sdxl": 0.9994}[family])
    out = sample(models[0], g, sampler="dpmpp_2m", noise=SameNoise(), latent={"samples": torch.zeros(1, 4, 32, 32)})
    mask = g.run.mask.bool().expand_as(out[:1])[0]
    assert 0 < mask.float().mean() < 1
    assert torch.equal(out[1][~mask], out[0][~mask]) and (out[1][mask] - out[0][mask]).abs().max() > 1e-3


def test_pix2pix_zero_moves_the_pooled_vector_and_a_zero_direction_reconstructs(fam):
    family, models, neg = fam
    cats, dogs = "a photo of a cat\na cat on the grass", "a photo of a dog\na dog on the grass"

    def run(target, guidance):
        return node("SelfPerceptualPix2PixZero").execute(
            model=models[0], clip=models[1], source_prompt="a photo of a cat", source_sentences=cats,
            target_sentences=target, negative=neg, cfg=7.5, strength=1.0, guidance=guidance, inversion=None).args

    g, edited = run(cats, 1.0)
    out = sample(models[0], g, noise=SameNoise())
    assert all(v == 0.0 for v in g.losses) and torch.equal(out[1], out[0])
    g, edited = run(dogs, 1.0)
    src = g.plan.source.extras["pooled_output"]
    assert not torch.equal(edited[0][1]["pooled_output"], src)  # SD2's and SDXL's pooled output moves too
    out = sample(models[0], g, noise=SameNoise())
    assert g.losses[0] > 0 and (out[1] - out[0]).abs().max() > 1e-3
