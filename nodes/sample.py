"""Self-Perceptual Sampler: sample the fine-tuned model the way the paper evaluates it (no CFG by default),
optionally beside the base model from identical noise, and A/B on a real image: SDEdit (denoise < 1 from an
encoded image), ILVR (the reference's low frequencies guide sampling) and inversion (invert the image with the
base model, reconstruct with both)."""
from __future__ import annotations

from dataclasses import dataclass

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import numpy as np
import torch
from comfy_api.latest import io, ui
from PIL import Image, ImageDraw, ImageFont

from . import realimage
from .families import empty_conditioning
from .host_compat import host_symbol


def latent_to_rgb(model, samples: torch.Tensor) -> torch.Tensor:
    """A rough RGB view of latents with the model's own latent->RGB factors (used when no VAE is given)."""
    fmt = model.model.latent_format
    x = fmt.process_out(samples.float())
    if x.ndim == 5:  # video (B, C, T, H, W): every frame
        x = x.movedim(2, 1).flatten(0, 1)
    if getattr(fmt, "latent_rgb_factors", None) is None or len(fmt.latent_rgb_factors) != x.shape[1]:
        g = x.mean(1)  # no factors for this latent space: a grey view of the channel mean
        g = (g - g.amin()) / (g.amax() - g.amin()).clamp_min(1e-8)
        return g[..., None].expand(*g.shape, 3)
    factors = torch.tensor(fmt.latent_rgb_factors, dtype=torch.float32)  # (C, 3)
    rgb = torch.einsum("bchw,cr->bhwr", x, factors)
    if getattr(fmt, "latent_rgb_factors_bias", None) is not None:
        rgb = rgb + torch.tensor(fmt.latent_rgb_factors_bias)
    return ((rgb + 1) / 2).clamp(0, 1)


def frames(images: torch.Tensor) -> torch.Tensor:
    """Decoded images as (N, H, W, 3); video VAEs decode (B, T, H, W, 3)."""
    return images.reshape(-1, *images.shape[-3:])


