"""Pix2Pix-Zero (Parmar et al. 2023) on ComfyUI's UNets: an edit direction from two sets of sentences, and
cross-attention guidance that keeps the source's maps.

It reuses Prompt-to-Prompt's machinery: the source and the edited branch are sampled together as [sources, edits]
in one batch (the edit's prompt is the source prompt's embedding plus the direction), the attn2 patches read the
maps. Before each step an extra conditional forward + backward measures how far the edited rows' cross-attention
maps are from the source rows' (every cross-attention layer) and moves the edited latent down that gradient; the
step itself is then taken from the moved latent. The source rows never move, so they are a plain sample (or,
with an inversion, the photo).
"""
from __future__ import annotations

import comfy.samplers
import torch

from ..selfperc_core import attention_edit as core
from ..selfperc_core import inversion as inv_core
from .host_compat import is_oom, training_mode
from .inversion import EULER_FUNCTIONS, sampler_name
from .prompt_to_prompt import Plan, PromptToPromptGuider
from .prompt_tokens import Prompt, encode
from .session import frozen_weights, make_trainable_tensors

MAX_SENTENCES = 256     # per side: each is one text-encoder call before any sampling


def parse_sentences(text: str, what: str) -> list[str]:
    """One sentence per line; blank lines are skipped."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{what} is empty: type one sentence per line (e.g. 'a photo of a cat')")
    if len(lines) > MAX_SENTENCES:
        raise ValueError(f"{what} has {len(lines)} sentences; at most {MAX_SENTENCES}")
    return lines


def sentence_embeddings(clip, sentences: list[str], shape: tuple, what: str) -> list[Prompt]:
    out = []
    for i, text in enumerate(sentences):
        p = encode(clip, text, f"{what} sentence {i + 1}")
        if tuple(p.cond.shape) != shape:
            raise ValueError(f"{what}, sentence {i + 1} ({text[:60]!r}) encodes to {p.cond.shape[1]} tokens and the "
                             f"source prompt to {shape[1]} (ComfyUI encodes in chunks of 77): shorten it")
        out.append(p)
    return out


def edit_plan(clip, source_text: str, source_sentences: str, target_sentences: str, strength: float) -> Plan:
    """The source prompt, and the edited one: its embedding plus ``strength`` times the direction (the pooled
    output, where the encoder gives one, moves along its own direction). Identical sentence sets give an edited
    prompt bit-identical to the source."""
    src = encode(clip, source_text, "source")
    a = sentence_embeddings(clip, parse_sentences(source_sentences, "source_sentences"), tuple(src.cond.shape),
                            "source_sentences")
    b = sentence_embeddings(clip, parse_sentences(target_sentences, "target_sentences"), tuple(src.cond.shape),
                            "target_sentences")
    direction = core.edit_direction([p.cond for p in a], [p.cond for p in b])
    extras = dict(src.extras)
    pooled = [p.extras.get("pooled_output") for p in a + b]
    if isinstance(src.extras.get("pooled_output"), torch.Tensor) and all(isinstance(t, torch.Tensor) for t in pooled):
        d = core.edit_direction(pooled[:len(a)], pooled[len(a):])
        extras["pooled_output"] = src.extras["pooled_output"] + (strength * d).to(src.extras["pooled_output"])
    target = Prompt(f"{source_text} (+ edit direction)", src.ids, src.real, src.labels,
                    src.cond + (strength * direction).to(src.cond), extras, src.spans)
    return Plan(src, target, "reweight", None, None, 0.0, 0.0, (), (), ())


def check_euler(sampler) -> None:
    fn = getattr(getattr(sampler, "sampler_function", None), "__name__", None)
    opts = getattr(sampler, "extra_options", {}) or {}
    if fn not in EULER_FUNCTIONS or float(opts.get("s_churn", 0.0)) != 0.0 \
            or float(opts.get("s_noise", 1.0)) != 1.0:
        raise ValueError(f"sampler {sampler_name(sampler)!r}: Pix2Pix-Zero's guidance moves the latent between "
                         "steps, which is written for the deterministic Euler / DDIM step (KSamplerSelect 'euler' or "
                         "'ddim')")


class Pix2PixZeroGuider(PromptToPromptGuider):
    """Samples each latent as the source prompt and as the edited prompt ([sources, edits]); before every step
    the edited latent takes one gradient step of size ``guidance`` (in the DDPM-scaled latent, as diffusers'
    cross_attention_guidance_amount) on the distance of its cross-attention maps from the source's. With an
    inversion, the source rows are put back on it every step (Direct Inversion) and the edits get the same
    correction."""

    def __init__(self, model, plan: Plan, negative, cfg: float, guidance: float, inversion=None):
        super().__init__(model, plan, negative, cfg, inversion)
        if self.joint is not None:
            raise ValueError(f"{self.joint.family}: Pix2Pix-Zero's map guidance here differentiates UNet "
                             "cross-attention (SD1.x, SD2.x, SDXL), not Flux's joint attention; on Flux the "
                             "Prompt-to-Prompt Guider (experimental) edits by attention")
        if not 0.0 <= guidance <= 100.0:
            raise ValueError(f"guidance {guidance:g} is outside 0..100")
        self.guidance = float(guidance)
        self.losses: list[float] = []  # per step, the summed map distance before the move

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        check_euler(sampler)
        self.losses = []
        return super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)

    def map_gradient(self, x: torch.Tensor, timestep: torch.Tensor, model_options: dict) -> torch.Tensor:
        """d(map distance) / d(edited latent): one conditional forward + backward of [sources, edits]."""
        run, n = self.run, self.run.pairs
        with torch.inference_mode(False), torch.enable_grad(), training_mode():
            make_trainable_tensors(self.model_patcher.model.diffusion_model)  # loaded under inference_mode
            edit = x[n:].detach().clone().requires_grad_(True)
            xin = torch.cat([x[:n].detach().clone(), edit])
            run.guide = []
            try:
                with frozen_weights(self.model_patcher.model):
                    comfy.samplers.calc_cond_batch(self.inner_model, [self.conds["positive"]], xin, timestep.clone(),
                                                   model_options)
                    if not run.guide:
                        raise RuntimeError("Pix2Pix-Zero's guidance pass reached no cross-attention layer")
                    loss = torch.stack(run.guide).sum()
                    (grad,) = torch.autograd.grad(loss, edit)
            except Exception as e:
                if is_oom(e):  # the backward keeps a whole conditional forward's activations
                    raise MemoryError(f"out of memory in Pix2Pix-Zero's guidance pass ({e}); lower the resolution "
                                      "or the batch, or set guidance 0 (the direction alone)") from None
                raise
            finally:
                run.guide = None
        self.losses.append(float(loss))
        return grad.detach()

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        run = self.run
        run.set_step(float(timestep.flatten()[0]))
        if self.guidance == 0.0:
            return super().predict_noise(x, timestep, model_options, seed)
        n, i = run.pairs, run.step
        grad = self.map_gradient(x, timestep, model_options)
        # SGD in DDPM latents (x / sqrt(1 + sigma^2) for eps / v models: c_in) is a step of guidance / c_in^2 here
        c_in = self.inner_model.model_sampling.calculate_input(timestep[:1].float(), torch.ones(1, 1).to(x))
        moved = x[n:] - (self.guidance / float(c_in.flatten()[0]) ** 2) * grad.to(x)
        xm = torch.cat([x[:n], moved])
        d = super().predict_noise(xm, timestep, model_options, seed)
        # the step ratio as a Python float: no float64 tensors on the device (Apple's MPS has none)
        shifted = inv_core.denoised_after_shift(d[n:], x[n:].to(d), moved.to(d), float(run.sigmas[i]),
                                                float(run.sigmas[i + 1]))
        return torch.cat([d[:n], shifted])
