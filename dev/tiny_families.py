"""Tiny, seeded, randomly initialised diffusion models of each ComfyUI model family, built in-process.

Each model is built from the family's own ``comfy.supported_models`` class with a small hand-written unet_config
(detection is skipped), exactly as ``comfy.sd.load_diffusion_model_state_dict`` does after detection, and wrapped in
a real ``comfy.model_patcher.ModelPatcher``. ``tiny_conditioning`` gives a CONDITIONING shaped like that family's
text-encoder output (the keys its ``extra_conds`` in comfy/model_base.py reads).

Run ``python -m dev.tiny_families [family ...]`` to sample 2 euler steps through ``comfy.sample.sample`` for each.
"""
from __future__ import annotations

import sys
import time

import torch

from dev.host import import_comfy

CTX = 64  # text-encoder hidden width of every tiny family (real: 768 SD1, 4096 T5, 3584 Qwen2.5-VL ...)
POOL = 32  # pooled text width (real: 768 CLIP-L, 2048 CLIP-L+G, 1280 CLIP-G)
LLAMA = 48  # HiDream llama hidden-state width (real 4096)
LLAMA_LAYERS = 2  # HiDream: number of llama layers stacked in conditioning_llama3 (real 32)

_UNET = dict(image_size=32, in_channels=4, out_channels=4, num_res_blocks=[1, 1], channel_mult=[1, 2],
             transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
             context_dim=CTX, adm_in_channels=None, use_spatial_transformer=True, legacy=False, use_checkpoint=False,
             use_temporal_attention=False, use_temporal_resblock=False)
_FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=POOL, context_in_dim=CTX, hidden_size=64,
             mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000,
             patch_size=2, qkv_bias=True, guidance_embed=True)
_LUMINA = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2,
               multiple_of=32, cap_feat_dim=CTX, qk_norm=True, axes_dims=[8, 12, 12])
_WAN = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), in_dim=16, out_dim=16, dim=64, ffn_dim=128,
            freq_dim=256, text_dim=CTX, num_heads=2, num_layers=2, window_size=(-1, -1), qk_norm=True,
            cross_attn_norm=True, eps=1e-6)

