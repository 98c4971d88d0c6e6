"""The diffusers model families the headless host trains: how each is loaded, called, tapped and conditioned.

* ``sd``: SD1.x / SD2.x ``UNet2DConditionModel`` (DDPM scheduler: eps or v, zero terminal SNR);
* ``sdxl``: the SDXL UNet (``addition_embed_type="text_time"``: pooled text + size embeddings);
* ``sd3``: ``SD3Transformer2DModel`` (SD3 / SD3.5, rectified flow);
* ``flux``: ``FluxTransformer2DModel`` (Flux.1 dev / schnell, rectified flow, packed 2x2 latents, guidance).

Each family's behaviour (how its denoiser is called, its zero conditioning, how captions are encoded) lives in its
FAMILIES entry. The tap rules are the ComfyUI nodes': the UNet mid-block output, or for transformers the block at a
depth fraction of the whole stack (double-stream then single-stream blocks; ``selfperc_core.features.block_at_depth``),
its image tokens reshaped to the latent's token grid. A conditioning is a dict of (B, ...) tensors: ``context``
(text tokens) and, where the family reads one, ``pooled``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from selfperc_core.features import DEFAULT_DEPTH, FeatureTap, block_at_depth, to_grid
from selfperc_headless import captions
from selfperc_headless.schedules import DiffusersSchedule, FlowSchedule

MAX_CONFIG_BYTES = 1 << 20  # a diffusers config.json is a few KB; anything far larger is not one
EMPTY_TOKENS = 77  # the token count of the zero conditioning used when no text encoder is there (CLIP's context)


DEFAULT_FLUX_GUIDANCE = 3.5  # Flux dev's distilled guidance when none is given (diffusers' FluxPipeline default)
VAE_SCALE = 8  # pixels per latent pixel of every family here (SDXL's size embeddings are in pixels)


def _unet_forward(net, x_in, sigma, cond, schedule, guidance):
    return net(x_in, schedule.timestep_of_sigma(sigma).to(x_in.device), encoder_hidden_states=cond["context"]).sample


def _sdxl_forward(net, x_in, sigma, cond, schedule, guidance):
    b, h, w = x_in.shape[0], x_in.shape[-2] * VAE_SCALE, x_in.shape[-1] * VAE_SCALE
    ids = torch.tensor([h, w, 0, 0, h, w], device=x_in.device, dtype=x_in.dtype).expand(b, 6)  # the image's size
    return net(x_in, schedule.timestep_of_sigma(sigma).to(x_in.device), encoder_hidden_states=cond["context"],
               added_cond_kwargs={"text_embeds": cond["pooled"], "time_ids": ids}).sample


def _sd3_forward(net, x_in, sigma, cond, schedule, guidance):
    return net(hidden_states=x_in, timestep=sigma * 1000, encoder_hidden_states=cond["context"],
               pooled_projections=cond["pooled"]).sample


def _flux_forward(net, x_in, sigma, cond, schedule, guidance):
    b, dev, dt = x_in.shape[0], x_in.device, x_in.dtype
    g = None  # the transformer multiplies timestep and guidance by 1000 itself
    if net.config.guidance_embeds:
        g = torch.full((b,), guidance or DEFAULT_FLUX_GUIDANCE, device=dev, dtype=dt)
    txt_ids = torch.zeros(cond["context"].shape[1], 3, device=dev, dtype=dt)
    out = net(hidden_states=pack(x_in), timestep=sigma.to(dt), guidance=g, pooled_projections=cond["pooled"],
              encoder_hidden_states=cond["context"], txt_ids=txt_ids, img_ids=flux_image_ids(*x_in.shape[-2:], dev, dt))
    return unpack(out.sample, x_in.shape)


def _unet_empty(c) -> dict[str, Tensor]:
    return {"context": torch.zeros(1, EMPTY_TOKENS, c.cross_attention_dim)}


def _sdxl_empty(c) -> dict[str, Tensor]:
    return dict(_unet_empty(c),
                pooled=torch.zeros(1, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim))


def _dit_empty(c) -> dict[str, Tensor]:
    return {"context": torch.zeros(1, EMPTY_TOKENS, c.joint_attention_dim),
            "pooled": torch.zeros(1, c.pooled_projection_dim)}


@dataclass(frozen=True)
class Family:
    """One diffusers model family the headless host trains, with its behaviour."""
    name: str
    denoiser: str  # the model folder's subfolder holding the denoiser
    model_class: str  # its diffusers class
    lora_prefix: str  # kohya prefix ComfyUI's LoRA loader maps for diffusers names of this family
    forward: Callable  # (net, x_in, sigma, cond, schedule, guidance) -> the raw output (eps, v or velocity)
    empty: Callable  # (the denoiser's config) -> the zero conditioning (1, ...)
    text: captions.TextEncoding  # how captions become its conditioning
    stacks: tuple[str, ...] = ()  # transformer block lists in forward order; () for UNets

    @property
    def unet(self) -> bool:
        return not self.stacks


FAMILIES = {
    "sd": Family("sd", "unet", "UNet2DConditionModel", "lora_unet_", _unet_forward, _unet_empty, captions.SD),
    "sdxl": Family("sdxl", "unet", "UNet2DConditionModel", "lora_unet_", _sdxl_forward, _sdxl_empty, captions.SDXL),
    "sd3": Family("sd3", "transformer", "SD3Transformer2DModel", "lora_transformer_", _sd3_forward, _dit_empty,
                  captions.SD3, ("transformer_blocks",)),
    "flux": Family("flux", "transformer", "FluxTransformer2DModel", "lora_transformer_", _flux_forward, _dit_empty,
                   captions.FLUX, ("transformer_blocks", "single_transformer_blocks")),
}


def _config(path: Path) -> dict:
    """A JSON config (plain data, never code), bounded in size before it is read; {} when absent."""
    if not path.is_file():
        return {}
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, more than a config can be ({MAX_CONFIG_BYTES})")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON config ({e})") from None


def detect(model_dir: Path) -> Family:
    """The family of a diffusers model folder, from its denoiser's config (unet/ or transformer/)."""
    model_dir = Path(model_dir)
    unet = _config(model_dir / "unet" / "config.json")
    if unet:
        return FAMILIES["sdxl" if unet.get("addition_embed_type") == "text_time" else "sd"]
    cls = _config(model_dir / "transformer" / "config.json").get("_class_name")
    for family in FAMILIES.values():
        if not family.unet and family.model_class == cls:
            return family
    if cls:
        raise ValueError(f"{model_dir}: transformer/ holds a {cls}; the headless trainer knows SD1.x/SD2.x/SDXL "
                         "UNets, SD3Transformer2DModel and FluxTransformer2DModel")
    raise ValueError(f"{model_dir}: no unet/config.json or transformer/config.json: not a diffusers model folder")


