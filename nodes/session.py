"""One training session on a ModelPatcher clone: LoRA attached, feature tap, checkpointing, and cleanup.

Used by the fine-tune node (and the in-process tests and the benchmark) so that setup and teardown live in one
place: whatever happens inside, the incoming MODEL and the shared modules come out without adapters, hooks or
wrappers.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Callable

import comfy.model_management
import torch

from ..selfperc_core.adapter import AdapterSwitch, checkpoint_forward, out_of_place_forward, uncheckpoint_forward
from ..selfperc_core.features import FeatureTap
from ..selfperc_core.model_view import ModelView, frozen_features_fn
from . import bridge, families, inputs, lora
from .host_compat import clone_for_training, training_mode

log = logging.getLogger("selfperc")


@dataclass(frozen=True)
class SessionSpec:
    """How a training session sets up its model: the adapter, the tap, checkpointing, and what to keep room for."""
    rank: int = 4
    alpha: float = 4.0
    seed: int = 0  # the adapter's initialisation
    algorithm: str = "LoRA"
    lora_dtype: torch.dtype = torch.float32
    layer: str = families.MID_BLOCK
    depth: float = families.DEFAULT_DEPTH
    early_exit: bool = True
    checkpointing: bool = True
    latent_shape: tuple | None = None  # (C, ...) of one image: with it, ComfyUI loads the model with room for a step
    batch: int = 1
    adapter: bool = True  # False: no LoRA, the whole model frozen (something else trains, e.g. an embedding)
    weights_on_device_gb: float = 0.0  # > 0: at most this much of the weights stays on the device (stream_weights)


@dataclass
class Session:
    mp: object                      # the training clone
    switch: AdapterSwitch
    adapters: dict
    params: list[torch.nn.Parameter]
    tap: FeatureTap                 # its name: e.g. "mid_block" or "block 28 of 57"
    view: ModelView                 # predictions (adapter on), frozen features (off, early exit), schedule
    model_sampling: object

    @property
    def tap_name(self) -> str:
        return self.tap.name

    @property
    def predict_x0(self) -> Callable:
        return self.view.predict_x0

    @property
    def frozen_features(self) -> Callable:
        return self.view.frozen_features


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


@contextlib.contextmanager
def frozen_weights(module: torch.nn.Module):
    """No gradient buffers for ``module``'s weights while gradients flow through it to something else (ComfyUI
    leaves loaded weights with requires_grad True); the flags are restored on exit."""
    params = [p for p in module.parameters() if not p.is_inference()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def release(mp) -> None:
    """Unload the training clone (ComfyUI restores the shared modules' weights from its patch backups)."""
    mm = comfy.model_management
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        if mm.current_loaded_models[i].model is mp:
            mm.current_loaded_models.pop(i).model_unload()


def stream_weights(mp, budget: int) -> int:
    """Keep at most ``budget`` bytes of the model's weights on its device: ComfyUI's own partial unloading moves
    the other layers to the offload device (system RAM) and marks them to be cast onto the compute device each time
    they run, which checkpointing's recompute and the backward do too. Returns the bytes left on the device."""
    if not all(hasattr(mp, a) for a in ("partially_unload", "loaded_size", "model_size")):
        raise RuntimeError("weights_on_device_gb needs ComfyUI's ModelPatcher.partially_unload / loaded_size / "
                           "model_size, which this ComfyUI lacks (tested with 0.3.75): set it to 0")
    loaded = mp.loaded_size()
    if loaded > budget:
        mp.partially_unload(mp.offload_device, loaded - budget)
    log.info("selfperc: %.2f of %.2f GB of weights on %s, the rest streamed from %s", mp.loaded_size() / 2 ** 30,
             mp.model_size() / 2 ** 30, mp.load_device, mp.offload_device)
    return mp.loaded_size()


def memory_estimate(mp, latent_shape: tuple, batch: int, checkpointing: bool) -> float:
    """Bytes to keep free for one training step, from ComfyUI's own per-model inference estimate: a step runs
    about three forward passes (online + two frozen) and keeps activations for backward (fewer when checkpointed).
    """
    passes = 3 * batch * (1 if checkpointing else 4)
    return mp.model.memory_required([passes, *latent_shape])


def _model_view(mp, dm, tap: FeatureTap, switch: AdapterSwitch) -> ModelView:
    predict = inputs.predictor(mp)
    ms = bridge.model_sampling(mp)
    return ModelView(predict, frozen_features_fn(predict, tap, switch), bridge.noise_scaling_fn(ms),
                     bridge.sigma_of_t_fn(ms), bridge.parameterization(ms),
                     functools.partial(inputs.collate, unet=families.is_unet(dm)), bridge.output_scale_fn(ms),
                     float(getattr(ms, "sigma_data", 1.0)))


@contextlib.contextmanager
def training_session(model, spec: SessionSpec = SessionSpec(), existing: dict | None = None,
                     start: dict | None = None):
    """A training clone of ``model`` with the adapter on (``existing``: resumed weights; ``start``: init_lora's),
    the tap, checkpointing, the host's training flag; everything is taken off again on exit, whatever happened."""
    with training_mode():
        with _session(model, spec, existing, start) as ses:
            yield ses


@contextlib.contextmanager
def _session(model, spec: SessionSpec, existing: dict | None, start: dict | None):
    mp = clone_for_training(model)
    base_params = list(mp.model.parameters())
    grad_flags = [p.requires_grad for p in base_params]
    switch = AdapterSwitch()
    blocks, tap, lora_ = [], None, None
    try:
        dm = mp.model.diffusion_model
        tap = families.tap_point(dm, spec.layer, spec.depth, spec.early_exit)  # unsupported: refused before work
        if spec.adapter:
            lora_ = lora.add_lora(mp.model, spec.rank, spec.alpha, switch, spec.seed, mp.load_device, existing,
                                  start, spec.algorithm, spec.lora_dtype)
        mp.model.requires_grad_(False)  # only the adapter trains; no gradient buffers for the base weights
        # ComfyUI decides how much of the model fits the device (partial loading/offload, weights kept as
        # stored, e.g. fp8), from its own estimate of what a step needs beside the weights.
        need = memory_estimate(mp, spec.latent_shape, spec.batch, spec.checkpointing) if spec.latent_shape else 0
        comfy.model_management.load_models_gpu([mp], memory_required=need)
        make_trainable_tensors(dm)
        if spec.weights_on_device_gb > 0:
            stream_weights(mp, int(spec.weights_on_device_gb * 2 ** 30))
        blocks = families.checkpointed_blocks(dm)
        if families.adds_in_place(dm):
            for b in blocks:
                out_of_place_forward(b)
        if spec.checkpointing:
            for b in blocks:
                checkpoint_forward(b, switch)
        yield Session(mp, switch, lora_.adapters if lora_ else {}, lora_.params() if lora_ else [], tap,
                      _model_view(mp, dm, tap, switch), bridge.model_sampling(mp))
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
