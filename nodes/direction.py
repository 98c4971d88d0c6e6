"""Self-Perceptual Direction (DiffusionCLIP): the edit a directional fine-tune learns, into the Objective node's
direction input; the fine-tune node then trains a LoRA that moves each image of its folder from the source text
towards the target text, with the self-perceptual distance keeping it the same image."""
from __future__ import annotations

from comfy_api.latest import io

from ..selfperc_core.directional import DIRECTION_SPACES, MAX_ROLLOUT_STEPS
from .diffusion_clip import CLIP_SPACES, Direction
from .options import DIRECTION


class SelfPerceptualDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = Direction
        return io.Schema(
            node_id="SelfPerceptualDirection",
            display_name="Self-Perceptual Direction (DiffusionCLIP)",
            category="selfperc/editing",
            description="DiffusionCLIP (Kim et al. 2022): the fine-tune inverts each image to t0, rolls the model out "
                        "back to a clean image, and trains the LoRA so that the image changes the way the text "
                        "changes from source to target; the Objective's perceptual_weight weighs the identity term "
                        "(the self-perceptual distance to the image). Into Self-Perceptual Objective's direction.",
            inputs=[
                io.Conditioning.Input("source", tooltip="What the images are now, e.g. CLIPTextEncode 'a photo of a "
                                                        "face'. Inversion and rollout are conditioned on it."),
                io.Conditioning.Input("target", tooltip="What they should become, e.g. 'a photo of a smiling face'."),
                io.Combo.Input("space", options=list(DIRECTION_SPACES), default=d.space,
                               tooltip="denoiser: the text direction is the frozen model's own prediction change "
                                       "between target and source, the image change is in latent space (any "
                                       "family, no extra model). clip: both in CLIP's space, from the pooled text "
                                       "output and the CLIP_VISION on the decoded image (DiffusionCLIP's; "
                                       + "; ".join(f"{k}: {v}" for k, v in CLIP_SPACES.items()) + ")."),
                io.Float.Input("t0", default=d.t0, min=0.01, max=1.0, step=0.01,
                               tooltip="How far each image is inverted, as a fraction of the noise schedule "
                                       "(DiffusionCLIP: 0.4-0.6). Higher: bigger edits, less of the image kept. "
                                       "eps models stop at 0.9."),
                io.Int.Input("rollout_steps", default=d.rollout_steps, min=1, max=MAX_ROLLOUT_STEPS,
                             tooltip="Deterministic steps of the rollout back to the image (DiffusionCLIP: 6); each "
                                     "step's estimate is scored and backpropagated, so a training step runs about "
                                     "4x this many model passes (denoiser space) for the memory of one."),
                io.Int.Input("inversion_steps", default=d.inversion_steps, min=1, max=MAX_ROLLOUT_STEPS,
                             tooltip="Steps of each image's inversion to t0, once per run (DiffusionCLIP: 40): finer "
                                     "than the rollout, so the rollout starts from the image's own inversion."),
                io.Float.Input("direction_weight", default=d.direction_weight, min=0.01, max=100.0, step=0.01,
                               tooltip="Weight of the directional loss (1 - cosine, 0..2) against the identity "
                                       "term (Objective's perceptual_weight) and the MSE term (mse_weight)."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="For space 'clip': the vision tower of the CLIP the model's text encoder "
                                            "belongs to (Load CLIP Vision)."),
            ],
            outputs=[DIRECTION.Output(display_name="direction",
                                      tooltip="Into Self-Perceptual Objective's direction input.")],
        )

    @classmethod
    def execute(cls, source, target, space, t0, rollout_steps, inversion_steps, direction_weight, clip_vision=None):
        return io.NodeOutput(Direction(source, target, space, t0, rollout_steps, direction_weight, clip_vision,
                                       inversion_steps).validate())
