"""Self-Perceptual Evaluate: did the fine-tune help on the user's own data? Distances to the dataset, with spread.

Base and fine-tuned (and optionally a baseline, e.g. a continued-MSE fine-tune) sample from identical noise; each
set of samples is compared with the dataset folder's images in two feature spaces:
  * self: the frozen base model's tapped features (the loss's own tap), of samples and dataset images noised to
    the same levels t' with the same noise, spatially pooled; FD and KID per level, averaged over the levels;
  * CLIP (when a CLIP_VISION is connected): its image embeddings, since a metric in the loss's own feature space
    should not be the only judge (CMMD's argument).
The distances and their paired-resampling spread come from selfperc_core.evaluation (torchmetrics underneath).
"""
from __future__ import annotations

import json
import logging

import comfy.model_management
import comfy.sample
import comfy.samplers
import numpy as np
import torch
from comfy_api.latest import io, ui
from PIL import Image, ImageDraw, ImageFont

from ..selfperc_core.dataset import as_float, load_dataset
from ..selfperc_core.evaluation import MIN_IMAGES, build_report, distances, noised_features, report_lines
from ..selfperc_core.model_view import frozen_features_fn
from . import bridge, families, files, inputs
from .data import cache_budget, encode_latents
from .sample import Sampling, frames, labelled_grid, sample_model
from .settings import check_step_size

log = logging.getLogger("selfperc")

DEFAULT_LEVELS = "0.1, 0.3, 0.5, 0.7"  # t' as fractions of the schedule (evaluation.md: 100..700 of 1000)
MAX_SAMPLES = 1024
CHUNK = 4  # images sampled / encoded per batch
GRID_ROWS = 8  # samples per model shown in the grid


def parse_levels(text: str) -> list[float]:
    try:
        levels = [float(x) for x in text.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"noise_levels {text!r}: give numbers between 0 and 1 separated by commas") from None
    if not levels or any(not 0.0 < t < 1.0 for t in levels):
        raise ValueError(f"noise_levels {text!r}: give one or more numbers strictly between 0 and 1")
    return levels


def self_features(model, latents: torch.Tensor, levels: list[float], positive, tap, seed: int,
                  stream: str) -> torch.Tensor:
    """(N, levels, C): the frozen ``model``'s features at ``tap`` (``families.tap_point``; one tap for every call,
    so a generic one is found once) of ``latents`` (model space) at each t'; ``stream`` names the corruption-noise
    stream (the dataset's is independent of the samples')."""
    comfy.model_management.load_models_gpu([model])
    dev = model.load_device
    ms = bridge.model_sampling(model)
    one = inputs.model_inputs(model, positive, tuple(latents.shape[1:]), seed)
    with tap:
        features = frozen_features_fn(inputs.predictor(model), tap)
        per_level = noised_features(features, latents, levels, bridge.sigma_of_t_fn(ms),
                                    bridge.noise_scaling_fn(ms), cond=lambda n: inputs.collate([one] * n),
                                    seed=seed, batch=CHUNK, stream=stream, device=dev)
    return torch.stack([per_level[t] for t in levels], 1)


def decoded_chunks(vae, latents: torch.Tensor):
    """Decoded (n, H, W, 3) images, CHUNK latents at a time (all of them at once could take many GB)."""
    for i in range(0, latents.shape[0], CHUNK):
        yield frames(vae.decode(latents[i:i + CHUNK])[..., :3]).float().cpu()


def clip_embeddings(clip_vision, images) -> torch.Tensor:
    """(N, D) CLIP image embeddings of images in [0, 1]: an (N, H, W, 3) tensor or an iterable of such chunks."""
    chunks = [images[i:i + CHUNK] for i in range(0, images.shape[0], CHUNK)] if torch.is_tensor(images) else images
    out = []
    for chunk in chunks:
        out_i = clip_vision.encode_image(chunk)  # ComfyUI's Output: attributes, no .get
        emb = getattr(out_i, "image_embeds", None) if not isinstance(out_i, dict) else out_i.get("image_embeds")
        if not isinstance(emb, torch.Tensor) or emb.ndim != 2:
            raise ValueError(f"the connected CLIP vision model ({type(clip_vision).__name__}) gives no image "
                             "embedding (image_embeds); connect a CLIP ViT vision model (e.g. clip_vision_g / "
                             "clip_vision_h / ViT-L), loaded with Load CLIP Vision")
        out.append(emb.float().cpu())
    return torch.cat(out)


