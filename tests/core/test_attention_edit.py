"""Prompt-to-Prompt's attention edits (selfperc_core.attention_edit): alignment, the edits' identities and
formulas, local blending; Pix2Pix-Zero's edit direction and guidance loss."""
import pytest
import torch

from selfperc_core.attention_edit import (
    align,
    attend,
    attention_probs,
    blend_mask,
    edit_cross_attention,
    edit_direction,
    joint_edit,
    joint_target_probs,
    local_blend,
    map_guidance_loss,
    pair_rows,
)


def probs(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).softmax(-1)


def test_alignment_pairs_shared_words_around_insertions_and_swaps():
    # token ids as a tokenizer gives them; 7 = start, 9 = end
    src = [7, 11, 12, 13, 9]            # <s> a cat sitting </s>
    tgt = [7, 11, 40, 12, 13, 9]        # <s> a fluffy cat sitting </s>
    assert align(src, tgt) == [0, 1, -1, 2, 3, 4]
    assert align(src, src) == list(range(len(src)))
    assert align(src, [7, 11, 50, 13, 9]) == [0, 1, -1, 3, 4]  # a word swapped: no source map for it
    assert align(src, [7, 11, 50, 51, 12, 13, 9]) == [0, 1, -1, -1, 2, 3, 4]  # a two-token word inserted
    assert align(src, [7, 9]) == [0, 4]


def test_identical_prompts_and_unit_weights_are_exact_no_ops():
    a = probs(2, 16, 6)
    for mode in ("replace", "refine", "reweight"):
        out = edit_cross_attention(a, a.clone(), mode, mapper=list(range(6)), weights=torch.ones(6))
        assert torch.equal(out, a)


def test_each_edit_is_its_formula():
    s, t = probs(2, 16, 6, seed=1), probs(2, 16, 6, seed=2)
    assert torch.equal(edit_cross_attention(s, t, "replace"), s)
    mapper = [0, 1, -1, 2, 3, 4]
    out = edit_cross_attention(s, t, "refine", mapper=mapper)
    for j, i in enumerate(mapper):
        assert torch.equal(out[..., j], s[..., i] if i >= 0 else t[..., j])
    w = torch.tensor([1.0, 1.0, 2.0, 1.0, 0.5, 1.0])
    torch.testing.assert_close(edit_cross_attention(s, t, "reweight", weights=w), t * w, rtol=0, atol=0)
    torch.testing.assert_close(edit_cross_attention(s, t, "replace", weights=w), s * w, rtol=0, atol=0)


def test_bad_edits_are_refused_by_name():
    s = probs(1, 4, 5)
    with pytest.raises(ValueError, match="unknown attention edit"):
        edit_cross_attention(s, s, "swap")
    with pytest.raises(ValueError, match="5 tokens, 3 given"):
        edit_cross_attention(s, s, "refine", mapper=[0, 1, 2])
    with pytest.raises(ValueError, match="differ in shape"):
        edit_cross_attention(s, probs(1, 4, 6), "replace")
    with pytest.raises(ValueError, match="4x4 grid"):
        blend_mask(s, [1], (4, 4), (8, 8))
    with pytest.raises(ValueError, match="at least one token"):
        blend_mask(probs(1, 16, 5), [], (4, 4), (8, 8))


def test_local_blend_keeps_the_source_exactly_outside_where_the_word_attends():
    maps = torch.full((1, 16, 5), 0.01)
    maps[0, 5, 2] = 1.0  # token 2 attends at grid cell (1, 1) of 4x4
    mask = blend_mask(maps, [2], (4, 4), (8, 8))
    assert mask.shape == (1, 1, 8, 8) and 0 < mask.sum() < 64
    assert mask[0, 0, 2:4, 2:4].eq(1).all() and mask[0, 0, 7, 7] == 0
    src, tgt = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    out = local_blend(src, tgt, mask)
    outside = mask.expand_as(src) == 0
    assert torch.equal(out[outside], src[outside]) and torch.equal(out[~outside], tgt[~outside])


def test_attention_probs_and_attend_are_scaled_dot_product_attention():
    torch.manual_seed(0)
    b, nq, nk, heads, d = 3, 10, 7, 4, 8
    q, k, v = torch.randn(b, nq, heads * d), torch.randn(b, nk, heads * d), torch.randn(b, nk, heads * d)
    p = attention_probs(q, k, heads)
    assert p.shape == (b, heads, nq, nk)
    torch.testing.assert_close(p.sum(-1), torch.ones(b, heads, nq))
    split = lambda t: t.reshape(b, -1, heads, d).transpose(1, 2)  # noqa: E731
    ref = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    torch.testing.assert_close(attend(p, v), ref.transpose(1, 2).reshape(b, nq, heads * d), rtol=1e-5, atol=1e-5)


