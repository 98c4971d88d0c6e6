"""A/B on real images: deterministic ODE inversion and reconstruction, and ILVR's low-pass guidance.

Everything is written on the denoiser D(x, sigma) (the model's x0 estimate) in the sampler's own variables:
x = x0 + sigma * eps for eps and v models (k-diffusion's form, which ComfyUI samples in) and
x = (1 - sigma) * x0 + sigma * eps for flow models. In both the probability-flow ODE is
dx/dsigma = (x - D(x, sigma)) / sigma, so one Euler integrator is DDIM for eps/v models (DDIM's deterministic
update is this Euler step) and the flow ODE's Euler step for flow models: exact for all three, nothing per
parameterization.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def euler_ode(denoise: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigmas: Tensor,
              callback: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """Integrate dx/dsigma = (x - D(x, sigma)) / sigma along ``sigmas`` with Euler steps, in either direction.

    Decreasing sigmas (ending at 0) sample; increasing sigmas (starting at 0) invert, DDIM inversion's
    approximation: each step uses the slope at the step's start, except from sigma 0, where the slope is read
    at the first nonzero sigma (x0 itself is the input there). ``denoise(x, sigma)`` takes a scalar-tensor sigma.
    """
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        s_eval = s if s > 0 else s_next
        d = (x - denoise(x, s_eval)) / s_eval
        x = x + (s_next - s) * d
        if callback is not None:
            callback(i, x)
    return x


def low_pass(x: Tensor, factor: int) -> Tensor:
    """ILVR's phi_N: downsample the last two (spatial) dims by ``factor`` (area mean) and upsample back
    (bilinear). Any leading dims (batch, channels, frames) are kept."""
    if factor <= 1:
        return x
    h, w = x.shape[-2:]
    flat = x.reshape(-1, 1, h, w).float()
    small = torch.nn.functional.adaptive_avg_pool2d(flat, (max(1, -(-h // factor)), max(1, -(-w // factor))))
    up = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return up.reshape(x.shape).to(x.dtype)


def ilvr(denoised: Tensor, reference: Tensor, weight: float, factor: int) -> Tensor:
    """ILVR (Choi et al. 2021) on the denoiser's estimate: replace ``weight`` of its low frequencies by the
    reference's, D + w (phi(ref) - phi(D)). Applied at every step, the samples keep the reference's coarse
    layout and the model fills in the detail. ``weight`` 0 returns ``denoised`` itself (plain sampling)."""
    if weight == 0:
        return denoised
    ref = reference.to(denoised)
    if ref.shape[0] != denoised.shape[0]:
        ref = ref.expand(denoised.shape[0], *ref.shape[1:]) if ref.shape[0] == 1 else ref.repeat_interleave(
            denoised.shape[0] // ref.shape[0], 0)
    return denoised + weight * (low_pass(ref, factor) - low_pass(denoised, factor))
