"""Prompt-to-Prompt Guider: a GUIDER for core SamplerCustomAdvanced that samples a source and a target prompt
together and hands the target the source's attention maps (replace / refine / reweight, self-attention
injection, local blending); with an inversion it edits a real image."""
from __future__ import annotations

from comfy_api.latest import io

from .invert import INVERSION
from .prompt_to_prompt import MODES, PromptToPromptGuider, make_plan

MAX_PROMPT_CHARS = 2000


class SelfPerceptualPromptToPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfPerceptualPromptToPrompt",
            display_name="Prompt-to-Prompt Guider",
            category="selfperc/editing",
            description="Samples every latent twice, with the source and the target prompt, and edits the target's "
                        "cross-attention with the source's maps (Hertz et al.). The output LATENT holds the sources "
                        "then the targets. UNet models (SD1.x, SD2.x, SDXL); Flux.1 and SD3.x experimental (their "
                        "joint attention's image-to-text part). Connect a deterministic sampler; with "
                        "an inversion, KSamplerSelect 'euler' and the Invert node's sigmas and noise latent.",
            inputs=[
                io.Model.Input("model", tooltip="A UNet model (SD1.x, SD2.x, SDXL) or Flux.1 / SD3.x (experimental), with or "
                                              "without a LoRA."),
                io.Clip.Input("clip", tooltip="The model's CLIP: it encodes both prompts, and its tokenizer maps "
                                              "the words between them."),
                io.String.Input("source_prompt", multiline=True, default="a photo of a cat riding a bicycle",
                                tooltip="The prompt of the image as it is (with an inversion: the image's "
                                        "description)."),
                io.String.Input("target_prompt", multiline=True, default="a photo of a dog riding a bicycle",
                                tooltip="The edited prompt. replace: the same number of tokens (swap words); "
                                        "refine: words added or removed; reweight: usually the source prompt."),
                io.Conditioning.Input("negative", tooltip="The negative prompt of both branches (CLIPTextEncode "
                                                          "with an empty text is the paper's)."),
                io.Combo.Input("mode", options=list(MODES), default="replace",
                               tooltip="replace: the target uses the source's maps (word swap). refine: target "
                                       "tokens aligned to the source (by the tokenizer's tokens) keep the source's "
                                       "maps, new ones their own. reweight: the target's own maps, scaled by "
                                       "'reweight'."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance of both branches."),
                io.Float.Input("cross_replace", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps (from the first) with the edited cross-attention; "
                                       "after it the target attends freely. The paper uses 0.8."),
                io.Float.Input("self_replace", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the first steps in which the target's self-attention maps are "
                                       "the source's (at the coarse levels: a quarter of the latent's side and "
                                       "below). Higher keeps more of the source's layout."),
                io.String.Input("reweight", default="", tooltip="Optional 'word:weight, other word:weight' on the "
                                                                "target prompt's tokens (1 = unchanged, 0..10); "
                                                                "applies in every mode."),
                io.String.Input("blend_words", default="",
                                tooltip="Optional local blending: 'word, other word' from either prompt; outside "
                                        "where they attend the target keeps the source's prediction (its latent "
                                        "ends equal to the source's there). Empty: no blending."),
                io.Float.Input("blend_threshold", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="Local blending's mask: where the blend words' maps (scaled to their "
                                       "maximum) exceed this. Lower: a larger edited region. The paper's 0.3."),
                INVERSION.Input("inversion", optional=True,
                                tooltip="A real image's inversion (Invert Image): the source branch is put back "
                                        "on it every step (Direct Inversion), so the source reconstructs the "
                                        "image and the target edits it."),
            ],
            outputs=[io.Guider.Output(display_name="guider")],
        )

    @classmethod
    def execute(cls, model, clip, source_prompt, target_prompt, negative, mode, cfg, cross_replace, self_replace,
                reweight, blend_words, blend_threshold=0.3, inversion=None):
        for name, text in (("source_prompt", source_prompt), ("target_prompt", target_prompt),
                           ("reweight", reweight), ("blend_words", blend_words)):
            if len(text) > MAX_PROMPT_CHARS:
                raise ValueError(f"{name} is {len(text)} characters; at most {MAX_PROMPT_CHARS}")
        if clip is None:
            raise ValueError("clip is not connected (a checkpoint without a text encoder?): Prompt-to-Prompt "
                             "encodes and aligns the prompts with it")
        plan = make_plan(clip, source_prompt, target_prompt, mode, cross_replace, self_replace, reweight,
                         blend_words, blend_threshold)
        return io.NodeOutput(PromptToPromptGuider(model, plan, negative, cfg, inversion))
