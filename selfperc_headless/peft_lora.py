"""peft's LoRA on a diffusers denoiser, seen by the core: the adapter switch, and its weights in the kohya layout
ComfyUI loads."""
from __future__ import annotations

import torch
from torch import Tensor

from selfperc_core.adapter import AdapterSwitch


class PeftSwitch(AdapterSwitch):
    """The adapter switch driving peft's LoRA layers (their own on/off flag, read in their forward)."""

    def __init__(self, model: torch.nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        self._enabled = True
        super().__init__(True)

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = value
        for layer in getattr(self, "_layers", []):
            layer._disable_adapters = not value  # not enable_adapters(): that also flips requires_grad


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of an FSDP2 shard (a DTensor: a collective, every process must call it), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def kohya_state_dict(net: torch.nn.Module, prefix: str = "lora_unet_", adapter: str = "default"
                     ) -> dict[str, Tensor]:
    """peft LoRA weights in the kohya layout ComfyUI's LoraLoader maps for diffusers layer names:
    '<prefix><module with _>.lora_down.weight' (A), '.lora_up.weight' (B), '.alpha'; prefix 'lora_unet_' for
    UNets, 'lora_transformer_' for SD3 / Flux transformers."""
    from peft.tuners.lora import LoraLayer

    sd = {}
    for name, m in net.named_modules():
        if isinstance(m, LoraLayer) and adapter in m.lora_A:
            a, b = full_tensor(m.lora_A[adapter].weight), full_tensor(m.lora_B[adapter].weight)
            key = prefix + name.replace(".", "_")
            # copies: a snapshot, never a view of the live (fp32, CPU) weights that training goes on to change
            sd[f"{key}.lora_down.weight"] = a.detach().float().cpu().reshape(a.shape[0], -1).clone()
            sd[f"{key}.lora_up.weight"] = b.detach().float().cpu().reshape(b.shape[0], -1).clone()
            sd[f"{key}.alpha"] = torch.tensor(float(m.lora_alpha[adapter]))
    return sd
