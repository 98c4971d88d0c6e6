"""The fine-tune's settings: one object, its defaults written once, every rule in one ``validate``.

The node keeps what a first run needs; the rest comes from four option nodes (options.py), each giving one of the
frozen dataclasses below. An option node left unconnected is its dataclass's defaults, which are the node's
defaults of earlier versions. Field names are the inputs' names (saved workflows and the headless flags use them).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from ..selfperc_core.dataset import MAX_CAPTION_CHARS, MAX_SHUFFLES, RESIZE_MODES
from ..selfperc_core.features import check_depth
from ..selfperc_core.loop import TrainSettings
from . import families, inputs
from .lora import algorithms

NONE = "[None]"
DTYPES = ("auto", "fp32", "bf16", "fp16")
LORA_DTYPES = ("fp32", "bf16")
SAVE_WEIGHTS = ("raw", "ema", "raw+ema")
SAVE_FORMATS = ("comfyui", "kohya")
MAX_SAMPLE_PROMPTS = 4
# Pixels per step (batch x resolution^2) are bounded before any work: 64 MP is e.g. batch 64 at 1024 px or
# batch 16 at 2048 px, beyond what any GPU we know trains; past it a run only ends in an out-of-memory.
MAX_STEP_PIXELS = 64 * 1024 * 1024


@dataclass(frozen=True)
class Objective:
    """What is compared and how (SELFPERC_OBJECTIVE). Defaults: the paper's."""
    feature_layer: str = families.MID_BLOCK
    tap_depth: float = families.DEFAULT_DEPTH
    t_prime: str = "uniform"
    t_prime_min: float = 0.0
    t_prime_max: float = 1.0
    distance: str = "mse"
    normalize_features: bool = False
    perceptual_weight: float = 1.0
    mse_weight: float = 0.0
    mse_space: str = "native"
    guidance: float = inputs.DEFAULT_GUIDANCE  # 0: the conditioning's own value, else the model's default
    t_law: str = "uniform"  # the online level t's law (timesteps.TLaw); the paper's: uniform
    t_law_mean: float = 0.0
    t_law_std: float = 1.0
    t_shift: float = 1.0
    min_snr_gamma: float = 0.0
    direction: object = None  # a diffusion_clip.Direction: the DiffusionCLIP directional fine-tune instead
    super_resolution: object = None  # a super_resolution.SuperResolution: the upscaler fine-tune (SR3 / CDM)


@dataclass(frozen=True)
class TrainingOptions:
    """How the steps are taken and the data read (SELFPERC_TRAINING)."""
    optimizer: str = "adamw"
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    gradient_accumulation: int = 1
    ema_decay: float = 0.0
    gradient_checkpointing: bool = True
    training_dtype: str = "auto"
    batched_frozen: bool = False
    resize_mode: str = "center_crop"
    dataset_path: str = ""
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0
    caption_prefix: str = ""  # e.g. a trigger word, before every caption
    caption_dropout: float = 0.0
    cache_latents_to_disk: bool = False  # latent_cache.py: a second run reads the latents instead of encoding
    repeat_folders: bool = False  # kohya's N_name subfolders repeat their images N times
    masked_loss: bool = False  # each image's alpha channel or name.mask.png weighs its loss
    shuffle_tags: int = 0  # caption orders per image (comma-separated tags shuffled); 0: the caption as written
    keep_first_tags: int = 1  # tags that stay first when shuffling (kohya's keep_tokens)
    regularization_folder: str = NONE  # prior-preservation images, trained beside the dataset
    regularization_weight: float = 1.0  # their loss's weight (kohya's prior_loss_weight)
    weights_on_device_gb: float = 0.0  # 0: ComfyUI decides; else at most this much of the weights on the device