# family -> (supported_models class, unet_config, VAE spatial downscale, conditioning extras)
# Conditioning extras: "pooled" (width, or None where the TE gives no pooled output but Flux.encode_adm still reads
# the key), "guidance", "mask" (TE returns an all-ones attention_mask), "llama" (HiDream conditioning_llama3).
SPECS: dict[str, tuple[str, dict, int, dict]] = {
    "sd15": ("SD15", dict(_UNET, model_channels=32, use_linear_in_transformer=False), 8, {}),
    "sd20_v": ("SD20", dict(_UNET, model_channels=64, use_linear_in_transformer=True), 8, {}),
    "sdxl": ("SDXL", dict(_UNET, model_channels=64, use_linear_in_transformer=True, transformer_depth=[0, 1],
                          transformer_depth_output=[0, 0, 1, 1], num_classes="sequential",
                          adm_in_channels=POOL + 6 * 256), 8, {"pooled": POOL}),
    "sd3": ("SD3", dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=POOL,
                        context_embedder_config={"target": "torch.nn.Linear",
                                                 "params": {"in_features": CTX, "out_features": 128}},
                        num_patches=32 * 32, pos_embed_max_size=32, pos_embed_scaling_factor=None,
                        x_block_self_attn_layers=[]), 8, {"pooled": POOL}),
    # SD3.5 (Medium): the same class; its first joint blocks add a second self-attention over the image tokens
    # (x_block_self_attn), which SD3.0 does not have.
    "sd35": ("SD3", dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=POOL,
                         context_embedder_config={"target": "torch.nn.Linear",
                                                  "params": {"in_features": CTX, "out_features": 128}},
                         num_patches=32 * 32, pos_embed_max_size=32, pos_embed_scaling_factor=None,
                         x_block_self_attn_layers=[0, 1], qk_norm="rms"), 8, {"pooled": POOL}),
    "flux": ("Flux", _FLUX, 8, {"pooled": POOL, "guidance": 3.5}),
    "flux_schnell": ("FluxSchnell", dict(_FLUX, guidance_embed=False), 8, {"pooled": POOL}),
    # Chroma: pre-patchified in_channels (16*2*2); in_dim 64 = 16+16+32 is fixed by Chroma.forward_orig.
    "chroma": ("Chroma", dict({k: v for k, v in _FLUX.items() if k not in ("vec_in_dim", "guidance_embed")},
                              image_model="chroma", in_channels=64, out_channels=64, in_dim=64, out_dim=64,
                              hidden_dim=32, n_layers=1), 8, {"pooled": None}),
    "flux2": ("Flux2", dict(_FLUX, image_model="flux2", in_channels=128, out_channels=128, patch_size=1,
                            axes_dim=[8, 8, 8, 8], mlp_ratio=3.0, theta=2000, global_modulation=True, vec_in_dim=None,
                            mlp_silu_act=True, qkv_bias=False, ops_bias=False, default_ref_method="index",
                            ref_index_scale=10.0), 16, {"pooled": None, "guidance": 4.0, "mask": True}),
    "qwen_image": ("QwenImage", dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16,
                                     num_layers=2, attention_head_dim=32, num_attention_heads=2,
                                     joint_attention_dim=CTX, axes_dims_rope=(8, 12, 12)), 8, {}),
    "lumina2": ("Lumina2", dict(_LUMINA, n_kv_heads=1, axes_lens=[300, 512, 512], rope_theta=10000.0,
                                ffn_dim_multiplier=4.0), 8, {"mask": True}),
    # Z-Image: its adaLN path is hard-wired to 256 wide (lumina/model.py:232,329,434), so dim must be >= 256.
    "z_image": ("ZImage", dict(_LUMINA, dim=256, n_heads=8, n_kv_heads=8, n_layers=1, axes_lens=[1536, 512, 512],
                               rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True,
                               time_scale=1000.0, pad_tokens_multiple=32), 8, {"mask": True}),
    "hidream": ("HiDream", dict(image_model="hidream", patch_size=2, in_channels=16, out_channels=16, num_layers=1,
                                num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
                                caption_channels=[CTX, LLAMA], text_emb_dim=POOL, num_routed_experts=4,
                                num_activated_experts=2, axes_dims_rope=[16, 8, 8], max_resolution=[128, 128],
                                llama_layers=list(range(LLAMA_LAYERS))), 8, {"pooled": POOL, "llama": True}),
    "hunyuan_image21": ("HunyuanImage21", dict(image_model="hunyuan_video", in_channels=64, out_channels=64,
                                               vec_in_dim=None, context_in_dim=CTX, hidden_size=64, mlp_ratio=4.0,
                                               num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 16],
                                               theta=256, patch_size=[1, 1], qkv_bias=True, guidance_embed=False,
                                               byt5=False, meanflow=False, use_cond_type_embedding=False,
                                               vision_in_dim=None), 32, {"mask": True}),
    "wan21": ("WAN21_T2V", _WAN, 8, {}),
    # Wan 2.2 T2V (the 5B TI2V model): 48-channel latent of the 16x Wan2.2 VAE, model_base.WAN22.
    "wan22": ("WAN22_T2V", dict(_WAN, in_dim=48, out_dim=48), 16, {}),
    "cosmos_predict2": ("CosmosT2IPredict2", dict(
        image_model="cosmos_predict2", max_img_h=240, max_img_w=240, max_frames=128, in_channels=16, out_channels=16,
        patch_spatial=2, patch_temporal=1, concat_padding_mask=True, model_channels=64, num_blocks=2, num_heads=2,
        crossattn_emb_channels=CTX, pos_emb_cls="rope3d", pos_emb_learnable=True, pos_emb_interpolation="crop",
        min_fps=1, max_fps=30, use_adaln_lora=True, adaln_lora_dim=16, extra_per_block_abs_pos_emb=False,
        rope_h_extrapolation_ratio=4.0, rope_w_extrapolation_ratio=4.0, rope_t_extrapolation_ratio=1.0,
        rope_enable_fps_modulation=False), 8, {"mask": True}),
}
FAMILIES: tuple[str, ...] = tuple(SPECS)
# Upscalers (concat-conditioned, kept out of FAMILIES: they are not text-to-image models). SD x4: 7 input channels
# (the 4-channel latent + the 3-channel low-res image at the latent's size), the augmentation level as a
# 1000-class label; supported_models.SD_X4Upscaler's extra config fixes 4 levels.
UPSCALERS: dict[str, tuple[str, dict, int, dict]] = {
    "sd_x4": ("SD_X4Upscaler", dict(_UNET, in_channels=7, model_channels=32, channel_mult=[1, 1, 2, 2],
                                    num_res_blocks=[1] * 4, transformer_depth=[0, 0, 1, 1],
                                    transformer_depth_output=[1, 1, 1, 1, 0, 0, 0, 0],
                                    use_linear_in_transformer=True), 4, {}),
}


def spec(family: str) -> tuple[str, dict, int, dict]:
    return SPECS[family] if family in SPECS else UPSCALERS[family]


