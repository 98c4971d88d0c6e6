"""The fine-tune's option nodes: each gives one group of settings (settings.py) to an optional input of the
Self-Perceptual Fine-Tune node. Not connected, a group is its defaults; every input of an option node is optional too
(an API prompt may give only the settings it changes), so a setting not given is its default."""
from __future__ import annotations

from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..selfperc_core import T_PRIME_STRATEGIES
from ..selfperc_core.dataset import MAX_SHUFFLES, RESIZE_MODES
from ..selfperc_core.loop import LR_SCHEDULES, OPTIMIZERS
from ..selfperc_core.objective import DISTANCES, MSE_SPACES
from ..selfperc_core.timesteps import T_LAWS
from . import families, files
from .lora import algorithms
from .settings import (
    DTYPES,
    LORA_DTYPES,
    MAX_SAMPLE_PROMPTS,
    NONE,
    SAVE_FORMATS,
    SAVE_WEIGHTS,
    LoraOptions,
    Monitoring,
    Objective,
    TrainingOptions,
)

OBJECTIVE = io.Custom("SELFPERC_OBJECTIVE")
DIRECTION = io.Custom("SELFPERC_DIRECTION")  # from Self-Perceptual Direction (direction.py)
SUPER_RESOLUTION = io.Custom("SELFPERC_SUPER_RESOLUTION")  # from Self-Perceptual Super-Resolution
TRAINING = io.Custom("SELFPERC_TRAINING")
LORA = io.Custom("SELFPERC_LORA")
MONITORING = io.Custom("SELFPERC_MONITORING")
CATEGORY = "selfperc/training/options"


def resumable_loras() -> list[str]:
    return [NONE] + [n for n in folder_paths.get_filename_list("loras")
                     if files.state_path(Path(folder_paths.get_full_path("loras", n) or n)).exists()]