@dataclass(frozen=True)
class LoraOptions:
    """The adapter, and how its file is written and continued (SELFPERC_LORA)."""
    algorithm: str = "LoRA"
    alpha: float = 8.0
    lora_dtype: str = "fp32"
    init_lora: str = NONE
    save_format: str = "comfyui"
    save_weights: str = "raw"
    save_every: int = 0
    resume_from: str = NONE
    overwrite: bool = False


@dataclass(frozen=True)
class Monitoring:
    """What the run shows while it trains (SELFPERC_MONITORING)."""
    preview_every: int = 0
    sample_prompts: str = ""
    sample_every: int = 0
    validation_split: float = 0.0
    validation_every: int = 0
    tensorboard: bool = False  # event files under output/selfperc_tensorboard/<lora name>

    @property
    def prompts(self) -> list[str]:
        return [p.strip() for p in self.sample_prompts.splitlines() if p.strip()]


OPTION_GROUPS = {"objective": Objective, "training": TrainingOptions, "lora": LoraOptions, "monitoring": Monitoring}


@dataclass(frozen=True)
class FineTuneSettings:
    """Every setting of one fine-tune: the node's own inputs and the four option groups."""
    steps: int = 200
    learning_rate: float = 1e-4
    rank: int = 8
    batch_size: int = 1
    resolution: int = 512
    seed: int = 0
    lora_name: str = "selfperc/selfperc_lora"
    objective: Objective = field(default_factory=Objective)
    training: TrainingOptions = field(default_factory=TrainingOptions)
    lora: LoraOptions = field(default_factory=LoraOptions)
    monitoring: Monitoring = field(default_factory=Monitoring)

    def train_settings(self, total_steps: int | None = None) -> TrainSettings:
        """The core's settings of this run (``total_steps``: the schedule's horizon when resuming)."""
        o, t = self.objective, self.training
        return TrainSettings(steps=self.steps, learning_rate=self.learning_rate, batch_size=self.batch_size,
                             seed=self.seed, t_prime=o.t_prime, t_prime_range=(o.t_prime_min, o.t_prime_max),
                             distance=o.distance, normalize=o.normalize_features, mse_weight=o.mse_weight,
                             mse_space=o.mse_space, perceptual_weight=o.perceptual_weight,
                             batched_frozen=t.batched_frozen, optimizer=t.optimizer, lr_schedule=t.lr_schedule,
                             warmup_steps=t.warmup_steps, total_steps=total_steps, ema_decay=t.ema_decay,
                             accumulation=t.gradient_accumulation, t_law=o.t_law, t_law_mean=o.t_law_mean,
                             t_law_std=o.t_law_std, t_shift=o.t_shift, min_snr_gamma=o.min_snr_gamma,
                             weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                             caption_dropout=t.caption_dropout)

    def validate(self) -> "FineTuneSettings":
        """Every rule on the settings, before any work; raises ValueError naming the setting."""
        o = self.objective
        if o.direction is not None:
            o.direction.validate()
            if o.min_snr_gamma:
                raise ValueError("min_snr_gamma weighs the self-perceptual fine-tune's MSE term; the directional "
                                 "fine-tune has its own terms")
            if self.training.caption_prefix or self.training.caption_dropout:
                raise ValueError("caption_prefix and caption_dropout do not apply with a direction (DiffusionCLIP "
                                 "trains every image at the direction's source text)")
            if not o.perceptual_weight and not o.mse_weight:
                raise ValueError("the directional fine-tune needs an identity term: perceptual_weight (the "
                                 "self-perceptual distance to each image) or mse_weight above 0")
        if o.super_resolution is not None:
            o.super_resolution.validate()
            if o.direction is not None:
                raise ValueError("connect a direction or super_resolution to the Objective, not both")
        self.train_settings().validate()
        check_depth(self.objective.tap_depth)
        check_step_size(self.batch_size, self.resolution)
        _choose("training_dtype", self.training.training_dtype, DTYPES)
        _choose("resize_mode", self.training.resize_mode, RESIZE_MODES)
        lo = self.lora
        _choose("algorithm", lo.algorithm, algorithms())
        _choose("lora_dtype", lo.lora_dtype, LORA_DTYPES)
        _choose("save_format", lo.save_format, SAVE_FORMATS)
        _choose("save_weights", lo.save_weights, SAVE_WEIGHTS)
        if lo.save_weights != "raw" and not self.training.ema_decay:
            raise ValueError(f"save_weights {lo.save_weights!r} needs an EMA: set ema_decay (e.g. 0.9995)")
        if lo.init_lora != NONE and lo.resume_from != NONE:
            raise ValueError("choose resume_from or init_lora, not both")
        if lo.init_lora != NONE and lo.algorithm != "LoRA":
            raise ValueError(f"init_lora starts a LoRA; it cannot start a {lo.algorithm}")
        t = self.training
        if not 0 <= t.shuffle_tags <= MAX_SHUFFLES or t.keep_first_tags < 0:
            raise ValueError(f"shuffle_tags {t.shuffle_tags} must be within [0, {MAX_SHUFFLES}] and keep_first_tags "
                             f"{t.keep_first_tags} at least 0")
        if not (math.isfinite(t.regularization_weight) and 0 < t.regularization_weight <= 100):
            raise ValueError(f"regularization_weight {t.regularization_weight} must be within (0, 100]")
        if not (math.isfinite(t.weights_on_device_gb) and 0 <= t.weights_on_device_gb <= 1024):
            raise ValueError(f"weights_on_device_gb {t.weights_on_device_gb} must be within [0, 1024] (0: ComfyUI "
                             "decides)")
        if (t.masked_loss or t.regularization_folder != NONE) and o.direction is not None:
            raise ValueError("masked_loss and regularization_folder weigh the self-perceptual fine-tune; not with a "
                             "direction")
        if len(self.training.caption_prefix) > MAX_CAPTION_CHARS // 4:
            raise ValueError(f"caption_prefix is {len(self.training.caption_prefix)} characters; at most "
                             f"{MAX_CAPTION_CHARS // 4} (it goes before every caption)")
        prompts = self.monitoring.prompts
        if len(prompts) > MAX_SAMPLE_PROMPTS or any(len(p) > MAX_CAPTION_CHARS for p in prompts):
            raise ValueError(f"sample_prompts: at most {MAX_SAMPLE_PROMPTS} lines of at most {MAX_CAPTION_CHARS} "
                             f"characters (got {len(prompts)} lines)")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def _choose(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, options))}")


