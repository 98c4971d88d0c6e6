"""Captions for the headless trainer: each distinct caption is encoded once by the model folder's own text encoder
(text_encoder/ + tokenizer/), cached on disk keyed by the caption and the encoder, and the encoder is freed
before training.

The cache is safetensors (never a pickle) named by sha256(encoder id, caption); the encoder id hashes the
encoder's config and weight files, so another encoder never reuses a stale entry. Images without a caption get
the empty prompt's encoding, as the ComfyUI node does when a text encoder is connected.
"""
from __future__ import annotations

import gc
import hashlib
import os
from pathlib import Path

import torch

MAX_LENGTH = 77  # CLIP's context: longer captions are truncated by the tokenizer, as ComfyUI does per chunk


def has_text_encoder(model_dir: Path) -> bool:
    return (Path(model_dir) / "text_encoder" / "config.json").exists() and (Path(model_dir) / "tokenizer").is_dir()


def encoder_id(model_dir: Path) -> str:
    """sha256 over the text encoder's and tokenizer's files (names and bytes)."""
    h = hashlib.sha256()
    for sub in ("text_encoder", "tokenizer"):
        for p in sorted((Path(model_dir) / sub).rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(model_dir)).encode() + b"\0")
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 24), b""):
                        h.update(chunk)
    return h.hexdigest()


def cache_key(enc_id: str, caption: str) -> str:
    return hashlib.sha256(f"{enc_id}\0{caption}".encode("utf-8")).hexdigest()


def _load(path: Path) -> torch.Tensor | None:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))["cond"].clone()  # not backed by the file's mmap (it may be replaced)
    except Exception:  # a damaged entry is re-encoded, never trusted
        return None


def _save_atomic(t: torch.Tensor, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    save_file({"cond": t.contiguous()}, str(tmp))
    os.replace(tmp, path)


def encode_captions(model_dir: Path, captions: list[str | None], cache_dir: Path, device,
                    log=print) -> list[torch.Tensor]:
    """One (1, 77, D) float32 CPU tensor per image, from the cache where present, else encoded and cached."""
    model_dir, cache_dir = Path(model_dir), Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    enc_id = encoder_id(model_dir)
    texts = sorted({c or "" for c in captions})
    found = {t: _load(cache_dir / f"{cache_key(enc_id, t)}.safetensors") for t in texts}
    missing = [t for t, v in found.items() if v is None]
    if missing:
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
        encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder").to(device).eval()
        with torch.no_grad():
            for t in missing:
                ids = tokenizer(t, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                return_tensors="pt").input_ids.to(device)
                found[t] = encoder(ids).last_hidden_state.float().cpu()
                _save_atomic(found[t], cache_dir / f"{cache_key(enc_id, t)}.safetensors")
        del encoder, tokenizer  # free the text encoder before training
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    log(f"selfperc: {len(texts)} distinct caption(s): {len(texts) - len(missing)} from the cache, "
        f"{len(missing)} encoded")
    return [found[c or ""] for c in captions]
