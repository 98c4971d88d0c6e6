"""Imagic's first stage (Kawar et al.): a text embedding optimised so that the frozen model reconstructs one image.

The embedding is the one trained tensor of the pack's own loop (the core Trainer, inside a training session
without an adapter): the loss is the model's own denoising loss (the paper's), or the self-perceptual loss with
the frozen branch's conditioning held at the input embedding, so the embedding cannot move its own target.
"""
from __future__ import annotations

import dataclasses
import functools

import comfy.conds
import comfy.model_management
import comfy.utils
import torch

from ..selfperc_core.loop import Hooks, NonFiniteLoss, Trainer, TrainSettings, fit
from ..selfperc_core.model_view import ModelView
from . import bridge, families, inputs
from .host_compat import is_oom
from .session import SessionSpec, training_session

OBJECTIVES = ("denoising", "self-perceptual")
TEXT_INPUT = "c_crossattn"  # where every family's extra_conds puts the text encoder's token embedding
CHECK_DRAWS = 8             # fixed (t, noise) draws of the before / after denoising loss


def one_image(latent: dict, model) -> torch.Tensor:
    """The LATENT's single image in the model's space, (C, ...)."""
    samples = latent["samples"]
    if samples.shape[0] != 1:
        raise ValueError(f"the latent holds {samples.shape[0]} images; Imagic optimises an embedding for one image "
                         "(use a batch of 1, e.g. one LoadImage -> VAEEncode)")
    return model.model.process_latent_in(samples.float())[0].cpu()


def text_embedding(conditioning: list) -> tuple[torch.Tensor, dict]:
    if len(conditioning) != 1:
        raise ValueError(f"the conditioning has {len(conditioning)} entries (combined or area conditionings); "
                         "Imagic optimises one prompt's embedding: use one CLIPTextEncode")
    emb, extras = conditioning[0]
    if emb.ndim != 3 or emb.shape[0] != 1:
        raise ValueError(f"the conditioning's embedding has shape {tuple(emb.shape)}, not (1, tokens, width)")
    return emb, extras


def text_inputs(mp, conditioning: list, shape: tuple) -> dict:
    """The model inputs of ``conditioning``, checked to carry its embedding unchanged (so that training the
    embedding trains what the model reads); a family that transforms it in extra_conds is refused by name."""
    base = inputs.model_inputs(mp, conditioning, shape)
    emb = conditioning[0][0]
    got = base.get(TEXT_INPUT)
    if got is None or tuple(got.cond.shape) != tuple(emb.shape) or not torch.equal(got.cond.float().cpu(),
                                                                                  emb.float().cpu()):
        raise ValueError(f"{type(mp.model).__name__} does not read the conditioning's embedding as it is (its "
                         f"extra_conds builds '{TEXT_INPUT}' from it), so Optimize Embedding cannot train it; "
                         "supported: families whose text input is the encoder's embedding (tested: SD1.x as eps, v "
                         "and flow)")
    return base


def with_embedding(base: dict, emb: torch.Tensor) -> dict:
    return dict(base, **{TEXT_INPUT: comfy.conds.CONDCrossAttn(emb)})


def embedding_view(view: ModelView, base: dict, emb: torch.Tensor, unet: bool) -> ModelView:
    """The view the loop trains ``emb`` through: every batch's text input is ``emb`` as it is now (rebuilt per step,
    so gradients reach it); the frozen features always see the input embedding (``base``), which the self-
    perceptual loss's real-image branch is then fixed to."""
    def collate(batch: list) -> dict:
        return inputs.collate([with_embedding(base, emb)] * len(batch), unet=unet)

    fixed = functools.lru_cache(maxsize=4)(lambda n: inputs.collate([base] * n, unet=unet))
    frozen = view.frozen_features
    return dataclasses.replace(view, collate=collate,
                               frozen_features=lambda x, sigma, cond=None: frozen(x, sigma, fixed(x.shape[0])))


def settings_for(objective: str, steps: int, learning_rate: float, seed: int) -> TrainSettings:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    weights = dict(mse_weight=1.0, perceptual_weight=0.0) if objective == "denoising" else {}
    # Adam as the paper (no weight decay: it would pull the embedding towards zero, not towards the prompt)
    return TrainSettings(steps=steps, learning_rate=learning_rate, seed=seed, optimizer="adam", **weights).validate()


def denoising_loss(trainer: Trainer, latent: torch.Tensor, base: dict, seed: int) -> float:
    """The model's own denoising loss of the current embedding on the image at CHECK_DRAWS fixed (t, noise)
    draws: the same draws before and after, so the two numbers differ only by the embedding."""
    return trainer.validate([latent] * CHECK_DRAWS, [base] * CHECK_DRAWS, seed=seed)[1]


@dataclasses.dataclass
class Optimized:
    conditioning: list
    losses: list[float]
    before: float  # denoising loss at the fixed draws with the input embedding
    after: float   # ... with the optimised one


def optimize_embedding(model, latent: dict, conditioning: list, steps: int, learning_rate: float, seed: int,
                       objective: str, node_id=None) -> Optimized:
    settings = settings_for(objective, steps, learning_rate, seed)
    emb_in, extras = text_embedding(conditioning)
    x0 = one_image(latent, model)
    if not torch.isfinite(emb_in).all():
        raise ValueError("the conditioning's embedding has NaN or Inf values")
    if steps == 0:  # nothing to optimise: the input, untouched
        return Optimized(conditioning, [], float("nan"), float("nan"))
    try:
        with torch.inference_mode(False):
            out, losses, before, after = _run(model, x0, conditioning, emb_in, settings, node_id)
    except Exception as e:
        if is_oom(e):  # anywhere in the run: the checks before and after too
            raise MemoryError(f"out of memory while optimising the embedding ({e}); use a smaller image") from None
        raise
    return Optimized([[out, dict(extras)]], losses, before, after)


def _run(model, x0, conditioning, emb_in, settings: TrainSettings, node_id):
    steps = settings.steps
    check_seed = (settings.seed + 1) % 2 ** 64  # the before / after draws: not the training's, and within torch's range
    spec = SessionSpec(adapter=False, latent_shape=tuple(x0.shape), early_exit=True, checkpointing=True)
    with training_session(model, spec) as ses:
        base = text_inputs(ses.mp, conditioning, tuple(x0.shape))
        emb = torch.nn.Parameter(emb_in.detach().clone().float().to(bridge.device()))
        view = embedding_view(ses.view, base, emb, families.is_unet(ses.mp.model.diffusion_model))
        trainer = Trainer([emb], [x0], [base], view, settings, device=bridge.device())
        before = denoising_loss(trainer, x0, base, check_seed)
        pbar = comfy.utils.ProgressBar(steps, node_id=node_id)
        fit(trainer, steps, Hooks(before_step=comfy.model_management.throw_exception_if_processing_interrupted,
                                  after_step=lambda step, _: pbar.update_absolute(step, steps),
                                  on_error=lambda e, _: FloatingPointError(str(e)) if isinstance(e, NonFiniteLoss)
                                  else None))
        after = denoising_loss(trainer, x0, base, check_seed)
        out = emb.detach().to(device=emb_in.device, dtype=emb_in.dtype)
    return out, list(trainer.losses), before, after
