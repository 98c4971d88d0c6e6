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


def session(pack, model, existing=None, start=None, **spec):
    """A training session on ``model`` with small test defaults (rank 4, alpha 4; ``spec``: SessionSpec fields;
    ``pack``: the pack is imported)."""
    from selfperc_pack.nodes.session import SessionSpec, training_session

    return training_session(model, SessionSpec(**spec), existing=existing, start=start)


def nonzero_lora(ses, seed=1, scale=0.05, up_scale=None):
    """Random adapter weights (a fresh LoRA's up matrices are zero: it would change nothing); ``up_scale``: another
    scale for the LoRA up matrices, to make the LoRA's effect on the output large."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in ses.adapters.values():
            for name, p in a.named_parameters():
                if p.requires_grad:
                    s = up_scale if up_scale is not None and name.startswith("lora_up") else scale
                    p.copy_(torch.randn(p.shape, generator=g) * s)


# The tolerance of "the trained adapter = the file loaded by core ComfyUI" (measured errors: ~1e-6, fp32 rounding),
# and how many times that tolerance the adapter's mean effect must be for the equality to mean anything.
LOADER_RTOL, LOADER_ATOL, EFFECT_FACTOR = 1e-4, 1e-5, 100


def assert_applied_as_trained(on, off, ref, rtol=LOADER_RTOL, atol=LOADER_ATOL, factor=EFFECT_FACTOR):
    """``on`` (the model with the trained adapter) equals ``ref`` (what a loader made of the saved file) within
    (rtol, atol), where the adapter's mean effect |on - off| is ``factor`` x that tolerance: a loader that applied
    nothing (ref = off), or missed part of the layers, cannot pass."""
    effect = (on - off).abs().mean().item()
    tolerance = atol + rtol * ref.abs().mean().item()
    assert effect > factor * tolerance, f"the adapter's effect {effect:.3g} is not {factor} x the tolerance {tolerance:.3g}"
    torch.testing.assert_close(on, ref, rtol=rtol, atol=atol)


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


def fine_tune_inputs(**flat):
    """The fine-tune node's inputs for settings given by name in one flat dict (the node's own inputs, and option
    objects for the groups that have a value)."""
    from selfperc_pack.nodes.settings import OPTION_GROUPS, split_flat

    base, groups = split_flat(flat)
    return dict(base, **{g: OPTION_GROUPS[g](**v) for g, v in groups.items()})


def watch_trainers(monkeypatch) -> list:
    """The core Trainers the fine-tune node's runs make, appended as they are made."""
    from selfperc_pack.nodes import run

    trainers = []

    class Watched(run.Trainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            trainers.append(self)
    monkeypatch.setattr(run, "Trainer", Watched)
    return trainers
