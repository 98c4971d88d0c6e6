"""Tiny, ComfyUI-loadable model files built from a seed (no weights can be downloaded here).

* ``tiny_sd15_unet``: an SD1.x-shaped UNet (model_channels 320, context 768, one level, ~26M params) that
  ComfyUI's detection classifies as SD1.x.
* ``tiny_sd15.safetensors``: that UNet + full-size CLIP-L text encoder + SD VAE keys, laid out like an SD1.5
  checkpoint, so ``CheckpointLoaderSimple`` loads it like a real file.
* ``tiny_sd2_unet``: the same at SD2.x's widths (``TINY_SD2_UNET_CONFIG``), classified as SD20 by UNETLoader.

Run as ``python -m dev.tiny_models OUT_DIR`` to write both. Files are cached by name + seed.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from dev.host import import_comfy

SEED = 1234
TINY_UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1], channel_mult=[1],
    transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1, context_dim=768,
    num_heads=8, num_head_channels=-1, use_linear_in_transformer=False, use_spatial_transformer=True,
    legacy=False, adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False,
)
# SD2.x's widths (context 1024 from OpenCLIP-H, linear projections, 64-channel heads) at the same tiny depth:
# ComfyUI's detection classifies the file as SD20
TINY_SD2_UNET_CONFIG = dict(TINY_UNET_CONFIG, context_dim=1024, use_linear_in_transformer=True, num_heads=-1,
                            num_head_channels=64)
SD_VAE_CONFIG = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
                 'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}


def _reset(module: torch.nn.Module) -> None:
    """PyTorch's default init for every layer: ComfyUI's ops skip init (weights are always loaded)."""
    for m in module.modules():
        for cls in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.GroupNorm, torch.nn.LayerNorm,
                    torch.nn.Embedding):
            if isinstance(m, cls):
                cls.reset_parameters(m)
                break


def build_unet(config: dict | None = None, seed: int = SEED) -> torch.nn.Module:
    import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(**(config or TINY_UNET_CONFIG), dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    _reset(unet)
    return unet


def build_clip_l(seed: int = SEED) -> dict[str, torch.Tensor]:
    """Full-size CLIP-L text-encoder weights, random, under SD1.5 checkpoint key names."""
    import_comfy()
    import comfy.sd1_clip

    torch.manual_seed(seed + 1)
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    _reset(clip)
    sd = clip.state_dict()
    return {f"cond_stage_model.{k}": v for k, v in sd.items() if k.startswith("transformer.text_model.")}


def build_sd_vae(seed: int = SEED) -> dict[str, torch.Tensor]:
    import_comfy()
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    torch.manual_seed(seed + 2)
    vae = AutoencodingEngine(
        regularizer_config={'target': "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={'target': "comfy.ldm.modules.diffusionmodules.model.Encoder", 'params': SD_VAE_CONFIG},
        decoder_config={'target': "comfy.ldm.modules.diffusionmodules.model.Decoder", 'params': SD_VAE_CONFIG},
        embed_dim=4)
    _reset(vae)
    return vae.state_dict()


def _save_atomic(sd: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def write_unet(path: Path, seed: int = SEED, config: dict | None = None) -> Path:
    """A UNet-only file for UNETLoader (keys as in a bare diffusion_model state dict)."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_atomic(build_unet(config, seed).state_dict(), path, {"selfperc_fixture": f"tiny-unet seed={seed}"})
    return path


def write_checkpoint(path: Path, seed: int = SEED, unet_sd: dict | None = None) -> Path:
    """An SD1.5-layout checkpoint: tiny UNet + full CLIP-L (fp16) + SD VAE (fp16)."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    unet_sd = unet_sd if unet_sd is not None else build_unet(seed=seed).state_dict()
    sd = {f"model.diffusion_model.{k}": v for k, v in unet_sd.items()}
    sd.update({k: v.half() for k, v in build_clip_l(seed).items()})
    sd.update({f"first_stage_model.{k}": v.half() for k, v in build_sd_vae(seed).items()})
    _save_atomic(sd, path, {"selfperc_fixture": f"tiny-sd15 seed={seed}"})
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=SEED)
    a = ap.parse_args()
    print(write_checkpoint(a.out_dir / "checkpoints" / "tiny_sd15.safetensors", a.seed))
    print(write_unet(a.out_dir / "diffusion_models" / "tiny_sd15_unet.safetensors", a.seed))


if __name__ == "__main__":
    main()
