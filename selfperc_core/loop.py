"""The fine-tuning loop: batches, noise levels, the objective, the optimizer, and resumable state.

Shared by the ComfyUI node and the headless trainer. All random draws come from one CPU generator whose
state is part of the saved state, so N steps straight and N/2 + resume N/2 give the same weights.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor

from .host import ModelHost
from .objective import MSE_SPACES, LossParts, self_perceptual_loss
from .timesteps import draw_t, draw_t_prime


@dataclass
class TrainSettings:
    steps: int = 100
    learning_rate: float = 1e-4
    batch_size: int = 1
    seed: int = 0
    t_prime: str = "uniform"
    t_prime_range: tuple[float, float] = (0.0, 1.0)
    t_range: tuple[float, float] | None = None  # None: the host's (see host.default_t_range)
    distance: str = "mse"
    normalize: bool = False
    mse_weight: float = 0.0
    mse_space: str = "native"  # the MSE term's space: "native" (the model's own eps/v/velocity loss) or "x0"
    perceptual_weight: float = 1.0  # 0 (with mse_weight > 0): the plain MSE baseline
    batched_frozen: bool = False
    optimizer: str = "adamw"
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None  # the schedule's horizon (final step count); None: steps
    ema_decay: float = 0.0  # 0: no EMA of the trained weights (the paper: 0.9995)

    def as_dict(self) -> dict:
        return asdict(self)


OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop")
LR_SCHEDULES = ("constant", "cosine", "linear")


def make_optimizer(name: str, params: list[Tensor], lr: float) -> torch.optim.Optimizer:
    """The optimizers core Train LoRA offers, with torch's defaults (AdamW without weight decay: the LoRA starts
    at zero, and decay would pull it back there)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def lr_factor(step: int, schedule: str, warmup: int, total: int) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based) of ``total``.

    Linear warm-up over the first ``warmup`` steps: (step + 1) / warmup. After it, with p = (step - warmup) /
    (total - warmup) in [0, 1]: constant 1; cosine 0.5 * (1 + cos(pi * p)); linear 1 - p.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {LR_SCHEDULES}")
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "linear":
        return 1.0 - p
    return 1.0


class NonFiniteLoss(FloatingPointError):
    def __init__(self, step: int, value: float):
        super().__init__(f"loss became {value} at step {step}: training stopped before the update; "
                         f"lower the learning rate (or use fp32)")
        self.step, self.value = step, value


