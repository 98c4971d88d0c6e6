"""Captions for the headless trainer: each distinct caption is encoded once by the model folder's own text
encoders (the family's diffusers slots), cached on disk keyed by the caption and the encoders, and the encoders
are freed before training.

What each family's pipeline feeds its denoiser (diffusers' own recipes):
* sd: CLIP's last hidden state (text_encoder/).
* sdxl: CLIP-L's and CLIP-G's penultimate hidden states side by side; CLIP-G's projected pooled output.
* sd3: CLIP-L's and CLIP-G's penultimate states side by side, zero-padded to the transformer's width, then T5's
  256 tokens (zeros when text_encoder_3/ is left out, as diffusers does); pooled: both CLIPs' projections.
* flux: T5's 512 tokens; pooled: CLIP-L's pooled output.

The cache is safetensors (never a pickle) named by sha256(encoder id, caption); the encoder id hashes the
encoders' and tokenizers' files and the dtype they ran in, so another encoder never reuses a stale entry. Images
without a caption get the empty prompt's encoding, as the ComfyUI node does when a text encoder is connected.
"""
from __future__ import annotations

import gc
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from selfperc_core.state import atomic_write

CLIP_TOKENS = 77  # CLIP's context: longer captions are truncated by the tokenizer, as ComfyUI does per chunk
SD3_T5_TOKENS, FLUX_T5_TOKENS = 256, 512  # diffusers' pipeline defaults


@dataclass(frozen=True)
class TextEncoding:
    """How a family's diffusers pipeline turns a prompt into the denoiser's conditioning."""
    name: str  # the family's name (part of the cache key)
    slots: tuple[tuple[str, str, str, bool], ...]  # (encoder folder, tokenizer folder, kind, required)
    encode: Callable[[list, str, int | None], dict[str, torch.Tensor]]  # (loaded encoders, text, joint_dim)


def _present(model_dir: Path, enc: str, tok: str) -> bool:
    return (model_dir / enc / "config.json").exists() and (model_dir / tok).is_dir()


def slots(model_dir: Path, text: TextEncoding) -> list[tuple[str, str, str]]:
    """The family's encoder slots found in the folder; [] when a required one is missing (no captions)."""
    model_dir = Path(model_dir)
    found = []
    for enc, tok, kind, required in text.slots:
        if _present(model_dir, enc, tok):
            found.append((enc, tok, kind))
        elif required:
            return []
    return found


def has_text_encoder(model_dir: Path, text: TextEncoding) -> bool:
    return bool(slots(model_dir, text))


def encoder_id(model_dir: Path, text: TextEncoding, dtype: torch.dtype = torch.float32) -> str:
    """sha256 over the text encoders' and tokenizers' files (names and bytes) and the dtype they run in."""
    h = hashlib.sha256(f"{text.name}\0{dtype}\0".encode())
    for enc, tok, _ in slots(model_dir, text):
        for sub in (enc, tok):
            for p in sorted((Path(model_dir) / sub).rglob("*")):
                if p.is_file():
                    h.update(str(p.relative_to(model_dir)).encode() + b"\0")
                    with open(p, "rb") as f:
                        for chunk in iter(lambda: f.read(1 << 24), b""):
                            h.update(chunk)
    return h.hexdigest()


def cache_key(enc_id: str, caption: str) -> str:
    return hashlib.sha256(f"{enc_id}\0{caption}".encode("utf-8")).hexdigest()


def _load(path: Path) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    try:
        out = {k: v.clone() for k, v in load_file(str(path)).items()}  # not backed by the file's mmap
    except Exception:  # a damaged entry is re-encoded, never trusted
        return None
    return out if "context" in out else None


def _save_atomic(cond: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in cond.items()}, tmp))


def _load_encoders(model_dir: Path, found: list, device, dtype) -> list:
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    cls = {"clip": CLIPTextModel, "clip_proj": CLIPTextModelWithProjection, "t5": T5EncoderModel}
    return [(kind, AutoTokenizer.from_pretrained(model_dir / tok),
             cls[kind].from_pretrained(model_dir / enc, torch_dtype=dtype).to(device).eval())
            for enc, tok, kind in found]


def _run(kind: str, tokenizer, encoder, text: str, length: int):
    ids = tokenizer(text, padding="max_length", max_length=length, truncation=True,
                    return_tensors="pt").input_ids.to(encoder.device)
    return encoder(ids, output_hidden_states=kind != "t5")


