"""One training session on a ModelPatcher clone: LoRA attached, feature tap, checkpointing, and cleanup.

Used by the fine-tune node (and the host tests) so that setup and teardown live in one place: whatever
happens inside, the incoming MODEL and the shared modules come out without adapters, hooks or wrappers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import comfy.model_management
import torch

from ..selfperc_core import FeatureTap
from ..selfperc_core.adapter import AdapterSwitch, checkpoint_forward, uncheckpoint_forward
from . import bridge, lora


@dataclass
class Session:
    mp: object                      # the training clone
    switch: AdapterSwitch
    adapters: dict
    params: list[torch.nn.Parameter]
    tap: FeatureTap
    predict_x0: Callable            # (x_t, sigma, cond) -> x0_hat, adapter on
    frozen_features: Callable       # (x, sigma, cond) -> features, adapter off, stops at the layer
    model_sampling: object


def make_trainable_tensors(module: torch.nn.Module) -> int:
    """Replace inference-mode weights by normal tensors with the same values (no extra copy is kept).

    ComfyUI loads models under torch.inference_mode; autograd cannot save such tensors for backward, and the
    frozen passes need backward through the weights' layers (gradients flow to the input). Returns the count.
    """
    n = 0
    with torch.no_grad():
        for mod in module.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None and p.is_inference():
                    mod._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
                    n += 1
            for name, b in list(mod._buffers.items()):
                if b is not None and b.is_inference():
                    mod._buffers[name] = b.clone()
                    n += 1
    return n


def checkpointed_blocks(diffusion_model) -> list[torch.nn.Module]:
    """The layers inside the UNet's blocks (ResBlocks, transformers, resamplers), as core Train LoRA picks them.

    The blocks themselves (TimestepEmbedSequential) are never called: the UNet iterates their children, so
    only the children can be checkpointed.
    """
    layers = []
    for blk in [*diffusion_model.input_blocks, diffusion_model.middle_block, *diffusion_model.output_blocks]:
        layers.extend(blk)
    return layers + [m for m in (getattr(diffusion_model, "out", None),) if m is not None]


def release(mp) -> None:
    """Unload the training clone (ComfyUI restores the shared modules' weights from its patch backups)."""
    mm = comfy.model_management
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        if mm.current_loaded_models[i].model is mp:
            mm.current_loaded_models.pop(i).model_unload()


@contextlib.contextmanager
def training_session(model, rank: int, alpha: float, seed: int, layer: str = bridge.MID_BLOCK,
                     checkpointing: bool = True, existing: dict | None = None, early_exit: bool = True):
    mp = model.clone()
    base_params = list(mp.model.parameters())
    grad_flags = [p.requires_grad for p in base_params]
    switch = AdapterSwitch()
    blocks, tap, lora_ = [], None, None
    try:
        lora_ = lora.add_lora(mp.model, rank, alpha, switch, seed, mp.load_device, existing)
        mp.model.requires_grad_(False)  # only the adapter trains; no gradient buffers for the base weights
        comfy.model_management.load_models_gpu([mp], memory_required=1e20, force_full_load=True)
        make_trainable_tensors(mp.model.diffusion_model)
        dm = mp.model.diffusion_model
        layers = bridge.feature_layers(dm)
        if layer not in layers:
            raise ValueError(f"feature layer {layer!r} does not exist in this model; it has {', '.join(layers)}")
        tap = FeatureTap(layers[layer], early_exit=early_exit)
        if checkpointing:
            blocks = checkpointed_blocks(dm)
            for b in blocks:
                checkpoint_forward(b, switch)
        predict = bridge.predictor(mp)

        def frozen_features(x, sigma, cond=None):
            with switch.off():
                return tap(predict, x, sigma, cond)

        yield Session(mp, switch, lora_.adapters, lora_.params(), tap, predict, frozen_features,
                      bridge.model_sampling(mp))
    finally:
        if tap is not None:
            tap.remove()
        if lora_ is not None:
            lora_.remove()
        for b in blocks:
            uncheckpoint_forward(b)
        release(mp)
        for p, flag in zip(base_params, grad_flags):
            if p.requires_grad != flag and not p.is_inference():
                p.requires_grad_(flag)
