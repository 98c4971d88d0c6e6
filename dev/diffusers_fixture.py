"""Tiny diffusers model folders for the headless trainer's tests, with the weights of ComfyUI-side models.

Per family, the denoiser is a ComfyUI model (``sd``: the tiny SD1.x UNet of dev/tiny_models, detected by ComfyUI;
``sdxl`` / ``sd3`` / ``flux``: dev/tiny_families' in-process models) converted to diffusers with ComfyUI's own key
maps (comfy.utils.unet_to_diffusers / mmdit_to_diffusers / flux_to_diffusers), so one set of weights exists in both
layouts. Beside it: a small AutoencoderKL of the family's latent width and factors, the family's scheduler config,
and optionally tiny random text encoders in the family's slots with the tokenizers ComfyUI ships.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dev.host import import_comfy
from dev.tiny_models import SEED, TINY_UNET_CONFIG, build_unet

# diffusers configs matching dev/tiny_families' SPECS for the same family
DIFFUSERS_CONFIGS = {
    "sdxl": dict(sample_size=32, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(64, 128), layers_per_block=1,
                 cross_attention_dim=64, attention_head_dim=(1, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=32 + 6 * 256, norm_num_groups=32),
    "sd3": dict(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
                joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=32, out_channels=16,
                pos_embed_max_size=32),
    "flux": dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
                 num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(8, 12, 12)),
}
# (latent channels, scaling_factor, shift_factor) of each family's VAE (the real ones' factors)
VAES = {"sd": (4, 0.18215, None), "sdxl": (4, 0.13025, None), "sd3": (16, 1.5305, 0.0609),
        "flux": (16, 0.3611, 0.1159)}
FLOW_SCHEDULERS = {"sd3": dict(shift=3.0),
                   "flux": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                base_image_seq_len=256, max_image_seq_len=4096)}


def comfy_model(family: str, seed: int = SEED):
    """The ComfyUI ModelPatcher whose weights the diffusers fixture of ``family`` (sdxl, sd3, flux) carries; the sd
    fixture's ComfyUI side is the tiny checkpoint file of dev/tiny_models."""
    import_comfy()
    from dev.tiny_families import tiny_model

    return tiny_model(family, seed)


def _convert(net: torch.nn.Module, comfy_sd: dict, key_map: dict) -> None:
    """Load ComfyUI weights into a diffusers module through a diffusers-name -> ComfyUI-name map (targets may be
    slices of fused weights, (key, (dim, offset, size)), or carry a function, (key, None, fn), that is its own
    inverse: swap_scale_shift)."""
    sd, missing = {}, []
    for k in net.state_dict():
        target = key_map.get(k)
        if target is None:
            missing.append(k)
            continue
        if isinstance(target, str):
            v = comfy_sd[target]
        else:
            v = comfy_sd[target[0]]
            if target[1] is not None:
                v = v.narrow(*target[1])
            if len(target) > 2:
                v = target[2](v)
        sd[k] = v.clone()
    if missing:
        raise RuntimeError(f"diffusers keys without a ComfyUI weight: {missing[:10]}")
    net.load_state_dict(sd, strict=True)


def diffusers_unet_from_comfy(seed: int = SEED):
    """The tiny SD1.x UNet of dev/tiny_models in diffusers layout."""
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


def diffusers_denoiser(family: str, seed: int = SEED, model_patcher=None) -> torch.nn.Module:
    """The diffusers denoiser of ``family`` with the weights of ``comfy_model(family, seed)`` (or the given one)."""
    if family == "sd":
        return diffusers_unet_from_comfy(seed)
    import_comfy()
    import comfy.utils
    import diffusers

    mp = model_patcher or comfy_model(family, seed)
    cfg = mp.model.model_config.unet_config
    comfy_sd = mp.model.diffusion_model.state_dict()
    if family == "sdxl":
        net, key_map = diffusers.UNet2DConditionModel(**DIFFUSERS_CONFIGS[family]), comfy.utils.unet_to_diffusers(cfg)
    elif family == "sd3":
        net, key_map = diffusers.SD3Transformer2DModel(**DIFFUSERS_CONFIGS[family]), comfy.utils.mmdit_to_diffusers(cfg)
    else:
        net, key_map = diffusers.FluxTransformer2DModel(**DIFFUSERS_CONFIGS[family]), comfy.utils.flux_to_diffusers(cfg)
    _convert(net, comfy_sd, key_map)
    return net.eval()


