"""Noise levels for the online model (t) and for the frozen perceptual network (t').

Times are fractions of the model's training range, t in [0, 1]: 0 = clean, 1 = the noisiest level the model
was trained on. The host maps t to sigma with its own schedule.
"""
from __future__ import annotations

import torch
from torch import Tensor

T_PRIME_STRATEGIES = ("uniform", "logit_normal", "low_noise")
# t' is kept at least this far from t: the paper draws t' independently; equal levels would make the
# perceptual network see the online model's own input, a degenerate pair.
MIN_GAP = 1e-3


def draw_t(batch: int, generator: torch.Generator | None = None, t_range: tuple[float, float] = (0.0, 1.0),
           device=None) -> Tensor:
    """Uniform online noise levels t ~ U(t_range), shape (batch,), the same law as plain MSE training."""
    lo, hi = t_range
    u = torch.rand(batch, generator=generator, device=device)
    return lo + (hi - lo) * u


def check_t_prime_range(t_range: tuple[float, float]) -> tuple[float, float]:
    """(lo, hi) of t' as fractions of the schedule: 0 <= lo < hi <= 1, and wide enough that t' can keep MIN_GAP
    from any t on one side."""
    lo, hi = t_range
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"t' range (t_prime_min, t_prime_max) must satisfy 0 <= min < max <= 1, got {lo}, {hi}")
    if hi - lo < 4 * MIN_GAP:
        raise ValueError(f"t' range {lo}..{hi} is too narrow: keep t_prime_max - t_prime_min >= {4 * MIN_GAP}")
    return lo, hi


def draw_t_prime(t: Tensor, strategy: str = "uniform", generator: torch.Generator | None = None,
                 t_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Draw t' independently of t (paper: uniform is best), within t_range and never equal to t.

    Args:
        t: the online noise levels, shape (B,).
        strategy: "uniform" (the paper's choice); "logit_normal" (t' = sigmoid(N(0,1)), mid-noise heavy, as in
            SD3); "low_noise" (t' = u^2, weighted towards fine detail).
        t_range: (lo, hi) limits t' to part of the schedule, e.g. (0, 0.5) for low-noise features only.
    Returns:
        t', shape (B,), with |t' - t| >= MIN_GAP (a too-close draw is reflected to the other side of t).
    """
    lo, hi = check_t_prime_range(t_range)
    shape, dev = t.shape, t.device
    if strategy == "uniform":
        u = torch.rand(shape, generator=generator, device=dev)
    elif strategy == "logit_normal":
        u = torch.sigmoid(torch.randn(shape, generator=generator, device=dev))
    elif strategy == "low_noise":
        u = torch.rand(shape, generator=generator, device=dev) ** 2
    else:
        raise ValueError(f"unknown t' strategy {strategy!r}; choose one of {T_PRIME_STRATEGIES}")
    tp = lo + (hi - lo) * u
    close = (tp - t).abs() < MIN_GAP
    if close.any():
        # Move the draw MIN_GAP away from t on whichever side stays inside the range.
        up = torch.where(t + MIN_GAP <= hi, t + MIN_GAP, t - MIN_GAP)
        tp = torch.where(close, up, tp)
    return tp.clamp(lo, hi)
