"""What the training loop needs from a model, in one bundle: the ModelView.

The ComfyUI node's session, the headless diffusers trainer and the tests each adapt their model once into these
callables; the loop, the objective and the benchmark take the bundle, so the rules that belong to a model
(which noise levels to train on, how conditioning batches) live in one place.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from .features import FeatureTap
from .schedule import NoiseScaling


def default_t_range(parameterization: str) -> tuple[float, float]:
    """Online noise levels to train on, as fractions of the schedule (0 clean).

    eps-prediction models estimate x0 as x_t - sigma * eps_pred, so their x0 error grows with sigma (x14.6 at
    SD1.5's sigma_max); that x0_hat is then re-noised to a possibly low t' and dominates the loss. For eps
    models the top 10% of the schedule is left out; v and flow models use the whole range (the paper's model
    is v-prediction with zero terminal SNR).
    """
    return (0.0, 0.9) if parameterization == "eps" else (0.0, 1.0)


def stack_token_conds(conds: list[Tensor]) -> Tensor:
    """Stack per-image token sequences (1, L_i, D) of different lengths into one batch.

    Each is repeated to the least common multiple of the lengths (as ComfyUI batches cross-attention
    conditioning): attention over a sequence repeated k times gives the same output as over the sequence once.
    """
    n = math.lcm(*[c.shape[1] for c in conds])
    return torch.cat([c.repeat(1, n // c.shape[1], *([1] * (c.ndim - 2))) for c in conds])


def frozen_features_fn(predict: Callable, tap: FeatureTap, switch=None) -> Callable:
    """(x, sigma, cond) -> the frozen network's features: ``predict`` read at ``tap`` (stopping there, unless the tap
    says otherwise) with the adapter ``switch`` off (None: a network without an adapter). Every reader of features
    (training, Evaluate, Perceptual Distance, the headless trainer and evaluation) is this function."""
    def frozen_features(x, sigma, cond=None):
        with switch.off() if switch is not None else contextlib.nullcontext():
            return tap.features(predict, x, sigma, cond)
    return frozen_features


@dataclass
class ModelView:
    """A model seen by the loop.

    Attributes:
        predict_x0: (x_t, sigma, cond) -> x0_hat with the adapter on; cond is a batch from ``collate`` or None.
        frozen_features: (x, sigma, cond) -> the frozen network's features (adapter off, early exit).
        noise_scaling: the forward process (sigma, eps, x0) -> x_t.
        sigma_of_t: t in [0, 1] (0 clean) -> sigma, elementwise.
        parameterization: "eps", "v" or "flow" (decides the online t-range).
        collate: per-image conditionings (as the host stores them) -> one batch's cond.
        output_scale: sigma (B,) -> c_out(sigma) (B,), how the raw network output enters x0_hat
            (schedule.output_scale_fn); needed for the MSE in the model's own output space.
        sigma_data: the data's standard deviation the schedule assumes (1; EDM models 0.5).
    """
    predict_x0: Callable[[Tensor, Tensor, Any], Tensor]
    frozen_features: Callable[[Tensor, Tensor, Any], Tensor]
    noise_scaling: NoiseScaling
    sigma_of_t: Callable[[Tensor], Tensor]
    parameterization: str
    collate: Callable[[list], Any] = field(default=stack_token_conds)
    output_scale: Callable[[Tensor], Tensor] | None = None
    sigma_data: float = 1.0  # the data's scale in the model's schedule (EDM: 0.5), for Min-SNR's SNR

    @property
    def t_range(self) -> tuple[float, float]:
        return default_t_range(self.parameterization)
