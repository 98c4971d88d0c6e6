"""Load the tiny SD1.x checkpoint in-process and re-parameterize it with ComfyUI's own nodes."""
from __future__ import annotations

import functools

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
