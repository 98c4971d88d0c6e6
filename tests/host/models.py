"""Load the tiny SD1.x checkpoint in-process and re-parameterize it with ComfyUI's own nodes."""
from __future__ import annotations

import functools

import torch

PARAMETERIZATIONS = ("eps", "v_zsnr", "flow")


@functools.lru_cache(maxsize=1)
def load_checkpoint(path: str):
    import comfy.sd

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)[:3]
    return model, clip, vae


def as_parameterization(model, kind: str):
    """eps (as loaded), v-prediction + zero terminal SNR (ModelSamplingDiscrete), flow (ModelSamplingSD3)."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete, ModelSamplingSD3

    if kind == "eps":
        return model
    if kind == "v_zsnr":
        return ModelSamplingDiscrete().patch(model, "v_prediction", True)[0]
    if kind == "flow":
        return ModelSamplingSD3().patch(model, 3.0)[0]
    raise ValueError(kind)


def session(pack, model, **kw):
    """A training session on ``model`` with small test defaults (``pack``: the pack is imported)."""
    from selfperc_pack.nodes.session import training_session

    kw.setdefault("rank", 4)
    kw.setdefault("alpha", 4.0)
    kw.setdefault("seed", 0)
    return training_session(model, **kw)


def nonzero_lora(ses, seed=1, scale=0.05):
    """Random adapter weights (a fresh LoRA's up matrices are zero: it would change nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ses.params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def loaded_output(patcher, x, sigma, **cond):
    """The model's x0 for (x, sigma) loaded as ComfyUI loads it (model_sampling, weight patches), then unloaded."""
    import comfy.model_management
    from selfperc_pack.nodes.session import release

    try:
        comfy.model_management.load_models_gpu([patcher])
        with torch.no_grad():
            return patcher.model.apply_model(x, sigma, **cond)
    finally:
        release(patcher)