def table_image(lines: list[str]) -> torch.Tensor:
    """Monospace-ish text lines on white, as a (1, H, W, 3) IMAGE."""
    font = ImageFont.load_default()
    w = max(8 + 7 * max(len(x) for x in lines), 200)
    img = Image.new("RGB", (w, 10 + 14 * len(lines)), "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((6, 5 + 14 * i), line, fill="black", font=font)
    return torch.from_numpy(np.asarray(img, np.float32) / 255.0)[None]


def sampling_inputs(cfg_tooltip: str) -> list:
    """seed, steps, sampler_name, scheduler, cfg: how the evaluators sample every model from the same noise."""
    return [io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                         tooltip="Seed of the sampling noise (shared by all models) and of the resampling."),
            io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Sampling steps."),
            io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                           tooltip="ComfyUI sampler."),
            io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                           tooltip="ComfyUI scheduler."),
            io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip=cfg_tooltip)]


class SelfPerceptualEvaluate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfPerceptualEvaluate",
            display_name="Self-Perceptual Evaluate (FD / KID vs dataset)",
            category="selfperc/analysis",
            description="Samples base and fine-tuned from identical noise and measures each against a dataset "
                        "folder: Fréchet and kernel distances in the frozen base model's features (and in CLIP "
                        "image embeddings), with their spread. Lower is better.",
            inputs=[
                io.Model.Input("base_model", tooltip="The model before fine-tuning; its frozen features are the "
                                                     "'self' feature space."),
                io.Model.Input("model", tooltip="The fine-tuned model (e.g. base + the LoRA through a LoRA "
                                                "loader, or the fine-tune node's output)."),
                io.Vae.Input("vae", tooltip="Encodes the dataset images and decodes the samples."),
                io.Combo.Input("dataset_folder", options=files.dataset_folders(),
                               tooltip="A folder of images in ComfyUI's input directory (the fine-tune's rules)."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=8,
                             tooltip="Dataset images are centre-cropped to this square; samples are made at it."),
                io.Int.Input("sample_count", default=32, min=MIN_IMAGES, max=MAX_SAMPLES,
                             tooltip="Samples per model. KID is unbiased at small counts; FD needs more samples "
                                     "than the feature width to be unbiased."),
                *sampling_inputs("Classifier-free guidance; 1.0 = none, as the paper evaluates."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="Prompt for sampling and for reading features; none = unconditional "
                                              "(SD1.x/SD2.x only; others need e.g. CLIPTextEncode with an empty "
                                              "text)."),
                io.Conditioning.Input("negative", optional=True, tooltip="Negative prompt (cfg > 1 only)."),
                io.Model.Input("baseline_model", optional=True,
                               tooltip="A third model to compare, e.g. the same fine-tune with the MSE loss: the "
                                       "honest baseline for 'did the self-perceptual loss help'."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Adds FD/KID in CLIP image embeddings (Load CLIP Vision)."),
                io.String.Input("noise_levels", default=DEFAULT_LEVELS, optional=True,
                                tooltip="t' levels (fractions of the schedule) at which the self features are "
                                        "read; the distances are averaged over them."),
                io.Int.Input("bootstraps", default=20, min=0, max=1000, optional=True,
                             tooltip="Resamples for the spread (0 = none). FD costs a matrix eigen-decomposition "
                                     "of the feature width per resample."),
                io.Int.Input("max_dataset_images", default=256, min=MIN_IMAGES, max=100_000, optional=True,
                             tooltip="Use at most this many dataset images (the first, sorted by name)."),
                io.Float.Input("tap_depth", default=families.DEFAULT_DEPTH, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Transformers: the block read, as a fraction of the block stack (UNets: "
                                       "the mid-block)."),
                io.String.Input("dataset_path", default="", optional=True,
                                tooltip="Absolute folder instead of dataset_folder (only if the server allows it, "
                                        "as for the fine-tune)."),
            ],
            outputs=[
                io.Image.Output(display_name="table", tooltip="The numbers as an image."),
                io.String.Output(display_name="report", tooltip="The numbers as JSON."),
                io.Image.Output(display_name="samples", tooltip="Samples, one column per model."),
            ],
        )

    @classmethod
    def execute(cls, base_model, model, vae, dataset_folder, resolution, sample_count, seed, steps, sampler_name,
                scheduler, cfg, positive=None, negative=None, baseline_model=None, clip_vision=None,
                noise_levels=DEFAULT_LEVELS, bootstraps=20, max_dataset_images=256, tap_depth=families.DEFAULT_DEPTH,
                dataset_path=""):
        # Every input is checked before any model runs.
        levels = parse_levels(noise_levels)
        check_step_size(CHUNK, resolution)
        if sample_count < MIN_IMAGES:
            raise ValueError(f"sample_count {sample_count}: a distance between distributions needs at least "
                             f"{MIN_IMAGES} samples (a covariance needs 2 points)")
        families.tap_point(base_model.model.diffusion_model, families.MID_BLOCK, tap_depth)
        positive = positive if positive is not None else families.empty_conditioning(base_model)
        if negative is None:
            if cfg != 1.0:
                negative = families.empty_conditioning(base_model)  # other families: connect a negative
            else:
                negative = positive  # cfg 1.0 never evaluates the negative
        folder = files.resolve_dataset(dataset_folder, dataset_path)
        ds = load_dataset(folder, resolution, "center_crop", max_cache_bytes=cache_budget(),
                          max_images=max_dataset_images)
        for s in ds.skipped:
            log.warning("selfperc evaluate: skipped %s: %s", s.path, s.reason)
        images = ds.images
        if len(images) < MIN_IMAGES:
            raise ValueError(f"dataset folder {folder} has {len(images)} usable image(s); the distances need at "
                             f"least {MIN_IMAGES} (a covariance needs 2 points; use many more for a stable answer)")
        models = {"base": base_model, "fine-tuned": model}
        if baseline_model is not None:
            models["baseline"] = baseline_model
        fmt = type(base_model.model.latent_format)
        for name, m in models.items():
            if type(m.model.latent_format) is not fmt:
                raise ValueError(f"the {name} model works in {type(m.model.latent_format).__name__} latents but the "
                                 f"base model in {fmt.__name__}: every model must be a fine-tune of the base model")

        if clip_vision is not None:
            clip_embeddings(clip_vision, torch.zeros(1, 64, 64, 3))  # a vision model of another kind: refuse now
        real_latents = torch.stack(encode_latents(base_model, vae, images))
        shape = tuple(real_latents.shape[1:])
        inputs.model_inputs(base_model, positive, shape, seed)  # a conditioning it cannot read: refuse now
        empty = torch.zeros((sample_count, *shape))
        noise = comfy.sample.prepare_noise(empty, seed)
        how = Sampling(steps, cfg, sampler_name, scheduler, positive, negative)
        samples = {}
        for name, m in models.items():
            chunks = []
            for i in range(0, sample_count, CHUNK):
                lat = {"samples": empty[i:i + CHUNK]}
                # seed + i: ancestral/SDE samplers draw their per-step noise from it, per chunk
                chunks.append(sample_model(m, lat, noise[i:i + CHUNK], seed + i, how))
            samples[name] = torch.cat(chunks)

        tap = families.tap_point(base_model.model.diffusion_model, families.MID_BLOCK, tap_depth)
        self_real = self_features(base_model, real_latents, levels, positive, tap, seed, "data")
        self_fake = {k: self_features(base_model, base_model.model.process_latent_in(v.float()), levels, positive,
                                      tap, seed, "samples") for k, v in samples.items()}
        spaces = {"self": (self_real, self_fake)}
        if clip_vision is not None:
            real_rgb = (torch.stack([as_float(x)[..., :3] for x in images[i:i + CHUNK]])
                        for i in range(0, len(images), CHUNK))
            spaces["CLIP"] = (clip_embeddings(clip_vision, real_rgb),
                              {k: clip_embeddings(clip_vision, decoded_chunks(vae, v)) for k, v in samples.items()})
        # the honest question: did the self-perceptual fine-tune beat plain MSE fine-tuning of the same length?
        contrasts = (("fine-tuned", "baseline"),) if "baseline" in samples else ()
        metrics = {space: distances(real, fake, bootstraps, seed, contrasts=contrasts)
                   for space, (real, fake) in spaces.items()}
        report = build_report(metrics, tap=f"{tap.name} of the base model", width=self_real.shape[-1], levels=levels,
                              samples=sample_count, dataset_images=len(images), dataset=str(folder), cfg=cfg,
                              steps=steps, sampler=sampler_name, scheduler=scheduler, seed=seed,
                              bootstraps=bootstraps, latent_shape=list(shape))
        table = table_image(report_lines(report))
        grid = labelled_grid([(k, torch.cat(list(decoded_chunks(vae, v[:GRID_ROWS])))) for k, v in samples.items()])
        return io.NodeOutput(table, json.dumps(report, indent=1), grid, ui=ui.PreviewImage(table, cls=cls))
