"""Invert: a real image's latent -> its DDIM inversion (the pivot trajectory, the schedule, the source prompt)
and the noise it maps to. Null-text Inversion refines it; the Inversion Guider replays it with a new prompt."""
from __future__ import annotations

import math

import comfy.samplers
from comfy_api.latest import io

from . import inversion, realimage

INVERSION = io.Custom("SELFPERC_INVERSION")


class SelfPerceptualInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfPerceptualInvert",
            display_name="Invert Image (DDIM pivot)",
            category="selfperc/editing",
            description="Inverts a real image's latent to noise with the model's deterministic ODE (Euler = DDIM) "
                        "and keeps every step: the pivot that Null-text Inversion fits and the Inversion Guider "
                        "replays. Works for eps, v and flow models.",
            inputs=[
                io.Model.Input("model", tooltip="The model to invert with (the base model, for an A/B of a "
                                                "fine-tune from the same inversion)."),
                io.Latent.Input("latent", tooltip="The real image's latent (LoadImage -> VAEEncode with this "
                                                  "model's VAE)."),
                io.Conditioning.Input("positive", tooltip="The source prompt: a description of the image as it is."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="The negative (unconditional) prompt, e.g. CLIPTextEncode with an empty "
                                              "text. Null-text Inversion optimises it, and replaying with cfg > 1 "
                                              "needs it."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="Inversion steps; the replay uses the same schedule (connect the sigmas "
                                     "output to SamplerCustomAdvanced). 50 as in the papers."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="ComfyUI scheduler of the schedule."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="The pivot's guidance: 1.0 (no guidance) is where DDIM inversion is "
                                       "accurate, as in Null-text and Direct Inversion."),
            ],
            outputs=[
                INVERSION.Output(display_name="inversion", tooltip="The pivot trajectory, schedule and prompts."),
                io.Latent.Output(display_name="noise", tooltip="The inverted noise (the latent to give "
                                                               "SamplerCustomAdvanced with an Inversion Guider)."),
                io.Sigmas.Output(display_name="sigmas", tooltip="The schedule, for SamplerCustomAdvanced."),
            ],
        )

    @classmethod
    def execute(cls, model, latent, positive, steps, scheduler, cfg, negative=None):
        samples = latent["samples"]
        inversion.check_latent(model, samples)
        if "noise_mask" in latent:
            raise ValueError("the latent has a noise mask: inversion inverts the whole latent (use a plain "
                             "VAEEncode)")
        if not math.isclose(cfg, 1.0) and negative is None:
            raise ValueError(f"cfg {cfg} needs a negative conditioning: connect one (e.g. CLIPTextEncode with an "
                             "empty text), or invert at cfg 1.0")
        sigmas = realimage.schedule(model, scheduler, steps)
        inv, noise = inversion.make_inversion(model, samples, sigmas, positive, negative, cfg, seed=0)
        out = {k: v for k, v in latent.items() if k != "noise_mask"}
        out["samples"] = noise
        return io.NodeOutput(inv, out, sigmas)
