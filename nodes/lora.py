"""Trainable LoRA on the diffusion model, from comfy.weight_adapter, applied in bypass form behind the switch.

ComfyUI's own training (core Train LoRA) patches every weight on every forward (W' = W + s * up @ down): each
step copies all weights and computes a full weight gradient per layer. Here each LoRA runs beside its layer
instead, y = layer(x) + s * up(down(x)), in a forward hook: the same function (a layer is linear in its
weight), so the saved file is the same ComfyUI LoRA, but a step needs only input gradients through the base
weights, and with the switch off (the frozen network) the layers run exactly as loaded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..selfperc_core import AdapterSwitch
from .host_compat import MissingHostFeature, host_symbol

log = logging.getLogger("selfperc")

LORA_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _weight_adapter(name: str, module: str = "comfy.weight_adapter"):
    return host_symbol(module, name, "training or reading a LoRA")


def algorithms() -> tuple[str, ...]:
    """What core Train LoRA offers (LoRA, LoHa, LoKr, OFT); just LoRA where the host has no comfy.weight_adapter
    (the fine-tune then names what is missing when it runs, and the other nodes still load)."""
    try:
        return tuple(_weight_adapter("adapter_maps"))
    except MissingHostFeature:
        return ("LoRA",)
_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def weight_delta(layer: torch.nn.Module, x: torch.Tensor, adapter: torch.nn.Module) -> torch.Tensor:
    """Any comfy.weight_adapter adapter (LoHa, LoKr, OFT: W' = adapter(W)) applied as layer(x, W' - W): exact, since
    a layer is linear in its weight; costs a weight-sized product per layer (LoRA has the cheap path below)."""
    w = layer.weight.to(device=x.device, dtype=torch.float32)
    delta = (adapter(w) - w).to(x.dtype)
    if isinstance(layer, torch.nn.Linear):
        return F.linear(x, delta)
    return layer._conv_forward(x, delta, None)


def lora_delta(layer: torch.nn.Module, x: torch.Tensor, lora: torch.nn.Module) -> torch.Tensor:
    """s * (up @ down) applied to ``x`` the way ``layer`` applies its weight (a LoraDiff's parameters)."""
    up, down = lora.lora_up.weight.to(x.dtype), lora.lora_down.weight.to(x.dtype)
    scale = lora.alpha / lora.rank
    if isinstance(layer, torch.nn.Linear):
        return F.linear(F.linear(x, down), up) * scale
    w = layer.weight
    if layer.groups == 1:  # down: a rank-channel conv with the layer's kernel, stride, padding; up: 1x1
        h = layer._conv_forward(x, down.view(down.shape[0], *w.shape[1:]), None)
        return _CONV[w.ndim](h, up.view(*up.shape, *[1] * (w.ndim - 2))) * scale
    return layer._conv_forward(x, (up @ down).view(w.shape), None) * scale  # grouped: exact, a full conv's cost


@dataclass
class Lora:
    """The trainable LoRA of one session: {module name ('diffusion_model.…'): LoraDiff} and its hooks."""
    adapters: dict[str, torch.nn.Module]
    handles: list = field(default_factory=list)

    def params(self) -> list[torch.nn.Parameter]:
        return [p for a in self.adapters.values() for p in a.parameters() if p.requires_grad]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def add_lora(model: torch.nn.Module, rank: int, alpha: float, switch: AdapterSwitch, seed: int, device,
             existing: dict[str, torch.Tensor] | None = None, start: dict[str, torch.Tensor] | None = None,
             algorithm: str = "LoRA", dtype: torch.dtype = torch.float32) -> Lora:
    """Hook a LoRA onto every Linear/Conv layer of ``model.diffusion_model`` (a ComfyUI BaseModel).

    The LoRA acts only while ``switch`` is on. ``existing`` (a saved state dict in this pack's key format)
    resumes those weights instead of a fresh init; ``start`` (from ``read_any_lora``) starts from another LoRA:
    its layers take that LoRA's weights, rank and alpha, the others a fresh init. Call ``remove()`` on the
    result to take the hooks off. ``algorithm``: any of algorithms() (comfy.weight_adapter's trainable adapters);
    ``dtype``: the adapter's own weights (float32, or bfloat16 to halve their and the optimizer's memory).
    """
    adapter_maps = _weight_adapter("adapter_maps")
    LoRAAdapter = _weight_adapter("LoRAAdapter", "comfy.weight_adapter.lora")  # noqa: N806 (the host's class)
    if algorithm not in adapter_maps:
        raise ValueError(f"unknown adapter {algorithm!r}; choose one of {', '.join(adapter_maps)}")
    lora = Lora({})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # create_train draws its init from the global generator
        for name, module in model.named_modules(prefix=""):
            if not name.startswith("diffusion_model.") or not isinstance(module, LORA_LAYERS):
                continue
            if start is not None and f"{name}.lora_up.weight" in start:
                up, down = start[f"{name}.lora_up.weight"], start[f"{name}.lora_down.weight"]
                train = LoRAAdapter.create_train(module.weight, rank=up.shape[1], alpha=float(start[f"{name}.alpha"]))
                with torch.no_grad():
                    train.lora_up.weight.copy_(up.reshape(train.lora_up.weight.shape))
                    train.lora_down.weight.copy_(down.reshape(train.lora_down.weight.shape))
                lora.adapters[name] = train.to(device=device, dtype=dtype)
                continue
            train = adapter_maps[algorithm].create_train(module.weight, rank=rank, alpha=alpha)
            if existing is not None:
                _load_trainable(train, existing, name, rank)
            lora.adapters[name] = train.to(device=device, dtype=dtype)
    for name, train in lora.adapters.items():
        lora.handles.append(model.get_submodule(name).register_forward_hook(_hook(train, switch), with_kwargs=True))
    return lora


# Keys of text-encoder LoRAs (A1111/kohya, diffusers): a LoRA file often holds them beside the diffusion model's;
# the pack trains the diffusion model only, so they are not "unmapped".
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te_", "te1", "te2", "clip_")


def lora_key_map(model_patcher) -> dict[str, str]:
    """ComfyUI's own LoRA key map for this model, plus the UNet names the current diffusers/peft format uses
    ('unet.<block>.attn1.to_q'; ComfyUI 0.3.75 maps only the older '.processor.to_q' form of the attention layers)."""
    import comfy.lora
    import comfy.utils

    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    config = model_patcher.model.model_config.unet_config
    for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(config).items():
        if diffusers_key.endswith(".weight"):
            for prefix in ("unet.", ""):
                key_map.setdefault(prefix + diffusers_key[: -len(".weight")], f"diffusion_model.{ldm_key}")
    return key_map


def _load_mapped(sd: dict[str, torch.Tensor], key_map: dict[str, str], name: str) -> dict:
    """ComfyUI's loader on ``sd``; the diffusion-model tensors it could not place are logged, named."""
    import comfy.lora
    import comfy.lora_convert

    missing = []

    class Collect(logging.Handler):
        def emit(self, record):
            text = record.getMessage()
            if text.startswith("lora key not loaded: "):
                missing.append(text[len("lora key not loaded: "):])
    handler = Collect(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(sd)), key_map, log_missing=True)
    finally:
        logging.getLogger().removeHandler(handler)
    missing = [k for k in missing if not k.startswith(TEXT_ENCODER_PREFIXES)]
    if missing and loaded:
        log.warning("selfperc: init_lora %s: %d of its tensors match no layer of this model and start fresh, e.g. %s",
                    name, len(missing), ", ".join(missing[:3]))
    return loaded


