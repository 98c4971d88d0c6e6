"""Inversion under guidance, on ComfyUI's own guider machinery: the pivot, Null-text Inversion, and a guider
that replays an inversion with a target prompt (null-text, Direct Inversion or plain).

The maths is selfperc_core.inversion's. Here it meets ComfyUI: each run goes through a CFGGuider, so model
loading, patches (LoRA, hooks), the conditioning's processing and the latent format's in/out scaling are
exactly what any core sampler gets. Latents in an Inversion are in the model's own (process_latent_in) space,
the space samplers work in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import comfy.model_management
import comfy.samplers
import comfy.utils
import torch

from ..selfperc_core import inversion as core
from . import bridge
from .host_compat import training_mode
from .session import frozen_weights, make_trainable_tensors

METHODS = ("null-text", "direct", "plain")
# Samplers whose step is the Euler step the inversion and the corrections are written for (ComfyUI's "ddim" is
# sample_euler too). Any other sampler would not retrace the pivot, so it is refused.
EULER_FUNCTIONS = ("sample_euler",)


@dataclass(frozen=True)
class Inversion:
    """A real image's inversion: the schedule, the pivot trajectory, the source conditioning (and, after
    Null-text Inversion, the per-step unconditional embeddings and the cfg they were fitted for)."""
    sigmas: torch.Tensor              # decreasing, ending at 0 (CPU float32)
    pivots: tuple                     # latents at each sigma, pivots[0] at sigma_max ... pivots[-1] the input
    positive: list
    negative: list | None
    cfg: float                        # the inversion's own cfg
    family: str                       # the model and latent format it was made with
    nulls: tuple | None = None        # per step, the unconditional cross-attention tensors
    null_cfg: float | None = None

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1


def family_of(model) -> str:
    """What an inversion is tied to: the model class and config (SD1.x and SD2.x share classes but not widths),
    the latent format and the parameterization (a ModelSamplingDiscrete patch turns eps into v)."""
    m = model.model
    return (f"{type(m).__name__} ({type(m.model_config).__name__}) / {type(m.diffusion_model).__name__} / "
            f"{type(m.latent_format).__name__} / {bridge.parameterization(bridge.model_sampling(model))}")


def check_latent(model, samples: torch.Tensor, what: str = "latent") -> None:
    """Refuse a latent this model cannot have encoded (another family's VAE, an empty latent), naming it."""
    fmt = model.model.latent_format
    want = getattr(fmt, "latent_channels", None)
    dims = getattr(fmt, "latent_dimensions", 2)
    if samples.ndim != dims + 2:
        raise ValueError(f"the {what} has shape {tuple(samples.shape)}, but {type(model.model).__name__} takes "
                         f"{dims}-d latents (batch, channels, {'frames, ' if dims == 3 else ''}height, width)")
    if want is not None and samples.shape[1] != want:
        raise ValueError(f"the {what} has {samples.shape[1]} channels, but {type(model.model).__name__}'s latent "
                         f"space ({type(fmt).__name__}) has {want}: it was encoded by another family's VAE; "
                         "encode the image with this model's VAE")
    if not torch.count_nonzero(samples):
        raise ValueError(f"the {what} is empty (all zeros): invert a real image's latent (LoadImage -> VAEEncode)")


def check_same_family(model, inv: Inversion, what: str) -> None:
    if family_of(model) != inv.family:
        raise ValueError(f"{what}: the inversion was made with {inv.family}, but the model is {family_of(model)}; "
                         "an inversion replays only on the model family that made it (a LoRA on it is fine)")


def sampler_name(sampler) -> str:
    fn = getattr(sampler, "sampler_function", None)
    return getattr(fn, "__name__", type(sampler).__name__).removeprefix("sample_")


def check_sampler(sampler) -> None:
    """Only a deterministic first-order (Euler / DDIM) step retraces the pivot; refuse the others by name."""
    fn = getattr(sampler, "sampler_function", None)
    opts = getattr(sampler, "extra_options", {}) or {}
    if getattr(fn, "__name__", None) not in EULER_FUNCTIONS or float(opts.get("s_churn", 0.0)) != 0.0 \
            or float(opts.get("s_noise", 1.0)) != 1.0:
        raise ValueError(f"sampler {sampler_name(sampler)!r}: replaying an inversion needs the deterministic "
                         "first-order step it was made with (KSamplerSelect 'euler' or 'ddim'); stochastic "
                         "(ancestral, SDE) and higher-order samplers do not retrace it")


def check_sigmas(sigmas: torch.Tensor, inv: Inversion) -> None:
    s = sigmas.detach().float().cpu()
    if s.shape != inv.sigmas.shape or not torch.allclose(s, inv.sigmas, rtol=1e-4, atol=1e-6):
        raise ValueError(f"the SIGMAS given ({len(s) - 1} steps, from {float(s[0]):.4g}) are not the inversion's "
                         f"schedule ({inv.steps} steps, from {float(inv.sigmas[0]):.4g}): connect the Invert node's "
                         "sigmas output")


def with_crossattn(conds: list[dict], tensors) -> list[dict]:
    """Processed conds with their cross-attention tensors replaced (Null-text's per-step embeddings)."""
    if len(conds) != len(tensors):
        raise ValueError(f"the negative conditioning has {len(conds)} entries here but {len(tensors)} were fitted: an "
                         "area or mask on the prompt changes how ComfyUI pairs the branches; replay with prompts "
                         "of the same structure as the inversion's")
    out = []
    for c, t in zip(conds, tensors):
        mc = dict(c["model_conds"])
        mc["c_crossattn"] = mc["c_crossattn"]._copy_with(t)
        out.append(dict(c, model_conds=mc))
    return out


def crossattn_of(conds: list[dict]) -> list[torch.Tensor]:
    missing = [i for i, c in enumerate(conds) if "c_crossattn" not in c.get("model_conds", {})]
    if missing:
        raise ValueError("the negative conditioning has no cross-attention (text) tensor for this model, so there "
                         "is no embedding for Null-text Inversion to optimise")
    return [c["model_conds"]["c_crossattn"].cond for c in conds]


def cfg_combine(guider, x, ts, cond, uncond, cond_pred, uncond_pred, model_options):
    """The rest of ComfyUI's sampling_function once both branches are predicted: pre-cfg patches, then cfg
    (with the model's sampler_cfg_function and post-cfg patches)."""
    out = [cond_pred, uncond_pred]
    for fn in model_options.get("sampler_pre_cfg_function", []):
        out = fn({"conds": [cond, uncond], "conds_out": out, "cond_scale": guider.cfg, "timestep": ts, "input": x,
                  "sigma": ts, "model": guider.inner_model, "model_options": model_options})
    return comfy.samplers.cfg_function(guider.inner_model, out[0], out[1], guider.cfg, x, ts,
                                       model_options=model_options, cond=cond, uncond=uncond)


class _Progress:
    def __init__(self, steps: int):
        self.bar = comfy.utils.ProgressBar(steps)

    def __call__(self, *_):
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update(1)


class PivotSampler(comfy.samplers.Sampler):
    """Integrates the ODE upwards from the (processed) latent along the decreasing ``sigmas`` and keeps every
    point: the pivot. Returns the noise end."""

    def __init__(self):
        self.pivots = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        x0 = latent_image.float()
        s_in = x0.new_ones([x0.shape[0]])
        progress = _Progress(len(sigmas) - 1)

        def denoise(x, s):
            progress()
            return model_wrap(x, s * s_in, **extra_args)
        self.pivots = core.trajectory(denoise, x0, sigmas.to(x0))
        return self.pivots[0]

    def max_denoise(self, model_wrap, sigmas):
        return False


def make_inversion(model, samples: torch.Tensor, sigmas: torch.Tensor, positive, negative, cfg: float,
                   seed: int) -> tuple[Inversion, torch.Tensor]:
    """DDIM-invert ``samples`` (a LATENT's) along ``sigmas``; returns the Inversion and the noise as a LATENT's
    samples."""
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative if negative is not None else positive)  # cfg 1 never reads it
    guider.set_cfg(cfg)
    sampler = PivotSampler()
    noise = guider.sample(torch.zeros_like(samples), samples, sampler, sigmas, seed=seed,
                          disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED)
    pivots = tuple(p.detach().float().cpu() for p in sampler.pivots)
    inv = Inversion(sigmas.detach().float().cpu(), pivots, positive, negative, float(cfg), family_of(model))
    return inv, noise.to(comfy.model_management.intermediate_device())


