"""The fine-tuning loop: batches, noise levels, the objective, the optimizer, and resumable state.

Shared by the ComfyUI node and the headless trainer. All random draws come from one CPU generator whose
state is part of the saved state, so N steps straight and N/2 + resume N/2 give the same weights.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .dataset import pick_order
from .model_view import ModelView
from .objective import MSE_SPACES, LossConfig, LossParts, LossWeights, min_snr_weight, self_perceptual_loss
from .timesteps import T_PRIME_STRATEGIES, TLaw, check_t_prime_range, draw_t, draw_t_prime


@dataclass
class TrainSettings:
    """One run's training settings (the ComfyUI node and the headless trainer build it by keyword, and check it
    with ``validate``, before any work)."""
    steps: int = 100
    learning_rate: float = 1e-4
    batch_size: int = 1
    seed: int = 0
    t_prime: str = "uniform"
    t_prime_range: tuple[float, float] = (0.0, 1.0)
    t_range: tuple[float, float] | None = None  # None: the model's (see model_view.default_t_range)
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
    accumulation: int = 1  # micro-batches per optimizer step
    t_law: str = "uniform"  # the online level's law (timesteps.TLaw): uniform (the paper's) or logit_normal
    t_law_mean: float = 0.0
    t_law_std: float = 1.0
    t_shift: float = 1.0  # static shift of the drawn t (1: none)
    min_snr_gamma: float = 0.0  # Min-SNR-gamma weights of the MSE term (eps / v models, native space); 0: none
    weight_decay: float = 0.0  # decoupled (adamw, adafactor); 0: none, as the LoRA starts at zero
    max_grad_norm: float = 0.0  # clip the gradients' total norm to this before each update; 0: no clipping
    caption_dropout: float = 0.0  # fraction of samples trained on the empty caption instead of their own

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def t_law_spec(self) -> TLaw:
        return TLaw(self.t_law, self.t_law_mean, self.t_law_std, self.t_shift)

    @property
    def loss(self) -> LossConfig:
        return LossConfig(self.distance, self.normalize, self.mse_weight, self.perceptual_weight, self.batched_frozen)

    def validate(self) -> "TrainSettings":
        """Every rule on these settings, in one place; raises ValueError naming the setting."""
        self.loss.validate()
        check_t_prime_range(self.t_prime_range)
        if self.t_prime not in T_PRIME_STRATEGIES:
            raise ValueError(f"unknown t' strategy {self.t_prime!r}; choose one of {T_PRIME_STRATEGIES}")
        if self.mse_space not in MSE_SPACES:
            raise ValueError(f"unknown mse_space {self.mse_space!r}; choose one of {MSE_SPACES}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {self.lr_schedule!r}; choose one of {LR_SCHEDULES}")
        if self.ema_decay and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay {self.ema_decay} must be within (0, 1), or 0 for none")
        for name in ("batch_size", "accumulation"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be at least 1")
        self.t_law_spec.validate()
        for name in ("min_snr_gamma", "weight_decay", "max_grad_norm"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} {v} must be a finite number >= 0 (0: off)")
        if self.min_snr_gamma and self.mse_space != "native":
            raise ValueError("min_snr_gamma weighs the MSE in the model's own output space: set mse_space 'native'")
        if self.min_snr_gamma and not self.mse_weight:
            raise ValueError("min_snr_gamma weighs the MSE term, which mse_weight 0 leaves out: set mse_weight > 0")
        if abs(self.t_law_mean) > 10 or self.t_law_std > 10 or not 0.01 <= self.t_shift <= 100:
            raise ValueError(f"t_law_mean {self.t_law_mean} (|.| <= 10), t_law_std {self.t_law_std} (<= 10) and "
                             f"t_shift {self.t_shift} (0.01..100) are out of range")
        if self.t_law == "uniform" and (self.t_law_mean, self.t_law_std) != (0.0, 1.0):
            raise ValueError("t_law_mean and t_law_std shape the logit_normal law; with t_law 'uniform' leave them "
                             "at 0 and 1")
        if self.weight_decay > 1 or self.min_snr_gamma > 1000:
            raise ValueError(f"weight_decay {self.weight_decay} (<= 1) or min_snr_gamma {self.min_snr_gamma} "
                             "(<= 1000) is out of range")
        if self.weight_decay and self.optimizer not in DECOUPLED:
            raise ValueError(f"weight_decay is decoupled weight decay, for {', '.join(DECOUPLED[:-1])} or {DECOUPLED[-1]}; the optimizer "
                             f"{self.optimizer!r} would add it to the gradient instead")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout {self.caption_dropout} must be within [0, 1)")
        if self.steps < 0 or self.warmup_steps < 0 or self.learning_rate < 0:
            raise ValueError(f"steps {self.steps}, warmup_steps {self.warmup_steps} and learning_rate "
                             f"{self.learning_rate} must not be negative")
        return self


@dataclass(frozen=True)
class Distributed:
    """Data parallel: every process draws the same global batch (batch_size x world_size) from the shared generator
    and keeps its own slice, so N processes x B equals 1 process x N*B; ``grad_sync`` averages the gradients."""
    rank: int = 0
    world_size: int = 1
    grad_sync: Callable[[list[Tensor]], None] | None = None


OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop", "adafactor", "prodigy")
DECOUPLED = ("adamw", "adafactor", "prodigy")  # the optimizers whose weight_decay is decoupled from the gradient
LR_SCHEDULES = ("constant", "cosine", "linear")


def make_optimizer(name: str, params: list[Tensor], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimizers core Train LoRA offers, torch's Adafactor and Prodigy (the prodigyopt package, when installed),
    with their defaults but for weight decay: 0 unless asked (the LoRA starts at zero, and decay pulls it back
    there), decoupled where given."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        if not hasattr(torch.optim, "Adafactor"):
            raise ValueError(f"optimizer 'adafactor' needs torch.optim.Adafactor (torch 2.5 or newer); this torch is "
                             f"{torch.__version__}")
        # torch scales each step by max(eps2, RMS(weight)); a LoRA's up matrix starts at zero, where the default
        # eps2 1e-3 makes steps 1000x smaller than lr says: with eps2 1 the step is lr x the normalised update, as
        # for AdamW, so learning rates carry over
        return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay, eps=(None, 1.0))
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ValueError("optimizer 'prodigy' needs the prodigyopt package (pip install prodigyopt)") from None
        # Prodigy estimates the step size itself; lr multiplies its estimate (1.0, its authors' advice)
        return Prodigy(params, lr=lr, weight_decay=weight_decay, decouple=True)
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


# A replacement of the self-perceptual loss: (x0, eps, sigma, sigma', cond batch, backward or None) -> LossParts.
Objective = Callable[[Tensor, Tensor, Tensor, Tensor, Any, Any], LossParts]


@dataclass(frozen=True)
class SampleExtras:
    """What an image carries beyond its latent and conditioning; each None: nothing.

    empty: per image, its conditioning with the empty caption (for caption_dropout). fresh(image index,
    conditioning, seed): this step's conditioning, for what is drawn afresh per sample and step (a shuffled
    caption, super_resolution.py's degraded low-res image); the seed comes from the loop's generator, so a resumed
    run draws the same. masks: per image, a (1, ...) loss mask at its latent's size, or None (all ones). weights:
    per image, the weight of its loss (e.g. regularization images' prior weight).
    """
    empty: list | None = None
    fresh: Callable[[int, Any, int], Any] | None = None
    masks: list | None = None
    weights: list[float] | None = None


def pick_fresh(options: list[list | None], empty: list | None = None) -> Callable[[int, Any, int], Any]:
    """SampleExtras.fresh choosing, per sample and step, one of sample k's ``options`` (e.g. its caption's tag
    orders) from the step's seed; a sample without options, or one dropped to its ``empty`` caption, keeps its
    conditioning."""
    def fresh(k: int, cond, seed: int):
        if options[k] is None or len(options[k]) < 2 or (empty is not None and cond is empty[k]):
            return cond
        return options[k][pick_order(seed, len(options[k]))]
    return fresh


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
        conds: per-image conditionings, as the model's host stores them (or None each, for unconditional training);
            a batch's are joined by ``view.collate``.
        view: the model's callables (predictions, frozen features, forward process, schedule).
        settings: the run's settings (checked here).
        dist: data parallel processes (default: one).
        optimizer: an optimizer over ``params`` made elsewhere (e.g. prepared by accelerate); default: the settings'.
        conditions: what changes a sample's conditioning per step (``SampleExtras``).
        objective: (x0, eps, sigma, sigma', cond batch, backward) -> LossParts, in place of the self-perceptual
            loss (e.g. directional.py's DiffusionCLIP loss); the draws, batching, optimizer and state stay the
            loop's. ``backward(loss)`` (None when no gradient is wanted) lets it backpropagate parts of its loss as
            it goes, scaled for accumulation, to free their graphs early; it then returns ``backward_done``.
    """

    def __init__(self, params: list[Tensor], latents: list[Tensor], conds: list, view: ModelView,
                 settings: TrainSettings, device=None, dist: Distributed = Distributed(),
                 optimizer: torch.optim.Optimizer | None = None, objective: Objective | None = None,
                 conditions: SampleExtras = SampleExtras()):
        if len(latents) != len(conds):
            raise ValueError(f"{len(latents)} latents but {len(conds)} conditionings")
        self.s = settings.validate()
        if settings.mse_space == "native" and view.output_scale is None:
            raise ValueError("mse_space 'native' needs the model's output_scale (how its raw output enters x0_hat)")
        self.params = list(params)
        self.latents, self.conds, self.view, self.dist = latents, conds, view, dist
        self.objective = objective
        self.t_range = settings.t_range or view.t_range
        self.device = device or latents[0].device
        self.optimizer = optimizer or make_optimizer(settings.optimizer, self.params, settings.learning_rate,
                                                     settings.weight_decay)
        if settings.min_snr_gamma and view.parameterization not in ("eps", "v"):
            raise ValueError(f"min_snr_gamma is for eps and v models; this model is {view.parameterization!r}")
        if settings.caption_dropout and conditions.empty is None and any(c is not None for c in conds):
            raise ValueError("caption_dropout needs the empty caption's conditioning per image (conditions.empty)")
        self.empty_conds, self.condition = conditions.empty, conditions.fresh
        self.masks, self.sample_weights = conditions.masks, conditions.weights
        for name, v in (("masks", self.masks), ("weights", self.sample_weights)):
            if v is not None and len(v) != len(latents):
                raise ValueError(f"{len(latents)} latents but {len(v)} {name}")
        if objective is not None and (self.masks is not None or self.sample_weights is not None):
            raise ValueError("masks and sample weights weigh the self-perceptual objective, not a replacement one")
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.step_count = 0
        self.losses: list[float] = []
        buckets: dict[tuple, list[int]] = {}
        for i, lat in enumerate(latents):
            buckets.setdefault(tuple(lat.shape), []).append(i)
        self.buckets = list(buckets.values())
        self.ema = None
        if settings.ema_decay:
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
        idx = self._indices(s.batch_size * self.dist.world_size * s.accumulation)
        t = draw_t(len(idx), g, self.t_range, law=s.t_law_spec)
        tp = draw_t_prime(t, s.t_prime, g, s.t_prime_range)
        eps = torch.randn((len(idx),) + tuple(self.latents[idx[0]].shape), generator=g)
        # drawn last and only when used, so that runs without dropout draw what they always drew
        drop = (torch.rand(len(idx), generator=g) < s.caption_dropout) if s.caption_dropout else \
            torch.zeros(len(idx), dtype=torch.bool)
        seeds = torch.randint(0, 2 ** 31 - 1, (len(idx),), generator=g) if self.condition is not None else \
            torch.zeros(len(idx), dtype=torch.long)
        return idx, t, tp, eps, drop, seeds

    def _loss(self, x0: Tensor, eps: Tensor, t: Tensor, tp: Tensor, cond, training: bool = True,
              given: LossWeights = LossWeights()) -> LossParts:
        """The objective on one batch at online levels t and perceptual levels t' (fractions of the schedule), with
        the data's weights ``given`` (mask, sample); validation (``training`` off) always measures both terms, as
        separate passes."""
        v, s = self.view, self.s
        sigma = v.sigma_of_t(t).to(self.device)
        sigma_p = v.sigma_of_t(tp).to(self.device)
        eps = eps.to(device=self.device, dtype=x0.dtype)
        if self.objective is not None:
            n = self.s.accumulation
            backward = (lambda loss: (loss / n).backward()) if training and torch.is_grad_enabled() else None
            return self.objective(x0, eps, sigma, sigma_p, cond, backward)
        scale = v.output_scale(sigma) if s.mse_space == "native" else None
        config = s.loss if training else LossConfig(s.distance, s.normalize)
        # training only: validation reports the plain MSE, comparable across runs
        snr = min_snr_weight(sigma, s.min_snr_gamma, v.output_scale(sigma), v.sigma_data) \
            if s.min_snr_gamma and training else None
        weights = LossWeights(snr, given.sample, None if given.mask is None else given.mask.to(self.device))
        return self_perceptual_loss(
            lambda x, sg: v.predict_x0(x, sg, cond), lambda x, sg: v.frozen_features(x, sg, cond),
            v.noise_scaling, x0, eps, sigma, sigma_p, config, scale, weights)

    def _given(self, idx: list[int]) -> LossWeights:
        """The data's loss weights for the images ``idx``: their masks (ones where an image has none) and weights."""
        mask = sample = None
        if self.masks is not None and any(self.masks[i] is not None for i in idx):
            mask = torch.stack([self.masks[i] if self.masks[i] is not None else
                                torch.ones((1, *self.latents[i].shape[1:])) for i in idx])
        if self.sample_weights is not None:
            sample = torch.tensor([float(self.sample_weights[i]) for i in idx], device=self.device)
        return LossWeights(sample=sample, mask=mask)

    def _micro_batch(self, draw: tuple, j: int) -> LossParts:
        """Micro-batch ``j`` of this process from the step's global draw: k micro-batches of B are exactly one
        batch of k*B, and N processes x B exactly one process x N*B."""
        s = self.s
        lo = (j * self.dist.world_size + self.dist.rank) * s.batch_size
        idx, t, tp, eps, drop, seeds = (d[lo:lo + s.batch_size] for d in draw)
        x0 = torch.stack([self.latents[i] for i in idx]).to(self.device)
        conds = [self.empty_conds[i] if dropped and self.empty_conds is not None else self.conds[i]
                 for i, dropped in zip(idx, drop.tolist())]
        if self.condition is not None:
            conds = [self.condition(i, c, int(seed)) for i, c, seed in zip(idx, conds, seeds)]
        cond = None if conds[0] is None else self.view.collate(conds)
        return self._loss(x0, eps, t, tp, cond, given=self._given(idx))

    @torch.no_grad()
    def validate(self, latents: list[Tensor], conds: list, seed: int = 0,
                 masks: list | None = None) -> tuple[float, float]:
        """(self-perceptual, MSE in the run's mse_space) losses on held-out latents (weighted by their ``masks``),
        each at noise, t and t' drawn once from ``seed``: the same draws at every call, so the numbers move only
        with the weights. One image per pass (buckets)."""
        g = torch.Generator().manual_seed(seed)
        perceptual = mse = 0.0
        for k, (lat, cond) in enumerate(zip(latents, conds)):
            mask = masks[k] if masks is not None else None
            t = draw_t(1, g, self.t_range, law=self.s.t_law_spec)
            tp = draw_t_prime(t, self.s.t_prime, g, self.s.t_prime_range)
            eps = torch.randn((1, *lat.shape), generator=g)
            c = None if cond is None else self.view.collate([cond])
            parts = self._loss(lat[None].to(self.device), eps, t, tp, c, training=False,
                               given=LossWeights(mask=None if mask is None else mask[None]))
            perceptual += float(parts.perceptual)
            mse += float(parts.mse)
        return perceptual / len(latents), mse / len(latents)

    def step(self) -> LossParts:
        """One optimizer step (over ``accumulation`` micro-batches). Raises NonFiniteLoss before updating if
        the loss is NaN/Inf. The returned loss is this process's mean over its micro-batches."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = perceptual = mse = direction = 0.0
        draw = self._draw()
        n = self.s.accumulation
        for j in range(n):
            parts = self._micro_batch(draw, j)
            value = parts.loss.item()
            if not math.isfinite(value):
                raise NonFiniteLoss(self.step_count + 1, value)
            if not parts.backward_done:
                (parts.loss / n).backward()
            loss, perceptual, mse = loss + value, perceptual + parts.perceptual, mse + parts.mse
            if parts.direction is not None:
                direction = direction + parts.direction
        if self.dist.grad_sync is not None:
            self.dist.grad_sync(self.params)
        if self.s.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.s.max_grad_norm)
        factor = lr_factor(self.step_count, self.s.lr_schedule, self.s.warmup_steps, self.s.total_steps or self.s.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.s.learning_rate * factor
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self._trained)
        self.step_count += 1
        self.losses.append(loss / n)
        return LossParts(loss=torch.tensor(loss / n), perceptual=perceptual / n, mse=mse / n,
                         direction=direction / n if self.objective is not None else None)

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


@dataclass
class Hooks:
    """What a host does around the steps of ``fit``; every hook is optional.

    before_step(): e.g. raise if the user cancelled; context(): a context for each step (autocast);
    after_step(step, parts): progress, previews, validation, logging; save(step) -> what was saved (e.g. its
    file), called every ``save_every`` steps (the last one included, when it is a multiple); on_error(exception,
    last saved): turn a failure into the host's message (return an exception to raise instead, or None to
    re-raise).
    """
    before_step: Callable[[], None] | None = None
    context: Callable[[], Any] | None = None
    after_step: Callable[[int, LossParts], None] | None = None
    save: Callable[[int], Any] | None = None
    on_error: Callable[[BaseException, Any], BaseException | None] | None = None


def fit(trainer: Trainer, total: int, hooks: Hooks = Hooks(), save_every: int = 0) -> Any:
    """Run ``trainer`` from its step count to ``total`` steps: the one loop the ComfyUI node and the headless
    trainer share (progress, checkpoints every ``save_every`` steps, a non-finite loss stopping the run before its
    update). Returns what the last periodic save returned (None if none ran)."""
    last_saved = None
    try:
        while trainer.step_count < total:
            if hooks.before_step is not None:
                hooks.before_step()
            with hooks.context() if hooks.context is not None else contextlib.nullcontext():
                parts = trainer.step()
            step = trainer.step_count
            if hooks.after_step is not None:
                hooks.after_step(step, parts)
            if save_every and step % save_every == 0 and hooks.save is not None:
                last_saved = hooks.save(step)
    except Exception as e:
        replacement = hooks.on_error(e, last_saved) if hooks.on_error is not None else None
        if replacement is not None:
            raise replacement from None
        raise
    return last_saved
