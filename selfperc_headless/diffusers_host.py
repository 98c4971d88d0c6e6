"""A diffusers UNet2DConditionModel + DDPM scheduler config -> the core's callables (headless trainer).

The same sigma-space conventions as ComfyUI's EPS / V model sampling: x_sigma = x0 + sigma * eps with
sigma = sqrt((1 - alpha_bar) / alpha_bar); the UNet sees x / sqrt(sigma^2 + 1) at the matching timestep.
"""
from __future__ import annotations

import torch
from torch import Tensor

from selfperc_core.adapter import AdapterSwitch

# Zero terminal SNR sets the last alpha_bar to 0 (sigma = inf); ComfyUI uses this value instead.
ZSNR_MIN_ALPHA_BAR = 4.8973451890853435e-08


class DiffusersSchedule:
    """Noise levels and parameterization read from a diffusers scheduler (prediction_type, zero SNR, betas)."""

    def __init__(self, scheduler):
        ac = scheduler.alphas_cumprod.double().clamp_min(ZSNR_MIN_ALPHA_BAR)
        self.log_sigmas = (((1 - ac) / ac).sqrt()).log().float()
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported (epsilon, v_prediction)")

    @staticmethod
    def noise_scaling(sigma: Tensor, eps: Tensor, x0: Tensor) -> Tensor:
        return x0 + sigma.reshape(-1, *([1] * (x0.ndim - 1))) * eps

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
    def parameterization(self) -> str:
        return "eps" if self.prediction_type == "epsilon" else "v"

    def denoise(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - out * s
        return x / (s ** 2 + 1) - out * s / (s ** 2 + 1).sqrt()


def unet_predictor(unet, schedule: DiffusersSchedule, context_dim: int):
    """(x_t, sigma, cond) -> x0_hat; cond None = unconditional (zero context, as the ComfyUI node)."""
    def predict_x0(x_t, sigma, cond=None):
        s = sigma.reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
        ts = schedule.timestep_of_sigma(sigma).to(x_t.device)
        ctx = cond if cond is not None else torch.zeros(x_t.shape[0], 77, context_dim, device=x_t.device,
                                                        dtype=x_t.dtype)
        out = unet(x_t / (s ** 2 + 1).sqrt(), ts, encoder_hidden_states=ctx).sample
        return schedule.denoise(x_t, sigma, out)
    return predict_x0


class PeftSwitch(AdapterSwitch):
    """The adapter switch driving peft's LoRA layers (their own on/off flag, read in their forward)."""

    def __init__(self, model: torch.nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        self._enabled = True
        super().__init__(True)

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = value
        for layer in getattr(self, "_layers", []):
            layer._disable_adapters = not value  # not enable_adapters(): that also flips requires_grad


def lora_targets(unet) -> list[str]:
    """Every linear and conv layer of the UNet (as the ComfyUI node trains)."""
    return [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def comfy_lora_state_dict(unet, adapter: str = "default") -> dict[str, Tensor]:
    """peft LoRA weights in the kohya layout ComfyUI's LoraLoader (and most UIs) map for every UNet layer:
    'lora_unet_<module with _>.lora_down.weight' (A), '.lora_up.weight' (B), '.alpha'."""
    from peft.tuners.lora import LoraLayer

    sd = {}
    for name, m in unet.named_modules():
        if isinstance(m, LoraLayer) and adapter in m.lora_A:
            a, b = m.lora_A[adapter].weight, m.lora_B[adapter].weight
            key = "lora_unet_" + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"] = a.detach().float().cpu().reshape(a.shape[0], -1).contiguous()
            sd[f"{key}.lora_up.weight"] = b.detach().float().cpu().reshape(b.shape[0], -1).contiguous()
            sd[f"{key}.alpha"] = torch.tensor(float(m.lora_alpha[adapter]))
    return sd