class SelfPerceptualObjective(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = Objective
        return io.Schema(
            node_id="SelfPerceptualObjective", display_name="Self-Perceptual Objective", category=CATEGORY,
            description="What the self-perceptual loss compares, and the MSE term beside it. Defaults: the paper's.",
            inputs=[
                io.Combo.Input("feature_layer", optional=True, options=families.UNET_LAYERS, default=d.feature_layer,
                               tooltip="Layer of the frozen model whose features are compared. mid_block: the UNet "
                                       "mid-block (the paper's best), or for transformers the block at tap_depth. "
                                       "The other names are UNet blocks."),
                io.Float.Input("tap_depth", optional=True, default=d.tap_depth, min=0.0, max=1.0, step=0.01,
                               tooltip="Transformers (Flux, SD3, Qwen-Image, Wan, ...): which block is the "
                                       "perceptual layer, as a fraction of the block stack (0.5: the middle block). "
                                       "UNets ignore it."),
                io.Combo.Input("t_prime", optional=True, options=list(T_PRIME_STRATEGIES), default=d.t_prime,
                               tooltip="How the perceptual noise level t' is drawn (the paper: uniform)."),
                io.Float.Input("t_prime_min", optional=True, default=d.t_prime_min, min=0.0, max=1.0, step=0.01,
                               tooltip="Lowest t' as a fraction of the schedule (0 = clean)."),
                io.Float.Input("t_prime_max", optional=True, default=d.t_prime_max, min=0.0, max=1.0, step=0.01,
                               tooltip="Highest t' as a fraction of the schedule (1 = pure noise)."),
                io.Combo.Input("distance", optional=True, options=list(DISTANCES), default=d.distance,
                               tooltip="Feature distance: mse (the paper) or mae."),
                io.Boolean.Input("normalize_features", optional=True, default=d.normalize_features,
                                 tooltip="Divide the distance by the target features' mean square (for transformers "
                                         "whose loss reads in the hundreds or more)."),
                io.Float.Input("perceptual_weight", optional=True, default=d.perceptual_weight, min=0.0, max=100.0, step=0.01,
                               tooltip="Weight of the self-perceptual loss (1 = the paper). 0 with mse_weight 1 "
                                       "trains the same LoRA with plain MSE (in mse_space): the baseline to "
                                       "compare against in Self-Perceptual Evaluate."),
                io.Float.Input("mse_weight", optional=True, default=d.mse_weight, min=0.0, max=100.0, step=0.01,
                               tooltip="Weight of the ordinary MSE loss added to the self-perceptual loss. "
                                       "0 = pure self-perceptual (the paper); 1 = a 1:1 mix (see help)."),
                io.Combo.Input("mse_space", optional=True, options=list(MSE_SPACES), default=d.mse_space,
                               tooltip="Space of the MSE term (mse_weight, and the perceptual_weight 0 baseline): "
                                       "native = the loss the model was trained with (eps-MSE for eps models, "
                                       "v-MSE for v models, velocity-MSE for flow models); x0 = the error of the "
                                       "clean-image estimate (core Train LoRA's loss), which weights the noise "
                                       "levels differently."),
                io.Float.Input("guidance", optional=True, default=d.guidance, min=0.0, max=100.0, step=0.1,
                               tooltip="Distilled guidance for guidance-distilled models (Flux-dev, Flux.2, Chroma, "
                                       "HunyuanImage) while training, as FluxGuidance sets it. 0 = leave the "
                                       "conditioning's own value or the model's default."),
                io.Combo.Input("t_law", optional=True, options=list(T_LAWS), default=d.t_law,
                               tooltip="How the online noise level t is drawn: uniform (the paper's) or "
                                       "logit_normal (SD3's, mid-noise heavy; t_law_mean / t_law_std)."),
                io.Float.Input("t_law_mean", optional=True, default=d.t_law_mean, min=-5.0, max=5.0, step=0.01,
                               tooltip="logit_normal: the mean of the normal before the sigmoid (0: centred)."),
                io.Float.Input("t_law_std", optional=True, default=d.t_law_std, min=0.01, max=5.0, step=0.01,
                               tooltip="logit_normal: the normal's standard deviation (1: SD3's)."),
                io.Float.Input("t_shift", optional=True, default=d.t_shift, min=0.05, max=20.0, step=0.05,
                               tooltip="Static shift of the drawn t, s t / (1 + (s - 1) t), as flow trainers use "
                                       "(> 1: towards noise). 1: none. The model's own shift (ModelSamplingSD3 / "
                                       "Flux) already maps t to sigma; this moves the draws on top of it."),
                io.Float.Input("min_snr_gamma", optional=True, default=d.min_snr_gamma, min=0.0, max=100.0, step=0.1,
                               tooltip="Min-SNR-gamma weights of the MSE term (eps and v models, mse_space native; "
                                       "Hang et al.: 5). 0: none. The self-perceptual term is not weighted."),
                DIRECTION.Input(
                    "direction", optional=True,
                    tooltip="Self-Perceptual Direction (DiffusionCLIP): the fine-tune becomes a directional one "
                            "(each image moved from its source text towards the target text); perceptual_weight "
                            "then weighs its identity term, the self-perceptual distance to the image. Not "
                            "connected: the self-perceptual fine-tune."),
                SUPER_RESOLUTION.Input(
                    "super_resolution", optional=True,
                    tooltip="Self-Perceptual Super-Resolution (SR3 / CDM): the fine-tune trains an upscaler (the "
                            "SD x4 upscaler) on pairs made from the folder's images, each step with a freshly "
                            "degraded low-res condition. Not connected: the text-to-image fine-tune."),
            ],
            outputs=[OBJECTIVE.Output(display_name="objective", tooltip="Into the fine-tune's objective input.")],
        )

    @classmethod
    def execute(cls, **values):
        return io.NodeOutput(Objective(**values))


class SelfPerceptualTrainingOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = TrainingOptions
        return io.Schema(
            node_id="SelfPerceptualTrainingOptions", display_name="Self-Perceptual Training Options",
            category=CATEGORY, description="Optimizer, schedule, memory and data-loading options of the fine-tune.",
            inputs=[
                io.Combo.Input("optimizer", optional=True, options=list(OPTIMIZERS), default=d.optimizer,
                               tooltip="adamw, adam, sgd, rmsprop or adafactor (torch's own), with torch's defaults "
                                       "but weight_decay; prodigy (needs the prodigyopt package; it estimates the "
                                       "step size: set learning_rate 1.0)."),
                io.Combo.Input("lr_schedule", optional=True, options=list(LR_SCHEDULES), default=d.lr_schedule,
                               tooltip="Learning rate after the warm-up: constant, cosine (to 0 at the last step) "
                                       "or linear (to 0)."),
                io.Int.Input("warmup_steps", optional=True, default=d.warmup_steps, min=0, max=100000,
                             tooltip="Linear learning-rate warm-up over the first N steps."),
                io.Int.Input("gradient_accumulation", optional=True, default=d.gradient_accumulation, min=1, max=256,
                             tooltip="Micro-batches of batch_size per optimizer step: k x batch_size images a step "
                                     "for the memory of one batch (exactly a k-times larger batch)."),
                io.Float.Input("ema_decay", optional=True, default=d.ema_decay, min=0.0, max=0.99999, step=0.0001,
                               tooltip="EMA of the LoRA weights after every step (the paper: 0.9995); 0 = off."),
                io.Boolean.Input("gradient_checkpointing", optional=True, default=d.gradient_checkpointing,
                                 tooltip="Recompute activations in backward: less memory, ~30% slower."),
                io.Combo.Input("training_dtype", optional=True, options=list(DTYPES), default=d.training_dtype,
                               tooltip="auto: bf16 on a GPU, fp32 on CPU."),
                io.Boolean.Input("batched_frozen", optional=True, default=d.batched_frozen,
                                 tooltip="Run the two frozen passes as one batch (faster on some GPUs)."),
                io.Combo.Input("resize_mode", optional=True, options=list(RESIZE_MODES), default=d.resize_mode,
                               tooltip="center_crop: square crops; buckets: keep each image's aspect ratio "
                                       "(same-shaped images are batched together)."),
                io.String.Input("dataset_path", optional=True, default=d.dataset_path,
                                tooltip="Absolute dataset folder instead of dataset_folder; only if the server owner "
                                        f"set {files.ALLOW_ANY_DATASET_PATH}=1."),
                io.Float.Input("weight_decay", optional=True, default=d.weight_decay, min=0.0, max=1.0, step=0.001,
                               tooltip="Decoupled weight decay (adamw, adafactor, prodigy); 0: none (the LoRA starts at zero "
                                       "and decay pulls it back there)."),
                io.Float.Input("max_grad_norm", optional=True, default=d.max_grad_norm, min=0.0, max=1000.0,
                               step=0.01, tooltip="Clip the gradients' total norm to this before each update (1.0 is "
                                                  "the usual); 0: no clipping."),
                io.String.Input("caption_prefix", optional=True, default=d.caption_prefix,
                                tooltip="Put before every caption, e.g. a trigger word ('sks, '): images without a "
                                        "caption get it alone. Needs the CLIP input."),
                io.Boolean.Input("repeat_folders", optional=True, default=d.repeat_folders,
                                 tooltip="kohya's convention: the images in a subfolder named N_name (e.g. 10_cat) "
                                         "count N times (1..1000). Off: every image once, whatever its folder is "
                                         "called."),
                io.Boolean.Input("cache_latents_to_disk", optional=True, default=d.cache_latents_to_disk,
                                 tooltip="Keep each image's VAE latent in ComfyUI's user/selfperc/latent_cache "
                                         "(safetensors, keyed by the exact pixels and the VAE's weights; at most "
                                         "SELFPERC_LATENT_CACHE_GB, default 8, least recently used files go first): "
                                         "a second run on the same images and VAE does not encode them again."),
                io.Float.Input("caption_dropout", optional=True, default=d.caption_dropout, min=0.0, max=0.99,
                               step=0.01, tooltip="Fraction of samples trained on the empty caption instead of their "
                                                  "own (e.g. 0.1), so the LoRA also works without its prompt. Needs "
                                                  "the CLIP input."),
                io.Boolean.Input("masked_loss", optional=True, default=d.masked_loss,
                                 tooltip="Weigh each image's loss by its mask: name.mask.png beside name.ext (grey "
                                         "levels, white = full weight; such files are then not images), else the "
                                         "image's alpha channel; images without either count everywhere. The mask "
                                         "is averaged onto the latent and the tapped feature grid."),
                io.Int.Input("shuffle_tags", optional=True, default=d.shuffle_tags, min=0, max=MAX_SHUFFLES,
                             tooltip="Captions as comma-separated tags: encode up to this many orders of each "
                                     "caption's tags (once, before training) and draw one per step. 0: the caption "
                                     "as written. Needs the CLIP input."),
                io.Int.Input("keep_first_tags", optional=True, default=d.keep_first_tags, min=0, max=64,
                             tooltip="With shuffle_tags: how many first tags stay in place (kohya's keep_tokens; "
                                     "the caption_prefix always stays first)."),
                io.Combo.Input("regularization_folder", optional=True, options=[NONE] + files.dataset_folders(),
                               default=d.regularization_folder,
                               tooltip="Prior preservation: a folder (in input/) of images of the class (e.g. other "
                                       "dogs, made with the base model), with their own name.txt captions or the "
                                       "conditioning input; drawn beside the dataset's images, their loss weighted "
                                       "by regularization_weight. None: no regularization."),
                io.Float.Input("regularization_weight", optional=True, default=d.regularization_weight, min=0.01,
                               max=100.0, step=0.01,
                               tooltip="Weight of the regularization images' loss (kohya's prior_loss_weight)."),
                io.Float.Input("weights_on_device_gb", optional=True, default=d.weights_on_device_gb, min=0.0,
                               max=1024.0, step=0.5,
                               tooltip="Memory lever for small GPUs: keep at most this many GB of the model's "
                                       "weights on the GPU; the rest stays in system RAM and each layer's weights "
                                       "are copied in when it runs (ComfyUI's own partial loading; forward, "
                                       "recompute and backward alike). The same step, slower by the copies. 0: "
                                       "ComfyUI decides from the free memory."),
            ],
            outputs=[TRAINING.Output(display_name="training", tooltip="Into the fine-tune's training input.")],
        )

    @classmethod
    def execute(cls, **values):
        return io.NodeOutput(TrainingOptions(**values))


class SelfPerceptualLoraOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = LoraOptions
        return io.Schema(
            node_id="SelfPerceptualLoraOptions", display_name="Self-Perceptual LoRA Options", category=CATEGORY,
            description="The adapter, and how its file is written, checkpointed and continued.",
            inputs=[
                io.Combo.Input("algorithm", optional=True, options=list(algorithms()), default=d.algorithm,
                               tooltip="The adapter (comfy.weight_adapter, as core Train LoRA): LoRA (fast path: "
                                       "runs beside each layer), LoHa, LoKr or OFT (exact, a weight-sized product "
                                       "per layer per pass). Core loaders load each."),
                io.Float.Input("alpha", optional=True, default=d.alpha, min=0.01, max=1024.0, step=0.01,
                               tooltip="LoRA alpha; the update is scaled by alpha / rank."),
                io.Combo.Input("lora_dtype", optional=True, options=list(LORA_DTYPES), default=d.lora_dtype,
                               tooltip="The adapter's own weights (and the optimizer's moments): fp32, or bf16 for "
                                       "half their memory. The base model keeps its stored dtype either way."),
                io.Combo.Input("init_lora", optional=True, options=[NONE] + folder_paths.get_filename_list("loras"),
                               default=d.init_lora,
                               tooltip="Start from this LoRA (ComfyUI, kohya, diffusers or peft keys; .safetensors "
                                       "only): its layers keep its rank and alpha, the others start fresh."),
                io.Combo.Input("save_format", optional=True, options=list(SAVE_FORMATS), default=d.save_format,
                               tooltip="comfyui: ComfyUI's own keys; kohya: the layout A1111, Forge and diffusers "
                                       "load (lora_unet_..., diffusers names for UNets). Core loaders read both."),
                io.Combo.Input("save_weights", optional=True, options=list(SAVE_WEIGHTS), default=d.save_weights,
                               tooltip="With EMA on: raw (the trained weights), ema (the EMA in the LoRA file), or "
                                       "raw+ema (the EMA also as <name>_ema.safetensors)."),
                io.Int.Input("save_every", optional=True, default=d.save_every, min=0, max=100000,
                             tooltip="Also save the LoRA and resume state every N steps (0 = only at the end)."),
                io.Combo.Input("resume_from", optional=True, options=resumable_loras(), default=d.resume_from,
                               tooltip="Continue a saved run (LoRA + its .selfperc_state: optimizer, step, RNG). "
                                       "Pickle files are never loaded."),
                io.Boolean.Input("overwrite", optional=True, default=d.overwrite,
                                 tooltip="Replace an existing file of lora_name; off adds a counter suffix."),
            ],
            outputs=[LORA.Output(display_name="lora", tooltip="Into the fine-tune's lora input.")],
        )

    @classmethod
    def execute(cls, **values):
        return io.NodeOutput(LoraOptions(**values))


class SelfPerceptualMonitoring(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = Monitoring
        return io.Schema(
            node_id="SelfPerceptualMonitoring", display_name="Self-Perceptual Monitoring", category=CATEGORY,
            description="Previews, sample grids and held-out validation while the fine-tune runs.",
            inputs=[
                io.Int.Input("preview_every", optional=True, default=d.preview_every, min=0, max=100000,
                             tooltip="Show a small no-CFG sample in the node every N steps (0 = off)."),
                io.String.Input("sample_prompts", optional=True, default=d.sample_prompts, multiline=True,
                                tooltip=f"Up to {MAX_SAMPLE_PROMPTS} prompts, one per line: every sample_every steps "
                                        "a no-CFG sample of each (same noise) is saved to output/selfperc_samples and "
                                        "shown in the node. Needs the fine-tune's CLIP input."),
                io.Int.Input("sample_every", optional=True, default=d.sample_every, min=0, max=100000,
                             tooltip="Steps between sample grids of sample_prompts (0 = only at the end)."),
                io.Float.Input("validation_split", optional=True, default=d.validation_split, min=0.0, max=0.5, step=0.01,
                               tooltip="Fraction of the images held out (not trained on): their self-perceptual and "
                                       "MSE losses at fixed noise are plotted with the training loss."),
                io.Int.Input("validation_every", optional=True, default=d.validation_every, min=0, max=100000,
                             tooltip="Steps between validation passes (0 = at the start and the end only)."),
                io.Boolean.Input("tensorboard", optional=True, default=d.tensorboard,
                                 tooltip="Write TensorBoard event files (losses, learning rate, validation, sample "
                                         "grids) to output/selfperc_tensorboard/<lora_name>; needs the tensorboard "
                                         "package (pip install tensorboard)."),
            ],
            outputs=[MONITORING.Output(display_name="monitoring", tooltip="Into the fine-tune's monitoring input.")],
        )

    @classmethod
    def execute(cls, **values):
        return io.NodeOutput(Monitoring(**values))


OPTION_NODES = [SelfPerceptualObjective, SelfPerceptualTrainingOptions, SelfPerceptualLoraOptions,
                SelfPerceptualMonitoring]
