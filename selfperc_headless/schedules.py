"""Noise schedules read from a diffusers scheduler config, in the sigma space ComfyUI's model_sampling uses.

* DDPM (SD1.x, SD2.x, SDXL; eps or v, zero terminal SNR): x_sigma = x0 + sigma * eps with
  sigma = sqrt((1 - alpha_bar) / alpha_bar); the UNet sees x / sqrt(sigma^2 + 1) at the matching timestep.
* Flow matching (SD3, Flux): x_sigma = (1 - sigma) * x0 + sigma * eps, the transformer predicts v = eps - x0;
  sigma = shift(t), the scheduler's static shift (SD3: 3.0) or its resolution-dependent one (Flux).
"""
from __future__ import annotations

import math

from torch import Tensor

# Zero terminal SNR sets the last alpha_bar to 0 (sigma = inf); ComfyUI uses this value instead.
ZSNR_MIN_ALPHA_BAR = 4.8973451890853435e-08
T_EDGE = 1e-3  # t is kept inside [T_EDGE, 1 - T_EDGE], as the ComfyUI node does (sigma 0 or inf at the ends)


def _expand(sigma: Tensor, like: Tensor) -> Tensor:
    return sigma.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class DiffusersSchedule:
    """Noise levels and parameterization of a DDPM-family scheduler (prediction_type, zero SNR, betas)."""

    kind = "ddpm"

    def __init__(self, scheduler):
        ac = scheduler.alphas_cumprod.double().clamp_min(ZSNR_MIN_ALPHA_BAR)
        self.log_sigmas = (((1 - ac) / ac).sqrt()).log().float()
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported (epsilon, v_prediction)")

    @staticmethod
    def noise_scaling(sigma: Tensor, eps: Tensor, x0: Tensor) -> Tensor:
        return x0 + _expand(sigma, x0) * eps

    def sigma_of_timestep(self, ts: Tensor) -> Tensor:
        ts = ts.float().clamp(0, len(self.log_sigmas) - 1)
        lo = ts.floor().long()
        hi = ts.ceil().long()
        w = ts - lo
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def timestep_of_sigma(self, sigma: Tensor) -> Tensor:
        """The nearest training timestep (as ComfyUI's ModelSamplingDiscrete.timestep: models were trained on
        integer timesteps)."""
        dists = sigma.float().cpu().log()[None, :] - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).float()

    def sigma_of_t(self, t: Tensor) -> Tensor:
        """t in [0, 1] (0 clean) -> sigma over the training timesteps."""
        return self.sigma_of_timestep(t.float().cpu() * (len(self.log_sigmas) - 1))

    @property
    def sigma_max(self) -> float:
        return float(self.log_sigmas[-1].exp())

    @property
    def parameterization(self) -> str:
        return "eps" if self.prediction_type == "epsilon" else "v"

    def model_input(self, x: Tensor, sigma: Tensor) -> Tensor:
        return x / (_expand(sigma, x) ** 2 + 1).sqrt()

    def denoise(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        s = _expand(sigma, x)
        if self.prediction_type == "epsilon":
            return x - out * s
        return x / (s ** 2 + 1) - out * s / (s ** 2 + 1).sqrt()


def flow_shift(t: Tensor, shift: float | None = None, mu: float | None = None, kind: str = "exponential") -> Tensor:
    """sigma of a flow-matching schedule at t in [0, 1].

    Static shift s (SD3): sigma = s t / (1 + (s - 1) t). Dynamic shift mu (Flux): exponential
    e^mu / (e^mu + (1/t - 1)), or linear mu / (mu + (1/t - 1)); ComfyUI's ModelSamplingFlux is the exponential one.
    """
    if mu is None:
        return shift * t / (1 + (shift - 1) * t)
    if kind == "linear":
        return mu / (mu + (1 / t - 1))
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


class FlowSchedule:
    """A FlowMatchEulerDiscreteScheduler config: static shift, or the shift diffusers' pipelines derive from the
    image's token count (use_dynamic_shifting: mu linear in the sequence length between base and max)."""

    kind = "flow"
    parameterization = "flow"
    sigma_max = 1.0

    def __init__(self, config: dict, image_seq_len: int):
        self.shift, self.mu = float(config.get("shift", 1.0)), None
        self.kind_of_shift = config.get("time_shift_type", "exponential")
        if config.get("use_dynamic_shifting", False):
            lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
            b_lo, b_hi = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
            self.mu = b_lo + (b_hi - b_lo) * (image_seq_len - lo) / (hi - lo)

    @staticmethod
    def noise_scaling(sigma: Tensor, eps: Tensor, x0: Tensor) -> Tensor:
        s = _expand(sigma, x0)
        return (1 - s) * x0 + s * eps

    def sigma_of_t(self, t: Tensor) -> Tensor:
        t = t.detach().float().cpu().clamp(T_EDGE, 1 - T_EDGE)
        return flow_shift(t, self.shift, self.mu, self.kind_of_shift)

    @staticmethod
    def model_input(x: Tensor, sigma: Tensor) -> Tensor:
        return x

    @staticmethod
    def denoise(x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        return x - _expand(sigma, x) * out
