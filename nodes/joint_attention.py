"""Prompt-to-Prompt on joint attention (experimental: Flux.1 and SD3.x): the image queries attend the text tokens
and the image tokens in one softmax, so the cross-attention maps are the text columns of the image rows.

Set as ``transformer_options["optimized_attention_override"]``, which every attention call of ComfyUI's Flux and
MMDiT goes through (ModelPatcher has no setter for it). The host's own kernel computes every row first, so source
rows are ComfyUI's own sample; the target's image rows are then recomputed (float32, in query chunks) from
probabilities whose text part is edited (selfperc_core.attention_edit.joint_edit). Maps are kept from the blocks
where text and image are still separate streams (Flux's double blocks, every SD3 joint block).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..selfperc_core import attention_edit as core


@dataclass(frozen=True)
class JointLayout:
    """Where the text tokens sit in a joint attention call and how the image tokens tile the latent."""
    family: str
    patch: int
    extra_text: int = 0         # learned tokens the model puts before the prompt's (SD3's register tokens)
    double_only: bool = False   # keep maps only where block_type is "double" (Flux: single blocks mix the streams)

    def grid(self, latent_hw: tuple) -> tuple[int, int]:
        h, w = latent_hw
        return -(-h // self.patch), -(-w // self.patch)  # the model pads the latent to whole patches


def joint_layout(model) -> JointLayout | None:
    """Flux.1 (dev, schnell) and SD3.x models: text first in every joint attention call. None for any other model
    (a UNet, or a transformer whose layout is not validated here: Flux.2 and Chroma feed other text encoders,
    Hunyuan puts the image first, Qwen-Image, Wan, ...)."""
    try:  # host internals, looked up when used
        import comfy.model_base
        from comfy.ldm.flux.model import Flux
        from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
    except ImportError:
        return None
    dm, kind = model.model.diffusion_model, type(model.model)
    if kind is comfy.model_base.Flux and isinstance(dm, Flux):
        if any(getattr(b, "flipped_img_txt", False) for b in dm.double_blocks):
            return None
        return JointLayout("Flux", int(dm.patch_size), 0, True)
    if kind is comfy.model_base.SD3 and isinstance(dm, MMDiT):
        return JointLayout("SD3", int(dm.patch_size), int(getattr(dm, "register_length", 0)), False)
    return None


def _heads(args, kwargs, out):
    """q, k, v as (batch, heads, tokens, dim) whichever layout the model called the attention with (Flux:
    already split, SD3: (batch, tokens, heads * dim))."""
    q, k, v = args[:3]
    heads = args[3] if len(args) > 3 else kwargs["heads"]
    if kwargs.get("skip_output_reshape", False) or out.ndim != 3:
        raise RuntimeError("Prompt-to-Prompt expected the joint attention's output as (batch, tokens, channels); "
                           "this ComfyUI returns it differently")
    if not kwargs.get("skip_reshape", False):
        q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    return q, k, v, heads


def check_override_free(model_options) -> None:
    if "optimized_attention_override" in model_options.get("transformer_options", {}):
        raise ValueError("the model already has an attention override (another node replaced its attention "
                         "function): Prompt-to-Prompt on Flux replaces the same call; remove that node first")


def override(run, layout: JointLayout):
    """The optimized_attention_override for one sampling ``run`` (prompt_to_prompt.Run): a plain closure
    (ModelPatcher.clone deep-copies model_options)."""
    plan = run.plan
    n_txt = layout.extra_text + plan.source.cond.shape[1]
    pad = layout.extra_text  # the register tokens attend as text but are no word: their maps are dropped

    def edit_text(ps, pt):
        w = None if plan.weights is None else plan.weights.to(ps.device)
        edited = core.edit_cross_attention(ps[..., pad:], pt[..., pad:], plan.mode, plan.mapper, w)
        return torch.cat([pt[..., :pad], edited], dim=-1) if pad else edited

    def attention(func, *args, **kwargs):
        out = func(*args, **kwargs)
        opts = kwargs.get("transformer_options") or {}
        edit = run.step < round(plan.cross * run.steps)
        inject = run.step < round(plan.self_ * run.steps)
        record = opts.get("block_type") == "double" or not layout.double_only
        if not (edit or inject or record):
            return out
        q, k, v, heads = _heads(args, kwargs, out)
        src, tgt = run.rows(opts, q.shape[0])
        if not src:  # only unconditional rows (a negative of another length runs alone): nothing is edited
            return out
        if kwargs.get("mask") is not None:
            raise ValueError(f"the conditioning carries an attention mask: Prompt-to-Prompt on {layout.family} "
                             "edits unmasked joint attention only")
        grid = layout.grid(run.latent_hw)
        if q.shape[2] == grid[0] * grid[1]:  # an image-only attention (SD3.5's second one): no text to edit
            return out
        if q.shape[2] != n_txt + grid[0] * grid[1]:
            raise RuntimeError(f"the joint attention has {q.shape[2]} tokens, not the prompt's {n_txt} + the "
                               f"latent's {grid[0]}x{grid[1]}: reference images or other extra tokens are not "
                               "supported by Prompt-to-Prompt")
        o, ms, mt = core.joint_edit(q[src], k[src], q[tgt], k[tgt], v[tgt], n_txt, edit_text if edit else None,
                                    inject, edit or inject)
        run.calls.append(("joint", opts.get("block_type"), run.step))
        if record:
            run.add_maps(ms[..., pad:], mt[..., pad:], grid)
        if o is not None:
            out = out.clone()
            out[tgt, n_txt:] = o.to(out)
        return out
    return attention
