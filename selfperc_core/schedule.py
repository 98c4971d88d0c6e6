"""The forward process, seen only through the host's ``noise_scaling(sigma, eps, x0) -> x_t``.

Every parameterization in use is linear in (x0, eps) at a fixed noise level sigma:

    x_t = a(sigma) * x0 + b(sigma) * eps
    eps-prediction / v-prediction (k-diffusion space):  a = 1,          b = sigma
    flow matching (rectified flow, "CONST"):              a = 1 - sigma,  b = sigma

so a and b are read off the host's own function instead of being guessed from a model type.

Likewise every host turns its network's raw output F into an x0 estimate affinely (Karras et al. 2022, eq. 7):

    x0_hat = denoise(x_t, sigma, F) = c_skip(sigma) * x_t + c_out(sigma) * F
    eps:  c_out = -sigma            (F = eps)
    v:    c_out = -sigma / sqrt(sigma^2 + 1)      (F = v = (eps - sigma x0) / sqrt(sigma^2 + 1))
    flow: c_out = -sigma            (F = velocity = eps - x0)

so the error in the network's own output space is (x0_hat - x0) / c_out: the MSE each model was trained with.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

NoiseScaling = Callable[[Tensor, Tensor, Tensor], Tensor]
Denoise = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_t, sigma, raw output F) -> x0_hat


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


def output_scale_fn(denoise: Denoise) -> Callable[[Tensor], Tensor]:
    """sigma (B,) -> c_out(sigma) (B,): the factor with which the network's raw output enters its x0 estimate,
    read off the host's own ``denoise(x_t, sigma, F)`` (affine in F) as denoise(0, sigma, 1)."""
    def output_scale(sigma: Tensor) -> Tensor:
        shape = (sigma.shape[0], 1)
        return denoise(torch.zeros(shape, dtype=torch.float32, device=sigma.device), sigma.float(),
                       torch.ones(shape, dtype=torch.float32, device=sigma.device)).reshape(-1)
    return output_scale