def _init_params(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI ops skip init (weights are raw memory): N(0, 0.02) weights, zero biases, unit norm scales.

    Persistent float buffers (loaded from checkpoints, e.g. SD3's pos_embed) get N(0, 0.02) too; non-persistent
    buffers (rope frequency ranges etc.) are computed by the model and left alone.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod_name, mod in module.named_modules():
            is_norm = "norm" in type(mod).__name__.lower() or "norm" in mod_name.rsplit(".", 1)[-1].lower()
            for name, p in mod.named_parameters(recurse=False):
                if name == "bias":
                    p.zero_()
                elif p.ndim == 1 and is_norm:
                    p.fill_(1.0)
                elif p.element_size() == 1:  # fp8 weights: no normal_ of their own; drawn in fp32 and stored
                    p.copy_(torch.empty(p.shape).normal_(0.0, 0.02, generator=gen))
                else:
                    p.normal_(0.0, 0.02, generator=gen)
            for name, b in mod.named_buffers(recurse=False):
                if name not in mod._non_persistent_buffers_set and b.is_floating_point():
                    b.normal_(0.0, 0.02, generator=gen)


def tiny_model(family: str, seed: int = 0):
    """A ModelPatcher around a tiny random model of ``family`` (CPU, fp32), as ComfyUI's loaders produce one."""
    cls_name, unet_config, _, _ = spec(family)
    return build_model(cls_name, unet_config, seed, v_prediction=family == "sd20_v")


def build_model(cls_name: str, unet_config: dict, seed: int = 0, dtype: torch.dtype = torch.float32,
                v_prediction: bool = False):
    """A ModelPatcher around a random model of the ``comfy.supported_models`` class ``cls_name`` built from
    ``unet_config`` (detection skipped), weights N(0, 0.02) in ``dtype`` (an fp8 dtype: stored in it, computed in
    bf16, as ComfyUI runs fp8 checkpoints)."""
    import_comfy()
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    model_config = getattr(comfy.supported_models, cls_name)(unet_config)
    if v_prediction:  # SD20.model_type() detects v-prediction from checkpoint weight statistics
        model_config.model_type = lambda state_dict, prefix="": comfy.model_base.ModelType.V_PREDICTION
    model_config.set_inference_dtype(dtype, torch.bfloat16 if torch.empty((), dtype=dtype).element_size() == 1
                                     else None)
    model = model_config.get_model({}, "")
    _init_params(model.diffusion_model, seed)
    model = model.to(comfy.model_management.unet_offload_device())
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def tiny_conditioning(family: str, model_patcher=None, seed: int = 0, tokens: int = 7) -> list:
    """CONDITIONING [[cross_attn (1, tokens, CTX), extras]] as this family's text encoder(s) would give it."""
    extras = spec(family)[3]
    gen = torch.Generator().manual_seed(seed + 1)
    cond = torch.randn((1, tokens, CTX), generator=gen)
    out = {}
    if "pooled" in extras:
        out["pooled_output"] = None if extras["pooled"] is None else torch.randn((1, extras["pooled"]), generator=gen)
    if "guidance" in extras:
        out["guidance"] = extras["guidance"]
    if extras.get("mask"):
        out["attention_mask"] = torch.ones((1, tokens), dtype=torch.long)
    if extras.get("llama"):
        out["conditioning_llama3"] = torch.randn((1, LLAMA_LAYERS, tokens, LLAMA), generator=gen)
    return [[cond, out]]


def latent_shape(family: str, model_patcher=None, side: int = 16) -> tuple:
    """Latent shape of one side*8 px square image: (1, C, H, W), or (1, C, 1, H, W) for 3-D latent formats."""
    import_comfy()
    import comfy.supported_models

    if model_patcher is not None:
        fmt = model_patcher.model.latent_format
    else:
        fmt = getattr(comfy.supported_models, spec(family)[0]).latent_format()
    hw = max(1, side * 8 // spec(family)[2])
    channels = fmt.latent_channels
    return (1, channels, 1, hw, hw) if getattr(fmt, "latent_dimensions", 2) == 3 else (1, channels, hw, hw)


def _sampling_name(model) -> str:
    return "+".join(b.__name__ for b in type(model.model_sampling).__bases__)


def _check(family: str) -> None:
    import comfy.model_management
    import comfy.sample

    t0 = time.perf_counter()
    mp = tiny_model(family)
    comfy.model_management.load_models_gpu([mp])
    shape = latent_shape(family, mp)
    latent = torch.zeros(shape)
    cond = tiny_conditioning(family, mp)
    noise = comfy.sample.prepare_noise(latent, 0)
    out = comfy.sample.sample(mp, noise, 2, 1.0, "euler", "normal", cond, cond, latent, disable_pbar=True, seed=0)
    assert tuple(out.shape) == shape and torch.isfinite(out).all(), (family, out.shape)
    n = sum(p.numel() for p in mp.model.diffusion_model.parameters())
    print(f"{family:16s} {n / 1e6:6.2f}M latent={shape} out={tuple(out.shape)} {time.perf_counter() - t0:5.1f}s "
          f"{type(mp.model).__name__}/{type(mp.model.diffusion_model).__name__} {_sampling_name(mp.model)}",
          flush=True)


if __name__ == "__main__":
    import_comfy()
    for fam in sys.argv[1:] or FAMILIES:
        _check(fam)
