"""Self-Perceptual Upscale Evaluate: did the upscaler fine-tune help on the user's own held-out images?

Each high-res image of the folder is averaged down by the VAE's factor (the fine-tune's pairs, without its random
degradations); base and fine-tuned upscalers (and a baseline, e.g. the plain-MSE fine-tune) upscale it from the
same noise, and bicubic interpolation does too. Per image: PSNR against the true high-res image, and the frozen base
model's feature distance to it (the self-perceptual distance at fixed levels t', the same noise for both). Means
and paired differences come with a bootstrap over the images (selfperc_core.evaluation.paired_means).
"""
from __future__ import annotations

import dataclasses
import json

import comfy.model_management
import comfy.sample
import comfy.samplers
import torch
from comfy_api.latest import io, ui

from ..selfperc_core.dataset import as_float, load_dataset
from ..selfperc_core.evaluation import paired_means, verdict
from ..selfperc_core.model_view import frozen_features_fn
from ..selfperc_core.super_resolution import bicubic, downscale, psnr
from . import bridge, families, files, inputs
from . import super_resolution as sr_task
from .data import cache_budget
from .evaluate import CHUNK, GRID_ROWS, parse_levels, sampling_inputs, table_image
from .sample import Sampling, frames, labelled_grid, sample_model
from .settings import check_step_size

MAX_IMAGES = 1024


def feature_distance(model, a: torch.Tensor, b: torch.Tensor, cond: dict, levels: list[float], tap,
                     seed: int) -> torch.Tensor:
    """(N,): the frozen ``model``'s mean squared feature difference at ``tap`` between latents ``a`` and ``b``
    (model space, the same noise for both), averaged over the levels ``levels``."""
    comfy.model_management.load_models_gpu([model])
    dev = model.load_device
    ms = bridge.model_sampling(model)
    noise_scaling = bridge.noise_scaling_fn(ms)
    read = frozen_features_fn(inputs.predictor(model), tap)
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(a.shape[0])
    with tap, torch.no_grad():
        for t in levels:
            sigma = bridge.sigma_of_t_fn(ms)(torch.tensor([t])).expand(a.shape[0]).to(dev)
            eps = torch.randn(a.shape, generator=g).to(dev)
            fa = read(noise_scaling(sigma, eps, a.to(dev)), sigma, cond)
            fb = read(noise_scaling(sigma, eps, b.to(dev)), sigma, cond)
            out += (fa - fb).float().square().flatten(1).mean(1).cpu() / len(levels)
    return out


def report_lines(report: dict) -> list[str]:
    lines = [f"Self-Perceptual Upscale Evaluate: {report['images']} held-out images, factor {report['factor']}, "
             f"{report['steps']} steps, cfg {report['cfg']}", "mean +- std over bootstrap resamples of the images", ""]
    for metric, higher in (("PSNR (dB)", True), ("self feature distance", False)):
        lines.append(f"{metric}: {'higher' if higher else 'lower'} is better")
        for name, s in report["metrics"][metric].items():
            tag = f"   {verdict(s, higher)}" if " - " in name else ""
            spread = "" if s["std"] is None else f"  +- {s['std']:.4f}  [{s['p05']:.4f}, {s['p95']:.4f}]"
            lines.append(f"  {name:<24} {s['value']:10.4f}{spread}{tag}")
        lines.append("")
    return lines + report["notes"]


def upscale_all(models: dict, vae, low: torch.Tensor, factor: int, how: Sampling, augmentation: float,
                seed: int) -> dict:
    """Each model's upscale of ``low`` (n, 3, h, w) in [-1, 1] from the same noise, and bicubic's: {name: (n, H,
    W, 3) images in [0, 1]}."""
    shape = (next(iter(models.values())).model.latent_format.latent_channels, *low.shape[-2:])
    empty = torch.zeros((low.shape[0], *shape))
    noise = comfy.sample.prepare_noise(empty, seed)
    how = dataclasses.replace(how, positive=sr_task.with_low_res(how.positive, low, augmentation),
                              negative=sr_task.with_low_res(how.negative, low, augmentation))
    ups = {"bicubic": ((bicubic(low, factor) + 1) / 2).clamp(0, 1).movedim(1, -1)}
    for name, m in models.items():
        out = sample_model(m, {"samples": empty}, noise, seed, how).float()
        ups[name] = frames(vae.decode(out)[..., :3]).float().cpu()
    return ups


