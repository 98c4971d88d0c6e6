"""Real-image A/B through ComfyUI's own guider: DDIM-style inversion / reconstruction and ILVR guidance.

The ODE and the low-pass live in selfperc_core.realimage; here they get ComfyUI's CFGGuider (conditioning, cfg,
model patches, model loading and the latent format's in/out scaling exactly as for any sampler) and its
schedules. The inversion's sampler starts from the given latent itself (no noise is added), so inverting and
reconstructing round-trip through the same code.
"""
from __future__ import annotations

import comfy.model_management
import comfy.samplers
import comfy.utils
import torch

from ..selfperc_core.realimage import euler_ode, ilvr

MODES = ("sample", "ilvr", "invert")


class ODESampler(comfy.samplers.Sampler):
    """A ComfyUI Sampler integrating the probability-flow ODE from ``latent_image`` along the given sigmas
    (increasing: invert; decreasing: sample); the noise argument is ignored."""

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        x = latent_image.float() if latent_image is not None else torch.zeros_like(noise)
        s_in = x.new_ones([x.shape[0]])
        bar = comfy.utils.ProgressBar(len(sigmas) - 1)

        def step(i, xi):
            bar.update(1)
            if callback is not None:
                callback(i, xi, xi, len(sigmas) - 1)
        return euler_ode(lambda xi, s: model_wrap(xi, s * s_in, **extra_args), x, sigmas.to(x), step)

    def max_denoise(self, model_wrap, sigmas):
        return False


def schedule(model, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """The model's decreasing sigmas (ending at 0) for ``scheduler`` and ``steps``; ``denoise`` < 1: the last
    ``steps`` of a schedule of steps / denoise, as core KSampler takes them (a partial inversion's levels)."""
    ms = model.get_model_object("model_sampling")
    if denoise >= 1.0:
        return comfy.samplers.calculate_sigmas(ms, scheduler, steps).cpu()
    if not denoise > 0.0:
        raise ValueError(f"denoise {denoise} must be above 0")
    return comfy.samplers.calculate_sigmas(ms, scheduler, int(steps / denoise)).cpu()[-(steps + 1):]


def run_ode(model, latent: torch.Tensor, sigmas: torch.Tensor, positive, negative, cfg: float, seed: int):
    """Integrate from ``latent`` (ComfyUI's LATENT space) along ``sigmas``; returns the end point in that space."""
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    noise = torch.zeros_like(latent)
    out = guider.sample(noise, latent, ODESampler(), sigmas, seed=seed,
                        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED)
    return out.to(comfy.model_management.intermediate_device())


def invert(model, latent, sigmas, positive, negative, cfg, seed):
    """The noise a real image's latent maps to under the model's ODE (DDIM inversion) along ``sigmas``
    (decreasing, as ``schedule`` gives them; integrated upwards)."""
    return run_ode(model, latent, sigmas.flip(0), positive, negative, cfg, seed)


def reconstruct(model, inverted, sigmas, positive, negative, cfg, seed):
    """Integrate an inverted latent back to an image with ``model`` (the same or another one) along the
    inversion's own ``sigmas``: the noise is at the inverting model's sigma_max, whatever another model's
    schedule would start from."""
    return run_ode(model, inverted, sigmas, positive, negative, cfg, seed)


def with_ilvr(model, reference: torch.Tensor, weight: float, factor: int):
    """A clone of ``model`` whose denoised estimate follows ``reference``'s (a LATENT's samples) low frequencies."""
    if weight == 0:
        return model
    ref = model.model.process_latent_in(reference.float())
    m = model.clone()
    m.set_model_sampler_post_cfg_function(lambda args: ilvr(args["denoised"], ref, weight, factor))
    return m
