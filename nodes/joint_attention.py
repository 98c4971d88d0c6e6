"""Prompt-to-Prompt on Flux.1's joint attention (experimental): the image queries attend the text tokens and the
image tokens in one softmax, so the cross-attention maps are the text columns of the image rows.

Set as ``transformer_options["optimized_attention_override"]``, which every attention call of ComfyUI's Flux goes
through (ModelPatcher has no setter for it). The host's own kernel computes every row first, so source rows are
ComfyUI's own sample; the target's image rows are then recomputed (float32, in query chunks) from probabilities
whose text part is edited (selfperc_core.attention_edit.joint_edit). Maps are kept from the double-stream blocks
(text and image still separate streams there).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..selfperc_core import attention_edit as core


@dataclass(frozen=True)
class JointLayout:
    """Where the text tokens sit in a joint attention call and how the image tokens tile the latent."""
    family: str
    patch: int

    def grid(self, latent_hw: tuple) -> tuple[int, int]:
        h, w = latent_hw
        return -(-h // self.patch), -(-w // self.patch)  # the model pads the latent to whole patches


def joint_layout(model) -> JointLayout | None:
    """Flux.1 (dev, schnell) models: text first in every joint attention call. None for any other model (a UNet,
    or a transformer whose layout is not validated here: SD3 mixes CLIP and T5 streams, Flux.2 and Chroma feed
    other text encoders, Hunyuan puts the image first)."""
    try:  # host internals, looked up when used
        import comfy.model_base
        from comfy.ldm.flux.model import Flux
    except ImportError:
        return None
    dm = model.model.diffusion_model
    if type(model.model) is not comfy.model_base.Flux or not isinstance(dm, Flux):
        return None
    if any(getattr(b, "flipped_img_txt", False) for b in dm.double_blocks):
        return None
    return JointLayout(type(model.model).__name__, int(dm.patch_size))


def check_override_free(model_options) -> None:
    if "optimized_attention_override" in model_options.get("transformer_options", {}):
        raise ValueError("the model already has an attention override (another node replaced its attention "
                         "function): Prompt-to-Prompt on Flux replaces the same call; remove that node first")


def override(run, layout: JointLayout):
    """The optimized_attention_override for one sampling ``run`` (prompt_to_prompt.Run): a plain closure
    (ModelPatcher.clone deep-copies model_options)."""
    plan = run.plan
    n_txt = plan.source.cond.shape[1]

    def edit_text(ps, pt):
        w = None if plan.weights is None else plan.weights.to(ps.device)
        return core.edit_cross_attention(ps, pt, plan.mode, plan.mapper, w)

    def attention(func, *args, **kwargs):
        out = func(*args, **kwargs)
        opts = kwargs.get("transformer_options") or {}
        edit = run.step < round(plan.cross * run.steps)
        inject = run.step < round(plan.self_ * run.steps)
        record = opts.get("block_type") == "double"
        if not (edit or inject or record):
            return out
        q, k, v, heads = args[:4]
        if not kwargs.get("skip_reshape", False) or kwargs.get("skip_output_reshape", False) or out.ndim != 3:
            raise RuntimeError("Prompt-to-Prompt on Flux expected the joint attention as (batch, heads, tokens, "
                               "dim) in and (batch, tokens, channels) out; this ComfyUI calls it differently")
        if kwargs.get("mask") is not None:
            raise ValueError("the conditioning carries an attention mask: Prompt-to-Prompt on Flux edits unmasked "
                             "joint attention only")
        grid = layout.grid(run.latent_hw)
        if q.shape[2] != n_txt + grid[0] * grid[1]:
            raise RuntimeError(f"the joint attention has {q.shape[2]} tokens, not the prompt's {n_txt} + the "
                               f"latent's {grid[0]}x{grid[1]}: reference images or other extra tokens are not "
                               "supported by Prompt-to-Prompt")
        src, tgt = run.rows(opts, q.shape[0])
        if not src:
            return out
        o, ms, mt = core.joint_edit(q[src], k[src], q[tgt], k[tgt], v[tgt], n_txt, edit_text if edit else None,
                                    inject, edit or inject)
        run.calls.append(("joint", opts.get("block_type"), run.step))
        if record:
            run.add_maps(ms, mt, grid)
        if o is not None:
            out = out.clone()
            out[tgt, n_txt:] = o.to(out)
        return out
    return attention
