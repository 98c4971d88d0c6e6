"""Null-text Inversion (Mokady et al. 2023): fit the unconditional embedding per step so that sampling with the
user's cfg retraces the inversion's pivot; a real image then reconstructs (and edits) under guidance."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..selfperc_core.inversion import NullTextSettings
from .inversion import null_text_inversion
from .invert import INVERSION


class SelfPerceptualNullTextInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = NullTextSettings()
        return io.Schema(
            node_id="SelfPerceptualNullTextInversion",
            display_name="Null-text Inversion",
            category="selfperc/editing",
            description="Optimises the negative prompt's embedding at every step (Adam, the paper's decaying "
                        "learning rate and early stop) so that sampling at this cfg retraces the inversion. Cost: "
                        "steps x up to inner_steps unconditional forward + backward passes, one at a time.",
            inputs=[
                io.Model.Input("model", tooltip="The model the inversion was made with."),
                INVERSION.Input("inversion", tooltip="From Invert Image (with a negative prompt connected)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="The guidance you will edit with (> 1: at 1 there is nothing to fit). The "
                                       "guider must replay at the same cfg."),
                io.Int.Input("inner_steps", default=d.inner_steps, min=1, max=1000,
                             tooltip="At most this many Adam updates per step (the paper: 10)."),
                io.Float.Input("learning_rate", default=d.lr, min=1e-6, max=1.0, step=0.001, round=1e-6,
                               tooltip="Adam's learning rate at the noisiest step, decaying linearly to half at "
                                       "the last (the paper: 1e-2)."),
                io.Float.Input("early_stop", default=d.early_stop, min=0.0, max=0.1, step=1e-6, round=1e-7,
                               tooltip="Stop a step's updates once the latent MSE to the pivot is below this, "
                                       "growing along the steps as in the paper (1e-5 at the first, 1e-5 + 2e-5 i "
                                       "at 50 steps), in the paper's DDPM-latent units."),
            ],
            outputs=[
                INVERSION.Output(display_name="inversion", tooltip="The inversion with the per-step null "
                                                                   "embeddings (for the Inversion Guider)."),
                io.Latent.Output(display_name="reconstruction", tooltip="Sampling with the fitted embeddings at "
                                                                        "this cfg (decode to compare)."),
                io.Float.Output(display_name="error", tooltip="Latent MSE of the reconstruction to the input."),
                io.Float.Output(display_name="plain_error",
                                tooltip="The same for plain DDIM inversion at this cfg (the original negative)."),
            ],
        )

    @classmethod
    def execute(cls, model, inversion, cfg, inner_steps, learning_rate, early_stop):
        settings = NullTextSettings(inner_steps, learning_rate, early_stop)
        inv, rep = null_text_inversion(model, inversion, cfg, settings, seed=0)
        recon = {"samples": model.model.process_latent_out(rep.reconstruction)}
        ran = sum(rep.inner_steps)
        text = (f"null-text reconstruction MSE {rep.error:.3g} vs plain DDIM inversion {rep.plain_error:.3g} at cfg "
                f"{cfg:g}; {ran} inner updates over {inv.steps} steps")
        return io.NodeOutput(inv, recon, rep.error, rep.plain_error, ui=ui.PreviewText(text))
