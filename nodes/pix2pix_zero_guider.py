"""Pix2Pix-Zero Guider: a GUIDER for core SamplerCustomAdvanced that edits along a direction between two sets of
sentences while cross-attention guidance keeps the source's layout; with an inversion it edits a real image."""
from __future__ import annotations

from comfy_api.latest import io

from .invert import INVERSION
from .p2p_guider import MAX_PROMPT_CHARS
from .pix2pix_zero import Pix2PixZeroGuider, edit_plan

MAX_SENTENCE_CHARS = 40000


class SelfPerceptualPix2PixZero(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfPerceptualPix2PixZero",
            display_name="Pix2Pix-Zero Guider",
            category="selfperc/editing",
            description="Samples every latent twice: with the source prompt, and with the source prompt's embedding "
                        "moved along the edit direction (mean of the target sentences minus mean of the source "
                        "sentences), while the edit's cross-attention maps are guided towards the source's (Parmar "
                        "et al.). The output LATENT holds the sources then the edits. UNet models (SD1.x, SD2.x, "
                        "SDXL); KSamplerSelect 'euler' or 'ddim'. With an inversion: the Invert node's sigmas and "
                        "noise latent.",
            inputs=[
                io.Model.Input("model", tooltip="A UNet model (SD1.x, SD2.x, SDXL), with or without a LoRA."),
                io.Clip.Input("clip", tooltip="The model's CLIP: it encodes the prompt and every sentence."),
                io.String.Input("source_prompt", multiline=True, default="a photo of a cat",
                                tooltip="The prompt of the image as it is (with an inversion: the image's "
                                        "description)."),
                io.String.Input("source_sentences", multiline=True,
                                default="a photo of a cat\na cat sitting on the grass\na close-up photo of a cat",
                                tooltip="Sentences about what is there now, one per line (the paper uses many, "
                                        "varied ones; a few work). Their mean embedding is the direction's start."),
                io.String.Input("target_sentences", multiline=True,
                                default="a photo of a dog\na dog sitting on the grass\na close-up photo of a dog",
                                tooltip="The same sentences about what it should become, one per line. The same "
                                        "sets on both sides make no edit at all."),
                io.Conditioning.Input("negative", tooltip="The negative prompt of both branches (CLIPTextEncode "
                                                          "with an empty text is the paper's)."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance of both branches (the paper's 5)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=5.0, step=0.05,
                               tooltip="How far along the direction the edit goes (1 = the paper's; 0 = no edit)."),
                io.Float.Input("guidance", default=0.1, min=0.0, max=100.0, step=0.01,
                               tooltip="Cross-attention guidance: the size of the step that moves the edit's "
                                       "latent towards the source's attention maps before every sampling step (in "
                                       "DDPM-scaled latents; diffusers' 0.1). Each step costs one extra forward + "
                                       "backward. 0: the direction alone."),
                INVERSION.Input("inversion", optional=True,
                                tooltip="A real image's inversion (Invert Image): the source branch is put back "
                                        "on it every step (Direct Inversion), so the source is the image and the "
                                        "edit changes it."),
            ],
            outputs=[io.Guider.Output(display_name="guider"),
                     io.Conditioning.Output(display_name="edited", tooltip="The source prompt plus the edit "
                                            "direction, for any sampler (the direction without guidance).")],
        )

    @classmethod
    def execute(cls, model, clip, source_prompt, source_sentences, target_sentences, negative, cfg, strength,
                guidance, inversion=None):
        for name, text, limit in (("source_prompt", source_prompt, MAX_PROMPT_CHARS),
                                  ("source_sentences", source_sentences, MAX_SENTENCE_CHARS),
                                  ("target_sentences", target_sentences, MAX_SENTENCE_CHARS)):
            if len(text) > limit:
                raise ValueError(f"{name} is {len(text)} characters; at most {limit}")
        if clip is None:
            raise ValueError("clip is not connected (a checkpoint without a text encoder?): Pix2Pix-Zero encodes "
                             "the prompt and the sentences with it")
        for name, value, hi in (("cfg", cfg, 100.0), ("strength", strength, 5.0), ("guidance", guidance, 100.0)):
            if not 0.0 <= value <= hi:  # NaN fails this too (the API skips the widget's bounds for NaN)
                raise ValueError(f"{name} {value:g} is outside 0..{hi:g}")
        plan = edit_plan(clip, source_prompt, source_sentences, target_sentences, strength)
        guider = Pix2PixZeroGuider(model, plan, negative, cfg, guidance, inversion)
        return io.NodeOutput(guider, [[plan.target.cond, dict(plan.target.extras)]])
