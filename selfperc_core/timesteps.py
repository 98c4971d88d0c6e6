"""Noise levels for the online model (t) and for the frozen perceptual network (t').

Times are fractions of the model's training range, t in [0, 1]: 0 = clean, 1 = the noisiest level the model
was trained on. The host maps t to sigma with its own schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

T_PRIME_STRATEGIES = ("uniform", "logit_normal", "low_noise")
# t' is kept at least this far from t: the paper draws t' independently; equal levels would make the
# perceptual network see the online model's own input, a degenerate pair.
MIN_GAP = 1e-3


T_LAWS = ("uniform", "logit_normal")


@dataclass(frozen=True)
class TLaw:
    """How the online level t is drawn, as a fraction u in [0, 1] of the t-range:

    uniform (the paper's and plain MSE training's), or logit_normal: u = sigmoid(mean + std * N(0, 1)) (SD3's
    paper, kohya's and SimpleTuner's option); then, with shift s != 1, u <- s u / (1 + (s - 1) u) (the static shift
    of flow trainers: s > 1 moves the draws towards noise). The t-range maps u to t."""
    law: str = "uniform"
    mean: float = 0.0
    std: float = 1.0
    shift: float = 1.0

    def validate(self) -> "TLaw":
        if self.law not in T_LAWS:
            raise ValueError(f"unknown t_law {self.law!r}; choose one of {T_LAWS}")
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"t_law_mean {self.mean} and t_law_std {self.std} must be finite, the std above 0")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"t_shift {self.shift} must be a finite number above 0 (1: no shift)")
        return self

    def cdf(self, u: Tensor) -> Tensor:
        """P(draw <= u) for u in (0, 1): the law's distribution function (for tests and plots)."""
        v = u / (self.shift - (self.shift - 1) * u)  # the shift's inverse
        if self.law == "uniform":
            return v
        z = (torch.logit(v) - self.mean) / self.std
        return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def shifted(u: Tensor, shift: float) -> Tensor:
    """u <- s u / (1 + (s - 1) u): the static timestep shift (s = 1 leaves u)."""
    return u if shift == 1 else shift * u / (1 + (shift - 1) * u)


def draw_t(batch: int, generator: torch.Generator | None = None, t_range: tuple[float, float] = (0.0, 1.0),
           device=None, law: TLaw = TLaw()) -> Tensor:
    """Online noise levels t, shape (batch,), by ``law`` mapped into ``t_range``; the default is uniform,
    t ~ U(t_range), the same law as plain MSE training (and the same draws as before the laws existed)."""
    lo, hi = t_range
    if law.law == "uniform":
        u = torch.rand(batch, generator=generator, device=device)
    elif law.law == "logit_normal":
        u = torch.sigmoid(law.mean + law.std * torch.randn(batch, generator=generator, device=device))
    else:
        raise ValueError(f"unknown t_law {law.law!r}; choose one of {T_LAWS}")
    return lo + (hi - lo) * shifted(u, law.shift)


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
