"""ComfyUI model -> the core's plain callables: forward process, sigma schedule, feature layers, predictions."""
from __future__ import annotations

import comfy.model_management
import torch

MID_BLOCK = "mid_block"


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


def default_t_range(ms) -> tuple[float, float]:
    """Online noise levels to train on.

    eps-prediction models estimate x0 as x_t - sigma * eps_pred, so their x0 error grows with sigma (x14.6 at
    SD1.5's sigma_max); that x0_hat is then re-noised to a possibly low t' and dominates the loss. For eps
    models the top 10% of the schedule is left out; v and flow models use the whole range (the paper's model
    is v-prediction with zero terminal SNR).
    """
    return (0.0, 0.9) if parameterization(ms) == "eps" else (0.0, 1.0)


def feature_layers(diffusion_model) -> dict[str, torch.nn.Module]:
    """Tappable layers, mid-block first (the paper's best). SD-style UNets only (input/middle/output blocks)."""
    if not hasattr(diffusion_model, "middle_block") or len(diffusion_model.middle_block) == 0:
        raise ValueError(f"{type(diffusion_model).__name__} has no UNet mid-block; only UNet models "
                         "(SD1.x, SD2.x, SDXL) are supported for now")
    # A hook on middle_block itself never fires (its children are called one by one), so tap its last child.
    layers = {MID_BLOCK: diffusion_model.middle_block[-1]}
    for i, blk in enumerate(diffusion_model.input_blocks):
        layers[f"input_block_{i}"] = blk[-1]
    for i, blk in enumerate(diffusion_model.output_blocks):
        layers[f"output_block_{i}"] = blk[-1]
    return layers


LAYER_CHOICES = [MID_BLOCK] + [f"input_block_{i}" for i in range(12)] + [f"output_block_{i}" for i in range(12)]


def context_for(model_patcher, batch: int, cond: torch.Tensor | None, device, dtype) -> dict:
    """Keyword conditioning for apply_model: the given cross-attention context, else zeros (unconditional)."""
    ctx_dim = model_patcher.model.model_config.unet_config.get("context_dim")
    if ctx_dim is None:
        return {}
    if cond is None:
        cond = torch.zeros(1, 77, ctx_dim)
    if cond.shape[0] != batch:
        cond = cond.repeat(batch // cond.shape[0], *([1] * (cond.ndim - 1)))
    return {"c_crossattn": cond.to(device=device, dtype=dtype)}


def predictor(model_patcher):
    """(x_t, sigma, cond) -> x0_hat through ComfyUI's apply_model (input scaling, timestep, denoising)."""
    base = model_patcher.model

    def predict_x0(x_t, sigma, cond=None):
        return base.apply_model(x_t, sigma, **context_for(model_patcher, x_t.shape[0], cond, x_t.device, x_t.dtype))
    return predict_x0


def device():
    return comfy.model_management.get_torch_device()
