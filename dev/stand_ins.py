"""Stand-ins for the two pieces a tiny family fixture cannot have for real: the VAE and the text encoder.

The diffusion models are ComfyUI's own classes (dev/tiny_families.py); these two only turn pixels into latents
of the family's shape and captions into CONDITIONINGs of the family's shape, so the nodes can be run on every
family on this CPU. Real VAEs/encoders of the transformer families are 84M-9B parameters.
"""
from __future__ import annotations

import hashlib

import torch


class PatchVAE:
    """Pixels (B, H, W, 3) <-> latents (B, C, [1,] H/f, W/f): average pooling and a fixed 3 -> C projection."""

    def __init__(self, latent_shape: tuple, factor: int, seed: int = 0):
        self.channels, self.video, self.f = latent_shape[1], len(latent_shape) == 5, factor
        self.downscale_ratio, self.latent_channels = factor, self.channels  # as comfy.sd.VAE names them
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(self.channels, 3, generator=g)
        self.inv = torch.linalg.pinv(self.proj)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.avg_pool2d(pixels[..., :3].movedim(-1, 1).float() * 2 - 1, self.f)
        lat = torch.einsum("cr,brhw->bchw", self.proj, x)
        return lat[:, :, None] if self.video else lat

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.ndim == 5:
            latent = latent[:, :, 0]
        rgb = torch.einsum("rc,bchw->brhw", self.inv, latent.float())
        rgb = torch.nn.functional.interpolate(rgb, scale_factor=self.f, mode="nearest")
        return ((rgb + 1) / 2).clamp(0, 1).movedim(1, -1)


class CaptionEncoder:
    """A CLIP-shaped object (tokenize / encode_from_tokens_scheduled) whose output for a caption is the
    family's conditioning with token features drawn from the caption's hash: different captions differ."""

    def __init__(self, family: str):
        self.family = family

    def tokenize(self, text: str):
        return text

    def encode_from_tokens_scheduled(self, text: str):
        from dev.tiny_families import tiny_conditioning

        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        return tiny_conditioning(self.family, seed=seed)
