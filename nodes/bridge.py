"""ComfyUI model -> the core's plain callables: forward process, sigma schedule, parameterization."""
from __future__ import annotations

import comfy.model_management
import torch


def model_sampling(model_patcher):
    return model_patcher.get_model_object("model_sampling")


def noise_scaling_fn(ms):
    """The core's forward process (sigma, eps, x0) -> x_t, from ComfyUI's model_sampling (eps, v or flow)."""
    return lambda sigma, eps, x0: ms.noise_scaling(sigma, eps, x0, max_denoise=False)


def sigma_of_t_fn(ms):
    """t in [0, 1] (0 clean) -> sigma over the model's training range, via ComfyUI's own percent_to_sigma.

    t is kept inside [1e-3, 1 - 1e-3]: percent_to_sigma returns 0 and a sentinel 1e9 at the very ends.
    """
    def sigma_of_t(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().float().clamp(1e-3, 1 - 1e-3).cpu()
        return torch.tensor([float(ms.percent_to_sigma(1.0 - float(v))) for v in t], dtype=torch.float32)
    return sigma_of_t


def parameterization(ms) -> str:
    import comfy.model_sampling as cms
    if isinstance(ms, cms.CONST):
        return "flow"
    if isinstance(ms, cms.V_PREDICTION):
        return "v"
    if isinstance(ms, cms.EPS):
        return "eps"
    return type(ms).__name__


def device():
    return comfy.model_management.get_torch_device()