@dataclass
class NullTextReport:
    reconstruction: torch.Tensor      # processed-in space
    error: float                      # latent MSE to the input, null-text
    plain_error: float                # the same with the original negative (plain DDIM inversion + cfg)
    losses: list
    inner_steps: list


class NullTextSampler(comfy.samplers.Sampler):
    """Null-text Inversion run inside ComfyUI's sampling (conds processed, model loaded and patched): one
    unconditional forward + backward per inner step, the conditional branch once per step without gradients."""

    def __init__(self, inv: Inversion, settings: core.NullTextSettings):
        self.inv, self.settings = inv, settings
        self.result: core.NullTextResult | None = None
        self.plain: torch.Tensor | None = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        guider = model_wrap
        make_trainable_tensors(guider.model_patcher.model.diffusion_model)  # loaded under inference_mode
        model_options, seed = extra_args["model_options"], extra_args.get("seed")
        pos, neg = guider.conds["positive"], guider.conds["negative"]
        dev = latent_image.device
        pivots = [p.to(dev).clone() for p in self.inv.pivots]  # normal tensors: they meet autograd
        sig = sigmas.float()
        s_in = pivots[0].new_ones([pivots[0].shape[0]])
        progress = _Progress(len(sig) - 1)

        def prepare_step(i, x, sigma):
            ts = sigma * s_in
            with torch.no_grad():
                cond_pred = comfy.samplers.calc_cond_batch(guider.inner_model, [pos], x, ts, model_options)[0]

            def guided(nulls):
                unc = with_crossattn(neg, nulls)
                u = comfy.samplers.calc_cond_batch(guider.inner_model, [unc], x, ts, model_options)[0]
                return cfg_combine(guider, x, ts, pos, unc, cond_pred, u, model_options)
            return guided

        def on_step(i, loss, inner):
            progress()
        # one embedding per image of the batch (the conds hold one for all; Adam is elementwise, so each image's
        # embedding follows its own gradient)
        init = [comfy.utils.repeat_to_batch_size(t, s_in.shape[0]).clone() for t in crossattn_of(neg)]
        # the paper's loss is in DDPM latents: k-diffusion's x over sqrt(1 + sigma^2) for eps/v (c_in), x for flow
        ms = guider.inner_model.model_sampling
        weights = [float(ms.calculate_input(s.reshape(1), torch.ones(1, 1, device=s.device)).square().mean())
                   for s in sig[1:]]
        with frozen_weights(guider.model_patcher.model):  # gradients reach the embeddings only
            self.result = core.null_text(prepare_step, pivots, sig, init, self.settings, on_step, weights)
        with torch.no_grad():  # the baseline: the same cfg with the original negative
            self.plain = core.replay(
                lambda i, x, s: guider(x, s * s_in, model_options=model_options, seed=seed), pivots[0], sig)
        return self.result.reconstruction

    def max_denoise(self, model_wrap, sigmas):
        return False


