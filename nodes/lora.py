"""Trainable LoRA on a ModelPatcher with comfy.weight_adapter, gated by the core's AdapterSwitch."""
from __future__ import annotations

import torch
from comfy.weight_adapter.base import WeightAdapterTrainBase
from comfy.weight_adapter.lora import LoRAAdapter

from ..selfperc_core import AdapterSwitch


class GatedAdapter(WeightAdapterTrainBase):
    """A training adapter that leaves the weight unchanged while the switch is off (the frozen network)."""

    def __init__(self, adapter: torch.nn.Module, switch: AdapterSwitch):
        super().__init__()
        self.adapter = adapter
        self.switch = switch

    def __call__(self, w):
        return self.adapter(w) if self.switch.enabled else w

    def passive_memory_usage(self):
        return self.adapter.passive_memory_usage()


def add_lora(model_patcher, rank: int, alpha: float, switch: AdapterSwitch, seed: int,
             existing: dict[str, torch.Tensor] | None = None) -> dict[str, torch.nn.Module]:
    """Attach a LoRA to every linear/conv weight of the diffusion model of ``model_patcher`` (a clone).

    Returns {module name (as in the saved keys, 'diffusion_model.…'): LoraDiff}. ``existing`` (a saved
    state dict in this pack's key format) resumes those weights instead of a fresh init.
    """
    adapters = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # create_train draws its init from the global generator
        for name, module in model_patcher.model.named_modules():
            if not name.startswith("diffusion_model.") or not hasattr(module, "weight_function"):
                continue
            weight = getattr(module, "weight", None)
            if weight is None or weight.ndim < 2:
                continue
            train = LoRAAdapter.create_train(weight, rank=rank, alpha=alpha)
            if existing is not None:
                up, down = existing.get(f"{name}.lora_up.weight"), existing.get(f"{name}.lora_down.weight")
                if up is None or down is None:
                    raise ValueError(f"resume file has no LoRA for {name}")
                if up.shape != train.lora_up.weight.shape or down.shape != train.lora_down.weight.shape:
                    raise ValueError(f"resume file's LoRA for {name} has rank {up.shape[1]}, not {rank}")
                with torch.no_grad():
                    train.lora_up.weight.copy_(up)
                    train.lora_down.weight.copy_(down)
            train = train.to(device=weight.device)
            model_patcher.add_weight_wrapper(f"{name}.weight", GatedAdapter(train, switch))
            adapters[name] = train
    return adapters


def bypass_when_off(model: torch.nn.Module, switch: AdapterSwitch) -> int:
    """While ``switch`` is off, take the gated adapters out of the layers' weight_function lists.

    ComfyUI copies every weight that has a weight function before calling it (comfy.ops.cast_bias_weight),
    even when the function returns the weight unchanged; without this the frozen passes copied every weight
    they touched. With the list emptied the layer runs its plain forward. Other functions (e.g. ComfyUI's
    low-VRAM patches, which are part of the frozen model) stay. Call after the model is loaded (the lists are
    filled at load). Returns how many layers it manages.
    """
    layers = [m for m in model.modules() if any(isinstance(f, GatedAdapter) for f in getattr(m, "weight_function", ()))]
    saved: dict[int, list] = {}

    def toggle(enabled: bool) -> None:
        for m in layers:
            if enabled:
                if id(m) in saved:
                    m.weight_function = saved.pop(id(m))
            else:
                saved[id(m)] = m.weight_function
                m.weight_function = [f for f in m.weight_function if not isinstance(f, GatedAdapter)]

    switch.on_change(toggle)
    return len(layers)


def trainable_parameters(adapters: dict[str, torch.nn.Module]) -> list[torch.nn.Parameter]:
    return [p for a in adapters.values() for p in (a.lora_up.weight, a.lora_down.weight)]


def lora_state_dict(adapters: dict[str, torch.nn.Module], dtype=torch.float32) -> dict[str, torch.Tensor]:
    """ComfyUI-native keys: '<module>.lora_up.weight', '<module>.lora_down.weight', '<module>.alpha'.

    Core LoraLoader maps 'diffusion_model.<module>' keys for every UNet, so loading reports no unloaded keys.
    """
    sd = {}
    for name, a in adapters.items():
        sd[f"{name}.lora_up.weight"] = a.lora_up.weight.detach().to("cpu", dtype).clone()
        sd[f"{name}.lora_down.weight"] = a.lora_down.weight.detach().to("cpu", dtype).clone()
        sd[f"{name}.alpha"] = a.alpha.detach().to("cpu", torch.float32).clone()
    return sd
