"""Self-Perceptual Fine-Tune: a LoRA trained with the self-perceptual objective on a folder of images.

The node holds what a first run needs; the option nodes (options.py) plug the rest into four optional inputs.
"""
from __future__ import annotations

from comfy_api.latest import io

from . import files
from .options import LORA, MONITORING, OBJECTIVE, TRAINING
from .run import plan_run, run_fine_tune
from .settings import FineTuneSettings, LoraOptions, Monitoring, Objective, TrainingOptions, option_of

OPTION_NODES = {"objective": "Self-Perceptual Objective", "training": "Self-Perceptual Training Options",
                "lora": "Self-Perceptual LoRA Options", "monitoring": "Self-Perceptual Monitoring"}


def earlier_inputs(prompt: dict | None, node_id, own: set[str]) -> dict:
    """The inputs this node has in the prompt beyond its ``own`` (ComfyUI drops those before calling it)."""
    entry = (prompt or {}).get(str(node_id)) if node_id is not None else None
    return {k: v for k, v in ((entry or {}).get("inputs") or {}).items() if k not in own}


def refuse_earlier_inputs(earlier: dict) -> None:
    """A prompt written for the node's earlier inputs (before the option nodes) is an error naming where each of its
    settings lives now, not a run that silently ignores them."""
    if not earlier:
        return
    moved: dict[str, list[str]] = {}
    for name in sorted(earlier):
        moved.setdefault(option_of(name) or "", []).append(f"{name}={earlier[name]!r}")
    parts = [f"{OPTION_NODES[g]} ({', '.join(v)})" for g, v in moved.items() if g]
    unknown = moved.get("", [])
    raise ValueError("this workflow was saved with an earlier version of Self-Perceptual Fine-Tune: these settings "
                     "now come from option nodes connected to its optional inputs: " + "; ".join(parts)
                     + (f"; unknown inputs: {', '.join(unknown)}" if unknown else "")
                     + ". Add those nodes with these values (unconnected, each keeps its defaults).")


class SelfPerceptualFineTune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = FineTuneSettings
        return io.Schema(
            node_id="SelfPerceptualFineTune",
            display_name="Self-Perceptual Fine-Tune (LoRA)",
            category="selfperc/training",
            description="Fine-tune a LoRA with the self-perceptual loss (Lin & Yang 2024) on a folder of images. "
                        "More settings: the Self-Perceptual Objective / Training Options / LoRA Options / "
                        "Monitoring nodes, into the optional inputs.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The base model to fine-tune (it is not modified)."),
                io.Vae.Input("vae", tooltip="Encodes the dataset images to latents, once, before training."),
                io.Combo.Input("dataset_folder", options=files.dataset_folders(),
                               tooltip="A folder of images inside ComfyUI's input directory; name.txt beside "
                                       "name.png is its caption."),
                io.Int.Input("steps", default=d.steps, min=1, max=100000, tooltip="Optimizer steps to train."),
                io.Float.Input("learning_rate", default=d.learning_rate, min=1e-7, max=1.0, step=1e-6,
                               tooltip="Learning rate. Self-perceptual fine-tuning degrades fast when this is too "
                                       "high; 1e-5 to 1e-4 is a safe range."),
                io.Int.Input("rank", default=d.rank, min=1, max=256, tooltip="LoRA rank."),
                io.Int.Input("batch_size", default=d.batch_size, min=1, max=64, tooltip="Images per step."),
                io.Int.Input("resolution", default=d.resolution, min=64, max=4096, step=8,
                             tooltip="Training resolution in pixels (side, or sqrt of area for buckets)."),
                io.Int.Input("seed", default=d.seed, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed for LoRA init, batches, noise and noise levels."),
                io.String.Input("lora_name", default=d.lora_name,
                                tooltip="File name in models/loras (one subfolder allowed)."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The model's text encoder (from its loader): encodes the captions. SD1.x/"
                                      "SD2.x train unconditionally without it; other families need it or a "
                                      "conditioning."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="Used for images without a caption (and for all images when no "
                                              "CLIP is connected), e.g. CLIPTextEncode with an empty text for "
                                              "unconditional training."),
                OBJECTIVE.Input("objective", optional=True,
                                tooltip="Self-Perceptual Objective: tap, t', distance, weights, MSE space, guidance. "
                                        "Not connected: the paper's settings."),
                TRAINING.Input("training", optional=True,
                               tooltip="Self-Perceptual Training Options: optimizer, schedule, accumulation, EMA, "
                                       "memory, data loading. Not connected: AdamW, constant, no EMA."),
                LORA.Input("lora", optional=True,
                           tooltip="Self-Perceptual LoRA Options: adapter kind, alpha, dtype, init_lora, file "
                                   "format, checkpoints, resume. Not connected: a fresh LoRA, saved at the end."),
                MONITORING.Input("monitoring", optional=True,
                                 tooltip="Self-Perceptual Monitoring: previews, sample prompts, validation. Not "
                                         "connected: none."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The base model with the trained LoRA applied."),
                io.Custom("LORA_MODEL").Output(display_name="lora", tooltip="LoRA weights (core LoRA nodes accept them)."),
                io.Custom("LOSS_MAP").Output(display_name="loss_map", tooltip="Loss per step (core Plot Loss Graph)."),
                io.String.Output(display_name="lora_file", tooltip="The saved file's name in models/loras."),
                io.Image.Output(display_name="loss_curve",
                                tooltip="Training loss (raw and smoothed) and the validation losses."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def execute(cls, model, vae, dataset_folder, steps, learning_rate, rank, batch_size, resolution, seed, lora_name,
                clip=None, conditioning=None, objective=None, training=None, lora=None, monitoring=None,
                **passed_through):
        own = {i.id for i in cls.define_schema().inputs}
        refuse_earlier_inputs({**earlier_inputs(cls.hidden.prompt, cls.hidden.unique_id, own), **passed_through})
        settings = FineTuneSettings(steps=steps, learning_rate=learning_rate, rank=rank, batch_size=batch_size,
                                    resolution=resolution, seed=seed, lora_name=lora_name,
                                    objective=objective or Objective(), training=training or TrainingOptions(),
                                    lora=lora or LoraOptions(), monitoring=monitoring or Monitoring())
        plan = plan_run(settings, model, clip, conditioning, dataset_folder, vae)
        *outputs, ui = run_fine_tune(plan, model, vae, clip, cls.hidden.unique_id)
        return io.NodeOutput(*outputs, ui=ui)