def null_text_inversion(model, inv: Inversion, cfg: float, settings: core.NullTextSettings,
                        seed: int) -> tuple[Inversion, NullTextReport]:
    if inv.negative is None:
        raise ValueError("Null-text Inversion optimises the negative (unconditional) embedding, and the inversion "
                         "has no negative conditioning: connect one to the Invert node (e.g. CLIPTextEncode with "
                         "an empty text)")
    for name, conds in (("positive", inv.positive), ("negative", inv.negative)):
        for entry in conds:
            extras = sorted(k for k in ("control", "gligen") if k in entry[1])
            if extras:
                raise ValueError(f"the {name} conditioning carries {', '.join(extras)} (ControlNet / T2I / GLIGEN): "
                                 "Null-text Inversion back-propagates through the model only; invert without them")
    if "sampler_calc_cond_batch_function" in model.model_options:
        raise ValueError("the model has a sampler_calc_cond_batch_function patch: Null-text Inversion fits the "
                         "unconditional branch alone, which such a patch would batch otherwise")
    if math.isclose(cfg, 1.0):
        raise ValueError("cfg 1.0: at cfg 1 the unconditional branch is not used, so there is nothing for Null-text "
                         "Inversion to optimise (plain DDIM inversion already reconstructs at cfg 1). Set the cfg "
                         "you edit with (e.g. 7.5); guidance-distilled models (Flux dev) sample at cfg 1 and cannot "
                         "use it")
    if model.model.model_config.unet_config.get("guidance_embed"):
        raise ValueError(f"{type(model.model).__name__} is guidance-distilled (guidance is an input of the model, it "
                         "samples at cfg 1): there is no unconditional branch for Null-text Inversion to fit; use "
                         "Direct Inversion (the Inversion Guider's method direct)")
    settings.validate()
    check_same_family(model, inv, "Null-text Inversion")
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(inv.positive, inv.negative)
    guider.set_cfg(cfg)
    sampler = NullTextSampler(inv, settings)
    with torch.inference_mode(False), training_mode():  # the null embeddings are trained (gradients)
        latent = model.model.process_latent_out(inv.pivots[-1].clone())  # what a sampler would be given
        guider.sample(torch.zeros_like(latent), latent, sampler, inv.sigmas.clone(), seed=seed, disable_pbar=True)
    res = sampler.result
    target = inv.pivots[-1]
    err = float(torch.mean((res.reconstruction.float().cpu() - target) ** 2))
    plain = float(torch.mean((sampler.plain.float().cpu() - target) ** 2))
    nulls = tuple(tuple(t.detach().cpu() for t in step) for step in res.nulls)
    out = replace(inv, nulls=nulls, null_cfg=float(cfg))
    return out, NullTextReport(res.reconstruction.detach().float().cpu(), err, plain, res.losses, res.inner_steps)


