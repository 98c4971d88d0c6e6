"""Self-Perceptual Fine-Tune: a LoRA trained with the self-perceptual objective on a folder of images."""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io
from tqdm.auto import tqdm

from ..selfperc_core import T_PRIME_STRATEGIES
from ..selfperc_core.dataset import MAX_CAPTION_CHARS, RESIZE_MODES, as_float, load_dataset
from ..selfperc_core.loop import LR_SCHEDULES, OPTIMIZERS, NonFiniteLoss, Trainer, TrainSettings
from ..selfperc_core.objective import DISTANCES, MSE_SPACES
from . import bridge, conditioning, files, lora, plots, preview, taps
from .session import training_session

log = logging.getLogger("selfperc")
DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NONE = "[None]"
SAVE_WEIGHTS = ("raw", "ema", "raw+ema")
SAVE_FORMATS = ("comfyui", "kohya")
MAX_SAMPLE_PROMPTS = 4
LORA_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Pixels per step (batch x resolution^2) are bounded before any work: 64 MP is e.g. batch 64 at 1024 px or
# batch 16 at 2048 px, beyond what any GPU we know trains; past it a run only ends in an out-of-memory.
MAX_STEP_PIXELS = 64 * 1024 * 1024
# The decoded images (uint8) may take at most this share of the memory available when training starts.
CACHE_MEMORY_SHARE = 0.5


def check_sizes(batch_size: int, resolution: int) -> None:
    if batch_size * resolution * resolution > MAX_STEP_PIXELS:
        raise ValueError(f"batch_size {batch_size} x resolution {resolution}^2 is "
                         f"{batch_size * resolution * resolution / 2**20:.0f} MP per step, over the "
                         f"{MAX_STEP_PIXELS // 2**20} MP bound: lower batch_size or resolution")


def cache_budget() -> int:
    import psutil

    return int(psutil.virtual_memory().available * CACHE_MEMORY_SHARE)


def training_dtype(choice: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that supports it, fp32 otherwise (CPU)."""
    if choice != "auto":
        return DTYPES[choice]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@torch.no_grad()
def encode_latents(model, vae, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """VAE-encode each image once (the latent cache), in the model's latent space."""
    out = []
    for img in images:
        lat = vae.encode(as_float(img)[None, :, :, :3])
        out.append(model.model.process_latent_in(lat.float())[0].cpu())
    return out


@torch.no_grad()
def caption_conditionings(clip, captions: list[str | None], fallback: list | None) -> list[list]:
    """A CONDITIONING per image: its caption through the connected text encoder (whatever the family uses,
    as CLIPTextEncode does), else ``fallback`` (the node's conditioning input, or the empty prompt)."""
    cache, out = {}, []
    for cap in captions:
        if clip is None or (not cap and fallback is not None):
            out.append(fallback)
            continue
        key = cap or ""
        if key not in cache:
            cache[key] = clip.encode_from_tokens_scheduled(clip.tokenize(key))
        out.append(cache[key])
    return out


def held_out(n: int, fraction: float, seed: int) -> list[int]:
    """Indices of the images kept for validation: round(fraction * n) of them (at least 1 when fraction > 0),
    drawn with ``seed``; at least one image always stays for training."""
    if fraction <= 0 or n < 2:
        return []
    k = min(n - 1, max(1, round(fraction * n)))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())


def model_fingerprint(model) -> str:
    """A short hash of the base model's first weights: identifies the base in the LoRA's metadata."""
    h = hashlib.sha256()
    for i, (k, v) in enumerate(model.model.diffusion_model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().flatten()[:4096].numpy().tobytes())
        if i > 16:
            break
    return h.hexdigest()[:16]


def resumable_loras() -> list[str]:
    return [NONE] + [n for n in folder_paths.get_filename_list("loras")
                     if files.state_path(Path(folder_paths.get_full_path("loras", n) or n)).exists()]