def _clip(hidden: int, projection: int | None, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=projection or hidden)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _t5(d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=32128, d_model=d_model, d_ff=2 * d_model, d_kv=32, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8))


def write_text_encoders(folder: Path, family: str, t5: bool = True) -> None:
    """Tiny random text encoders in the family's diffusers slots (widths fitting the tiny denoiser), with the CLIP
    and T5 tokenizers ComfyUI ships. SD1.x: CLIP 768 (the tiny UNet's context); SDXL: CLIP 32 + CLIP-with-projection
    32 (context 64, pooled 32); SD3: two CLIPs-with-projection of 16 (padded to 64, pooled 32) + optionally T5 64;
    Flux: CLIP 32 (pooled) + T5 64."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    tree = import_comfy()
    folder = Path(folder)
    clip_tok = CLIPTokenizer.from_pretrained(tree / "comfy" / "sd1_tokenizer", model_max_length=77)
    t5_tok = T5TokenizerFast.from_pretrained(tree / "comfy" / "text_encoders" / "t5_tokenizer")
    if family == "sd":
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(SEED + 3)
        encoders = {"text_encoder": CLIPTextModel(CLIPTextConfig(
            hidden_size=768, intermediate_size=256, num_hidden_layers=1, num_attention_heads=12,
            max_position_embeddings=77))}
        tokenizers = {"tokenizer": clip_tok}
    elif family == "sdxl":
        encoders = {"text_encoder": _clip(32, None, SEED + 3), "text_encoder_2": _clip(32, 32, SEED + 4)}
        tokenizers = {"tokenizer": clip_tok, "tokenizer_2": clip_tok}
    elif family == "sd3":
        encoders = {"text_encoder": _clip(16, 16, SEED + 3), "text_encoder_2": _clip(16, 16, SEED + 4)}
        tokenizers = {"tokenizer": clip_tok, "tokenizer_2": clip_tok}
        if t5:
            encoders["text_encoder_3"], tokenizers["tokenizer_3"] = _t5(64, SEED + 5), t5_tok
    else:
        encoders = {"text_encoder": _clip(32, None, SEED + 3), "text_encoder_2": _t5(64, SEED + 4)}
        tokenizers = {"tokenizer": clip_tok, "tokenizer_2": t5_tok}
    for name, m in encoders.items():
        m.save_pretrained(folder / name)
    for name, t in tokenizers.items():
        t.save_pretrained(folder / name)


def write_model_folder(folder: Path, prediction_type: str = "epsilon", zsnr: bool = False,
                       text_encoder: bool = False, family: str = "sd", t5: bool = True) -> Path:
    """A diffusers model folder of ``family`` (cached: an existing folder is reused)."""
    from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    folder = Path(folder)
    sub = "unet" if family in ("sd", "sdxl") else "transformer"
    if (folder / sub / "config.json").exists():
        return folder
    if text_encoder:
        write_text_encoders(folder, family, t5=t5)
    diffusers_denoiser(family).save_pretrained(folder / sub)
    channels, scale, shift = VAES[family]
    torch.manual_seed(SEED)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=channels, block_out_channels=(32, 32, 32, 32),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=16, scaling_factor=scale,
                  shift_factor=shift).save_pretrained(folder / "vae")
    if family in FLOW_SCHEDULERS:
        FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULERS[family]).save_pretrained(folder / "scheduler")
    else:
        DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type=prediction_type, rescale_betas_zero_snr=zsnr).save_pretrained(folder / "scheduler")
    pipeline = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family]
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}) + "\n")
    return folder
