"""Tiny, seeded, randomly initialised text encoders of SD2.x, SDXL, SD3 and Flux, with the families' real
tokenizers.

Each is the host's own text-encoder class (``comfy.text_encoders.sd2_clip.SD2ClipModel``,
``comfy.sdxl_clip.SDXLClipModel``, ``comfy.text_encoders.sd3_clip.SD3ClipModel``,
``comfy.text_encoders.flux.FluxClipModel``) and its real tokenizer, built by
``comfy.sd.CLIP`` with the host's ``<encoder>_model_config`` overrides that shrink the width and depth; the
vocabulary stays the real one, so tokenization (padding tokens, T5's sentencepiece, chunks of 77) is the host's.
Their outputs are as wide as dev/tiny_families' conditioning of the same family (CTX, POOL), except SD3's: its
host class pads CLIP-L + G to T5-XXL's 4096 channels, so its T5 is 4096 wide (a 131M-parameter vocabulary table,
two thin layers) and ``model_for("sd3")`` reads 4096-wide text.
"""
from __future__ import annotations

import torch

from dev.host import import_comfy
from dev.tiny_families import CTX, POOL, _init_params

FAMILY_CLIPS = ("sd20_v", "sdxl", "sd3", "sd35", "flux")
SD3_TEXT = 4096  # fixed by comfy.text_encoders.sd3_clip.SD3ClipModel


def _clip_config(width: int) -> dict:
    return dict(hidden_size=width, intermediate_size=2 * width, num_attention_heads=2, num_hidden_layers=3,
                projection_dim=POOL)


def _target(family: str):
    import comfy.sdxl_clip
    import comfy.supported_models_base
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd2_clip
    import comfy.text_encoders.sd3_clip

    target = comfy.supported_models_base.ClipTarget
    if family == "sd20_v":  # OpenCLIP-H: pads with token 0 (the vocabulary's "!")
        return target(comfy.text_encoders.sd2_clip.SD2Tokenizer, comfy.text_encoders.sd2_clip.SD2ClipModel), \
            {"clip_h_model_config": _clip_config(CTX)}
    if family == "sdxl":  # CLIP-L and CLIP-G side by side on the channels; the pooled output is G's
        return target(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel), \
            {"clip_l_model_config": _clip_config(CTX // 2), "clip_g_model_config": _clip_config(CTX // 2)}
    if family in ("sd3", "sd35"):  # CLIP-L and CLIP-G positions (padded to 4096 channels), then T5's 77 positions
        return target(comfy.text_encoders.sd3_clip.SD3Tokenizer, comfy.text_encoders.sd3_clip.SD3ClipModel), \
            {"clip_l_model_config": _clip_config(POOL), "clip_g_model_config": _clip_config(POOL),
             "t5xxl_model_config": dict(d_model=SD3_TEXT, d_ff=64, d_kv=32, num_heads=2, num_layers=2)}
    if family == "flux":  # T5-XXL's tokens are the cross-attention stream; CLIP-L gives the pooled vector
        return target(comfy.text_encoders.flux.FluxTokenizer, comfy.text_encoders.flux.FluxClipModel), \
            {"clip_l_model_config": dict(_clip_config(POOL), projection_dim=POOL),
             "t5xxl_model_config": dict(d_model=CTX, d_ff=2 * CTX, d_kv=CTX // 2, num_heads=2, num_layers=2)}
    raise ValueError(f"no tiny text encoder for {family!r}; one of {FAMILY_CLIPS}")


def tiny_clip(family: str, seed: int = 0):
    """A ``comfy.sd.CLIP`` (CPU, fp32) of ``family``'s text encoder at tiny widths, weights N(0, 0.02)."""
    import_comfy()
    import comfy.sd

    target, options = _target(family)
    clip = comfy.sd.CLIP(target, model_options={**options, "dtype": torch.float32, "load_device": torch.device("cpu"),
                                                "offload_device": torch.device("cpu"),
                                                "initial_device": torch.device("cpu")})
    _init_params(clip.cond_stage_model, seed)
    return clip


def model_for(family: str, seed: int = 0):
    """The tiny ``family`` model (dev/tiny_families) that reads ``tiny_clip(family)``'s output: the same model,
    except SD3's and SD3.5's, whose text input is 4096 wide and whose pooled vector is CLIP-L's + CLIP-G's."""
    from dev.tiny_families import build_model, spec, tiny_model

    if family not in ("sd3", "sd35"):
        return tiny_model(family, seed)
    cls_name, config, _, _ = spec(family)
    config = dict(config, adm_in_channels=2 * POOL,
                  context_embedder_config={"target": "torch.nn.Linear",
                                           "params": {"in_features": SD3_TEXT, "out_features": 128}})
    return build_model(cls_name, config, seed)