def check_step_size(batch_size: int, resolution: int) -> None:
    if batch_size * resolution * resolution > MAX_STEP_PIXELS:
        raise ValueError(f"batch_size {batch_size} x resolution {resolution}^2 is "
                         f"{batch_size * resolution * resolution / 2**20:.0f} MP per step, over the "
                         f"{MAX_STEP_PIXELS // 2**20} MP bound: lower batch_size or resolution")


def option_of(name: str) -> str | None:
    """The option group (objective, training, lora, monitoring) an input of earlier versions now belongs to."""
    for group, cls in OPTION_GROUPS.items():
        if name in {f.name for f in fields(cls)}:
            return group
    return None


def split_flat(values: dict) -> tuple[dict, dict[str, dict]]:
    """(the node's own inputs, {option group: its inputs}) of one flat dict of input names, as the node's inputs
    were before the option nodes (and as tests and scripts write them). Groups without a value are left out."""
    groups: dict[str, dict] = {}
    base = {}
    for name, value in values.items():
        group = option_of(name)
        if group is not None:
            groups.setdefault(group, {})[name] = value
        else:
            base[name] = value
    return base, groups


def from_flat(values: dict) -> FineTuneSettings:
    """Settings from one flat dict of setting names (``split_flat``); names not given keep their defaults; an
    unknown name is an error."""
    base, groups = split_flat(values)
    return FineTuneSettings(**base, **{g: OPTION_GROUPS[g](**v) for g, v in groups.items()})