@dataclass
class Job:
    """One fine-tune's settings, grouped, after every check (the node's inputs minus the data)."""
    settings: TrainSettings
    rank: int
    alpha: float
    layer: str
    depth: float
    checkpointing: bool
    dtype: torch.dtype
    out_file: Path
    save_every: int
    preview_every: int
    folder: Path
    guidance: float
    fallback: list | None                  # conditioning for images without a caption
    accumulation: int = 1
    save_weights: str = "raw"
    save_format: str = "comfyui"
    start: dict | None = None              # init_lora's weights in this pack's keys
    algorithm: str = "LoRA"
    lora_dtype: torch.dtype = torch.float32
    sample_prompts: list[str] = field(default_factory=list)
    sample_every: int = 0
    validation_split: float = 0.0
    validation_every: int = 0
    resume_name: str | None = None
    resume_weights: dict | None = None
    resume_state: dict | None = None


class SelfPerceptualFineTune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfPerceptualFineTune",
            display_name="Self-Perceptual Fine-Tune (LoRA)",
            category="selfperc/training",
            description="Fine-tune a LoRA with the self-perceptual loss (Lin & Yang 2024) on a folder of images.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The base model to fine-tune (it is not modified)."),
                io.Vae.Input("vae", tooltip="Encodes the dataset images to latents, once, before training."),
                io.Combo.Input("dataset_folder", options=files.dataset_folders(),
                               tooltip="A folder of images inside ComfyUI's input directory; name.txt beside "
                                       "name.png is its caption."),
                io.Int.Input("steps", default=200, min=1, max=100000, tooltip="Optimizer steps to train."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6,
                               tooltip="AdamW learning rate. Self-perceptual fine-tuning degrades fast when this "
                                       "is too high; 1e-5 to 1e-4 is a safe range."),
                io.Int.Input("rank", default=8, min=1, max=256, tooltip="LoRA rank."),
                io.Float.Input("alpha", default=8.0, min=0.01, max=1024.0, step=0.01,
                               tooltip="LoRA alpha; the update is scaled by alpha / rank."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per step."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=8,
                             tooltip="Training resolution in pixels (side, or sqrt of area for buckets)."),
                io.Combo.Input("resize_mode", options=list(RESIZE_MODES), default="center_crop",
                               tooltip="center_crop: square crops; buckets: keep each image's aspect ratio "
                                       "(same-shaped images are batched together)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed for LoRA init, batches, noise and noise levels."),
                io.Combo.Input("feature_layer", options=taps.UNET_LAYERS, default=taps.MID_BLOCK,
                               tooltip="Layer of the frozen model whose features are compared. mid_block: the "
                                       "UNet mid-block (the paper's best), or for transformers the block at "
                                       "tap_depth. The other names are UNet blocks."),
                io.Combo.Input("t_prime", options=list(T_PRIME_STRATEGIES), default="uniform",
                               tooltip="How the perceptual noise level t' is drawn (the paper: uniform)."),
                io.Float.Input("t_prime_min", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Lowest t' as a fraction of the schedule (0 = clean)."),
                io.Float.Input("t_prime_max", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Highest t' as a fraction of the schedule (1 = pure noise)."),
                io.Combo.Input("distance", options=list(DISTANCES), default="mse",
                               tooltip="Feature distance: mse (the paper) or mae."),
                io.Boolean.Input("normalize_features", default=False,
                                 tooltip="Divide the distance by the target features' mean square."),
                io.Float.Input("mse_weight", default=0.0, min=0.0, max=100.0, step=0.01,
                               tooltip="Weight of the ordinary MSE loss added to the self-perceptual loss. "
                                       "0 = pure self-perceptual (the paper); 1 = a 1:1 mix (see help)."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute activations in backward: less memory, ~30% slower."),
                io.Combo.Input("training_dtype", options=list(DTYPES), default="auto",
                               tooltip="auto: bf16 on a GPU, fp32 on CPU."),
                io.String.Input("lora_name", default="selfperc/selfperc_lora",
                                tooltip="File name in models/loras (one subfolder allowed)."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of that name; off adds a counter suffix."),
                io.Int.Input("save_every", default=0, min=0, max=100000,
                             tooltip="Also save the LoRA and resume state every N steps (0 = only at the end)."),
                io.Int.Input("preview_every", default=0, min=0, max=100000,
                             tooltip="Show a small no-CFG sample in the node every N steps (0 = off)."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The model's text encoder (from its loader): encodes the captions. SD1.x/"
                                      "SD2.x train unconditionally without it; other families need it or a "
                                      "conditioning."),
                io.Combo.Input("resume_from", options=resumable_loras(), default=NONE, optional=True,
                               tooltip="Continue a saved run (LoRA + its .selfperc_state: optimizer, step, RNG). "
                                       "Pickle files are never loaded."),
                io.Boolean.Input("batched_frozen", default=TrainSettings.batched_frozen, optional=True,
                                 tooltip="Run the two frozen passes as one batch (faster on some GPUs)."),
                io.String.Input("dataset_path", default="", optional=True,
                                tooltip="Absolute dataset folder; only if the server owner set "
                                        f"{files.ALLOW_ANY_DATASET_PATH}=1."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="Used for images without a caption (and for all images when no "
                                              "CLIP is connected), e.g. CLIPTextEncode with an empty text for "
                                              "unconditional training."),
                io.Float.Input("tap_depth", default=taps.DEFAULT_DEPTH, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Transformers (Flux, SD3, Qwen-Image, Wan, ...): which block is the "
                                       "perceptual layer, as a fraction of the block stack (0.5: the middle "
                                       "block). UNets ignore it."),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="adamw", optional=True,
                               tooltip="adamw (no weight decay), adam, sgd or rmsprop, with torch's defaults."),
                io.Combo.Input("lr_schedule", options=list(LR_SCHEDULES), default="constant", optional=True,
                               tooltip="Learning rate after the warm-up: constant, cosine (to 0 at the last step) "
                                       "or linear (to 0)."),
                io.Int.Input("warmup_steps", default=0, min=0, max=100000, optional=True,
                             tooltip="Linear learning-rate warm-up over the first N steps."),
                io.Int.Input("gradient_accumulation", default=1, min=1, max=256, optional=True,
                             tooltip="Micro-batches of batch_size per optimizer step: k x batch_size images a step "
                                     "for the memory of one batch (exactly a k-times larger batch)."),
                io.Float.Input("ema_decay", default=0.0, min=0.0, max=0.99999, step=0.0001, optional=True,
                               tooltip="EMA of the LoRA weights after every step (the paper: 0.9995); 0 = off."),
                io.Combo.Input("save_weights", options=list(SAVE_WEIGHTS), default="raw", optional=True,
                               tooltip="With EMA on: raw (the trained weights), ema (the EMA in the LoRA file), or "
                                       "raw+ema (the EMA also as <name>_ema.safetensors)."),
                io.Combo.Input("algorithm", options=list(lora.ALGORITHMS), default="LoRA", optional=True,
                               tooltip="The adapter (comfy.weight_adapter, as core Train LoRA): LoRA (fast path: "
                                       "runs beside each layer), LoHa, LoKr or OFT (exact, a weight-sized product "
                                       "per layer per pass). Core loaders load each."),
                io.Combo.Input("lora_dtype", options=list(LORA_DTYPES), default="fp32", optional=True,
                               tooltip="The adapter's own weights (and the optimizer's moments): fp32, or bf16 for "
                                       "half their memory. The base model keeps its stored dtype either way."),
                io.Combo.Input("save_format", options=list(SAVE_FORMATS), default="comfyui", optional=True,
                               tooltip="comfyui: ComfyUI's own keys; kohya: the layout A1111, Forge and diffusers "
                                       "load (lora_unet_..., diffusers names for UNets). Core loaders read both."),
                io.Combo.Input("init_lora", options=[NONE] + folder_paths.get_filename_list("loras"), default=NONE,
                               optional=True,
                               tooltip="Start from this LoRA (ComfyUI, kohya, diffusers or peft keys; .safetensors "
                                       "only): its layers keep its rank and alpha, the others start fresh."),
                io.String.Input("sample_prompts", default="", multiline=True, optional=True,
                                tooltip=f"Up to {MAX_SAMPLE_PROMPTS} prompts, one per line: every sample_every steps a "
                                        "no-CFG sample of each (same noise) is saved to output/selfperc_samples and "
                                        "shown in the node. Needs the CLIP input."),
                io.Int.Input("sample_every", default=0, min=0, max=100000, optional=True,
                             tooltip="Steps between sample grids of sample_prompts (0 = only at the end)."),
                io.Float.Input("validation_split", default=0.0, min=0.0, max=0.5, step=0.01, optional=True,
                               tooltip="Fraction of the images held out (not trained on): their self-perceptual and "
                                       "MSE losses at fixed noise are plotted with the training loss."),
                io.Int.Input("validation_every", default=0, min=0, max=100000, optional=True,
                             tooltip="Steps between validation passes (0 = at the start and the end only)."),
                io.Float.Input("guidance", default=conditioning.DEFAULT_GUIDANCE, min=0.0, max=100.0, step=0.1,
                               optional=True,
                               tooltip="Distilled guidance for guidance-distilled models (Flux-dev, Flux.2, Chroma, "
                                       "HunyuanImage) while training, as FluxGuidance sets it. 0 = leave the "
                                       "conditioning's own value or the model's default."),
                io.Float.Input("perceptual_weight", default=1.0, min=0.0, max=100.0, step=0.01, optional=True,
                               tooltip="Weight of the self-perceptual loss (1 = the paper). 0 with mse_weight 1 "
                                       "trains the same LoRA with plain MSE (in mse_space): the baseline to "
                                       "compare against in Self-Perceptual Evaluate."),
                io.Combo.Input("mse_space", options=list(MSE_SPACES), default="native", optional=True,
                               tooltip="Space of the MSE term (mse_weight, and the perceptual_weight 0 baseline): "
                                       "native = the loss the model was trained with (eps-MSE for eps models, "
                                       "v-MSE for v models, velocity-MSE for flow models); x0 = the error of the "
                                       "clean-image estimate (core Train LoRA's loss), which weights the noise "
                                       "levels differently."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The base model with the trained LoRA applied."),
                io.Custom("LORA_MODEL").Output(display_name="lora", tooltip="LoRA weights (core LoRA nodes accept them)."),
                io.Custom("LOSS_MAP").Output(display_name="loss_map", tooltip="Loss per step (core Plot Loss Graph)."),
                io.String.Output(display_name="lora_file", tooltip="The saved file's name in models/loras."),
                io.Image.Output(display_name="loss_curve",
                                tooltip="Training loss (raw and smoothed) and the validation losses."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, vae, dataset_folder, clip=None, conditioning=None, **inputs):
        job = cls._job(model, clip, conditioning, dataset_folder, inputs)
        ds = load_dataset(job.folder, inputs["resolution"], inputs["resize_mode"], max_cache_bytes=cache_budget())
        for s in ds.skipped:
            log.warning("selfperc: skipped %s: %s", s.path, s.reason)
        for s in ds.notes:
            log.warning("selfperc: %s: %s", s.path, s.reason)
        log.info("selfperc: %d images from %s (%d skipped)", len(ds.images), job.folder, len(ds.skipped))
        with torch.inference_mode(False):
            return cls._train(model, vae, clip, ds, job)

    @classmethod
    def _job(cls, model, clip, cond, dataset_folder, i: dict) -> Job:
        """The run's settings, every one checked before any training work (a refusal may come after the LoRA's
        folder was created or a resume/init file was read, never after a model or dataset was touched)."""
        settings = TrainSettings(steps=i["steps"], learning_rate=i["learning_rate"], batch_size=i["batch_size"],
                                 seed=i["seed"], t_prime=i["t_prime"], t_prime_range=(i["t_prime_min"],
                                                                                     i["t_prime_max"]),
                                 distance=i["distance"], normalize=i["normalize_features"],
                                 mse_weight=i["mse_weight"], perceptual_weight=i.get("perceptual_weight", 1.0),
                                 mse_space=i.get("mse_space", "native"),
                                 batched_frozen=i.get("batched_frozen", TrainSettings.batched_frozen),
                                 optimizer=i.get("optimizer", "adamw"), lr_schedule=i.get("lr_schedule", "constant"),
                                 warmup_steps=i.get("warmup_steps", 0), ema_decay=i.get("ema_decay", 0.0))
        if not settings.perceptual_weight and not settings.mse_weight:
            raise ValueError("perceptual_weight and mse_weight are both 0: nothing to train (perceptual_weight 0 "
                             "with mse_weight 1 is the plain-MSE baseline)")
        if i["t_prime_max"] - i["t_prime_min"] < 0.01:
            raise ValueError(f"t_prime_min {i['t_prime_min']} must be below t_prime_max {i['t_prime_max']}")
        check_sizes(i["batch_size"], i["resolution"])
        accumulation = i.get("gradient_accumulation", 1)
        save_weights = i.get("save_weights", "raw")
        if save_weights != "raw" and not settings.ema_decay:
            raise ValueError(f"save_weights {save_weights!r} needs an EMA: set ema_decay (e.g. 0.9995)")
        depth = i.get("tap_depth", taps.DEFAULT_DEPTH)
        taps.tap_point(model.model.diffusion_model, i["feature_layer"], depth)  # unsupported model or layer
        fallback = cond
        if fallback is None and clip is None:
            fallback = conditioning.empty_conditioning(model)  # refuses families that need their text encoder
        job = Job(settings, i["rank"], i["alpha"], i["feature_layer"], depth, i["gradient_checkpointing"],
                  training_dtype(i["training_dtype"], bridge.device()),
                  files.lora_path(i["lora_name"], i["overwrite"]), i["save_every"], i["preview_every"],
                  files.resolve_dataset(dataset_folder, i.get("dataset_path") or ""),
                  i.get("guidance", conditioning.DEFAULT_GUIDANCE), fallback, accumulation, save_weights,
                  i.get("save_format", "comfyui"), algorithm=i.get("algorithm", "LoRA"),
                  lora_dtype=LORA_DTYPES[i.get("lora_dtype", "fp32")])
        resume_from = i.get("resume_from") or NONE
        if resume_from != NONE:
            with torch.inference_mode(False):  # the optimizer updates these tensors in place
                job.resume_weights, job.resume_state = files.load_resume(
                    Path(folder_paths.get_full_path_or_raise("loras", resume_from)))
            job.resume_name = resume_from
        init = i.get("init_lora") or NONE
        if init != NONE:
            if job.resume_weights is not None:
                raise ValueError("choose resume_from or init_lora, not both")
            if job.algorithm != "LoRA":
                raise ValueError(f"init_lora starts a LoRA; it cannot start a {job.algorithm}")
            job.start = lora.read_any_lora(model, files.read_lora_file(init), init)
        prompts = [p.strip() for p in (i.get("sample_prompts") or "").splitlines() if p.strip()]
        if len(prompts) > MAX_SAMPLE_PROMPTS or any(len(p) > MAX_CAPTION_CHARS for p in prompts):
            raise ValueError(f"sample_prompts: at most {MAX_SAMPLE_PROMPTS} lines of at most {MAX_CAPTION_CHARS} "
                             f"characters (got {len(prompts)} lines)")
        if prompts and clip is None:
            raise ValueError("sample_prompts need the CLIP input to encode them")
        job.sample_prompts, job.sample_every = prompts, i.get("sample_every", 0)
        job.validation_split, job.validation_every = i.get("validation_split", 0.0), i.get("validation_every", 0)
        return job

    @classmethod
    def _train(cls, model, vae, clip, ds, job: Job):
        latents = encode_latents(model, vae, ds.images)
        guided: dict[int, list] = {}  # one guided conditioning per distinct caption: model inputs are cached by it
        prompts = [guided.setdefault(id(p), conditioning.with_guidance(p, job.guidance))
                   for p in caption_conditionings(clip, ds.captions, job.fallback)]
        ds.images = []  # encoded: the decoded images are not needed any more
        held = held_out(len(latents), job.validation_split, job.settings.seed)
        if held:
            log.info("selfperc: %d of %d images held out for validation", len(held), len(latents))
        samples = [(p, conditioning.with_guidance(clip.encode_from_tokens_scheduled(clip.tokenize(p)), job.guidance))
                   for p in job.sample_prompts]
        with training_session(model, job.rank, job.alpha, job.settings.seed, job.layer, job.checkpointing,
                              job.resume_weights, depth=job.depth, latent_shape=tuple(latents[0].shape), start=job.start,
                              algorithm=job.algorithm, lora_dtype=job.lora_dtype,
                              batch=job.settings.batch_size) as ses:
            cache, conds = {}, []
            for p, lat in zip(prompts, latents):  # the model's inputs per (prompt, image shape), built once
                key = (id(p), tuple(lat.shape))
                if key not in cache:
                    cache[key] = conditioning.model_inputs(ses.mp, p, tuple(lat.shape), job.settings.seed)
                conds.append(cache[key])
            train_idx = [i for i in range(len(latents)) if i not in held]
            trainer = Trainer(ses.params, [latents[i] for i in train_idx], [conds[i] for i in train_idx], ses.host,
                              job.settings, device=bridge.device(), accumulation=job.accumulation)
            validation = ([latents[i] for i in held], [conds[i] for i in held]) if held else None
            if job.resume_state is not None:
                try:
                    trainer.load_state_dict(job.resume_state["trainer"])
                except (KeyError, TypeError, ValueError, RuntimeError) as e:
                    raise files.StateFileError(f"the resume state of {job.resume_name} does not match this run "
                                               f"({e}); resume with the settings the run was started with") from None
            return cls._loop(model, vae, ses, trainer, job, latents[0].shape, prompts[0], len(latents), validation,
                             samples)

    @classmethod
    def _loop(cls, model, vae, ses, trainer, job: Job, preview_shape, preview_prompt, n_images, validation=None,
              samples=()):
        settings, dtype, device = job.settings, job.dtype, bridge.device()
        start = trainer.step_count
        total = start + settings.steps
        settings.total_steps = total  # the learning-rate schedule's horizon, a resumed run's steps included
        meta = cls._metadata(model, ses, job, n_images)
        pbar = comfy.utils.ProgressBar(total, node_id=cls.hidden.unique_id)
        pbar.update_absolute(start, total)
        bar = tqdm(total=total, initial=start, desc="Self-perceptual fine-tune",
                   disable=not comfy.utils.PROGRESS_BAR_ENABLED)
        last_saved = None
        history: list[tuple[int, float, float]] = []  # (step, self-perceptual, MSE) on the held-out images
        shown: list[dict] = []                        # sample grids saved, for the node's UI

        def validate():
            if validation is not None:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    sp, mse = trainer.validate(*validation, seed=settings.seed + 1)
                history.append((trainer.step_count, sp, mse))
                log.info("selfperc: validation at step %d: self-perceptual %.5f, mse %.5f", *history[-1])

        def sample():
            if samples:
                grid = preview.prompt_grid(ses.mp, vae, preview_shape, samples, settings.seed)
                shown.append(cls._save_samples(job, grid, trainer.step_count))
        validate()
        t0 = time.time()
        try:
            for _ in range(start, total):
                comfy.model_management.throw_exception_if_processing_interrupted()
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    parts = trainer.step()
                step = trainer.step_count
                img = None
                if job.preview_every and step % job.preview_every == 0:
                    img = preview.preview_image(ses.mp, vae, preview_shape, preview_prompt, settings.seed)
                pbar.update_absolute(step, total, img)
                text = f"step {step}/{total}  loss {parts.loss.item():.5f}  (mse {parts.mse.item():.4f})"
                preview.send_text(text, cls.hidden.unique_id)
                bar.set_postfix(loss=f"{parts.loss.item():.5f}")
                bar.update(1)
                if job.validation_every and step % job.validation_every == 0 and step < total:
                    validate()
                if job.sample_every and step % job.sample_every == 0 and step < total:
                    sample()
                if job.save_every and step % job.save_every == 0 and step < total:
                    last_saved = cls._save(job, ses, trainer, meta)
        except NonFiniteLoss as e:
            where = f"; the last finite checkpoint is {last_saved.name}" if last_saved else ""
            raise FloatingPointError(f"{e}{where}") from None
        except comfy.model_management.OOM_EXCEPTION as e:
            raise MemoryError(f"out of memory while training ({e}); lower batch_size ({settings.batch_size}) or "
                              f"resolution, or turn on gradient_checkpointing") from None
        finally:
            bar.close()
        log.info("selfperc: %d steps in %.1fs", settings.steps, time.time() - t0)
        validate()
        sample()
        if history:
            meta = dict(meta, validation=[{"step": s, "self_perceptual": sp, "mse": m} for s, sp, m in history])
        cls._save(job, ses, trainer, meta)
        use_ema = job.save_weights == "ema"
        lora_sd = lora.lora_state_dict(ses.adapters, weights=trainer.ema_params() if use_ema else None)
        out_model, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0)
        name = job.out_file.relative_to(Path(folder_paths.get_folder_paths("loras")[0]).resolve()).as_posix()
        curve = plots.loss_curve_image(trainer.losses, history)
        text = f"saved {name} ({trainer.step_count} steps, final loss {trainer.losses[-1]:.5f})"
        if history:
            text += f"; validation self-perceptual {history[0][1]:.5f} -> {history[-1][1]:.5f}"
        ui = {"text": [text]}
        if shown:
            ui["images"] = shown
        return io.NodeOutput(out_model, lora_sd, {"loss": list(trainer.losses)}, name, curve, ui=ui)

    @staticmethod
    def _save_samples(job: Job, grid: torch.Tensor, step: int) -> dict:
        """The sample grid as output/selfperc_samples/<lora name>/step_NNNNNN.png (written atomically)."""
        from PIL import Image

        sub = Path("selfperc_samples") / job.out_file.stem
        path = Path(folder_paths.get_output_directory()) / sub / f"step_{step:06d}.png"
        arr = (grid[0].clamp(0, 1).numpy() * 255).round().astype("uint8")
        files.save_image_png(path, Image.fromarray(arr))
        return {"filename": path.name, "subfolder": sub.as_posix(), "type": "output"}

    @staticmethod
    def _metadata(model, ses, job: Job, n_images: int) -> dict:
        return {"selfperc_version": "0.2.0", "selfperc_objective": "self-perceptual (Lin & Yang 2024)",
                "base_model_hash": model_fingerprint(model),
                "base_model_type": type(model.model.model_config).__name__,
                "parameterization": ses.host.parameterization, "mse_space": job.settings.mse_space,
                "feature_layer": job.layer, "tap": ses.tap_name,
                "rank": job.rank, "alpha": job.alpha, "training_dtype": str(job.dtype).replace("torch.", ""),
                "dataset": job.folder.name, "dataset_images": n_images, "guidance": job.guidance,
                "gradient_accumulation": job.accumulation, "algorithm": job.algorithm,
                "lora_dtype": str(job.lora_dtype).replace("torch.", ""),
                "settings": job.settings.as_dict() | {"t_range": ses.host.t_range}}

    @staticmethod
    def _save(job: Job, ses, trainer, meta: dict) -> Path:
        """The LoRA file (raw or EMA weights, ComfyUI or kohya keys, as chosen), the EMA beside it for raw+ema,
        and the resume state (which keeps the raw weights whenever the LoRA file holds something else)."""
        meta = dict(meta, steps=trainer.step_count, format=job.save_format)
        raw = lora.lora_state_dict(ses.adapters)
        ema = lora.lora_state_dict(ses.adapters, weights=trainer.ema_params()) if trainer.ema is not None else None

        def layout(sd):
            return lora.kohya_state_dict(ses.mp, sd) if job.save_format == "kohya" else sd
        state = {"trainer": trainer.state_dict(), "metadata": meta}
        if job.save_weights == "ema" or job.save_format != "comfyui":
            state["raw_weights"] = raw
        if job.save_weights == "raw+ema":
            files.save_lora(files.ema_path(job.out_file), layout(ema), dict(meta, weights="ema"))
        use_ema = job.save_weights == "ema"
        path = files.save_lora(job.out_file, layout(ema if use_ema else raw), dict(meta, weights="ema" if use_ema
                                                                                   else "raw"))
        # the state after the LoRA: a run stopped in between leaves an older state, which load_resume refuses
        files.save_state(files.state_path(job.out_file), state)
        return path
