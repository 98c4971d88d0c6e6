"""Prompt-to-Prompt's attention edits (Hertz et al. 2022) on plain tensors: token alignment, the edits of the
target prompt's cross-attention probabilities from the source's, and local blending.

Attention probabilities are (..., Q, K): Q image positions, K text tokens. The host computes them from its own
q, k, v and puts the edited ones back; nothing here knows a model.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

EDIT_MODES = ("replace", "refine", "reweight")


def align(src: Sequence, tgt: Sequence) -> list[int]:
    """For each target token, the index of the source token it is the same word as, or -1 (a word the target
    added or changed): a global alignment (Needleman-Wunsch: match +1, mismatch and gap -1) of the two token
    sequences, so the words shared around an insertion keep their pairing."""
    n, m = len(src), len(tgt)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        score[i][0] = -i
    for j in range(1, m + 1):
        score[0][j] = -j
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diag = score[i - 1][j - 1] + (1 if src[i - 1] == tgt[j - 1] else -1)
            score[i][j] = max(diag, score[i - 1][j] - 1, score[i][j - 1] - 1)
    mapper = [-1] * m
    i, j = n, m
    while i > 0 and j > 0:
        same = src[i - 1] == tgt[j - 1]
        if score[i][j] == score[i - 1][j - 1] + (1 if same else -1):
            if same:
                mapper[j - 1] = i - 1
            i, j = i - 1, j - 1
        elif score[i][j] == score[i - 1][j] - 1:
            i -= 1
        else:
            j -= 1
    return mapper


def edit_cross_attention(src: Tensor, tgt: Tensor, mode: str, mapper: Sequence[int] | None = None,
                         weights: Tensor | None = None) -> Tensor:
    """The target branch's cross-attention probabilities after Prompt-to-Prompt's edit:

    - ``replace`` (word swap, prompts of equal token length): the source's maps, so the layout stays and only the
      values (the new words' text) change;
    - ``refine`` (added words): target token j takes the source's map of token ``mapper[j]`` where it has one
      (``align``), and keeps its own where it is new (-1);
    - ``reweight``: the target's maps scaled per token by ``weights`` (K,) (1 = unchanged).

    ``weights`` also applies after replace / refine, as in the paper's combined edits.
    """
    if mode not in EDIT_MODES:
        raise ValueError(f"unknown attention edit {mode!r}; choose one of {EDIT_MODES}")
    if src.shape != tgt.shape:
        raise ValueError(f"source and target attention maps differ in shape: {tuple(src.shape)} vs "
                         f"{tuple(tgt.shape)}")
    if mode == "replace":
        out = src
    elif mode == "refine":
        k = tgt.shape[-1]
        if mapper is None or len(mapper) != k:
            raise ValueError(f"refine needs one source index (or -1) per target token: {k} tokens, "
                             f"{None if mapper is None else len(mapper)} given")
        idx = torch.tensor([j if j >= 0 else 0 for j in mapper], device=src.device)
        keep = torch.tensor([j >= 0 for j in mapper], device=src.device)
        out = torch.where(keep, src.index_select(-1, idx), tgt)
    else:
        out = tgt
    if weights is not None:
        out = out * weights.to(out)
    return out


def blend_mask(maps: Tensor, tokens: Sequence[int], grid: tuple[int, int], size: tuple[int, int],
               threshold: float = 0.3) -> Tensor:
    """Local blending's mask: where the chosen ``tokens`` attend. ``maps`` (B, Q, K) cross-attention
    probabilities (averaged over heads and layers) at a ``grid`` of Q = h * w positions; the chosen tokens' maps
    are summed, smoothed (3x3 max-pool), resized to ``size`` (the latent's), divided by their maximum and
    thresholded: (B, 1, H, W) of 0 / 1."""
    h, w = grid
    if maps.shape[-2] != h * w:
        raise ValueError(f"{maps.shape[-2]} attention positions are not a {h}x{w} grid")
    if not tokens:
        raise ValueError("local blending needs at least one token to blend at")
    m = maps[..., list(tokens)].sum(-1).reshape(-1, 1, h, w).float()
    m = torch.nn.functional.max_pool2d(m, 3, stride=1, padding=1)
    m = torch.nn.functional.interpolate(m, size=size, mode="bilinear", align_corners=False)
    m = m / m.flatten(1).amax(1).clamp_min(1e-12).reshape(-1, 1, 1, 1)
    return (m > threshold).to(maps.dtype)


def local_blend(source: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """The target latent inside ``mask``, the source's outside (exactly: outside it is the source itself)."""
    return torch.where(mask.to(torch.bool), target, source)


def attention_probs(q: Tensor, k: Tensor, heads: int) -> Tensor:
    """Softmax(q k^T / sqrt(d)) per head, in float32 (the maps the edits act on): q (B, Q, H*D), k (B, K, H*D)
    -> (B, H, Q, K)."""
    b, nq, hd = q.shape
    d = hd // heads
    qh = q.reshape(b, nq, heads, d).transpose(1, 2).float()
    kh = k.reshape(b, k.shape[1], heads, d).transpose(1, 2).float()
    return torch.softmax(qh @ kh.transpose(-1, -2) * d ** -0.5, dim=-1)


def attend(probs: Tensor, v: Tensor) -> Tensor:
    """The attention output for (edited) ``probs`` (B, H, Q, K) and values v (B, K, H*D): (B, Q, H*D) in v's
    dtype."""
    b, heads, nq, _ = probs.shape
    vh = v.reshape(b, v.shape[1], heads, -1).transpose(1, 2).float()
    return (probs @ vh).transpose(1, 2).reshape(b, nq, -1).to(v.dtype)


def pair_rows(chunks: Sequence[bool], pairs: int) -> tuple[list[int], list[int]]:
    """Batch rows of the source and target images in the edited chunks of a model call. The call's batch is
    ``len(chunks)`` chunks (ComfyUI batches the conditional and unconditional branches together), each laid out
    as ``pairs`` source images then their ``pairs`` targets; ``chunks[c]`` says whether chunk c is edited (the
    conditional branch, as in Prompt-to-Prompt)."""
    src, tgt = [], []
    for c, edited in enumerate(chunks):
        if edited:
            base = c * 2 * pairs
            src += range(base, base + pairs)
            tgt += range(base + pairs, base + 2 * pairs)
    return src, tgt


def edit_direction(source: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
    """Pix2Pix-Zero's edit direction (Parmar et al. 2023): the mean of the target sentences' embeddings minus the
    mean of the source sentences' (each one sentence's text-encoder output, all of one shape). The edit samples
    with the source prompt's embedding plus this; identical sets give exactly zero. Float32."""
    if not source or not target:
        raise ValueError(f"an edit direction needs sentences on both sides: {len(source)} source, "
                         f"{len(target)} target")
    shapes = {tuple(t.shape) for t in (*source, *target)}
    if len(shapes) != 1:
        raise ValueError(f"the sentence embeddings differ in shape: {sorted(shapes)}")
    return torch.stack([t.float() for t in target]).mean(0) - torch.stack([t.float() for t in source]).mean(0)


def map_guidance_loss(edit: Tensor, reference: Tensor) -> Tensor:
    """Pix2Pix-Zero's cross-attention guidance loss at one layer: the squared difference of the edited branch's
    attention probabilities from the reference branch's, both (B, H, Q, K), summed over positions and tokens and
    averaged over rows and heads (as diffusers' pipeline does); the reference carries no gradient. Float32."""
    if edit.shape != reference.shape:
        raise ValueError(f"edited and reference maps differ in shape: {tuple(edit.shape)} vs "
                         f"{tuple(reference.shape)}")
    return (edit.float() - reference.detach().float()).square().sum((-2, -1)).mean()


def joint_target_probs(ps: Tensor, pt: Tensor, n_txt: int, text: Tensor | None, inject_self: bool) -> Tensor:
    """The target's edited probabilities in a joint (MM-DiT) attention, where image queries attend the text
    tokens (the first ``n_txt`` keys) and the image tokens in one softmax: ``ps`` / ``pt`` (..., Q, n_txt + N).

    The text part becomes ``text`` (the edited cross-attention maps; None: the target's own); the image part
    keeps its distribution (the source's when ``inject_self``, the target's otherwise) and takes the mass the
    text part leaves, so every row still sums to 1 (exactly the target's own row when nothing is edited)."""
    txt = pt[..., :n_txt] if text is None else text
    img = (ps if inject_self else pt)[..., n_txt:]
    share = (1.0 - txt.sum(-1, keepdim=True)).clamp_min(0.0)
    return torch.cat([txt, img * (share / img.sum(-1, keepdim=True).clamp_min(1e-30))], dim=-1)


def joint_edit(qs: Tensor, ks: Tensor, qt: Tensor, kt: Tensor, vt: Tensor, n_txt: int, edit_text=None,
               inject_self: bool = False, edit: bool = True, budget: int = 2 ** 28):
    """Prompt-to-Prompt in a joint attention, for the image queries of paired source / target rows:
    q, k, v (B, H, L, D) with the text tokens first (L = n_txt + N image tokens).

    Returns (out, maps_src, maps_tgt): the target's attention output at the image positions (B, N, H*D), float32,
    from its edited probabilities (None when not ``edit``), and both branches' image-to-text maps (B, N, n_txt)
    averaged over heads. ``edit_text(ps_txt, pt_txt)`` edits the text part (Prompt-to-Prompt's replace / refine /
    reweight); None keeps the target's. Queries go in chunks so the float32 probabilities of one chunk stay under
    ``budget`` bytes."""
    b, h, length, d = qt.shape
    chunk = max(1, budget // max(1, 2 * b * h * length * 4))
    scale = d ** -0.5
    outs, m_s, m_t = [], [], []
    ks_t, kt_t, vt = ks.float().transpose(-1, -2), kt.float().transpose(-1, -2), vt.float()  # once, not per chunk
    for c0 in range(n_txt, length, chunk):
        c1 = min(length, c0 + chunk)
        ps = torch.softmax(qs[:, :, c0:c1].float() @ ks_t * scale, dim=-1)
        pt = torch.softmax(qt[:, :, c0:c1].float() @ kt_t * scale, dim=-1)
        m_s.append(ps[..., :n_txt].mean(1))
        m_t.append(pt[..., :n_txt].mean(1))
        if edit:
            text = None if edit_text is None else edit_text(ps[..., :n_txt], pt[..., :n_txt])
            p = joint_target_probs(ps, pt, n_txt, text, inject_self)
            outs.append((p @ vt).transpose(1, 2).reshape(b, c1 - c0, h * d))
    out = torch.cat(outs, dim=1) if edit else None
    return out, torch.cat(m_s, dim=1), torch.cat(m_t, dim=1)
