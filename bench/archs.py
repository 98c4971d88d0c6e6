"""The architectures `make bench-wide` measures, at the width people train them (random weights).

Each entry: the ``comfy.supported_models`` class, its unet_config as ComfyUI's detection reads it from the
released checkpoint (transformers with fewer blocks, so they fit this machine), and the text-encoder output
shapes its conditioning carries. Real depth is kept beside it for the memory prediction.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

SDXL_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
                 channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
                 context_dim=2048, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True,
                 use_spatial_transformer=True, legacy=False, adm_in_channels=2816, num_classes="sequential",
                 use_temporal_attention=False, use_temporal_resblock=False)
FLUX1 = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
             hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
             theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
QWEN_IMAGE = dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=60,
                  attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                  axes_dims_rope=(16, 56, 56))
# SD3.5 Large as ComfyUI's detection reads it (hidden 64 x depth = 2432, 38 heads; num_blocks: how many of the 38
# joint blocks are built, the width stays the real one)
SD35_LARGE = dict(in_channels=16, out_channels=16, patch_size=2, depth=38, num_blocks=38, input_size=None,
                  adm_in_channels=2048, context_embedder_config={"target": "torch.nn.Linear",
                                                                 "params": {"in_features": 4096, "out_features": 2432}},
                  num_patches=192 * 192, pos_embed_max_size=192, pos_embed_scaling_factor=None, qk_norm="rms",
                  x_block_self_attn_layers=[])
# Wan 2.1 / 2.2 T2V 14B (one frame at 1024 px is a 128x128 latent, 64x64 patches; the text enters by cross-attention)
WAN21_14B = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), in_dim=16, out_dim=16, dim=5120,
                 ffn_dim=13824, freq_dim=256, text_dim=4096, num_heads=40, num_layers=40, window_size=(-1, -1),
                 qk_norm=True, cross_attn_norm=True, eps=1e-6)


@dataclass(frozen=True)
class Arch:
    cls_name: str            # comfy.supported_models class
    config: dict             # as benchmarked (reduced depth for transformers)
    context: int             # text-encoder token width
    tokens: int              # text tokens per prompt in the benchmark
    pooled: int | None = None
    extras: dict = field(default_factory=dict)
    real_blocks: dict = field(default_factory=dict)  # depth keys of the released model -> their real value
    note: str = ""
    joint: bool = True       # text tokens join the image tokens' sequence (False: cross-attention only)
    text_tokens_1024: int = 0  # text tokens of the released model's usual prompt (the memory prediction)

    def blocks(self, overrides: dict | None = None) -> int:
        """Blocks in the main stack(s) with these unet_config overrides (0 for a UNet)."""
        c = {**self.config, **(overrides or {})}
        return sum(c[k] for k in self.real_blocks)

    def sequence(self, side: int, text_tokens: int) -> int:
        """Tokens a block's attention sees at a ``side`` x ``side`` latent (2x2 patches)."""
        return (side // 2) ** 2 + (text_tokens if self.joint else 0)


ARCHS: dict[str, Arch] = {
    "sdxl": Arch("SDXL", SDXL_UNET, 2048, 77, pooled=1280, note="the whole SDXL UNet (2.6B parameters)"),
    "flux": Arch("Flux", dict(FLUX1, depth=2, depth_single_blocks=4), 4096, 64, pooled=768,
                 extras={"guidance": 3.5}, real_blocks={"depth": 19, "depth_single_blocks": 38},
                 note="Flux.1-dev width (hidden 3072, 24 heads), 2 double + 4 single blocks of 19 + 38",
                 text_tokens_1024=512),
    "qwen_image": Arch("QwenImage", dict(QWEN_IMAGE, num_layers=4), 3584, 64,
                       real_blocks={"num_layers": 60},
                       note="Qwen-Image width (hidden 3072, 24 heads), 4 of its 60 blocks", text_tokens_1024=256),
    "sd35_large": Arch("SD3", dict(SD35_LARGE, num_blocks=2), 4096, 154, pooled=2048,
                       real_blocks={"num_blocks": 38},
                       note="SD3.5 Large width (hidden 2432, 38 heads), 2 of its 38 joint blocks",
                       text_tokens_1024=154),
    "wan21_14b": Arch("WAN21_T2V", dict(WAN21_14B, num_layers=2), 4096, 512, real_blocks={"num_layers": 40},
                      note="Wan 2.1 / 2.2 14B width (dim 5120, 40 heads), 2 of its 40 blocks, one frame", joint=False,
                      text_tokens_1024=512),
}


def build(name: str, dtype: torch.dtype = torch.float32, **config_overrides):
    """A ComfyUI ModelPatcher of architecture ``name`` with random weights (seed 0)."""
    from dev.tiny_families import build_model

    arch = ARCHS[name]
    return build_model(arch.cls_name, {**arch.config, **config_overrides}, seed=0, dtype=dtype)


def conditioning(name: str, tokens: int = 0) -> list:
    """A CONDITIONING shaped like this architecture's text encoders' output (seeded random values); ``tokens``: text
    tokens instead of the benchmark's."""
    arch = ARCHS[name]
    g = torch.Generator().manual_seed(1)
    extras = dict(arch.extras)
    if arch.pooled:
        extras["pooled_output"] = torch.randn((1, arch.pooled), generator=g)
    return [[torch.randn((1, tokens or arch.tokens, arch.context), generator=g), extras]]


def latent_shape(model_patcher, side: int) -> tuple:
    """(C, ...) of one latent of ``side`` x ``side`` for this model's latent format."""
    fmt = model_patcher.model.latent_format
    c = fmt.latent_channels
    return (c, 1, side, side) if getattr(fmt, "latent_dimensions", 2) == 3 else (c, side, side)


def parameter_count(model_patcher) -> int:
    return sum(p.numel() for p in model_patcher.model.diffusion_model.parameters())
