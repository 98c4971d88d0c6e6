"""The data side of a fine-tune (and of Evaluate): memory bounds, the latent cache, per-image conditionings, and
the held-out split."""
from __future__ import annotations

import logging

import torch

from ..selfperc_core.dataset import as_float
from . import latent_cache

log = logging.getLogger("selfperc")

# The decoded images (uint8) may take at most this share of the memory available when training starts.
CACHE_MEMORY_SHARE = 0.5


def cache_budget() -> int:
    import psutil

    return int(psutil.virtual_memory().available * CACHE_MEMORY_SHARE)


@torch.no_grad()
def encode_latents(model, vae, images: list[torch.Tensor], cache=None) -> list[torch.Tensor]:
    """VAE-encode each image once (the in-memory latent cache), in the model's latent space; with ``cache``
    (latent_cache.LatentCache) an image encoded by this VAE before is read from disk instead."""
    out, hits = [], 0
    for img in images:
        key = cache and latent_cache.image_key(img, cache.vae_id)
        lat = cache.get(key) if cache is not None else None
        if lat is None:
            lat = vae.encode(as_float(img)[None, :, :, :3]).float().cpu()
            if cache is not None:
                cache.put(key, lat)
        else:
            hits += 1
        out.append(model.model.process_latent_in(lat.float())[0].cpu())
    if cache is not None:
        cache.bound()
        log.info("selfperc: %d of %d latents from the disk cache", hits, len(images))
    return out


@torch.no_grad()
def caption_conditionings(clip, captions: list[str | None], fallback: list | None) -> list[list]:
    """A CONDITIONING per image: its caption through the connected text encoder (whatever the family uses,
    as CLIPTextEncode does), else ``fallback`` (the node's conditioning input, or the empty prompt). One
    CONDITIONING object per distinct caption: later caches key on its identity."""
    cache, out = {}, []
    for cap in captions:
        if clip is None or (not cap and fallback is not None):
            out.append(fallback)
            continue
        key = cap or ""
        if key not in cache:
            cache[key] = clip.encode_from_tokens_scheduled(clip.tokenize(key))
        out.append(cache[key])
    return out


def held_out(n: int, fraction: float, seed: int) -> list[int]:
    """Indices of the images kept for validation: round(fraction * n) of them (at least 1 when fraction > 0),
    drawn with ``seed``; at least one image always stays for training."""
    if fraction <= 0 or n < 2:
        return []
    k = min(n - 1, max(1, round(fraction * n)))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())


@torch.no_grad()
def shuffled_conditionings(clip, captions: list[str | None], n_data: int, training, seed: int,
                           guidance: float) -> list:
    """Per image, the CONDITIONINGs of up to ``training.shuffle_tags`` orders of its caption's tags (the first
    ``keep_first_tags`` kept; the caption prefix before the dataset's own images'), each encoded once; None for an
    image without a caption or tags to move. Their memory is bounded like the decoded images'."""
    from ..selfperc_core.dataset import caption_orders
    from .inputs import with_guidance

    cache: dict[str, list] = {}
    budget, used, out = cache_budget(), 0, []
    for orders in caption_orders(captions, n_data, training.caption_prefix, training.keep_first_tags,
                                 training.shuffle_tags, seed):
        if len(orders) < 2:
            out.append(None)
            continue
        for text in orders:
            if text not in cache:
                cache[text] = with_guidance(clip.encode_from_tokens_scheduled(clip.tokenize(text)), guidance)
                used += sum(t.numel() * t.element_size() for c in cache[text] for t in
                            [c[0], *[v for v in c[1].values() if torch.is_tensor(v)]])
                if used > budget:
                    raise MemoryError(f"shuffle_tags {training.shuffle_tags}: the encoded caption orders need more "
                                      f"than {budget / 2**30:.1f} GiB; lower shuffle_tags or use fewer images")
        out.append([cache[text] for text in orders])
    return out