def _encode_sd(encoders: list, text: str, joint_dim=None) -> dict[str, torch.Tensor]:
    kind, tok, enc = encoders[0]
    return {"context": _run(kind, tok, enc, text, CLIP_TOKENS).last_hidden_state}


def _encode_flux(encoders: list, text: str, joint_dim=None) -> dict[str, torch.Tensor]:
    (k1, t1, e1), (k2, t2, e2) = encoders
    return {"context": _run(k2, t2, e2, text, FLUX_T5_TOKENS).last_hidden_state,
            "pooled": _run(k1, t1, e1, text, CLIP_TOKENS).pooler_output}


def _encode_sdxl(encoders: list, text: str, joint_dim=None) -> dict[str, torch.Tensor]:
    outs = [_run(kind, tok, enc, text, CLIP_TOKENS) for kind, tok, enc in encoders[:2]]
    return {"context": torch.cat([o.hidden_states[-2] for o in outs], dim=-1), "pooled": outs[1].text_embeds}


def _encode_sd3(encoders: list, text: str, joint_dim: int | None = None) -> dict[str, torch.Tensor]:
    outs = [_run(kind, tok, enc, text, CLIP_TOKENS) for kind, tok, enc in encoders[:2]]
    clip = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, joint_dim - clip.shape[-1]))
    if len(encoders) > 2:
        kind, tok, enc = encoders[2]
        t5 = _run(kind, tok, enc, text, SD3_T5_TOKENS).last_hidden_state
    else:  # without text_encoder_3/, zero T5 tokens, as diffusers
        t5 = torch.zeros(1, SD3_T5_TOKENS, joint_dim, device=clip.device, dtype=clip.dtype)
    return {"context": torch.cat([clip, t5], dim=1), "pooled": torch.cat([o.text_embeds for o in outs], dim=-1)}


_CLIP, _CLIP_2 = ("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")
SD = TextEncoding("sd", ((*_CLIP, "clip", True),), _encode_sd)
SDXL = TextEncoding("sdxl", ((*_CLIP, "clip", True), (*_CLIP_2, "clip_proj", True)), _encode_sdxl)
SD3 = TextEncoding("sd3", ((*_CLIP, "clip_proj", True), (*_CLIP_2, "clip_proj", True),
                           ("text_encoder_3", "tokenizer_3", "t5", False)), _encode_sd3)
FLUX = TextEncoding("flux", ((*_CLIP, "clip", True), (*_CLIP_2, "t5", True)), _encode_flux)


def encode_texts(model_dir: Path, texts: list[str], device, text: TextEncoding = SD,
                 dtype: torch.dtype = torch.float32, joint_dim: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Load the family's encoders, encode each text (CPU results), as its diffusers pipeline's encode_prompt does
    ({"context": (1, L, D)[, "pooled": (1, P)]}), and free the encoders again."""
    if not texts:
        return {}
    encoders = _load_encoders(Path(model_dir), slots(model_dir, text), device, dtype)
    with torch.no_grad():
        out = {t: {k: v.cpu() for k, v in text.encode(encoders, t, joint_dim).items()} for t in texts}
    del encoders  # free the text encoders before training
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def encode_captions(model_dir: Path, captions: list[str | None], cache_dir: Path, device, text: TextEncoding = SD,
                    dtype: torch.dtype = torch.float32, joint_dim: int | None = None,
                    log=print) -> list[dict[str, torch.Tensor]]:
    """One conditioning per image ({"context": (1, L, D)[, "pooled"]}, CPU, ``dtype``), from the cache where
    present, else encoded and cached. ``joint_dim``: SD3's transformer width the CLIP states are padded to."""
    model_dir, cache_dir = Path(model_dir), Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    enc_id = encoder_id(model_dir, text, dtype)
    texts = sorted({c or "" for c in captions})
    found = {t: _load(cache_dir / f"{cache_key(enc_id, t)}.safetensors") for t in texts}
    missing = [t for t, v in found.items() if v is None]
    for t, cond in encode_texts(model_dir, missing, device, text, dtype, joint_dim).items():
        found[t] = cond
        _save_atomic(cond, cache_dir / f"{cache_key(enc_id, t)}.safetensors")
    log(f"selfperc: {len(texts)} distinct caption(s): {len(texts) - len(missing)} from the cache, "
        f"{len(missing)} encoded")
    return [found[c or ""] for c in captions]
