"""Conditioning the ComfyUI way, for every model family.

A CONDITIONING (what CLIPTextEncode or any text encoder node outputs: ``[[tokens, {pooled_output, ...}]]``) is
turned into the diffusion model's keyword inputs by the model's own ``extra_conds``, as ComfyUI's samplers do
(``encode_model_conds``): SDXL's ``y`` (pooled CLIP-G + size embeddings), Flux's guidance and pooled vector,
attention masks of the LLM encoders, Wan's and Cosmos' extra inputs, ... Per-image inputs are computed once
(the conditioning cache) and batched with ComfyUI's ``cond_cat``, which also pads token sequences of different
lengths the way ComfyUI does.
"""
from __future__ import annotations

import math

import comfy.conds
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import node_helpers
import torch

from . import families

# Guidance-distilled models read the guidance strength from the conditioning (the FluxGuidance node sets it);
# 0 leaves the conditioning as it is (its own value, else the model's default: 3.5 Flux, 0 Chroma, 6 Hunyuan).
DEFAULT_GUIDANCE = 0.0


def with_guidance(conditioning: list, guidance: float | None) -> list:
    """Set the distilled guidance value (FluxGuidance's key) on every entry; None or 0 leaves the conditioning."""
    if not guidance:
        return conditioning
    return node_helpers.conditioning_set_values(conditioning, {"guidance": guidance})


def model_inputs(model_patcher, conditioning: list, latent_shape: tuple, seed: int = 0) -> dict:
    """One image's model inputs (ComfyUI CONDRegular objects, batch 1, on the CPU) for ``conditioning`` at
    ``latent_shape`` (C, ...), built by the model's own extra_conds."""
    if len(conditioning) != 1:
        raise ValueError(f"training takes one conditioning per image, got a list of {len(conditioning)} (combined "
                         "or area conditionings are for sampling)")
    noise = torch.zeros((1, *latent_shape))
    conds = comfy.sampler_helpers.convert_cond(conditioning)
    conds = comfy.samplers.encode_model_conds(model_patcher.model.extra_conds, conds, noise, torch.device("cpu"),
                                              "positive", latent_image=noise, denoise_mask=None, seed=seed)
    out = {}
    for k, v in conds[0]["model_conds"].items():
        if k in families.REFERENCE_INPUTS:
            raise ValueError(f"the conditioning carries reference images ({k}: Kontext / edit models), which "
                             "training does not support yet; use a plain text conditioning")
        out[k] = v.process_cond(batch_size=1, area=None, device=torch.device("cpu"))
    return out


def collate(inputs: list[dict], unet: bool = False) -> dict:
    """Per-image model inputs -> one batch's keyword inputs (ComfyUI's cond_cat).

    Token sequences of different lengths batch by repetition only for UNets (pure cross-attention, where it is
    exact, up to 8x the longest); joint-attention transformers get ComfyUI's own rule."""
    keys = set(inputs[0])
    for i, x in enumerate(inputs[1:], 1):
        if set(x) != keys:
            raise ValueError(f"image {i} of the batch has model inputs {sorted(x)}, not {sorted(keys)}")
    for k in keys:
        first = inputs[0][k]
        if isinstance(first, comfy.conds.CONDCrossAttn) and unet and _repeatable([x[k] for x in inputs]):
            continue  # UNet cross-attention: repeating a sequence is exact; cond_cat repeats to the lengths' LCM
        if any(not first.can_concat(x[k]) for x in inputs[1:]):
            raise ValueError(f"the batch's '{k}' inputs cannot be batched (shapes "
                             f"{[tuple(x[k].size()) for x in inputs]}): use batch_size 1 or captions of similar "
                             "length")
    return comfy.samplers.cond_cat(inputs)


def _repeatable(conds: list, max_growth: int = 8) -> bool:
    """Token sequences of one width whose LCM length stays within ``max_growth`` x the longest."""
    shapes = [tuple(c.cond.shape) for c in conds]
    lengths = [s[1] for s in shapes]
    same = all(s[0] == shapes[0][0] and s[2:] == shapes[0][2:] for s in shapes)
    return same and math.lcm(*lengths) <= max_growth * max(lengths)


def transformer_options(model_patcher, sigma: torch.Tensor) -> dict:
    """The transformer_options ComfyUI's sampler passes to the model (patches set by other nodes included)."""
    opts = comfy.patcher_extension.merge_nested_dicts({}, model_patcher.model_options.get("transformer_options", {}),
                                                      copy_dict1=False)
    opts["cond_or_uncond"] = [0]
    opts["sigmas"] = sigma
    return opts


def predictor(model_patcher):
    """(x_t, sigma, batch inputs from ``collate``) -> x0_hat through ComfyUI's apply_model.

    cond None: the unconditional inputs of ``families.empty_conditioning`` (SD1.x/SD2.x only; others must be
    given).
    """
    base = model_patcher.model
    empty: dict[tuple, dict] = {}
    extra = families.call_inputs(base.diffusion_model)

    def predict_x0(x_t, sigma, cond=None):
        if cond is None:
            shape = tuple(x_t.shape[1:])
            if shape not in empty:
                empty[shape] = model_inputs(model_patcher, families.empty_conditioning(model_patcher), shape)
            cond = collate([empty[shape]] * x_t.shape[0])
        return base.apply_model(x_t, sigma, transformer_options=transformer_options(model_patcher, sigma), **cond,
                                **extra)
    return predict_x0

