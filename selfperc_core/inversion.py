"""Exact real-image inversion under guidance: the pivot trajectory, Null-text Inversion and Direct Inversion.

Written, like realimage.py, on the denoiser D(x, sigma) in the sampler's own variables, where one Euler step of
the probability-flow ODE is x_next = x + (s_next - s) (x - D) / s for eps, v and flow models alike (DDIM's
deterministic update). The step is affine in D, so "which D lands exactly on x_next" has a closed form
(``denoised_to_reach``): Direct Inversion is a correction of D, and a guider can apply it.

- Pivot: DDIM inversion (``trajectory``), usually at cfg 1, where it is accurate.
- Null-text Inversion (Mokady et al. 2023): per step, optimise the unconditional embedding so that sampling with
  the user's cfg from the previous reconstruction lands on the pivot's next point (Adam, the paper's decaying
  learning rate and growing early-stop threshold, a bounded number of inner steps).
- Direct Inversion (Ju et al. 2024, PnP inversion): no optimisation; at each step the source branch's guided
  estimate is corrected by the difference that puts it back on the pivot, and the target follows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from .realimage import euler_ode


def euler_step(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """One Euler step of dx/dsigma = (x - D) / sigma from ``sigma`` to ``sigma_next`` (k-diffusion's sample_euler)."""
    return x + (sigma_next - sigma) * ((x - denoised) / sigma)


def denoised_to_reach(x: Tensor, x_next: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """The D for which ``euler_step(x, D, sigma, sigma_next)`` equals ``x_next``: the step is
    x_next = (s_next / s) x + (1 - s_next / s) D, solved for D (s_next < s, so the factor is > 0)."""
    r = sigma_next / sigma
    return (x_next - r * x) / (1 - r)


def denoised_after_shift(denoised: Tensor, x: Tensor, x_shifted: Tensor, sigma: Tensor,
                         sigma_next: Tensor) -> Tensor:
    """The D at ``x`` whose Euler step lands where the step from ``x_shifted`` with ``denoised`` (the denoiser's
    output there) lands: D + r / (1 - r) (x_shifted - x), r = s_next / s. A guidance that moves the latent
    between a sampler's steps (Pix2Pix-Zero's) hands the sampler this, as the sampler keeps its own x. An unmoved
    latent gives ``denoised`` exactly."""
    r = sigma_next / sigma
    return denoised + (r / (1 - r)) * (x_shifted - x)


def trajectory(denoise: Callable[[Tensor, Tensor], Tensor], x0: Tensor, sigmas: Tensor) -> list[Tensor]:
    """DDIM inversion's pivot: the latents at each of ``sigmas`` (decreasing, ending at 0), ``[x_N, ..., x_0]``,
    with ``x_0`` the input itself (realimage.euler_ode integrated upwards)."""
    xs = [x0]
    euler_ode(denoise, x0, sigmas.flip(0), lambda i, x: xs.append(x))
    return xs[::-1]


def replay(denoise: Callable[[int, Tensor, Tensor], Tensor], x: Tensor, sigmas: Tensor) -> Tensor:
    """Euler sampling from ``x`` along ``sigmas`` (decreasing) with a per-step denoiser ``denoise(i, x, sigma)``."""
    for i in range(len(sigmas) - 1):
        x = euler_step(x, denoise(i, x, sigmas[i]), sigmas[i], sigmas[i + 1])
    return x


@dataclass(frozen=True)
class NullTextSettings:
    """Mokady et al.'s optimisation, generalised from their 50 steps to N: at step i (0 = the noisiest) Adam's
    learning rate is ``lr * (1 - i / (2 N))`` (1e-2 (1 - i/100) at N = 50), at most ``inner_steps`` updates,
    stopping once the latent MSE is below ``early_stop * (1 + 100 i / N)`` (1e-5 + 2e-5 i at N = 50)."""
    inner_steps: int = 10
    lr: float = 1e-2
    early_stop: float = 1e-5

    def validate(self) -> None:
        if not 1 <= self.inner_steps <= 1000:
            raise ValueError(f"inner_steps must be in 1..1000, got {self.inner_steps}")
        if not 0 < self.lr <= 1:
            raise ValueError(f"learning rate must be in (0, 1], got {self.lr}")
        if not 0 <= self.early_stop < 1:
            raise ValueError(f"early_stop must be in [0, 1), got {self.early_stop}")


@dataclass
class NullTextResult:
    nulls: list[list[Tensor]]   # per step, the optimised unconditional tensors (as given, detached)
    reconstruction: Tensor      # the end of sampling with them (equals the last pivot point up to the fit)
    losses: list[float]         # per step, the last inner loss (weighted: the paper's units)
    inner_steps: list[int]      # per step, how many updates ran


def null_text(prepare_step: Callable[[int, Tensor, Tensor], Callable[[Sequence[Tensor]], Tensor]],
              pivots: Sequence[Tensor], sigmas: Tensor, null_init: Sequence[Tensor],
              settings: NullTextSettings = NullTextSettings(),
              on_step: Callable[[int, float, int], None] | None = None,
              loss_weights: Sequence[float] | None = None) -> NullTextResult:
    """Null-text Inversion along ``pivots`` (``trajectory``'s output, at ``sigmas`` decreasing to 0).

    ``prepare_step(i, x, sigma)`` returns ``guided(nulls) -> D``: the cfg-combined denoiser at (x, sigma) as a
    differentiable function of the unconditional tensors (the conditional branch does not depend on them, so the
    caller evaluates it once per step). Each inner update costs one unconditional forward and backward. Each
    step starts from the previous step's result, as in the paper. Where D does not depend on the nulls (cfg 1)
    the gradient is exactly zero and Adam leaves them bit-identical.

    ``loss_weights[i]`` puts step i's latent MSE in the paper's units, for the early stop and the reported loss
    (k-diffusion's x is the DDPM latent times sqrt(1 + sigma^2) for eps/v models: weight 1 / (1 + sigma_next^2);
    default 1). The backward uses the sum of squares, not the mean: Adam does not see a constant factor, and the
    gradient stays far from fp16's underflow.
    """
    settings.validate()
    n = len(sigmas) - 1
    if len(pivots) != n + 1:
        raise ValueError(f"{len(pivots)} pivot latents for {n} steps; expected {n + 1}")
    nulls = [t.detach().clone() for t in null_init]
    x = pivots[0]
    out, losses, counts = [], [], []
    for i in range(n):
        s, s_next, target = sigmas[i], sigmas[i + 1], pivots[i + 1]
        guided = prepare_step(i, x, s)
        params = [t.detach().clone().requires_grad_(True) for t in nulls]
        opt = torch.optim.Adam(params, lr=settings.lr * (1 - i / (2 * n)))
        threshold = settings.early_stop * (1 + 100 * i / n)
        weight = 1.0 if loss_weights is None else float(loss_weights[i])
        loss_item, j = float("nan"), 0
        with torch.enable_grad():
            for j in range(1, settings.inner_steps + 1):
                sq = (euler_step(x, guided(params), s, s_next).float() - target.float()).square()
                opt.zero_grad(set_to_none=False)
                sq.sum().backward()
                opt.step()
                loss_item = weight * sq.mean().item()
                if loss_item < threshold:
                    break
        nulls = [p.detach() for p in params]
        with torch.no_grad():
            x = euler_step(x, guided(nulls), s, s_next)
        out.append(nulls)
        losses.append(loss_item)
        counts.append(j)
        if on_step is not None:
            on_step(i, loss_item, j)
    return NullTextResult(out, x, losses, counts)


def direct_denoised(target_denoised: Tensor, source_denoised: Tensor, pivot: Tensor, pivot_next: Tensor,
                    sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """Direct Inversion's step, as a correction of D: the source branch's guided estimate at the pivot is
    replaced by the D whose Euler step lands exactly on the next pivot point (Ju et al. add the same difference
    to the latent; for an Euler step the two are the same thing), and the target branch moves by its difference
    to the source. Written so that identical branches give that D exactly (the difference is then 0)."""
    return denoised_to_reach(pivot, pivot_next, sigma, sigma_next) + (target_denoised - source_denoised)
