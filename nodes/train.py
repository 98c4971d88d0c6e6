"""Self-Perceptual Fine-Tune: a LoRA trained with the self-perceptual objective on a folder of images."""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io
from tqdm.auto import tqdm

from ..selfperc_core import T_PRIME_STRATEGIES
from ..selfperc_core.dataset import RESIZE_MODES, as_float, load_dataset
from ..selfperc_core.loop import NonFiniteLoss, Trainer, TrainSettings
from ..selfperc_core.objective import DISTANCES
from . import bridge, files, lora, preview
from .session import training_session

log = logging.getLogger("selfperc")
DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NONE = "[None]"
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
def encode_captions(clip, captions: list[str | None]) -> list[torch.Tensor | None]:
    """CLIP-encode each caption (missing caption -> empty prompt); no CLIP -> unconditional (None)."""
    if clip is None:
        return [None] * len(captions)
    cache, out = {}, []
    for cap in captions:
        key = cap or ""
        if key not in cache:
            cond = clip.encode_from_tokens_scheduled(clip.tokenize(key))
            cache[key] = cond[0][0].float().cpu()
        out.append(cache[key])
    return out


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
                io.Combo.Input("feature_layer", options=bridge.LAYER_CHOICES, default=bridge.MID_BLOCK,
                               tooltip="Layer of the frozen model whose features are compared (the paper's "
                                       "best: mid_block)."),
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
                              tooltip="Encodes captions. Without it training is unconditional."),
                io.Combo.Input("resume_from", options=resumable_loras(), default=NONE, optional=True,
                               tooltip="Continue a saved run (LoRA + its .selfperc_state: optimizer, step, RNG). "
                                       "Pickle files are never loaded."),
                io.Boolean.Input("batched_frozen", default=TrainSettings.batched_frozen, optional=True,
                                 tooltip="Run the two frozen passes as one batch (faster on some GPUs)."),
                io.String.Input("dataset_path", default="", optional=True,
                                tooltip="Absolute dataset folder; only if the server owner set "
                                        f"{files.ALLOW_ANY_DATASET_PATH}=1."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The base model with the trained LoRA applied."),
                io.Custom("LORA_MODEL").Output(display_name="lora", tooltip="LoRA weights (core LoRA nodes accept them)."),
                io.Custom("LOSS_MAP").Output(display_name="loss_map", tooltip="Loss per step (core Plot Loss Graph)."),
                io.String.Output(display_name="lora_file", tooltip="The saved file's name in models/loras."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, vae, dataset_folder, steps, learning_rate, rank, alpha, batch_size, resolution,
                resize_mode, seed, feature_layer, t_prime, t_prime_min, t_prime_max, distance,
                normalize_features, mse_weight, gradient_checkpointing, training_dtype, lora_name, overwrite,
                save_every, preview_every, clip=None, resume_from=NONE,
                batched_frozen=TrainSettings.batched_frozen, dataset_path=""):
        settings = TrainSettings(steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed,
                                 t_prime=t_prime, t_prime_range=(t_prime_min, t_prime_max), distance=distance,
                                 normalize=normalize_features, mse_weight=mse_weight, batched_frozen=batched_frozen)
        if t_prime_max - t_prime_min < 0.01:
            raise ValueError(f"t_prime_min {t_prime_min} must be below t_prime_max {t_prime_max}")
        check_sizes(batch_size, resolution)
        out_file = files.lora_path(lora_name, overwrite)  # refuse a bad name before any work
        existing, state = None, None
        if resume_from and resume_from != NONE:
            with torch.inference_mode(False):  # the optimizer updates these tensors in place
                existing, state = files.load_resume(Path(folder_paths.get_full_path_or_raise("loras", resume_from)))
        folder = files.resolve_dataset(dataset_folder, dataset_path or "")
        ds = load_dataset(folder, resolution, resize_mode, max_cache_bytes=cache_budget())
        for s in ds.skipped:
            log.warning("selfperc: skipped %s: %s", s.path, s.reason)
        for s in ds.notes:
            log.warning("selfperc: %s: %s", s.path, s.reason)
        log.info("selfperc: %d images from %s (%d skipped)", len(ds.images), folder, len(ds.skipped))

        with torch.inference_mode(False):
            return cls._train(model, vae, clip, ds, settings, feature_layer, rank, alpha, gradient_checkpointing,
                              training_dtype, out_file, save_every, preview_every, (existing, state, resume_from),
                              folder)

    @classmethod
    def _train(cls, model, vae, clip, ds, settings, feature_layer, rank, alpha, checkpointing, dtype_choice,
               out_file, save_every, preview_every, resume, folder):
        device = bridge.device()
        dtype = training_dtype(dtype_choice, device)
        latents = encode_latents(model, vae, ds.images)
        conds = encode_captions(clip, ds.captions)
        existing, state, resume_name = resume

        with training_session(model, rank, alpha, settings.seed, feature_layer, checkpointing, existing) as ses:
            return cls._loop(model, vae, ses, latents, conds, settings, feature_layer, rank, alpha, dtype, device,
                             out_file, save_every, preview_every, (state, resume_name), folder)

    @classmethod
    def _loop(cls, model, vae, ses, latents, conds, settings, feature_layer, rank, alpha, dtype, device, out_file,
              save_every, preview_every, resume, folder):
        ms = ses.model_sampling
        settings.t_range = bridge.default_t_range(ms)
        trainer = Trainer(ses.params, latents, conds, ses.predict_x0, ses.frozen_features, bridge.noise_scaling_fn(ms),
                          bridge.sigma_of_t_fn(ms), settings, device=device)
        state, resume_name = resume
        if state is not None:
            try:
                trainer.load_state_dict(state["trainer"])
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise files.StateFileError(f"the resume state of {resume_name} does not match this run ({e}); "
                                           "resume with the settings the run was started with") from None
        start = trainer.step_count
        total = start + settings.steps
        meta = cls._metadata(model, settings, feature_layer, rank, alpha, dtype, folder, ms, len(latents))
        pbar = comfy.utils.ProgressBar(total, node_id=cls.hidden.unique_id)
        pbar.update_absolute(start, total)
        bar = tqdm(total=total, initial=start, desc="Self-perceptual fine-tune",
                   disable=not comfy.utils.PROGRESS_BAR_ENABLED)
        last_saved = None
        t0 = time.time()
        try:
            for i in range(start, total):
                comfy.model_management.throw_exception_if_processing_interrupted()
                autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
                with autocast:
                    parts = trainer.step()
                step = trainer.step_count
                img = None
                if preview_every and step % preview_every == 0:
                    img = preview.preview_image(ses.mp, vae, latents[0].shape, conds[0], settings.seed)
                pbar.update_absolute(step, total, img)
                text = f"step {step}/{total}  loss {parts.loss.item():.5f}  (mse {parts.mse.item():.4f})"
                preview.send_text(text, cls.hidden.unique_id)
                bar.set_postfix(loss=f"{parts.loss.item():.5f}")
                bar.update(1)
                if save_every and step % save_every == 0 and step < total:
                    last_saved = cls._save(out_file, ses.adapters, trainer, meta)
        except NonFiniteLoss as e:
            where = f"; the last finite checkpoint is {last_saved.name}" if last_saved else ""
            raise FloatingPointError(f"{e}{where}") from None
        except comfy.model_management.OOM_EXCEPTION as e:
            raise MemoryError(f"out of memory while training ({e}); lower batch_size ({settings.batch_size}) or "
                              f"resolution, or turn on gradient_checkpointing") from None
        finally:
            bar.close()
        log.info("selfperc: %d steps in %.1fs", settings.steps, time.time() - t0)

        cls._save(out_file, ses.adapters, trainer, meta)
        lora_sd = lora.lora_state_dict(ses.adapters)
        out_model, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0)
        name = out_file.relative_to(Path(folder_paths.get_folder_paths("loras")[0]).resolve()).as_posix()
        return io.NodeOutput(out_model, lora_sd, {"loss": list(trainer.losses)}, name,
                             ui={"text": [f"saved {name} ({trainer.step_count} steps, "
                                          f"final loss {trainer.losses[-1]:.5f})"]})

    @staticmethod
    def _metadata(model, settings, layer, rank, alpha, dtype, folder, ms, n_images) -> dict:
        return {"selfperc_version": "0.1.0", "selfperc_objective": "self-perceptual (Lin & Yang 2024)",
                "base_model_hash": model_fingerprint(model),
                "base_model_type": type(model.model.model_config).__name__,
                "parameterization": bridge.parameterization(ms), "feature_layer": layer, "rank": rank,
                "alpha": alpha, "training_dtype": str(dtype).replace("torch.", ""), "dataset": folder.name,
                "dataset_images": n_images, "settings": settings.as_dict()}

    @staticmethod
    def _save(out_file: Path, adapters, trainer, meta: dict) -> Path:
        meta = dict(meta, steps=trainer.step_count)
        files.save_state(files.state_path(out_file), {"trainer": trainer.state_dict(), "metadata": meta})
        return files.save_lora(out_file, lora.lora_state_dict(adapters), meta)
