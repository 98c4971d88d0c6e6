"""DiffusionCLIP's directional fine-tune (Kim et al. 2022), with the self-perceptual distance as its identity term.

A real image x0 is inverted (DDIM at cfg 1, the frozen model) to the level t0; from there the online model rolls
out a few deterministic steps back to 0. At each rollout step k, with x0_hat_k the online model's clean estimate:

    L_dir = 1 - cos(dI, dT)                                    (the image moved the way the text moved)
    dI    = E(x0_hat_k) - E(x0)                                (in the direction space's image embedding E)
    dT    = the text change: E_T(target) - E_T(source), or the frozen denoiser's D*(x_k, target) - D*(x_k, source)
    L_id  = D( f*(a' x0_hat_k + b' eps, t'), f*(a' x0 + b' eps, t') )   (the self-perceptual distance to x0)
    L     = mean_k [ w_dir L_dir + w_id L_id + w_mse MSE(x0_hat_k, x0) ]

The rollout's next point is taken from the detached x0_hat_k, so each step's graph ends at its own model call, and
each step's share is backpropagated before the next one runs (DiffusionCLIP's GPU-efficient fine-tuning, with one
optimizer step per rollout instead of one per rollout step): memory stays that of one step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .inversion import euler_step, trajectory
from .objective import DISTANCES, LossParts, feature_distance, prediction_mse
from .schedule import NoiseScaling, noise_coefficients

DIRECTION_SPACES = ("denoiser", "clip")
MAX_ROLLOUT_STEPS = 200


def directional_loss(d_image: Tensor, d_text: Tensor, eps: float = 1e-12) -> Tensor:
    """1 - cos(d_image, d_text) per sample, (B,): 0 when the image changed along the text direction, 2 when against
    it, the same for any positive scale of either. ``d_text`` of batch 1 applies to every sample."""
    a = d_image.flatten(1).float()
    b = d_text.flatten(1).float().expand_as(a)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(eps)
    return 1.0 - cos


def normalized(x: Tensor) -> Tensor:
    """Each sample scaled to unit length (CLIP embeddings are compared on the sphere, as DiffusionCLIP does)."""
    flat = x.flatten(1).float()
    return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).reshape(x.shape)


def clip_input(images: Tensor, size: int, mean, std) -> Tensor:
    """Images (B, 3, H, W) in [0, 1] -> a CLIP vision tower's input, differentiably: the short side resized to
    ``size`` (bicubic, antialiased), centre-cropped to size x size, normalised by the per-channel ``mean``/``std``."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    x = torch.nn.functional.interpolate(images, size=(max(size, round(h * scale)), max(size, round(w * scale))),
                                        mode="bicubic", antialias=True, align_corners=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x - m) / s


def rollout_sigmas(sigma_of_t: Callable[[Tensor], Tensor], t0: float, steps: int) -> Tensor:
    """The rollout's levels: ``steps`` equal steps in t from t0 down, then sigma 0 (clean), (steps + 1,)."""
    check_rollout(t0, steps)
    t = torch.linspace(t0, 0.0, steps + 1)[:-1]
    return torch.cat([sigma_of_t(t).float().reshape(-1), torch.zeros(1)])


def check_rollout(t0: float, steps: int, t_max: float = 1.0, what: str = "rollout_steps") -> None:
    """t0 must lie inside the schedule the model is trained on ((0, t_max]); the steps (``what``) within
    1..MAX_ROLLOUT_STEPS."""
    if not (isinstance(t0, (int, float)) and math.isfinite(t0) and 0.0 < t0 <= t_max):
        raise ValueError(f"t0 {t0} is outside the schedule: it must be in (0, {t_max:g}] as a fraction of the "
                         "noise schedule (0 clean, 1 pure noise)")
    if not 1 <= steps <= MAX_ROLLOUT_STEPS:
        raise ValueError(f"{what} {steps} must be in 1..{MAX_ROLLOUT_STEPS}")


def invert(denoise: Callable[[Tensor, Tensor], Tensor], x0: Tensor, sigmas: Tensor) -> Tensor:
    """x0 inverted to ``sigmas[0]`` along ``sigmas`` (decreasing to 0; DDIM inversion with the frozen ``denoise``).
    Finer levels than the rollout's make the start closer to the image's true inversion (DiffusionCLIP: 40 up, 6
    down)."""
    return trajectory(denoise, x0, sigmas)[0]