def test_pair_rows_follow_the_hosts_chunk_layout():
    # chunks [cond, uncond], 2 pairs each: rows 0-1 sources, 2-3 targets of the conditional chunk; uncond untouched
    assert pair_rows([True, False], 2) == ([0, 1], [2, 3])
    assert pair_rows([False, True], 2) == ([4, 5], [6, 7])
    assert pair_rows([False], 1) == ([], [])


def test_edit_direction_is_the_difference_of_the_sentence_means_and_zero_for_equal_sets():
    g = torch.Generator().manual_seed(0)
    src = [torch.randn(1, 6, 4, generator=g) for _ in range(3)]
    tgt = [torch.randn(1, 6, 4, generator=g) for _ in range(2)]
    d = edit_direction(src, tgt)
    torch.testing.assert_close(d, (tgt[0] + tgt[1]) / 2 - (src[0] + src[1] + src[2]) / 3)
    assert torch.equal(edit_direction(src, list(src)), torch.zeros(1, 6, 4))  # exactly, not nearly
    with pytest.raises(ValueError, match="differ in shape"):
        edit_direction(src, [torch.randn(1, 12, 4)])
    with pytest.raises(ValueError, match="0 target"):
        edit_direction(src, [])


def test_map_guidance_loss_is_the_summed_squared_map_difference_and_its_gradient_vanishes_at_equal_maps():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(2, 3, 5, 4, generator=g)
    edit = torch.rand(2, 3, 5, 4, generator=g, requires_grad=True)
    loss = map_guidance_loss(edit, ref)
    torch.testing.assert_close(loss, ((edit - ref) ** 2).sum((-2, -1)).mean())
    (grad,) = torch.autograd.grad(loss, edit)
    torch.testing.assert_close(grad, 2 * (edit - ref).detach() / 6)  # mean over 2 rows x 3 heads
    same, reference = ref.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    loss = map_guidance_loss(same, reference)
    loss.backward()
    assert loss == 0 and not torch.count_nonzero(same.grad)  # exactly zero at equal maps
    assert reference.grad is None  # the reference is a target: no gradient reaches it


def _joint(seed, b=2, h=3, n_txt=5, n_img=12, d=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n_txt + n_img, d, generator=g) for _ in range(3)]


def test_joint_edit_without_an_edit_is_the_joint_attention_of_the_image_queries():
    q, k, v = _joint(0)
    n_txt = 5
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)[:, :, n_txt:].transpose(1, 2).flatten(2)
    for budget in (2 ** 28, 1):  # one chunk, and one query per chunk
        out, ms, mt = joint_edit(q, k, q, k, v, n_txt, budget=budget)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert ms.shape == mt.shape == (2, 12, n_txt) and torch.equal(ms, mt)
    # the source's text maps handed to an identical target (replace) change nothing, bit for bit
    same, _, _ = joint_edit(q, k, q, k, v, n_txt, edit_text=lambda ps, pt: ps)
    assert torch.equal(same, joint_edit(q, k, q, k, v, n_txt)[0])
    assert joint_edit(q, k, q, k, v, n_txt, edit=False)[0] is None


def test_joint_target_probs_take_the_edited_text_part_and_keep_rows_summing_to_one():
    qs, ks, _ = _joint(1)
    qt, kt, _ = _joint(2)
    n_txt = 5
    sm = lambda q, k: torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, -1)[:, :, n_txt:]  # noqa: E731
    ps, pt = sm(qs, ks), sm(qt, kt)
    p = joint_target_probs(ps, pt, n_txt, ps[..., :n_txt], inject_self=False)
    assert torch.equal(p[..., :n_txt], ps[..., :n_txt])  # the source's maps over the text tokens
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
    img = p[..., n_txt:] / p[..., n_txt:].sum(-1, keepdim=True)  # the target's own image distribution
    torch.testing.assert_close(img, pt[..., n_txt:] / pt[..., n_txt:].sum(-1, keepdim=True))
    inj = joint_target_probs(ps, pt, n_txt, None, inject_self=True)
    torch.testing.assert_close(inj[..., n_txt:] / inj[..., n_txt:].sum(-1, keepdim=True),
                               ps[..., n_txt:] / ps[..., n_txt:].sum(-1, keepdim=True))
    torch.testing.assert_close(joint_target_probs(ps, pt, n_txt, None, False), pt)
    # a reweighted text part larger than 1 leaves the image part no mass, never a negative one
    big = joint_target_probs(ps, pt, n_txt, ps[..., :n_txt] * 100, False)
    assert float(big[..., n_txt:].min()) == 0.0
