"""ComfyUI model -> the core's plain callables: forward process, sigma schedule, parameterization."""
from __future__ import annotations

import comfy.model_management
import torch

from ..selfperc_core.schedule import output_scale_fn as _output_scale_fn


def model_sampling(model_patcher):
    return model_patcher.get_model_object("model_sampling")


def noise_scaling_fn(ms):
    """The core's forward process (sigma, eps, x0) -> x_t, from ComfyUI's model_sampling (eps, v or flow)."""
    return lambda sigma, eps, x0: ms.noise_scaling(sigma, eps, x0, max_denoise=False)


def output_scale_fn(ms):
    """sigma -> c_out(sigma), how the raw output enters ComfyUI's own x0 estimate (model_sampling.calculate_denoised):
    -sigma for eps and flow models, -sigma/sqrt(sigma^2+1) for v, and whatever a newer parameterization uses."""
    return _output_scale_fn(lambda x, sigma, out: ms.calculate_denoised(sigma, out, x))


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