def load_denoiser(model_dir: Path, family: Family, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    import diffusers

    return getattr(diffusers, family.model_class).from_pretrained(Path(model_dir) / family.denoiser,
                                                                  torch_dtype=dtype)


def load_schedule(model_dir: Path, family: Family, latent_hw: tuple[int, int]):
    """The scheduler config's noise levels: DDPM for UNets, flow matching for transformers (a resolution-dependent
    shift uses ``latent_hw``)."""
    if family.unet:
        from diffusers import DDPMScheduler

        return DiffusersSchedule(DDPMScheduler.from_pretrained(Path(model_dir) / "scheduler"))
    cfg = _config(Path(model_dir) / "scheduler" / "scheduler_config.json")
    seq = (latent_hw[0] // 2) * (latent_hw[1] // 2)  # both families patchify 2x2
    return FlowSchedule(cfg, seq)


def empty_cond(net: torch.nn.Module, family: Family) -> dict[str, Tensor]:
    """The zero conditioning (1, ...) of this denoiser: unconditional training without a text encoder."""
    return family.empty(net.config)


def collate(conds: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Per-image conditionings -> one batch. Text encoders pad to a fixed length, so contexts stack as they are."""
    lengths = {c["context"].shape[1] for c in conds}
    if len(lengths) > 1:
        raise ValueError(f"conditionings of different token counts {sorted(lengths)} cannot be batched")
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def pack(x: Tensor) -> Tensor:
    """Flux: (B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens, row-major over the 2x2 patches (diffusers' order)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, shape: tuple) -> Tensor:
    b, c, h, w = shape
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def flux_image_ids(h: int, w: int, device, dtype) -> Tensor:
    """(h/2 * w/2, 3) position ids (0, row, column) of the packed latent (diffusers' and ComfyUI's)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def predictor(net: torch.nn.Module, family: Family, schedule, guidance: float | None = None) -> Callable:
    """(x_t, sigma, cond) -> x0_hat through ``net`` (the online or the frozen network); cond None = the zero one.

    ``guidance``: Flux dev's distilled guidance (the transformer's guidance input); 0 or None: its default, 3.5;
    ignored by models without guidance_embeds.
    """
    empty = empty_cond(net, family)

    def predict_x0(x: Tensor, sigma: Tensor, cond: dict | None = None) -> Tensor:
        b, dev, dt = x.shape[0], x.device, x.dtype
        cond = cond if cond is not None else {k: v.expand(b, *v.shape[1:]) for k, v in empty.items()}
        cond = {k: v.to(device=dev, dtype=dt) for k, v in cond.items()}
        sigma = sigma.to(dev)
        out = family.forward(net, schedule.model_input(x, sigma), sigma, cond, schedule, guidance)
        return schedule.denoise(x, sigma, out)
    return predict_x0


def tap_point(net: torch.nn.Module, family: Family, depth: float = DEFAULT_DEPTH, early_exit: bool = True
              ) -> FeatureTap:
    """UNets: the mid-block output; transformers: the image tokens of the block at ``depth`` of all blocks."""
    if family.unet:
        return FeatureTap(net.mid_block, "mid_block", early_exit=early_exit)
    stack = [b for attr in family.stacks for b in getattr(net, attr)]
    i = block_at_depth(len(stack), depth)

    def features(out, shape):  # every block returns (text tokens, image tokens)
        return to_grid(out[1], (shape[-2] // 2, shape[-1] // 2))
    return FeatureTap(stack[i], f"block {i} of {len(stack)}", features, early_exit)


def blocks(net: torch.nn.Module, family: Family) -> list[torch.nn.Module]:
    """The blocks to checkpoint (and FSDP's wrap units): the UNet's down/mid/up blocks, every transformer block."""
    if family.unet:
        return [*net.down_blocks, net.mid_block, *net.up_blocks]
    return [b for attr in family.stacks for b in getattr(net, attr)]


def block_class_names(net: torch.nn.Module, family: Family) -> list[str]:
    """The class names of ``blocks``: FSDP's wrap units (accelerate refuses a name the model does not have)."""
    return sorted({type(b).__name__ for b in blocks(net, family)})


def lora_targets(net: torch.nn.Module) -> list[str]:
    """Every linear and conv layer of the denoiser (as the ComfyUI node trains)."""
    return [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def latent_scale(vae_config) -> tuple[float, float]:
    """(scaling_factor, shift_factor): the denoiser's latent = (VAE mean - shift) * scale (shift 0 for SD/SDXL)."""
    return float(vae_config.scaling_factor), float(getattr(vae_config, "shift_factor", None) or 0.0)
