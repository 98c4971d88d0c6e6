"""The latent cache on disk (opt-in, as kohya's cache_latents_to_disk): each image's VAE latent stored as a
safetensors file keyed by the exact pixels the VAE encodes (so the image file's content, the resolution, the crop or
bucket and the resize mode are all in the key) and by the VAE's identity (a hash of all its weights and its dtype).
A changed image or VAE gives another key, so nothing stale is ever read; a file whose recorded key does not match, or
that cannot be read, is ignored and rewritten. Files are read with safetensors only (never unpickled), written
atomically, and the folder is kept under a size bound by deleting the least recently used files.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path

import folder_paths
import torch

from ..selfperc_core.state import atomic_write

log = logging.getLogger("selfperc")
SIZE_VARIABLE = "SELFPERC_LATENT_CACHE_GB"


def size_bound() -> int:
    """The folder's bound: SELFPERC_LATENT_CACHE_GB (default 8), read when a cache is made."""
    raw = os.environ.get(SIZE_VARIABLE, "8")
    try:
        gb = float(raw)
    except ValueError:
        gb = float("nan")
    if not (math.isfinite(gb) and 0 < gb <= 1 << 20):
        raise ValueError(f"{SIZE_VARIABLE}={raw!r} must be a size in GB above 0")
    return int(gb * 2 ** 30)


def cache_folder() -> Path:
    return Path(folder_paths.get_user_directory()) / "selfperc" / "latent_cache"


def vae_identity(vae) -> str:
    """A hash of every weight of the VAE and the dtype it encodes in, computed for each run (weights may have been
    changed in place since the last one; hashing is a small part of encoding a dataset)."""
    module = vae.first_stage_model
    h = hashlib.sha256(f"{type(module).__name__} {vae.vae_dtype}".encode())
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def image_key(image: torch.Tensor, vae_id: str) -> str:
    """The key of one image (uint8, H x W x C, the pixels the VAE encodes) under one VAE."""
    h = hashlib.sha256(f"{vae_id} {tuple(image.shape)} {image.dtype}".encode())
    h.update(image.contiguous().numpy().tobytes())
    return h.hexdigest()


class LatentCache:
    """One run's view of the cache: ``get`` / ``put`` per image, then ``bound`` once."""

    def __init__(self, vae, folder: Path | None = None, max_bytes: int | None = None):
        self.folder = folder or cache_folder()
        self.max_bytes = max_bytes if max_bytes is not None else size_bound()
        self.vae_id = vae_identity(vae)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    raise ValueError("recorded key differs")
                latent = f.get_tensor("latent")
            os.utime(path)  # recently used: kept by the size bound
            return latent
        except Exception as e:  # noqa: BLE001 - any unreadable entry is a miss, rewritten below
            log.warning("selfperc: latent cache entry %s ignored (%s)", path.name, e)
            return None

    def put(self, key: str, latent: torch.Tensor) -> None:
        from safetensors.torch import save_file

        atomic_write(self.path(key), lambda tmp: save_file({"latent": latent.contiguous()}, tmp,
                                                         metadata={"key": key, "vae": self.vae_id}))

    def bound(self) -> None:
        """Delete the least recently used entries until the folder is within max_bytes (once per run: it lists the
        folder; entries another run removes meanwhile are passed over)."""
        files = []
        for p in self.folder.glob("*/*.safetensors"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(s for _, s, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
