"""Self-Perceptual Super-Resolution (SR3 / CDM): the upscaler task, into the Objective node's super_resolution
input; the fine-tune node then trains a LoRA of an upscaler (the SD x4 upscaler) on pairs made from its folder of
high-res images."""
from __future__ import annotations

from comfy_api.latest import io

from ..selfperc_core.super_resolution import MAX_BLUR, Degradation
from .options import SUPER_RESOLUTION
from .super_resolution import SuperResolution


class SelfPerceptualSuperResolution(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = Degradation
        return io.Schema(
            node_id="SelfPerceptualSuperResolution",
            display_name="Self-Perceptual Super-Resolution (SR3 / CDM)",
            category="selfperc/training/options",
            description="Turns the fine-tune into an upscaler fine-tune: each folder image is the high-res target, "
                        "its low-res condition the image averaged down by the VAE's factor (4 for the SD x4 "
                        "upscaler), degraded afresh at every step; the online and the frozen model read the same "
                        "condition. Into Self-Perceptual Objective's super_resolution.",
            inputs=[
                io.Float.Input("noise_augmentation_max", default=d.noise_augmentation_max, min=0.0, max=1.0,
                               step=0.01,
                               tooltip="CDM's noise augmentation of the condition: each step draws a level in "
                                       "[0, this], as the fraction SD_4XUpscale_Conditioning's noise_augmentation "
                                       "takes (SD x4: of its 350 levels). Train with what you will sample with "
                                       "and below; 0: the clean condition."),
                io.Float.Input("blur_max", default=d.blur_max, min=0.0, max=MAX_BLUR, step=0.05,
                               tooltip="Gaussian blur of the low-res condition, sigma drawn in [0, this] low-res "
                                       "pixels each step (for inputs softer than a box downscale). 0: none."),
                io.Int.Input("jpeg_min_quality", default=d.jpeg_min_quality, min=0, max=100,
                             tooltip="A JPEG round trip of the condition at a quality drawn in [this, 100] each "
                                     "step (for compressed inputs). 0: none."),
            ],
            outputs=[SUPER_RESOLUTION.Output(display_name="super_resolution",
                                             tooltip="Into Self-Perceptual Objective's super_resolution input.")],
        )

    @classmethod
    def execute(cls, noise_augmentation_max, blur_max, jpeg_min_quality):
        return io.NodeOutput(SuperResolution(Degradation(blur_max, noise_augmentation_max,
                                                         jpeg_min_quality)).validate())