def score_all(base_model, vae, high: torch.Tensor, low: torch.Tensor, ups: dict, positive: list,
              levels: list[float], tap, seed: int) -> dict:
    """{metric: {name: (n,) per-image scores}} of each upscale against the true ``high`` (n, H, W, 3); every image
    (the target too) is VAE-encoded the same way for the feature distance."""
    def encoded(images):
        return base_model.model.process_latent_in(vae.encode(images).float())
    target = encoded(high)
    latents = {k: encoded(v) for k, v in ups.items()}
    shape = tuple(target.shape[1:])
    cond = inputs.collate([inputs.model_inputs(base_model, sr_task.with_low_res(positive, low[j:j + 1], 0.0), shape, seed)
                           for j in range(low.shape[0])])  # the frozen model reads each image's own low-res input
    return {"PSNR (dB)": {k: psnr(v.movedim(-1, 1), high.movedim(-1, 1), 1.0) for k, v in ups.items()},
            "self feature distance": {k: feature_distance(base_model, latents[k], target, cond, levels, tap, seed)
                                      for k in ups}}


class SelfPerceptualUpscaleEvaluate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfPerceptualUpscaleEvaluate",
            display_name="Self-Perceptual Upscale Evaluate (PSNR / feature distance)",
            category="selfperc/analysis",
            description="Upscales held-out images (averaged down by the VAE's factor) with the base and the "
                        "fine-tuned upscaler from identical noise, and with bicubic interpolation; reports PSNR and "
                        "the frozen base model's feature distance to the true images, with paired spread.",
            inputs=[
                io.Model.Input("base_model", tooltip="The upscaler before fine-tuning (e.g. SD x4); its frozen "
                                                     "features define the feature distance."),
                io.Model.Input("model", tooltip="The fine-tuned upscaler (base + the LoRA)."),
                io.Vae.Input("vae", tooltip="The upscaler's VAE (its factor is the upscale factor)."),
                io.Combo.Input("dataset_folder", options=files.dataset_folders(),
                               tooltip="Held-out high-res images (not the training folder) in ComfyUI's input "
                                       "directory; each must be at least resolution x resolution."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=8,
                             tooltip="The high-res side: images are centre-cropped to it, then averaged down by "
                                     "the factor to make the low-res input."),
                *sampling_inputs("Classifier-free guidance (1.0 = none)."),
                io.Float.Input("noise_augmentation", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="The low-res input's noise augmentation, as SD_4XUpscale_Conditioning's."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="The text prompt (SD x4: CLIPTextEncode of the upscaler's CLIP), as "
                                              "the fine-tune's captions were (e.g. an empty text for an uncaptioned "
                                              "folder); none = a zero text input."),
                io.Conditioning.Input("negative", optional=True, tooltip="Negative prompt (cfg > 1 only)."),
                io.Model.Input("baseline_model", optional=True,
                               tooltip="A third upscaler, e.g. the same fine-tune with plain MSE (perceptual_weight "
                                       "0, mse_weight 1): the honest baseline."),
                io.String.Input("noise_levels", default="0.1, 0.3, 0.5, 0.7", optional=True,
                                tooltip="t' levels at which the feature distance is read, then averaged."),
                io.Int.Input("bootstraps", default=200, min=0, max=10000, optional=True,
                             tooltip="Bootstrap resamples of the images for the spread (0 = none)."),
                io.Int.Input("max_dataset_images", default=64, min=1, max=MAX_IMAGES, optional=True,
                             tooltip="Use at most this many images (the first, sorted by name)."),
                io.String.Input("dataset_path", default="", optional=True,
                                tooltip="Absolute folder instead of dataset_folder (only if the server allows it)."),
            ],
            outputs=[
                io.Image.Output(display_name="table", tooltip="The numbers as an image."),
                io.String.Output(display_name="report", tooltip="The numbers as JSON."),
                io.Image.Output(display_name="images", tooltip="Per image: low-res | bicubic | each model | high-res."),
            ],
        )

    @classmethod
    def execute(cls, base_model, model, vae, dataset_folder, resolution, seed, steps, sampler_name, scheduler, cfg,
                noise_augmentation, positive=None, negative=None, baseline_model=None,
                noise_levels="0.1, 0.3, 0.5, 0.7", bootstraps=200, max_dataset_images=64, dataset_path=""):
        levels = parse_levels(noise_levels)  # every input checked before any model runs
        check_step_size(CHUNK, resolution)
        models = {"base": base_model, "fine-tuned": model}
        if baseline_model is not None:
            models["baseline"] = baseline_model
        for m in models.values():
            sr_task.check_model(sr_task.SuperResolution(), m)
        factor = sr_task.factor_of(vae)
        sr_task.check_resolution(resolution, factor)
        sr_task.check_vae(vae, base_model)
        positive = positive if positive is not None else families.empty_conditioning(base_model)
        negative = negative if negative is not None else positive
        tap = families.tap_point(base_model.model.diffusion_model, families.MID_BLOCK, families.DEFAULT_DEPTH)
        folder = files.resolve_dataset(dataset_folder, dataset_path)
        ds = load_dataset(folder, resolution, "center_crop", max_cache_bytes=cache_budget(),
                          max_images=max_dataset_images, no_upscale=True)
        how = Sampling(steps, cfg, sampler_name, scheduler, positive, negative)
        scores, shown = {"PSNR (dB)": {}, "self feature distance": {}}, {}
        for i in range(0, len(ds.images), CHUNK):
            high = torch.stack([as_float(x)[..., :3] for x in ds.images[i:i + CHUNK]])  # (n, H, W, 3) in [0, 1]
            low = downscale(high.movedim(-1, 1) * 2 - 1, factor)
            ups = upscale_all(models, vae, low, factor, how, noise_augmentation, (seed + i) % 2 ** 64)
            for metric, per in score_all(base_model, vae, high, low, ups, positive, levels, tap, seed).items():
                for name, v in per.items():
                    scores[metric].setdefault(name, []).append(v)
            if i == 0:
                nearest = torch.nn.functional.interpolate((low + 1) / 2, scale_factor=factor, mode="nearest")
                shown = {"low-res": nearest.clamp(0, 1).movedim(1, -1), **ups, "high-res": high}
        contrasts = (("fine-tuned", "baseline"),) if baseline_model is not None else ()
        metrics = {metric: {k: s.as_dict() for k, s in paired_means(
            {k: torch.cat(v) for k, v in per.items()}, bootstraps, seed, "base", contrasts).items()}
            for metric, per in scores.items()}
        report = {"images": len(ds.images), "factor": factor, "resolution": resolution, "steps": steps, "cfg": cfg,
                  "sampler": sampler_name, "scheduler": scheduler, "seed": seed, "levels": levels,
                  "noise_augmentation": noise_augmentation, "tap": f"{tap.name} of the base model",
                  "dataset": str(folder), "metrics": metrics,
                  "notes": ["bicubic: the interpolation any upscaler must beat; the low-res images are box "
                            "averages (the fine-tune's pairs without their random degradations)"]
                  + [f"skipped {s.path.name}: {s.reason}" for s in ds.skipped]}
        table = table_image(report_lines(report))
        grid = labelled_grid([(k, v[:GRID_ROWS]) for k, v in shown.items()])
        return io.NodeOutput(table, json.dumps(report, indent=1), grid, ui=ui.PreviewImage(table, cls=cls))
