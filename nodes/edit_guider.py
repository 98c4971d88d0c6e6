"""Inversion Guider: replays an inversion with a target prompt through SamplerCustomAdvanced, so a real image is
edited under guidance, by the base model or base + LoRA from the same inversion (the pack's A/B)."""
from __future__ import annotations

import math

from comfy_api.latest import io

from .inversion import METHODS, InversionGuider, check_same_family
from .invert import INVERSION


class SelfPerceptualInversionGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfPerceptualInversionGuider",
            display_name="Inversion Guider (Null-text / Direct)",
            category="selfperc/editing",
            description="A GUIDER for SamplerCustomAdvanced that starts at the inversion's noise and samples with "
                        "the target prompt. Connect the Invert node's sigmas and noise latent, KSamplerSelect "
                        "'euler' (or 'ddim'), and any NOISE (e.g. DisableNoise: it is not used). With the source "
                        "prompt as target, null-text and direct reconstruct the image at cfg > 1.",
            inputs=[
                io.Model.Input("model", tooltip="The model to edit with: the inverting model, or it with a LoRA "
                                                "(same family)."),
                INVERSION.Input("inversion", tooltip="From Invert Image, or from Null-text Inversion for "
                                                     "method null-text."),
                io.Conditioning.Input("positive", tooltip="The target prompt (the source prompt reconstructs)."),
                io.Combo.Input("method", options=list(METHODS), default="direct",
                               tooltip="null-text: the target prompt with Null-text Inversion's fitted negative "
                                       "embeddings (same cfg as fitted). direct: Direct Inversion, no "
                                       "optimisation: every step, the source branch's error against the pivot is "
                                       "corrected, in both branches (2 guided evaluations per step). plain: "
                                       "plain DDIM inversion + cfg (the baseline; drifts at cfg > 1)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance of the edit (null-text: must equal the cfg it was fitted for)."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="direct / plain: the target's negative prompt (default: the "
                                              "inversion's). null-text: leave unconnected (the fitted embeddings "
                                              "are the negative)."),
            ],
            outputs=[io.Guider.Output(display_name="guider")],
        )

    @classmethod
    def execute(cls, model, inversion, positive, method, cfg, negative=None):
        inv = inversion
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        check_same_family(model, inv, "Inversion Guider")
        if method == "null-text":
            if inv.nulls is None:
                raise ValueError("method null-text needs the inversion from a Null-text Inversion node (this one "
                                 "comes straight from Invert Image): add one, or use method direct")
            if negative is not None:
                raise ValueError("method null-text: leave negative unconnected; the fitted per-step embeddings "
                                 "replace the negative prompt")
            if not math.isclose(cfg, inv.null_cfg, rel_tol=1e-6):
                raise ValueError(f"method null-text: the embeddings were fitted for cfg {inv.null_cfg:g}, not {cfg:g}; "
                                 "replay at the same cfg (or fit again)")
            negative = inv.negative
        else:
            negative = negative if negative is not None else inv.negative
            if negative is None:
                if not math.isclose(cfg, 1.0):
                    raise ValueError(f"cfg {cfg:g} needs a negative conditioning: connect one here or to the Invert "
                                     "node")
                negative = positive  # cfg 1 never evaluates it
        return io.NodeOutput(InversionGuider(model, inv, method, positive, negative, cfg))
