"""Super-resolution pairs (SR3, Saharia et al.; CDM, Ho et al.): the low-res condition of a high-res image.

The low-res image is the high-res one averaged over factor x factor boxes, once per image; what degrades it is drawn
afresh at every step (a blur, a JPEG quality, and CDM's noise-augmentation level), so the model never sees the
same condition twice. The draws come from a seed the training loop takes from its own generator, so a resumed run
draws the same conditions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_FACTOR = 16
MIN_LOW_RES_SIDE = 8  # pixels: a smaller condition holds too little of the image to learn from
MAX_BLUR = 8.0        # the blur's sigma in low-res pixels


@dataclass(frozen=True)
class Degradation:
    """What degrades each step's low-res condition, each drawn uniformly per sample and step.

    blur_max: Gaussian blur sigma in [0, blur_max] low-res pixels. noise_augmentation_max: CDM's augmentation
    level in [0, max], a fraction of the model's own augmentation range (SD x4: 350 of its 1000 levels).
    jpeg_min_quality: a JPEG round trip at a quality in [q, 100]; 0: none.
    """
    blur_max: float = 0.0
    noise_augmentation_max: float = 0.0
    jpeg_min_quality: int = 0

    def validate(self) -> "Degradation":
        if not (math.isfinite(self.blur_max) and 0.0 <= self.blur_max <= MAX_BLUR):
            raise ValueError(f"blur_max {self.blur_max} must be within [0, {MAX_BLUR}] low-res pixels")
        if not (math.isfinite(self.noise_augmentation_max) and 0.0 <= self.noise_augmentation_max <= 1.0):
            raise ValueError(f"noise_augmentation_max {self.noise_augmentation_max} must be within [0, 1]")
        if self.jpeg_min_quality != 0 and not 1 <= self.jpeg_min_quality <= 100:
            raise ValueError(f"jpeg_min_quality {self.jpeg_min_quality} must be within [1, 100], or 0 for none")
        return self


@dataclass(frozen=True)
class Draw:
    """One sample's degradation at one step."""
    blur: float
    level: float    # noise augmentation, a fraction of the model's range
    quality: int    # 0: no JPEG
    seed: int       # the augmentation noise's


def draw_degradation(d: Degradation, seed: int) -> Draw:
    """The degradation for ``seed`` (drawn from the loop's generator): the same seed gives the same draw."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(3, generator=g, dtype=torch.float64).tolist()
    quality = 0 if not d.jpeg_min_quality else d.jpeg_min_quality + int(u[2] * (101 - d.jpeg_min_quality))
    return Draw(blur=u[0] * d.blur_max, level=u[1] * d.noise_augmentation_max, quality=min(quality, 100),
                seed=int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g)))


def check_factor(factor: int, height: int, width: int, what: str = "the images",
                 min_side: int = MIN_LOW_RES_SIDE) -> None:
    """The high-res size must divide by the factor into a low-res side of at least ``min_side``."""
    if not isinstance(factor, int) or not 2 <= factor <= MAX_FACTOR:
        raise ValueError(f"the super-resolution factor {factor!r} must be an integer within [2, {MAX_FACTOR}]")
    if height % factor or width % factor:
        raise ValueError(f"{what} ({width}x{height}) do not divide by the factor {factor}")
    if min(height, width) // factor < min_side:
        raise ValueError(f"{what} ({width}x{height}) are too small for factor {factor}: the low-res side would be "
                         f"{min(height, width) // factor} px, under {min_side}")


def downscale(images: Tensor, factor: int) -> Tensor:
    """(B, C, H, W) -> (B, C, H/f, W/f): the mean of each f x f box (what a sensor of f-times-larger pixels sees)."""
    check_factor(factor, images.shape[-2], images.shape[-1], min_side=1)
    return F.avg_pool2d(images, factor)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """A separable Gaussian blur of (B, C, h, w) with reflected borders; sigma <= 0 returns ``x`` itself."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def degrade(low: Tensor, draw: Draw, jpeg: Callable[[Tensor, int], Tensor] | None = None) -> Tensor:
    """The low-res image (B, 3, h, w) in [-1, 1] with ``draw``'s blur, then its JPEG round trip (``jpeg``: the
    host's codec); the noise augmentation is the model's own (it is applied where the model reads the condition)."""
    out = gaussian_blur(low, draw.blur)
    if draw.quality:
        if jpeg is None:
            raise ValueError("a JPEG degradation needs a codec (jpeg)")
        out = jpeg(out, draw.quality)
    return out


def bicubic(low: Tensor, factor: int) -> Tensor:
    """The baseline any upscaler must beat: bicubic interpolation to f x the size."""
    return F.interpolate(low, scale_factor=factor, mode="bicubic", align_corners=False)


def psnr(x: Tensor, ref: Tensor, peak: float = 2.0) -> Tensor:
    """Per-image PSNR in dB of ``x`` against ``ref`` (B, ...), for values spanning ``peak`` ([-1, 1]: 2)."""
    mse = (x.float() - ref.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(peak ** 2 / mse.clamp_min(1e-12))
