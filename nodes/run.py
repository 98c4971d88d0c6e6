"""One fine-tune run of the node: the plan (every input resolved and checked before any model or dataset is touched)
and the run itself (latents, conditionings, the training session, the core's loop with ComfyUI's progress, Cancel,
previews, validation and samples around it, and the files)."""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
import torch
from tqdm.auto import tqdm

from ..selfperc_core import run_log
from ..selfperc_core.dataset import load_dataset, mask_at, repeated, with_prefix
from ..selfperc_core.loop import Hooks, NonFiniteLoss, SampleExtras, Trainer, TrainSettings, fit, pick_fresh
from . import bridge, data, diffusion_clip, families, files, inputs, latent_cache, lora, plots, preview, saving
from . import super_resolution as sr_task
from .host_compat import is_oom
from .session import SessionSpec, training_session
from .settings import NONE, FineTuneSettings

log = logging.getLogger("selfperc")
TORCH_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def training_dtype(choice: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that supports it, fp32 otherwise (CPU)."""
    if choice != "auto":
        return TORCH_DTYPES[choice]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@dataclass(frozen=True)
class RunPlan:
    """A fine-tune, resolved: the settings and what they point to."""
    settings: FineTuneSettings
    train_settings: TrainSettings          # the core's, with the schedule's horizon (a resumed run's steps included)
    folder: Path                           # the dataset
    out_file: Path                         # the LoRA file in models/loras
    dtype: torch.dtype                     # the training compute dtype
    fallback: list | None                  # conditioning for images without a caption
    start: dict | None = None              # init_lora's weights in this pack's keys
    resume_name: str | None = None
    resume_weights: dict | None = None
    resume_state: dict | None = None       # the Trainer's state to continue
    regularization: Path | None = None     # the prior-preservation images' folder

    @property
    def start_step(self) -> int:
        return int(self.resume_state["step"]) if self.resume_state is not None else 0

    def session_spec(self, latent_shape: tuple) -> SessionSpec:
        s = self.settings
        return SessionSpec(rank=s.rank, alpha=s.lora.alpha, seed=s.seed, algorithm=s.lora.algorithm,
                           lora_dtype=TORCH_DTYPES[s.lora.lora_dtype], layer=s.objective.feature_layer,
                           depth=s.objective.tap_depth, checkpointing=s.training.gradient_checkpointing,
                           latent_shape=latent_shape, batch=s.batch_size,
                           weights_on_device_gb=s.training.weights_on_device_gb)


def plan_run(settings: FineTuneSettings, model, clip, conditioning, dataset_folder: str, vae=None) -> RunPlan:
    """Every check before any training work (a refusal may come after the LoRA's folder was created or a resume /
    init file was read, never after a model or dataset was touched); ``vae``: for the checks that need it."""
    s = settings.validate()
    sr = s.objective.super_resolution
    if sr is not None:
        sr_task.check_model(sr, model)
        if vae is not None:
            sr_task.check_resolution(s.resolution, sr_task.factor_of(vae))
            sr_task.check_vae(vae, model)
    families.tap_point(model.model.diffusion_model, s.objective.feature_layer, s.objective.tap_depth)  # supported?
    if s.monitoring.prompts and clip is None:
        raise ValueError("sample_prompts need the CLIP input to encode them")
    if s.monitoring.tensorboard:
        run_log.check_available()
    if s.training.cache_latents_to_disk:
        latent_cache.size_bound()  # a bad SELFPERC_LATENT_CACHE_GB is refused before work
    kind = bridge.parameterization(bridge.model_sampling(model))
    if s.objective.min_snr_gamma and kind not in ("eps", "v"):
        raise ValueError(f"min_snr_gamma is for eps and v models; this model is {kind!r} (use t_law / t_shift)")
    for name in ("caption_prefix", "caption_dropout", "shuffle_tags"):
        if getattr(s.training, name) and clip is None:
            raise ValueError(f"{name} needs the CLIP input (it changes the captions the text encoder encodes)")
    direction = s.objective.direction
    if direction is not None:
        diffusion_clip.check(direction, model)
        if conditioning is not None:
            log.warning("selfperc: a direction is connected: the conditioning input is not used (every image is at "
                        "the direction's source text)")
    fallback = conditioning if direction is None else direction.source  # directional: every image at the source
    if fallback is None and clip is None:
        fallback = families.empty_conditioning(model)  # refuses families that need their text encoder
    resume = {}
    if s.lora.resume_from != NONE:
        path = Path(folder_paths.get_full_path_or_raise("loras", s.lora.resume_from))
        with torch.inference_mode(False):  # the optimizer updates these tensors in place
            weights, state = saving.load_resume(path)
        meta = saving.lora_metadata(path)
        diffusion_clip.check_resume(meta, direction, s.lora.resume_from)
        sr_task.check_resume(meta, sr, s.lora.resume_from)
        resume = dict(resume_name=s.lora.resume_from, resume_weights=weights, resume_state=state)
    start = None
    if s.lora.init_lora != NONE:
        start = lora.read_any_lora(model, files.read_lora_file(s.lora.init_lora), s.lora.init_lora)
    first = int(resume["resume_state"]["step"]) if resume else 0
    return RunPlan(settings=s, train_settings=s.train_settings(total_steps=first + s.steps).validate(),
                   folder=files.resolve_dataset(dataset_folder, s.training.dataset_path),
                   out_file=files.lora_path(s.lora_name, s.lora.overwrite),
                   dtype=training_dtype(s.training.training_dtype, bridge.device()), fallback=fallback, start=start,
                   regularization=None if s.training.regularization_folder == NONE else
                   files.resolve_dataset(s.training.regularization_folder, ""), **resume)


def tensorboard_folder(plan: RunPlan) -> Path:
    """output/selfperc_tensorboard/<the LoRA's path under models/loras, without its suffix>."""
    rel = plan.out_file.relative_to(Path(folder_paths.get_folder_paths("loras")[0]).resolve()).with_suffix("")
    return Path(folder_paths.get_output_directory()) / "selfperc_tensorboard" / rel


def read_dataset(plan: RunPlan) -> tuple:
    """(the dataset with the regularization images after its own, how many of those there are)."""
    t = plan.settings.training
    read = functools.partial(load_dataset, resolution=plan.settings.resolution, mode=t.resize_mode,
                             max_cache_bytes=data.cache_budget(), repeat_folders=t.repeat_folders,
                             no_upscale=plan.settings.objective.super_resolution is not None, masks=t.masked_loss)
    ds = read(plan.folder)
    n_reg = 0
    if plan.regularization is not None:
        reg = read(plan.regularization)
        ds.extend(reg)
        n_reg = len(reg.images)
        log.info("selfperc: %d regularization images from %s", n_reg, plan.regularization)
    if any(r > 1 for r in ds.repeats):
        log.info("selfperc: repeat folders: %d images make %d samples", len(ds.repeats), sum(ds.repeats))
    for s in ds.skipped:
        log.warning("selfperc: skipped %s: %s", s.path, s.reason)
    for s in ds.notes:
        log.warning("selfperc: %s: %s", s.path, s.reason)
    log.info("selfperc: %d images from %s (%d skipped)", len(ds.images) - n_reg, plan.folder, len(ds.skipped))
    return ds, n_reg


@dataclass
class Prepared:
    """A run's data, ready for its session: latents, per-image prompts (one CONDITIONING object per caption) and
    the sample prompts' conditionings."""
    latents: list[torch.Tensor]
    prompts: list[list]
    samples: list[tuple[str, list]]
    held: list[int]
    empty: list | None = None  # the empty caption's conditioning, for caption_dropout
    repeats: list[int] | None = None  # per image, from N_name folders (None: once each)
    lows: list[torch.Tensor] | None = None  # super-resolution: each image's clean low-res condition
    factor: int = 0                          # super-resolution: the VAE's (and so the upscaler's) factor
    masks: list | None = None                # masked_loss: per image, its mask at the latent's size, or None
    weights: list[float] | None = None       # per image, its loss weight (regularization images')
    variants: list[list] | None = None       # shuffle_tags: per image, its captions' CONDITIONINGs (None: its own)
    n_data: int = 0                          # the dataset's own images (the regularization images follow)

    @property
    def preview(self) -> list:
        """The progress previews' conditioning: the first image's (an upscaler's: with its low-res image)."""
        return self.prompts[0] if self.lows is None else sr_task.with_low_res(self.prompts[0], self.lows[0][None])


def prepare(plan: RunPlan, model, vae, clip, ds, n_reg: int = 0) -> Prepared:
    """Everything a run needs from its images before its session (``n_reg``: the last images are regularization
    images: no caption prefix, never held out, weighted)."""
    cache = latent_cache.LatentCache(vae) if plan.settings.training.cache_latents_to_disk else None
    lows, factor = None, 0
    if plan.settings.objective.super_resolution is not None:  # before encoding: a bad size is refused first
        factor = sr_task.factor_of(vae)
        lows = sr_task.low_res_images(ds.images, factor, ds.files)
    latents = data.encode_latents(model, vae, ds.images, cache)
    guidance = plan.settings.objective.guidance
    guided: dict[int, list] = {}  # one guided conditioning per distinct caption: model inputs are cached by it
    t, n_data = plan.settings.training, len(ds.images) - n_reg
    captions = with_prefix(ds.captions[:n_data], t.caption_prefix) + ds.captions[n_data:]
    if plan.settings.objective.direction is not None:
        if any(c for c in captions):
            log.warning("selfperc: a direction is connected: the captions of %d images are not used (every image is "
                        "at the direction's source text)", sum(1 for c in captions if c))
        captions = [None] * len(captions)
    prompts = [guided.setdefault(id(p), inputs.with_guidance(p, guidance))
               for p in data.caption_conditionings(clip, captions, plan.fallback)]
    variants = None
    if t.shuffle_tags:
        variants = data.shuffled_conditionings(clip, ds.captions, n_data, t, plan.settings.seed, guidance)
    masks = [mask_at(m, tuple(lat.shape)) for m, lat in zip(ds.masks, latents)] if t.masked_loss else None
    ds.images = []  # encoded: the decoded images are not needed any more
    held = data.held_out(n_data, plan.settings.monitoring.validation_split, plan.settings.seed)
    if held:
        log.info("selfperc: %d of %d images held out for validation", len(held), len(latents))
    samples = [(p, inputs.with_guidance(clip.encode_from_tokens_scheduled(clip.tokenize(p)), guidance))
               for p in plan.settings.monitoring.prompts]
    if lows is not None:  # an upscaler's sample prompts upscale the first image
        samples = [(p, sr_task.with_low_res(c, lows[0][None])) for p, c in samples]
    empty = None
    if plan.settings.training.caption_dropout:
        empty = inputs.with_guidance(clip.encode_from_tokens_scheduled(clip.tokenize("")), guidance)
    weights = [1.0] * n_data + [t.regularization_weight] * n_reg if n_reg else None
    return Prepared(latents, prompts, samples, held, empty, list(ds.repeats) or None, lows, factor, masks, weights,
                    variants, n_data)


def model_inputs_per_image(ses, prep: Prepared, seed: int, prompts: list | None = None) -> list[dict]:
    """The model's inputs per (prompt, image shape), built once each (``prompts``: instead of each image's own)."""
    cache, conds = {}, []
    for p, lat in zip(prompts or prep.prompts, prep.latents):
        key = (id(p), tuple(lat.shape))
        if key not in cache:
            cache[key] = inputs.model_inputs(ses.mp, p, tuple(lat.shape), seed)
        conds.append(cache[key])
    return conds


def autocast(dtype: torch.dtype):
    return torch.autocast(bridge.device().type, dtype=dtype, enabled=dtype != torch.float32)


@contextlib.contextmanager
def objective_mode(plan: RunPlan, ses, prep: Prepared, vae):
    """None for the self-perceptual fine-tune; for a directional one (DiffusionCLIP), its (objective, view, per-image
    inputs), ready for the whole run."""
    o = plan.settings.objective
    if o.direction is None:
        yield None
        return
    with diffusion_clip.prepared(o.direction, ses, prep.latents, vae, diffusion_clip.config_of(o, o.direction),
                                 plan.settings.seed, o.mse_space == "native", lambda: autocast(plan.dtype),
                                 o.guidance) as mode:
        yield mode


def make_trainer(plan: RunPlan, ses, prep: Prepared, mode=None) -> tuple[Trainer, tuple | None]:
    """The core's Trainer on the training images (and the held-out ones for validation), resumed if asked; ``mode``
    (objective_mode's) replaces the objective, the view and the per-image inputs."""
    objective, view, conds = mode if mode is not None else (None, ses.view, model_inputs_per_image(
        ses, prep, plan.settings.seed))
    train_idx = [i for i in range(len(prep.latents)) if i not in prep.held]
    if prep.repeats is not None:  # kohya's N_name folders: an image N times (references, no copies)
        train_idx = repeated(train_idx, prep.repeats)
    empty = None
    if prep.empty is not None:
        empty = model_inputs_per_image(ses, prep, plan.settings.seed, [prep.empty] * len(prep.latents))
        if plan.settings.batch_size > 1:  # a dropped sample is batched with others: find out now, not mid-run
            for i in dict.fromkeys(train_idx):
                try:
                    ses.view.collate([conds[i], empty[i]])
                except ValueError as e:
                    raise ValueError(f"caption_dropout with batch_size {plan.settings.batch_size}: the empty caption "
                                     f"cannot be batched with image {i + 1}'s caption ({e}); use batch_size 1") from None
        empty = [empty[i] for i in train_idx]
    condition, validation_conds = fresh_conditions(plan, ses, prep, conds, train_idx, empty)
    masks = [prep.masks[i] for i in train_idx] if prep.masks is not None else None
    weights = [prep.weights[i] for i in train_idx] if prep.weights is not None else None
    trainer = Trainer(ses.params, [prep.latents[i] for i in train_idx], [conds[i] for i in train_idx], view,
                      plan.train_settings, device=bridge.device(), objective=objective,
                      conditions=SampleExtras(empty, condition, masks, weights))
    if plan.resume_state is not None:
        try:
            trainer.load_state_dict(plan.resume_state)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise files.StateFileError(f"the resume state of {plan.resume_name} does not match this run ({e}); "
                                       "resume with the settings the run was started with") from None
    validation = None
    if prep.held:
        validation = ([prep.latents[i] for i in prep.held], validation_conds,
                      [prep.masks[i] for i in prep.held] if prep.masks is not None else None)
    return trainer, validation


def fresh_conditions(plan: RunPlan, ses, prep: Prepared, conds: list, train_idx: list[int], empty: list | None):
    """The Trainer's per-step conditioning (SampleExtras.fresh: a shuffled caption's, then an upscaler's degraded
    low-res image; trainer index k is image train_idx[k]) or None, and the held-out images' conditionings."""
    steps, validation = [], [conds[i] for i in prep.held]
    if prep.variants is not None:
        per_image = [None if v is None else [inputs.model_inputs(ses.mp, c, tuple(prep.latents[i].shape),
                                                                  plan.settings.seed) for c in v]
                     for i, v in enumerate(prep.variants)]

        steps.append(pick_fresh([per_image[i] for i in train_idx], empty))
    sr = plan.settings.objective.super_resolution
    if sr is not None:
        every = sr_task.condition_fn(ses.mp, prep.lows, [tuple(lat.shape) for lat in prep.latents], sr)
        steps.append(lambda k, c, seed: every(train_idx[k], c, seed))
        validation = sr_task.fixed_conditions(every, conds, prep.held, (plan.settings.seed + 1) % 2 ** 64)
    if not steps:
        return None, validation

    def fresh(k, c, seed):
        for step in steps:
            c = step(k, c, seed)
        return c
    return fresh, validation


class FineTuneRun:
    """The run of one plan inside its session: the core's loop with ComfyUI around it."""

    def __init__(self, plan: RunPlan, model, vae, ses, trainer: Trainer, prep: Prepared, validation, node_id):
        self.plan, self.model, self.vae, self.ses, self.trainer = plan, model, vae, ses, trainer
        self.prep, self.validation, self.node_id = prep, validation, node_id
        self.meta = saving.metadata(model, ses, plan, prep.n_data)
        self.meta["dataset_samples"] = len(trainer.latents)  # with repeats, and without the held-out images
        t = plan.settings.training
        self.meta.update(masked_loss=t.masked_loss, shuffle_tags=t.shuffle_tags, keep_first_tags=t.keep_first_tags)
        if plan.regularization is not None:
            self.meta.update(regularization_folder=plan.regularization.name,
                             regularization_images=len(prep.latents) - prep.n_data,
                             regularization_weight=t.regularization_weight)
        if plan.settings.objective.direction is not None:
            self.meta.update(diffusion_clip.metadata(plan.settings.objective.direction))
        if plan.settings.objective.super_resolution is not None:
            self.meta.update(sr_task.metadata(plan.settings.objective.super_resolution, prep.factor))
        self.history: list[tuple[int, float, float]] = []  # (step, self-perceptual, MSE) on the held-out images
        self.shown: list[dict] = []                         # sample grids saved, for the node's UI
        self.total = plan.start_step + plan.settings.steps
        self.log = run_log.RunLog(tensorboard_folder(plan)) if plan.settings.monitoring.tensorboard else None

    def autocast(self):
        return autocast(self.plan.dtype)

    def validate(self) -> None:
        if self.validation is not None:
            with self.autocast():
                latents, conds, masks = self.validation
                sp, mse = self.trainer.validate(latents, conds, seed=(self.plan.settings.seed + 1) % 2 ** 64,
                                                masks=masks)
            self.history.append((self.trainer.step_count, sp, mse))
            log.info("selfperc: validation at step %d: self-perceptual %.5f, mse %.5f", *self.history[-1])
            if self.log is not None:
                self.log.validation(*self.history[-1])

    def sample(self) -> None:
        if self.prep.samples:
            grid = preview.prompt_grid(self.ses.mp, self.vae, self.prep.latents[0].shape, self.prep.samples,
                                       self.plan.settings.seed)
            self.shown.append(saving.save_samples(self.plan, grid, self.trainer.step_count))
            if self.log is not None:
                self.log.image("samples/prompts", self.trainer.step_count, grid[0])

    def save(self) -> Path:
        self.meta["tap"] = self.ses.tap_name  # a generic tap is named once its first read found it
        return saving.save_run(self.plan, self.ses, self.trainer, self.meta)

    def hooks(self, pbar, bar) -> Hooks:
        m, total = self.plan.settings.monitoring, self.total

        def after_step(step, parts):
            img = None
            if m.preview_every and step % m.preview_every == 0:
                img = preview.preview_image(self.ses.mp, self.vae, self.prep.latents[0].shape, self.prep.preview,
                                            self.plan.settings.seed)
            pbar.update_absolute(step, total, img)
            preview.send_text(f"step {step}/{total}  loss {parts.loss.item():.5f}  (mse {parts.mse.item():.4f})",
                              self.node_id)
            bar.set_postfix(loss=f"{parts.loss.item():.5f}")
            bar.update(1)
            if self.log is not None:
                self.log.step(step, parts, self.trainer.optimizer.param_groups[0]["lr"])
            if m.validation_every and step % m.validation_every == 0 and step < total:
                self.validate()
            if m.sample_every and step % m.sample_every == 0 and step < total:
                self.sample()
        return Hooks(before_step=comfy.model_management.throw_exception_if_processing_interrupted,
                     context=self.autocast, after_step=after_step,
                     save=lambda step: self.save() if step < total else None, on_error=self.error)

    def error(self, e: BaseException, last_saved):
        if isinstance(e, NonFiniteLoss):
            where = f"; the last finite checkpoint is {last_saved.name}" if last_saved else ""
            return FloatingPointError(f"{e}{where}")
        if is_oom(e):
            return MemoryError(f"out of memory while training ({e}); lower batch_size "
                               f"({self.plan.settings.batch_size}) or resolution, or turn on gradient_checkpointing")
        return None

    def train(self) -> None:
        try:
            self._train()
        finally:  # after the last validation and samples are logged, whatever happened
            if self.log is not None:
                self.log.close()

    def _train(self) -> None:
        start = self.trainer.step_count
        pbar = comfy.utils.ProgressBar(self.total, node_id=self.node_id)
        pbar.update_absolute(start, self.total)
        bar = tqdm(total=self.total, initial=start, desc="Self-perceptual fine-tune",
                   disable=not comfy.utils.PROGRESS_BAR_ENABLED)
        self.validate()
        t0 = time.time()
        try:
            fit(self.trainer, self.total, self.hooks(pbar, bar), self.plan.settings.lora.save_every)
        finally:
            bar.close()
        log.info("selfperc: %d steps in %.1fs", self.total - start, time.time() - t0)
        self.validate()
        self.sample()
        if self.history:
            self.meta = dict(self.meta, validation=[{"step": s, "self_perceptual": sp, "mse": m}
                                                    for s, sp, m in self.history])
        self.save()

    def outputs(self) -> tuple:
        """(model with the LoRA, LORA_MODEL, LOSS_MAP, file name, loss curve, UI)."""
        trainer, plan = self.trainer, self.plan
        use_ema = plan.settings.lora.save_weights == "ema"
        lora_sd = lora.lora_state_dict(self.ses.adapters, weights=trainer.ema_params() if use_ema else None)
        out_model, _ = comfy.sd.load_lora_for_models(self.model, None, lora_sd, 1.0, 0)
        name = plan.out_file.relative_to(Path(folder_paths.get_folder_paths("loras")[0]).resolve()).as_posix()
        curve = plots.loss_curve_image(trainer.losses, self.history)
        text = f"saved {name} ({trainer.step_count} steps, final loss {trainer.losses[-1]:.5f})"
        if self.history:
            text += f"; validation self-perceptual {self.history[0][1]:.5f} -> {self.history[-1][1]:.5f}"
        ui = {"text": [text]}
        if self.shown:
            ui["images"] = self.shown
        return out_model, lora_sd, {"loss": list(trainer.losses)}, name, curve, ui


def run_fine_tune(plan: RunPlan, model, vae, clip, node_id) -> tuple:
    """The whole run of a plan; returns FineTuneRun.outputs()."""
    ds, n_reg = read_dataset(plan)
    with torch.inference_mode(False):
        prep = prepare(plan, model, vae, clip, ds, n_reg)
        spec = plan.session_spec(tuple(prep.latents[0].shape))
        with training_session(model, spec, plan.resume_weights, plan.start) as ses, \
                objective_mode(plan, ses, prep, vae) as mode:
            trainer, validation = make_trainer(plan, ses, prep, mode)
            run = FineTuneRun(plan, model, vae, ses, trainer, prep, validation, node_id)
            run.train()
            return run.outputs()