class _StartAt(comfy.samplers.Sampler):
    """Wraps a core sampler so that it starts exactly at ``x`` (the inversion's noise end) whatever the
    model's noise_scaling: ComfyUI's samplers build their start as noise_scaling(sigma_0, noise, latent), which is
    linear in the noise when the latent is zero."""

    def __init__(self, inner, x: torch.Tensor):
        self.inner, self.x = inner, x

    def max_denoise(self, model_wrap, sigmas):
        return self.inner.max_denoise(model_wrap, sigmas)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        x = self.x.to(noise)
        zero = torch.zeros_like(x)
        scale = model_wrap.inner_model.model_sampling.noise_scaling(
            sigmas[0], torch.ones_like(x), zero, self.inner.max_denoise(model_wrap, sigmas))
        return self.inner.sample(model_wrap, sigmas, extra_args, callback, x / scale, zero, denoise_mask,
                                 disable_pbar)


class InversionGuider(comfy.samplers.CFGGuider):
    """Replays an inversion with a target prompt: ``null-text`` (the target prompt with the optimised per-step
    unconditional embeddings), ``direct`` (Direct Inversion: the source branch is put back on the pivot at every
    step and the same correction goes to the target branch) or ``plain`` (plain inversion + cfg, the baseline).

    Direct Inversion's paper adds the correction to the source branch only and lets Prompt-to-Prompt's attention
    injection carry the source into the target; without attention control the target needs the correction
    itself, which is also what makes identical source and target prompts return the input exactly."""

    def __init__(self, model, inv: Inversion, method: str, positive, negative, cfg: float):
        super().__init__(model)
        self.inv, self.method = inv, method
        conds = {"positive": positive, "negative": negative}
        if method == "direct":
            conds |= {"source_positive": inv.positive, "source_negative": inv.negative or negative}
        self.inner_set_conds(conds)
        self.set_cfg(cfg)

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        check_sampler(sampler)
        check_sigmas(sigmas, self.inv)
        if tuple(latent_image.shape) != tuple(self.inv.pivots[0].shape):
            raise ValueError(f"the latent given has shape {tuple(latent_image.shape)}, the inversion's is "
                             f"{tuple(self.inv.pivots[0].shape)}: connect the Invert node's latent")
        if denoise_mask is not None:
            raise ValueError("the latent has a noise mask: replaying an inversion edits the whole latent")
        self._sigmas = self.inv.sigmas.tolist()
        # the conds see the inverted image (concat-conditioned models read it); the sampler starts at the noise
        image = self.model_patcher.model.process_latent_out(self.inv.pivots[-1].clone()).to(latent_image)
        return super().sample(noise, image, _StartAt(sampler, self.inv.pivots[0]), sigmas, None, callback,
                              disable_pbar, seed)

    def _step(self, timestep) -> int:
        s = float(timestep.flatten()[0])
        for i, v in enumerate(self._sigmas[:-1]):
            if math.isclose(s, v, rel_tol=1e-4, abs_tol=1e-7):
                return i
        raise ValueError(f"the sampler evaluated the model at sigma {s:.5g}, which is not a step of the inversion's "
                         "schedule")

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        i = self._step(timestep)
        negative = self.conds.get("negative")
        if self.method == "null-text":
            negative = with_crossattn(negative, [t.to(x.device) for t in self.inv.nulls[i]])
        d = comfy.samplers.sampling_function(self.inner_model, x, timestep, negative, self.conds["positive"],
                                             self.cfg, model_options=model_options, seed=seed)
        if self.method == "direct":
            sig = self.inv.sigmas.to(x)
            piv = self.inv.pivots[i].to(x)
            d_src = comfy.samplers.sampling_function(self.inner_model, piv, timestep, self.conds["source_negative"],
                                                     self.conds["source_positive"], self.cfg,
                                                     model_options=model_options, seed=seed)
            d = core.direct_denoised(d, d_src, piv, self.inv.pivots[i + 1].to(x), sig[i], sig[i + 1])
        return d
