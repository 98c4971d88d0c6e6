"""A tiny diffusers model folder for the headless trainer's tests: the tiny SD1.x UNet of dev/tiny_models in
diffusers layout (same weights, converted with ComfyUI's own key map), a small AutoencoderKL and a DDPM
scheduler (epsilon, or v-prediction with zero terminal SNR); optionally a one-layer random CLIP text encoder
(width 768, the UNet's context) with ComfyUI's own CLIP tokenizer files."""
from __future__ import annotations

from pathlib import Path

import torch

from dev.host import import_comfy
from dev.tiny_models import SEED, TINY_UNET_CONFIG, build_unet


def diffusers_unet_from_comfy(seed: int = SEED):
    import_comfy()
    import comfy.utils
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",), block_out_channels=(320,), layers_per_block=1,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
    comfy_sd = build_unet(seed=seed).state_dict()
    key_map = comfy.utils.unet_to_diffusers(dict(TINY_UNET_CONFIG))
    sd = {dk: comfy_sd[ck] for dk, ck in key_map.items() if ck in comfy_sd}
    missing, unexpected = unet.load_state_dict(sd, strict=False)
    if missing:
        raise RuntimeError(f"diffusers keys without a ComfyUI weight: {missing[:10]}")
    return unet


def write_text_encoder(folder: Path) -> None:
    """text_encoder/ (CLIPTextModel, 1 layer, random) and tokenizer/ (the CLIP tokenizer ComfyUI ships)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tree = import_comfy()
    CLIPTokenizer.from_pretrained(tree / "comfy" / "sd1_tokenizer").save_pretrained(folder / "tokenizer")
    torch.manual_seed(SEED + 3)
    CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=256, num_hidden_layers=1, num_attention_heads=12,
                                 max_position_embeddings=77)).save_pretrained(folder / "text_encoder")


def write_model_folder(folder: Path, prediction_type: str = "epsilon", zsnr: bool = False,
                       text_encoder: bool = False) -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler

    folder = Path(folder)
    if (folder / "unet" / "config.json").exists():
        return folder
    if text_encoder:
        write_text_encoder(folder)
    diffusers_unet_from_comfy().save_pretrained(folder / "unet")
    torch.manual_seed(SEED)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=16).save_pretrained(folder / "vae")
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type=prediction_type, rescale_betas_zero_snr=zsnr).save_pretrained(folder / "scheduler")
    return folder
