"""The self-perceptual objective (Lin & Yang 2024, Algorithm 1), in sigma space for any parameterization.

Given clean latents x0, noise eps, an online noise level sigma and an independent level sigma':

    x_t      = a(sigma) x0 + b(sigma) eps                      (forward process, host's noise_scaling)
    x0_hat   = online model's clean-image estimate at (x_t, sigma)
    eps_hat  = (x_t - a(sigma) x0_hat) / b(sigma)               (the noise the prediction implies)
    x_t'     = a(sigma') x0     + b(sigma') eps                 (target: the real pair, no gradient)
    x_hat_t' = a(sigma') x0_hat + b(sigma') eps_hat             (prediction: re-noised with eps_hat, not eps)
    L_sp     = D( f*(x_t', sigma'), f*(x_hat_t', sigma') )      (f*: frozen network up to the tapped layer)
    L        = perceptual_weight * L_sp + mse_weight * L_mse

L_mse is the MSE of the prediction in one of two spaces (``MSE_SPACES``):
    native: in the network's own output space, mean(((x0_hat - x0) / c_out(sigma))^2) = mean((F_hat - F)^2) with
            F = eps (eps models), v (v models) or eps - x0 (flow models): the loss each model was trained with
            (c_out: schedule.output_scale_fn);
    x0:     mean((x0_hat - x0)^2), core ComfyUI Train LoRA's loss: per noise level it is c_out(sigma)^2 times the
            native one, i.e. it weights the noise levels differently from the model's own training.

D is the mean squared (or absolute) difference per sample, optionally divided by the mean square of the
target features (scale-free, which keeps transformer features with large norms stable).
Gradients reach the online model only through x0_hat and eps_hat; f*'s weights are never trained.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .schedule import NoiseScaling, noise_coefficients, split_prediction

DISTANCES = ("mse", "mae")
MSE_SPACES = ("native", "x0")


@dataclass(frozen=True)
class LossConfig:
    """How the loss is formed (the module docstring's D, weights and batching). Defaults: the paper's."""
    distance: str = "mse"           # D: "mse" or "mae"
    normalize: bool = False         # divide D by the target features' mean square
    mse_weight: float = 0.0         # weight of the ordinary MSE term (0 = pure self-perceptual, as in the paper)
    perceptual_weight: float = 1.0  # weight of L_sp; 0 with mse_weight > 0 = the plain MSE baseline
    batched_frozen: bool = False    # target and prediction through f* as one batch of 2B

    def validate(self) -> "LossConfig":
        if self.distance not in DISTANCES:
            raise ValueError(f"unknown distance {self.distance!r}; choose one of {DISTANCES}")
        if self.mse_weight < 0 or self.perceptual_weight < 0:
            raise ValueError(f"weights must be >= 0 (mse_weight {self.mse_weight}, perceptual_weight "
                             f"{self.perceptual_weight})")
        if not self.perceptual_weight and not self.mse_weight:
            raise ValueError("perceptual_weight and mse_weight are both 0: nothing to train (perceptual_weight 0 with "
                             "mse_weight 1 is the plain-MSE baseline)")
        return self


@dataclass(frozen=True)
class LossWeights:
    """A batch's loss weights beyond the LossConfig's; each None: equal.

    mse: (B,) of the MSE term only (``min_snr_weight``). sample: (B,) of both terms (e.g. regularization images'
    prior weight). mask: (B, 1, [1,] h, w) positions at the latent's size (masked training): both terms become
    mask-weighted means, the perceptual one on the tapped grid (``grid_mask``).
    """
    mse: Tensor | None = None
    sample: Tensor | None = None
    mask: Tensor | None = None

    def of_mse(self) -> Tensor | None:
        if self.mse is None or self.sample is None:
            return self.mse if self.sample is None else self.sample
        return self.mse * self.sample.to(self.mse)


@dataclass
class LossParts:
    loss: Tensor          # what to backpropagate
    perceptual: Tensor    # L_sp, detached
    mse: Tensor           # MSE of the online prediction (native or x0 space), detached (logged even at weight 0)
    direction: Tensor | None = None  # the directional fine-tune's 1 - cos term, detached (directional.py)
    backward_done: bool = False      # the objective ran backward itself (``loss`` is then detached)


def grid_mask(mask: Tensor, like: Tensor) -> Tensor:
    """A loss mask (B, 1, [1,] h, w) at the latent's size -> (B, 1, h', w') on the grid of ``like`` (B, C, h', w'):
    the mean of the mask over each grid cell (area averaging; the tapped grid is the latent's or coarser)."""
    m = mask.float().reshape(mask.shape[0], 1, mask.shape[-2], mask.shape[-1])
    return torch.nn.functional.adaptive_avg_pool2d(m, like.shape[-2:]) if m.shape[-2:] != like.shape[-2:] else m


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Per-sample mean of ``values`` (B, C, ...), weighted by ``mask`` (broadcastable, >= 0), shape (B,): sum(m v) /
    sum(m) over each sample's elements, so an all-ones mask is the plain mean and a mask's scale does not matter."""
    if mask is None:
        return values.flatten(1).mean(1)
    m = mask.to(values).expand_as(values)
    return (values * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1e-8)


def feature_distance(pred: Tensor, target: Tensor, distance: str = "mse", normalize: bool = False,
                     mask: Tensor | None = None) -> Tensor:
    """Per-sample distance between feature maps, shape (B,).

    mse: mean((pred - target)^2); mae: mean(|pred - target|). With ``normalize`` the result is divided by
    mean(target^2) of that sample (detached). ``mask`` (B, 1, [1,] h, w) at the latent's size weighs the grid
    positions (``grid_mask``, ``masked_mean``); the normalisation stays the whole map's.
    """
    diff = (pred - target).float()
    if distance == "mse":
        d = diff.square()
    elif distance == "mae":
        d = diff.abs()
    else:
        raise ValueError(f"unknown distance {distance!r}; choose one of {DISTANCES}")
    d = masked_mean(d, None if mask is None else grid_mask(mask, d))
    if normalize:
        d = d / target.detach().float().square().flatten(1).mean(1).clamp_min(1e-8)
    return d


def min_snr_weight(sigma: Tensor, gamma: float, output_scale: Tensor, sigma_data: float = 1.0) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) per sample, (B,), for the MSE in the model's own output space.

    Hang et al. weigh the x0-MSE (in units of the data's variance) by min(SNR, gamma), SNR = sigma_data^2 / sigma^2
    in ComfyUI's variables (x = x0 + sigma eps); the native MSE is the x0-MSE / c_out^2, so its weight is
    min(SNR, gamma) * c_out^2 / sigma_data^2: min(SNR, gamma) / SNR for eps-prediction (c_out = -sigma),
    min(SNR, gamma) / (SNR + 1) for v-prediction and for EDM (its own sigma_data), min(SNR, gamma) for
    x0-prediction."""
    if not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"min_snr_gamma {gamma} must be a finite number above 0 (e.g. 5), or 0 for none")
    snr = sigma_data ** 2 / sigma.float().square()
    return snr.clamp(max=gamma) * output_scale.float().square() / sigma_data ** 2


def prediction_mse(x0_hat: Tensor, x0: Tensor, output_scale: Tensor | None = None,
                   weights: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """MSE of a prediction: in x0 space, mean((x0_hat - x0)^2), when ``output_scale`` is None; else in the network's
    own output space, mean(((x0_hat - x0) / c_out)^2) with ``output_scale`` = c_out(sigma), shape (B,).

    For a fixed x_t, F_hat - F = (x0_hat - x0) / c_out exactly, so the native value is the eps-, v- or velocity-MSE
    of the raw output without the host having to expose it. ``weights`` (B,) weigh each sample's mean (min-SNR);
    ``mask`` (B, 1, ...) at the latent's size weighs its positions (``masked_mean``).
    """
    err = x0_hat.float() - x0.float()
    if output_scale is not None:
        err = err / output_scale.float().reshape((-1,) + (1,) * (err.ndim - 1))
    if weights is None and mask is None:
        return err.square().mean()
    per = masked_mean(err.square(), mask)
    return (per * weights.to(err)).mean() if weights is not None else per.mean()


def self_perceptual_loss(
    predict_x0: Callable[[Tensor, Tensor], Tensor],
    frozen_features: Callable[[Tensor, Tensor], Tensor],
    noise_scaling: NoiseScaling,
    x0: Tensor,
    eps: Tensor,
    sigma: Tensor,
    sigma_prime: Tensor,
    config: LossConfig = LossConfig(),
    output_scale: Tensor | None = None,
    weights: "LossWeights | None" = None,
) -> LossParts:
    """Self-perceptual loss for one batch (module docstring states the maths).

    Args:
        predict_x0: online model (adapter on), (x_t, sigma) -> x0_hat. The host converts the raw output
            (eps, v or flow velocity) with its own denoising formula.
        frozen_features: frozen model (adapter off), (x, sigma) -> features at the tapped layer. It must run
            with the adapter switched off and should stop at the layer (FeatureTap). It may receive a batch of
            2B when ``batched_frozen``.
        noise_scaling: the forward process, (sigma, eps, x0) -> x_t.
        x0, eps: clean latents and noise, (B, C, ...).
        sigma, sigma_prime: noise levels for the online and the perceptual pass, (B,).
        config: distance, normalization, the two weights and batching (LossConfig). perceptual_weight 0 with
            mse_weight > 0 is plain MSE fine-tuning, the honest baseline: the frozen passes are then skipped and
            ``perceptual`` is reported as 0. batched_frozen off (default) runs the target under no_grad, which
            records no graph for it.
        output_scale: c_out(sigma), (B,), for the MSE in the network's own output space (``prediction_mse``);
            None: x0 space.
        weights: per-sample and per-position weights (``LossWeights``); None: equal.
    """
    c = config.validate()
    x_t = noise_scaling(sigma, eps, x0)
    x0_hat = predict_x0(x_t, sigma)
    eps_hat = split_prediction(x_t, sigma, x0_hat, noise_scaling)

    w = weights or LossWeights()
    mse = prediction_mse(x0_hat, x0, output_scale, w.of_mse(), w.mask)
    if not c.perceptual_weight:
        return LossParts(loss=c.mse_weight * mse, perceptual=torch.zeros((), device=mse.device), mse=mse.detach())

    a_p, b_p = noise_coefficients(noise_scaling, sigma_prime, x0)
    x_hat_tp = a_p * x0_hat + b_p * eps_hat
    with torch.no_grad():
        x_tp = a_p * x0 + b_p * eps

    if c.batched_frozen:
        feats = frozen_features(torch.cat([x_tp, x_hat_tp]), torch.cat([sigma_prime, sigma_prime]))
        f_target, f_pred = feats.chunk(2)
        f_target = f_target.detach()
    else:
        with torch.no_grad():
            f_target = frozen_features(x_tp, sigma_prime)
        f_pred = frozen_features(x_hat_tp, sigma_prime)

    per_sample = feature_distance(f_pred, f_target, c.distance, c.normalize, w.mask)
    perceptual = (per_sample * w.sample.to(per_sample)).mean() if w.sample is not None else per_sample.mean()
    loss = c.perceptual_weight * perceptual if c.perceptual_weight != 1 else perceptual
    loss = loss + c.mse_weight * mse if c.mse_weight else loss
    return LossParts(loss=loss, perceptual=perceptual.detach(), mse=mse.detach())
