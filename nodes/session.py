"""One training session on a ModelPatcher clone: LoRA attached, feature tap, checkpointing, and cleanup.

Used by the fine-tune node (and the host tests) so that setup and teardown live in one place: whatever
happens inside, the incoming MODEL and the shared modules come out without adapters, hooks or wrappers.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Callable

import comfy.model_management
import torch

from ..selfperc_core import FeatureTap
from ..selfperc_core.adapter import AdapterSwitch, checkpoint_forward, out_of_place_forward, uncheckpoint_forward
from ..selfperc_core.host import ModelHost, frozen_features_fn
from . import bridge, conditioning, lora, taps

log = logging.getLogger("selfperc")


@dataclass
class Session:
    mp: object                      # the training clone
    switch: AdapterSwitch
    adapters: dict
    params: list[torch.nn.Parameter]
    tap: FeatureTap
    tap_name: str                   # e.g. "mid_block" or "block 28 of 57"
    host: ModelHost                 # predictions (adapter on), frozen features (off, early exit), schedule
    model_sampling: object

    @property
    def predict_x0(self) -> Callable:
        return self.host.predict_x0

    @property
    def frozen_features(self) -> Callable:
        return self.host.frozen_features


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


def release(mp) -> None:
    """Unload the training clone (ComfyUI restores the shared modules' weights from its patch backups)."""
    mm = comfy.model_management
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        if mm.current_loaded_models[i].model is mp:
            mm.current_loaded_models.pop(i).model_unload()


def memory_estimate(mp, latent_shape: tuple, batch: int, checkpointing: bool) -> float:
    """Bytes to keep free for one training step, from ComfyUI's own per-model inference estimate: a step runs
    about three forward passes (online + two frozen) and keeps activations for backward (fewer when checkpointed).
    """
    passes = 3 * batch * (1 if checkpointing else 4)
    return mp.model.memory_required([passes, *latent_shape])


@contextlib.contextmanager
def training_session(model, rank: int, alpha: float, seed: int, layer: str = taps.MID_BLOCK,
                     checkpointing: bool = True, existing: dict | None = None, early_exit: bool = True,
                     depth: float = taps.DEFAULT_DEPTH, latent_shape: tuple | None = None, batch: int = 1,
                     start: dict | None = None, algorithm: str = "LoRA", lora_dtype: torch.dtype = torch.float32):
    mp = model.clone()
    base_params = list(mp.model.parameters())
    grad_flags = [p.requires_grad for p in base_params]
    switch = AdapterSwitch()
    blocks, tap, lora_ = [], None, None
    try:
        dm = mp.model.diffusion_model
        point = taps.tap_point(dm, layer, depth)  # an unsupported model or layer is refused before any work
        lora_ = lora.add_lora(mp.model, rank, alpha, switch, seed, mp.load_device, existing, start, algorithm,
                              lora_dtype)
        mp.model.requires_grad_(False)  # only the adapter trains; no gradient buffers for the base weights
        # ComfyUI decides how much of the model fits the device (partial loading/offload, weights kept as
        # stored, e.g. fp8), from its own estimate of what a step needs beside the weights.
        need = memory_estimate(mp, latent_shape, batch, checkpointing) if latent_shape else 0
        comfy.model_management.load_models_gpu([mp], memory_required=need)
        make_trainable_tensors(dm)
        tap = FeatureTap(point.module, early_exit=early_exit)
        blocks = taps.checkpointed_blocks(dm)
        if taps.adds_in_place(dm):
            for b in blocks:
                out_of_place_forward(b)
        if checkpointing:
            for b in blocks:
                checkpoint_forward(b, switch)
        predict = conditioning.predictor(mp)
        ms = bridge.model_sampling(mp)
        host = ModelHost(predict, frozen_features_fn(predict, tap, switch, point.features), bridge.noise_scaling_fn(ms),
                         bridge.sigma_of_t_fn(ms), bridge.parameterization(ms),
                         functools.partial(conditioning.collate, unet=taps.is_unet(dm)), bridge.output_scale_fn(ms))
        yield Session(mp, switch, lora_.adapters, lora_.params(), tap, point.name, host, ms)
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