class Trainer:
    """One self-perceptual fine-tune.

    Args:
        params: the trainable (adapter) parameters.
        latents: clean latents, one (C, h, w) tensor per image; images of one shape form a bucket.
        conds: per-image conditionings, as the host stores them (or None each, for unconditional training);
            a batch's are joined by ``host.collate``.
        host: the model's callables (predictions, frozen features, forward process, schedule).
    """

    def __init__(self, params: list[Tensor], latents: list[Tensor], conds: list, host: ModelHost,
                 settings: TrainSettings, device=None,
                 rank: int = 0, world_size: int = 1, grad_sync: Callable[[list[Tensor]], None] | None = None,
                 accumulation: int = 1, optimizer: torch.optim.Optimizer | None = None):
        if len(latents) != len(conds):
            raise ValueError(f"{len(latents)} latents but {len(conds)} conditionings")
        self.params = list(params)
        self.latents, self.conds = latents, conds
        self.host = host
        self.s = settings
        self.t_range = settings.t_range or host.t_range
        self.device = device or latents[0].device
        self.optimizer = optimizer or make_optimizer(settings.optimizer, self.params, settings.learning_rate)
        lr_factor(0, settings.lr_schedule, settings.warmup_steps, 1)  # an unknown schedule fails here, not later
        if settings.mse_space not in MSE_SPACES:
            raise ValueError(f"unknown mse_space {settings.mse_space!r}; choose one of {MSE_SPACES}")
        if settings.mse_space == "native" and host.output_scale is None:
            raise ValueError("mse_space 'native' needs the host's output_scale (how its raw output enters x0_hat)")
        # Data parallel: every process draws the same GLOBAL batch (batch_size x world_size) from the shared
        # generator and keeps its own slice, so N processes x B equals 1 process x N*B exactly.
        self.rank, self.world_size, self.grad_sync = rank, world_size, grad_sync
        self.accumulation = accumulation
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.step_count = 0
        self.losses: list[float] = []
        buckets: dict[tuple, list[int]] = {}
        for i, lat in enumerate(latents):
            buckets.setdefault(tuple(lat.shape), []).append(i)
        self.buckets = list(buckets.values())
        self.ema = None
        if settings.ema_decay:
            if not 0.0 < settings.ema_decay < 1.0:
                raise ValueError(f"ema_decay {settings.ema_decay} must be within (0, 1), or 0 for none")
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            # ema = decay * ema + (1 - decay) * weights after every step (the first step copies the weights)
            self._trained = torch.nn.ParameterList(self.params)
            self.ema = AveragedModel(self._trained, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay),
                                     use_buffers=False)
            self.ema.requires_grad_(False)

    def ema_params(self) -> list[Tensor] | None:
        """The EMA of the trained weights, in ``params`` order (None without EMA)."""
        return None if self.ema is None else list(self.ema.module)

    def _indices(self, n: int) -> list[int]:
        sizes = torch.tensor([len(b) for b in self.buckets], dtype=torch.float)
        bucket = self.buckets[int(torch.multinomial(sizes, 1, generator=self.generator))]
        if len(bucket) >= n:
            pick = torch.randperm(len(bucket), generator=self.generator)[:n]
        else:  # a bucket smaller than the batch is sampled with replacement
            pick = torch.randint(len(bucket), (n,), generator=self.generator)
        return [bucket[int(i)] for i in pick]

    def _draw(self) -> tuple:
        """Everything random for one optimizer step: the GLOBAL batch (batch_size x processes x accumulation)."""
        g, s = self.generator, self.s
        idx = self._indices(s.batch_size * self.world_size * self.accumulation)
        t = draw_t(len(idx), g, self.t_range)
        tp = draw_t_prime(t, s.t_prime, g, s.t_prime_range)
        eps = torch.randn((len(idx),) + tuple(self.latents[idx[0]].shape), generator=g)
        return idx, t, tp, eps

    def _loss(self, x0: Tensor, eps: Tensor, t: Tensor, tp: Tensor, cond, training: bool = True) -> LossParts:
        """The objective on one batch at online levels t and perceptual levels t' (fractions of the schedule)."""
        h, s = self.host, self.s
        sigma = h.sigma_of_t(t).to(self.device)
        sigma_p = h.sigma_of_t(tp).to(self.device)
        scale = h.output_scale(sigma) if s.mse_space == "native" else None
        weights = dict(mse_weight=s.mse_weight, perceptual_weight=s.perceptual_weight) if training else {}
        return self_perceptual_loss(
            lambda x, sg: h.predict_x0(x, sg, cond), lambda x, sg: h.frozen_features(x, sg, cond),
            h.noise_scaling, x0, eps.to(device=self.device, dtype=x0.dtype), sigma, sigma_p,
            distance=s.distance, normalize=s.normalize, batched_frozen=s.batched_frozen and training,
            output_scale=scale, **weights)

    def _micro_batch(self, draw: tuple, j: int) -> LossParts:
        """Micro-batch ``j`` of this process from the step's global draw: k micro-batches of B are exactly one
        batch of k*B, and N processes x B exactly one process x N*B."""
        s = self.s
        lo = (j * self.world_size + self.rank) * s.batch_size
        idx, t, tp, eps = (d[lo:lo + s.batch_size] for d in draw)
        x0 = torch.stack([self.latents[i] for i in idx]).to(self.device)
        cond = None if self.conds[idx[0]] is None else self.host.collate([self.conds[i] for i in idx])
        return self._loss(x0, eps, t, tp, cond)

    @torch.no_grad()
    def validate(self, latents: list[Tensor], conds: list, seed: int = 0) -> tuple[float, float]:
        """(self-perceptual, MSE in the run's mse_space) losses on held-out latents, each at noise, t and t' drawn
        once from ``seed``: the same draws at every call, so the numbers move only with the weights. One image per
        pass (buckets)."""
        g = torch.Generator().manual_seed(seed)
        perceptual = mse = 0.0
        for lat, cond in zip(latents, conds):
            t = draw_t(1, g, self.t_range)
            tp = draw_t_prime(t, self.s.t_prime, g, self.s.t_prime_range)
            eps = torch.randn((1, *lat.shape), generator=g)
            c = None if cond is None else self.host.collate([cond])
            parts = self._loss(lat[None].to(self.device), eps, t, tp, c, training=False)
            perceptual += float(parts.perceptual)
            mse += float(parts.mse)
        return perceptual / len(latents), mse / len(latents)

    def step(self) -> LossParts:
        """One optimizer step (over ``accumulation`` micro-batches). Raises NonFiniteLoss before updating if
        the loss is NaN/Inf. The returned loss is this process's mean over its micro-batches."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = perceptual = mse = 0.0
        draw = self._draw()
        for j in range(self.accumulation):
            parts = self._micro_batch(draw, j)
            value = parts.loss.item()
            if not math.isfinite(value):
                raise NonFiniteLoss(self.step_count + 1, value)
            (parts.loss / self.accumulation).backward()
            loss, perceptual, mse = loss + value, perceptual + parts.perceptual, mse + parts.mse
        if self.grad_sync is not None:
            self.grad_sync(self.params)
        factor = lr_factor(self.step_count, self.s.lr_schedule, self.s.warmup_steps, self.s.total_steps or self.s.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.s.learning_rate * factor
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self._trained)
        self.step_count += 1
        n = self.accumulation
        out = LossParts(loss=torch.tensor(loss / n), perceptual=perceptual / n, mse=mse / n)
        self.losses.append(loss / n)
        return out

    def state_dict(self) -> dict:
        """Everything but the adapter weights needed to continue exactly: optimizer, step, RNG, loss curve."""
        state = {"optimizer": self.optimizer.state_dict(), "step": self.step_count,
                 "rng": self.generator.get_state(), "losses": list(self.losses), "settings": self.s.as_dict()}
        if self.ema is not None:
            state["ema"] = dict(self.ema.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])
        self.generator.set_state(state["rng"])
        self.losses = list(state["losses"])
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError("the saved run has no EMA weights but ema_decay is set")
            self.ema.load_state_dict(state["ema"])
