"""Optimize Embedding (Imagic, stage 1): the prompt's embedding trained so that the frozen model reconstructs one
image; the fine-tune node then trains a LoRA on that image with it, and ConditioningAverage interpolates."""
from __future__ import annotations

import math

from comfy_api.latest import io

from . import plots
from .imagic import CHECK_DRAWS, OBJECTIVES, optimize_embedding

MAX_STEPS = 10000


class SelfPerceptualOptimizeEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfPerceptualOptimizeEmbedding",
            display_name="Optimize Embedding (Imagic)",
            category="selfperc/editing",
            description="Imagic's first stage (Kawar et al.): the prompt's embedding is optimised, the model frozen, "
                        "so that the model reconstructs the image. Then: the fine-tune node on that image with the "
                        "optimised conditioning, core ConditioningAverage between the target and the optimised "
                        "conditioning, and any sampler.",
            inputs=[
                io.Model.Input("model", tooltip="The model to edit with (it stays frozen here)."),
                io.Latent.Input("latent", tooltip="The image to edit, encoded (LoadImage -> VAEEncode); one image."),
                io.Conditioning.Input("conditioning", tooltip="The TARGET prompt (what the image should become), "
                                                              "e.g. CLIPTextEncode 'a photo of a sitting dog'; its "
                                                              "embedding is the starting point."),
                io.Int.Input("steps", default=100, min=0, max=MAX_STEPS,
                             tooltip="Adam steps on the embedding (the paper's 100; 0 returns the input as it is)."),
                io.Float.Input("learning_rate", default=1e-3, min=0.0, max=1.0, step=1e-4,
                               tooltip="Adam's learning rate (the paper's 1e-3)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the noise and noise levels of every step."),
                io.Combo.Input("objective", options=list(OBJECTIVES), default="denoising",
                               tooltip="denoising: the model's own loss (the paper's). self-perceptual: the frozen "
                                       "model's mid-block features of the prediction against the image's, with "
                                       "the image's branch held at the input embedding."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="optimized", tooltip="The target prompt's conditioning with the "
                                       "optimised embedding (pooled output and other keys unchanged)."),
                io.Custom("LOSS_MAP").Output(display_name="loss_map", tooltip="Loss per step (core Plot Loss Graph)."),
                io.Image.Output(display_name="loss_curve", tooltip="The loss per step."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, latent, conditioning, steps, learning_rate, seed, objective):
        if not 0 <= steps <= MAX_STEPS:
            raise ValueError(f"steps {steps} is outside 0..{MAX_STEPS}")
        if not (math.isfinite(learning_rate) and learning_rate >= 0):
            raise ValueError(f"learning_rate {learning_rate} must be a finite number >= 0")
        res = optimize_embedding(model, latent, conditioning, steps, learning_rate, seed, objective,
                                 cls.hidden.unique_id)
        if steps == 0:
            text = "0 steps: the input conditioning, unchanged"
        else:
            text = (f"{objective}, {steps} steps: denoising loss on the image at {CHECK_DRAWS} fixed draws "
                    f"{res.before:.5f} (input embedding) -> {res.after:.5f} (optimised)")
        return io.NodeOutput(res.conditioning, {"loss": res.losses}, plots.loss_curve_image(res.losses),
                             ui={"text": [text]})