@dataclass(frozen=True)
class DirectionalConfig:
    """The weights of the three terms and the identity distance (the module docstring's L)."""
    direction_weight: float = 1.0
    identity_weight: float = 1.0   # the self-perceptual distance to the input image
    mse_weight: float = 0.0        # MSE(x0_hat, x0) in the model's own output space (or x0 space)
    distance: str = "mse"
    normalize: bool = False

    def validate(self) -> "DirectionalConfig":
        if self.distance not in DISTANCES:
            raise ValueError(f"unknown distance {self.distance!r}; choose one of {DISTANCES}")
        for name in ("direction_weight", "identity_weight", "mse_weight"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} {v} must be a finite number >= 0")
        if not self.direction_weight:
            raise ValueError("direction_weight is 0: the directional fine-tune would not move along the text")
        return self


@dataclass
class Rollout:
    """One batch's edit: where the rollout starts and how the image and the text changes are measured.

    start: the images inverted to sigmas[0]; sigmas: the rollout's levels, decreasing to 0 (``rollout_sigmas``);
    image_change: x0_hat -> dI (e.g. x0_hat - x0, or a CLIP image embedding's change); text_direction:
    (x_k, sigma_k) -> dT, run without gradient (a fixed embedding change, or the frozen model's prediction
    difference between the two texts at the rollout's point).
    """
    start: Tensor
    sigmas: Tensor
    image_change: Callable[[Tensor], Tensor]
    text_direction: Callable[[Tensor, Tensor], Tensor]


def directional_loss_parts(
    predict_x0: Callable[[Tensor, Tensor], Tensor],
    frozen_features: Callable[[Tensor, Tensor], Tensor],
    noise_scaling: NoiseScaling,
    x0: Tensor,
    eps: Tensor,
    sigma_prime: Tensor,
    rollout: Rollout,
    config: DirectionalConfig = DirectionalConfig(),
    output_scale: Callable[[Tensor], Tensor] | None = None,
    backward: Callable[[Tensor], None] | None = None,
) -> LossParts:
    """The directional loss of one batch over its rollout (module docstring).

    Args:
        predict_x0: online model (adapter on), (x, sigma) -> x0_hat, conditioned on the source.
        frozen_features: frozen model at the tapped layer, (x, sigma) -> features, conditioned on the source.
        noise_scaling: the forward process (the identity term noises x0_hat and x0 with the same ``eps``).
        x0: the input images' latents.
        eps, sigma_prime: the identity term's noise and level t' (as sigma), (B, ...) and (B,).
        rollout: the start, the levels and the two changes (``Rollout``).
        output_scale: sigma (B,) -> c_out, for the MSE in the model's own output space; None: x0 space.
        backward: given, each step's share of the loss is backpropagated through it at once (its graph freed before
            the next step; the returned loss is then detached, ``backward_done``); None: one graph over all steps.
    """
    c = config.validate()
    sigmas, text_direction, image_change = rollout.sigmas, rollout.text_direction, rollout.image_change
    b = x0.shape[0]
    a_p, b_p = noise_coefficients(noise_scaling, sigma_prime, x0)
    x_ref = a_p * x0 + b_p * eps
    with torch.no_grad():
        f_ref = frozen_features(x_ref, sigma_prime)
    x = rollout.start
    loss = direction = identity = mse = 0.0
    n = len(sigmas) - 1
    for k in range(n):
        s = sigmas[k].expand(b).to(x0)
        x0_hat = predict_x0(x, s)
        with torch.no_grad():
            d_text = text_direction(x, s)
        l_dir = directional_loss(image_change(x0_hat), d_text).mean()
        term = c.direction_weight * l_dir
        l_id = torch.zeros((), device=x0.device)
        if c.identity_weight:
            # the same noise on x0_hat as on x0: a distance between two images, not a denoising target
            x_gen = a_p * x0_hat + b_p * eps
            l_id = feature_distance(frozen_features(x_gen, sigma_prime), f_ref, c.distance, c.normalize).mean()
            term = term + c.identity_weight * l_id
        l_mse = prediction_mse(x0_hat, x0, output_scale(s) if output_scale is not None else None)
        if c.mse_weight:
            term = term + c.mse_weight * l_mse
        if backward is not None:
            backward(term / n)
            term = term.detach()
        loss = loss + term / n
        direction, identity, mse = direction + l_dir.detach() / n, identity + l_id.detach() / n, mse + l_mse.detach() / n
        x = euler_step(x, x0_hat.detach(), sigmas[k], sigmas[k + 1])
    return LossParts(loss=loss, perceptual=identity, mse=mse, direction=direction, backward_done=backward is not None)
