"""A prompt's tokens as the positions of its text-encoder tensor, read off ComfyUI's own tokenizer: which
tokenizer stream(s) index the tensor, which positions are the prompt's own words, readable labels, where a word
sits, and the word alignment of two prompts (Prompt-to-Prompt's refine)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..selfperc_core import attention_edit as core


def _flat(tokens: dict, key: str) -> list:
    """(token id, segment id: 0 for start / end / padding) for every position of one stream, all 77-token chunks in
    order; textual-inversion embeddings (tensors) become unique placeholders."""
    flat = [t for chunk in tokens[key] for t in chunk]
    return [(t[0] if isinstance(t[0], int) else ("embedding", j), t[2] if len(t) > 2 else 1)
            for j, t in enumerate(flat)]


def segments(tokens: dict, length: int) -> tuple:
    """The (stream, start, end) spans of a ComfyUI tokenize(return_word_ids=True) result that index a tensor of
    ``length`` positions: one stream ('l' first where several are as long: SDXL's CLIP-L and CLIP-G share positions;
    Flux's T5 stream is 256+ long where its CLIP-L is 77), or SD3's CLIP positions followed by its T5 positions."""
    keys = sorted(tokens, key=lambda k: (k != "l", k))
    sizes = {k: len(_flat(tokens, k)) for k in keys}
    for key in keys:
        if sizes[key] == length:
            return ((key, 0, length),)
    clip = next((k for k in ("l", "g") if k in sizes), None)
    if clip is not None and "t5xxl" in sizes and sizes[clip] + sizes["t5xxl"] == length:
        return ((clip, 0, sizes[clip]), ("t5xxl", sizes[clip], length))
    raise ValueError(f"the text encoder gives {length} positions but its tokenizer's streams have {sizes} tokens: "
                     "this CLIP's tokens do not index its tensor, so words cannot be mapped")


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: list                  # every token position of the encoded tensor
    real: list                 # positions of the prompt's own tokens (not start / end / padding)
    labels: list               # a readable label per real position
    cond: torch.Tensor         # (1, K, C) cross-attention tensor
    extras: dict               # pooled_output etc.
    spans: tuple = (("l", 0, 77),)  # (tokenizer stream, start, end) of the positions


def encode(clip, text: str, what: str) -> Prompt:
    if not text.strip():
        raise ValueError(f"the {what} prompt is empty")
    tokens = clip.tokenize(text, return_word_ids=True)
    conds = clip.encode_from_tokens_scheduled(tokens)
    if len(conds) != 1:
        raise ValueError(f"the {what} prompt encodes to {len(conds)} scheduled conditionings (prompt scheduling or "
                         "hooks on the CLIP): Prompt-to-Prompt needs one tensor per prompt")
    cond, extras = conds[0]
    spans = segments(tokens, cond.shape[1])
    stream = [p for key, _, _ in spans for p in _flat(tokens, key)]
    ids = [t for t, _ in stream]
    # the tokenizer marks start / end / padding with segment 0: SD2's and CLIP-G's padding is token 0, which is
    # also a vocabulary entry, so ids alone cannot tell them apart
    real = [j for j, (_, seg) in enumerate(stream) if seg != 0]
    return Prompt(text, ids, real, _labels(clip, spans, ids, real), cond, dict(extras), spans)


def _labels(clip, spans: tuple, ids: list, real: list) -> list[str]:
    try:
        words = []
        for key, start, end in spans:
            tok = clip.tokenizer
            sub = getattr(tok, key, None) or getattr(tok, f"clip_{key}", None) or tok
            words += [w for _, w in sub.untokenize([(t, 1.0) for t in ids[start:end]])]
        # CLIP ends words with </w>; T5's sentencepiece starts them with U+2581, alone before some words
        return [str(words[j]).replace("</w>", "").replace("\u2581", "") or "_" for j in real]
    except Exception:  # a tokenizer without a vocabulary to read back: positions still identify the tokens
        return [f"#{j}" for j in real]


def word_positions(clip, prompt: Prompt, word: str) -> list[int]:
    """Positions in ``prompt`` of every occurrence of ``word``'s tokens (a word may be several tokens), in each
    stream the prompt's tensor holds."""
    tokens = clip.tokenize(word, return_word_ids=True)
    real, out = set(prompt.real), []
    for key, start, end in prompt.spans:
        sub = [t for t, seg in _flat(tokens, key) if seg != 0] if key in tokens else []
        n = len(sub)
        for j in range(start, end - n + 1) if n else ():
            if j in real and prompt.ids[j:j + n] == sub:
                out += range(j, j + n)
    return out


def aligned(src: Prompt, tgt: Prompt) -> tuple:
    """For each target position, the source position of the same word or -1 (refine's word map): a global
    alignment of the two prompts' tokens within each stream."""
    if src.spans != tgt.spans:
        raise ValueError(f"the source and target prompts' token streams differ ({src.spans} vs {tgt.spans}): "
                         "shorten the longer prompt")

    def keys(p: Prompt) -> list:  # the token and whether it is the prompt's own (a real token 0 is not padding)
        real = set(p.real)
        return [(t, j in real) for j, t in enumerate(p.ids)]
    ks, kt, mapper = keys(src), keys(tgt), []
    for _, start, end in src.spans:
        mapper += [i + start if i >= 0 else -1 for i in core.align(ks[start:end], kt[start:end])]
    return tuple(mapper)
