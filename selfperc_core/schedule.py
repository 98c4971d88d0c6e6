"""The forward process, seen only through the host's ``noise_scaling(sigma, eps, x0) -> x_t``.

Every parameterization in use is linear in (x0, eps) at a fixed noise level sigma:

    x_t = a(sigma) * x0 + b(sigma) * eps
    eps-prediction / v-prediction (k-diffusion space):  a = 1,          b = sigma
    flow matching (rectified flow, "CONST"):              a = 1 - sigma,  b = sigma

so a and b are read off the host's own function instead of being guessed from a model type.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

NoiseScaling = Callable[[Tensor, Tensor, Tensor], Tensor]


def noise_coefficients(noise_scaling: NoiseScaling, sigma: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """Return (a, b), broadcastable to ``like``, with ``noise_scaling(sigma, eps, x0) = a*x0 + b*eps``.

    Args:
        noise_scaling: the host's forward process.
        sigma: noise levels, shape (B,).
        like: a tensor of the latent shape (B, C, ...), for broadcasting and dtype.
    """
    shape = (like.shape[0],) + (1,) * (like.ndim - 1)
    ones = torch.ones(shape, dtype=like.dtype, device=like.device)
    zeros = torch.zeros_like(ones)
    a = noise_scaling(sigma, zeros, ones)
    b = noise_scaling(sigma, ones, zeros)
    return a.reshape(shape), b.reshape(shape)


def split_prediction(x_t: Tensor, sigma: Tensor, x0_hat: Tensor, noise_scaling: NoiseScaling) -> Tensor:
    """eps_hat, the noise implied by a prediction x0_hat of x_t:  eps_hat = (x_t - a*x0_hat) / b.

    Exact for any parameterization when the model is exact: then x0_hat = x0 and eps_hat = eps.
    b(sigma) >= sigma_min > 0 on every schedule ComfyUI trains on, so the division is finite.
    """
    a, b = noise_coefficients(noise_scaling, sigma, x_t)
    return (x_t - a * x0_hat) / b