def labelled_grid(columns: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """Side-by-side columns (each a (B, H, W, 3) batch, stacked vertically) with a label above each."""
    font = ImageFont.load_default()
    pad = 18
    cols = []
    for label, imgs in columns:
        arr = (imgs.detach().float().cpu().numpy() * 255).round().astype(np.uint8)
        col = np.concatenate(list(arr), axis=0)
        canvas = Image.new("RGB", (col.shape[1], col.shape[0] + pad), "white")
        canvas.paste(Image.fromarray(col), (0, pad))
        ImageDraw.Draw(canvas).text((4, 3), label, fill="black", font=font)
        cols.append(np.asarray(canvas))
    gap = np.full((cols[0].shape[0], 4, 3), 255, np.uint8)
    out = cols[0]
    for c in cols[1:]:
        out = np.concatenate([out, gap, c], axis=1)
    return torch.from_numpy(out.astype(np.float32) / 255.0)[None]


@dataclass(frozen=True)
class Sampling:
    """How to sample: ComfyUI's sampler settings and the prompts."""
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    positive: list
    negative: list
    denoise: float = 1.0
    cfg_rescale: float = 0.0


def sample_model(model, latent: dict, noise, seed: int, how: Sampling):
    """``model``'s samples from ``noise`` (+ ``latent``, for SDEdit) through ComfyUI's own sampling."""
    if how.cfg_rescale > 0:
        rescale = host_symbol("comfy_extras.nodes_model_advanced", "RescaleCFG", "cfg_rescale")
        model = rescale().patch(model, how.cfg_rescale)[0]
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    callback = latent_preview.prepare_callback(model, how.steps)
    return comfy.sample.sample(model, noise, how.steps, how.cfg, how.sampler_name, how.scheduler, how.positive,
                               how.negative, latent_image, denoise=how.denoise, noise_mask=latent.get("noise_mask"),
                               callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)


class SelfPerceptualSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfPerceptualSampler",
            display_name="Self-Perceptual Sampler (A/B, no CFG)",
            category="selfperc/sampling",
            description="Samples a model without guidance by default (as the paper evaluates), optionally beside "
                        "a base model from identical noise.",
            inputs=[
                io.Model.Input("model", tooltip="The fine-tuned model (e.g. the fine-tune node's output)."),
                io.Latent.Input("latent", tooltip="An empty latent, or an encoded image with denoise < 1."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed; both models get the same noise."),
                io.Int.Input("steps", default=30, min=1, max=10000, tooltip="Sampling steps."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="ComfyUI sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="ComfyUI scheduler."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance; 1.0 = none (the paper's setting for its model)."),
                io.Float.Input("cfg_rescale", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="CFG rescale (the paper's MSE baseline: cfg 7.5, rescale 0.7)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Below 1: SDEdit-style img2img from the input latent."),
                io.Model.Input("base_model", optional=True,
                               tooltip="The model before fine-tuning, for an A/B comparison."),
                io.Conditioning.Input("positive", optional=True, tooltip="Prompt; none = unconditional (SD1.x/SD2.x; other families need their "
                                                      "text encoder's output, e.g. CLIPTextEncode with an empty text)."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative prompt (only used with cfg > 1); none = unconditional (SD1.x/"
                                                      "SD2.x; other families: connect one for cfg > 1)."),
                io.Vae.Input("vae", optional=True, tooltip="Decodes the samples for the grid (else a rough "
                                                           "latent preview)."),
                io.Combo.Input("mode", options=list(realimage.MODES), default="sample", optional=True,
                               tooltip="sample: from noise, or SDEdit from an encoded image with denoise < 1. "
                                       "ilvr: the latent is a reference image whose coarse layout guides sampling "
                                       "from noise (with denoise < 1: SDEdit from the reference, guided). "
                                       "invert: the latent is a real image, inverted to noise with the base model "
                                       "(or the model) by the deterministic ODE (Euler = DDIM), then reconstructed by "
                                       "each model on the same schedule (denoise < 1: inverted only that far, "
                                       "e.g. a DiffusionCLIP LoRA's t0, and each model generates from there); "
                                       "sampler_name and cfg_rescale are not used."),
                io.Float.Input("ilvr_weight", default=1.0, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="ilvr: how much of the reference's low frequencies replace the model's at "
                                       "each step (0 = plain sampling)."),
                io.Int.Input("ilvr_factor", default=4, min=1, max=64, optional=True,
                             tooltip="ilvr: low-pass factor in latent pixels (larger = only the coarser layout "
                                     "is kept)."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="The fine-tuned model's samples."),
                io.Image.Output(display_name="grid", tooltip="Labelled grid: base | fine-tuned (or just the "
                                                              "samples)."),
            ],
        )

    @classmethod
    def execute(cls, model, latent, seed, steps, sampler_name, scheduler, cfg, cfg_rescale, denoise,
                base_model=None, positive=None, negative=None, vae=None, mode="sample", ilvr_weight=1.0,
                ilvr_factor=4):
        if mode not in realimage.MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {realimage.MODES}")
        if mode != "sample" and not torch.count_nonzero(latent["samples"]):
            raise ValueError(f"mode {mode!r} needs a real image's latent (e.g. LoadImage -> VAEEncode); the latent "
                             "given is empty")
        positive = positive if positive is not None else empty_conditioning(model)
        if negative is None:
            try:
                negative = empty_conditioning(model)
            except ValueError:
                if cfg != 1.0:
                    raise ValueError("cfg > 1 needs a negative conditioning for this model (e.g. CLIPTextEncode "
                                     "with an empty text)") from None
                negative = positive  # cfg 1.0 never evaluates the negative
        decode = (lambda s: frames(vae.decode(s)[..., :3])) if vae is not None else (lambda s: latent_to_rgb(model, s))
        columns = []
        if mode == "invert":
            inverter = base_model if base_model is not None else model
            ode = (realimage.schedule(inverter, scheduler, steps, denoise), positive, negative, cfg, seed)
            noise = realimage.invert(inverter, latent["samples"], *ode)
            tuned = realimage.reconstruct(model, noise, *ode)
            columns.append(("input", decode(latent["samples"])))
            if base_model is not None:
                columns.append(("base (recon.)", decode(realimage.reconstruct(base_model, noise, *ode))))
            columns.append(("fine-tuned (recon.)" if base_model is not None else "reconstruction", decode(tuned)))
        else:
            start = latent
            if mode == "ilvr":
                columns.append(("reference", decode(latent["samples"])))
                if denoise >= 1.0:  # ILVR samples from noise; below 1 it is SDEdit from the reference, guided
                    start = dict(latent, samples=torch.zeros_like(latent["samples"]))
            noise = comfy.sample.prepare_noise(start["samples"], seed, latent.get("batch_index"))
            how = Sampling(steps, cfg, sampler_name, scheduler, positive, negative, denoise, cfg_rescale)
            guide = ((lambda m: realimage.with_ilvr(m, latent["samples"], ilvr_weight, ilvr_factor))
                     if mode == "ilvr" else (lambda m: m))
            tuned = sample_model(guide(model), start, noise, seed, how)
            if base_model is not None:
                columns.append(("base", decode(sample_model(guide(base_model), start, noise, seed, how))))
            columns.append(("fine-tuned" if base_model is not None else "sample", decode(tuned)))
        grid = labelled_grid(columns)
        out = latent.copy()
        out["samples"] = tuned
        return io.NodeOutput(out, grid, ui=ui.PreviewImage(grid, cls=cls))