def read_any_lora(model_patcher, sd: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """A LoRA in any layout ComfyUI's own loader maps (ComfyUI, kohya, diffusers, peft, ...) -> this pack's keys,
    by ComfyUI's key map (``lora_key_map``): '<module>.lora_up.weight' (out, r), '.lora_down.weight' (r, in), '.alpha'.

    Raises ValueError naming the file when nothing maps to this model or it holds another adapter kind; tensors that
    map to no layer are logged (named), as core LoraLoader does.
    """
    LoRAAdapter = _weight_adapter("LoRAAdapter", "comfy.weight_adapter.lora")  # noqa: N806 (the host's class)
    loaded = _load_mapped(sd, lora_key_map(model_patcher), name)
    out = {}
    for weight_key, patch in loaded.items():
        if not isinstance(patch, LoRAAdapter):
            raise ValueError(f"{name}: {weight_key} holds a {type(patch).__name__}, not a LoRA; only LoRA files can "
                             "be continued")
        up, down, alpha, mid, dora, _ = patch.weights
        if mid is not None or dora is not None:
            raise ValueError(f"{name}: {weight_key} is a LoCon-mid or DoRA LoRA, which cannot be continued")
        module = weight_key[: -len(".weight")]
        out[f"{module}.lora_up.weight"] = up.flatten(1).float()
        out[f"{module}.lora_down.weight"] = down.flatten(1).float()
        out[f"{module}.alpha"] = torch.tensor(float(alpha if alpha is not None else up.shape[1]))
    if not out:
        raise ValueError(f"{name}: no LoRA weight in it matches this model's layers (another model family?)")
    return out


def kohya_state_dict(model_patcher, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This pack's LoRA in the kohya layout A1111, Forge and diffusers read: 'lora_unet_<name>.lora_down.weight'
    (convolutions as (r, in, kh, kw) / (out, r, 1, ...)), '.lora_up.weight', '.alpha'. UNets use diffusers
    module names (as kohya's SD trainers do), transformers their original names (as kohya's Flux/SD3 trainers)."""
    import comfy.utils

    model = model_patcher.model
    names = {}
    if hasattr(model.diffusion_model, "input_blocks"):
        for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(model.model_config.unet_config).items():
            if diffusers_key.endswith(".weight"):
                names[ldm_key[: -len(".weight")]] = diffusers_key[: -len(".weight")]
    out = {}
    for key, value in sd.items():
        module, _, kind = key.partition(".lora_") if ".lora_" in key else key.rpartition(".")
        module = module[len("diffusion_model."):]
        kohya = "lora_unet_" + names.get(module, module).replace(".", "_")
        weight = model.diffusion_model.get_submodule(module).weight
        if kind == "down.weight":
            out[f"{kohya}.lora_down.weight"] = value.reshape(value.shape[0], *weight.shape[1:])
        elif kind == "up.weight":
            out[f"{kohya}.lora_up.weight"] = value.reshape(*value.shape, *[1] * (weight.ndim - 2))
        else:  # alpha, and LoHa/LoKr/OFT tensors: the same names in kohya/LyCORIS files
            out[f"{kohya}.{kind}"] = value
    return out


def _load_trainable(train: torch.nn.Module, saved: dict[str, torch.Tensor], name: str, rank: int) -> None:
    """Resume: the saved values of ``train``'s trainable tensors ('<module>.<parameter>' keys)."""
    with torch.no_grad():
        for pname, p in train.named_parameters():
            if not p.requires_grad:
                continue
            value = saved.get(f"{name}.{pname}")
            if value is None:
                raise ValueError(f"resume file has no {pname} for {name} (another adapter kind?)")
            if value.shape != p.shape:
                raise ValueError(f"resume file's {pname} for {name} has shape {tuple(value.shape)}, not "
                                 f"{tuple(p.shape)} (rank {rank})")
            p.copy_(value)


def _hook(train: torch.nn.Module, switch: AdapterSwitch):
    delta = lora_delta if isinstance(train, _weight_adapter("LoraDiff", "comfy.weight_adapter.lora")) else weight_delta

    def hook(layer, args, kwargs, out):
        if not switch.enabled:
            return None  # the frozen network: the layer's own output
        x = args[0] if args else kwargs["input"]
        return out + delta(layer, x, train).to(out.dtype)
    return hook


def lora_state_dict(adapters: dict[str, torch.nn.Module], dtype=torch.float32,
                    weights: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """ComfyUI-native keys: '<module>.lora_up.weight', '<module>.lora_down.weight', '<module>.alpha'.

    Core LoraLoader maps 'diffusion_model.<module>' keys for every model, so loading reports no unloaded keys.
    ``weights``: other values for the (up, down) matrices, in ``Lora.params()`` order (e.g. their EMA).
    """
    sd = {}
    it = iter(weights) if weights is not None else None
    for name, a in adapters.items():
        for pname, p in a.named_parameters():  # LoRA: lora_up.weight, lora_down.weight, alpha; LoHa: hada_*, ...
            value = next(it) if it is not None and p.requires_grad else p
            keep = dtype if p.requires_grad else torch.float32
            sd[f"{name}.{pname}"] = value.detach().to("cpu", keep).clone()
    return sd
