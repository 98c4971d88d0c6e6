"""Distribution distances for judging a fine-tune on the user's own data, with their spread.

Given feature vectors of dataset images and of each model's samples (the samples of every model paired: the same
noise made sample i of each), this computes
  * the Fréchet distance (FD) of Gaussians fitted to the two sets, and
  * the kernel distance (KID: unbiased MMD^2 with the cubic polynomial kernel), which stays unbiased at the small
    counts a user can afford to sample (FD's covariance is rank-deficient below dim+1 points and FD is then
    biased upward),
both through torchmetrics (its FID/KID metrics take a custom feature extractor; ours are features computed
beforehand, so the extractor is the identity). The spread comes from paired resampling: each replicate draws
dataset images and sample indices, the same indices for every model, so the spread of a *difference* between
models (what tells a user whether the change is noise) is measured directly. FD: a bootstrap (with replacement).
KID: random halves without replacement, since a duplicated point would enter its within-set kernel mean and bias
the unbiased estimator.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

MIN_IMAGES = 2  # a covariance (FD) and an unbiased within-set kernel mean (KID) need at least 2 points


class _Given(torch.nn.Module):
    """The identity 'feature extractor' torchmetrics needs when the features are already computed."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: Tensor) -> Tensor:
        return x


def _metrics():
    """torchmetrics' image metrics (the pack's requirements.txt installs it; only the evaluation needs it)."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError as e:
        raise ImportError("the evaluation needs torchmetrics: pip install -r requirements.txt (in ComfyUI's "
                          f"Python environment) ({e})") from e
    return FrechetInceptionDistance, KernelInceptionDistance


def _check(real: Tensor, fake: Tensor, what: str = "") -> None:
    for name, x in (("dataset", real), ("samples", fake)):
        if x.ndim != 2:
            raise ValueError(f"{what}{name} features must be (count, dim), got {tuple(x.shape)}")
        if x.shape[0] < MIN_IMAGES:
            raise ValueError(f"{what}{name}: {x.shape[0]} image(s); a distance between distributions needs at least "
                             f"{MIN_IMAGES} on each side (a covariance needs 2 points; FD is unbiased only with more "
                             f"than the feature dimension, {x.shape[1]}, and KID is preferred below that)")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"{what}feature widths differ: dataset {real.shape[1]}, samples {fake.shape[1]}")


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """FD between Gaussians fitted to ``real`` (N, D) and ``fake`` (M, D) (torchmetrics' FID on given features)."""
    fid, _ = _metrics()
    _check(real, fake)
    m = fid(feature=_Given(real.shape[1]), normalize=False).to(real.device)
    m.update(real.double(), real=True)
    m.update(fake.double(), real=False)
    return float(m.compute())


def kernel_distance(real: Tensor, fake: Tensor, seed: int = 0) -> float:
    """KID (unbiased MMD^2, cubic polynomial kernel) between ``real`` and ``fake`` (torchmetrics), on subsets of
    the smaller set's size (all of both when the counts are equal)."""
    _, kid = _metrics()
    _check(real, fake)
    size = min(real.shape[0], fake.shape[0])
    m = kid(feature=_Given(real.shape[1]), subsets=1, subset_size=size, normalize=False).to(real.device)
    m.update(real.double(), real=True)
    m.update(fake.double(), real=False)
    devices = list(range(torch.cuda.device_count())) if real.is_cuda else []
    with torch.random.fork_rng(devices=devices):  # torchmetrics draws its subsets from the global generators
        torch.manual_seed(seed)
        mean, _std = m.compute()
    return float(mean)


@dataclass
class Spread:
    value: float          # on all images
    mean: float           # over bootstrap replicates
    std: float
    low: float            # 5th and 95th percentiles of the replicates, moved to centre on value (see _spread)
    high: float

    def as_dict(self) -> dict:
        """JSON-ready: no spread (fewer than 2 resamples) is None, not NaN."""
        d = {"value": self.value, "mean": self.mean, "std": self.std, "p05": self.low, "p95": self.high}
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def _spread(value: float, reps: list[float]) -> Spread:
    """The replicates' spread around the all-images value: [value + q05 - mean, value + q95 - mean].

    A bootstrap sample repeats points, which shrinks FD's effective sample count and biases every replicate
    upward (measured here: 0.39 on replicates for 0.21 on all 128 points): their raw percentiles would not even
    contain the value. Shifting keeps the interval's width and shape and centres it where the estimate is.
    """
    t = torch.tensor(reps, dtype=torch.float64)
    if len(reps) < 2:
        return Spread(value, value, float("nan"), float("nan"), float("nan"))
    mean = float(t.mean())
    return Spread(value, mean, float(t.std()), value + float(t.quantile(0.05)) - mean,
                  value + float(t.quantile(0.95)) - mean)


def compare(real: Tensor, fakes: dict[str, Tensor], metric, bootstraps: int = 20, seed: int = 0,
            reference: str | None = None, replace: bool = True, contrasts: tuple = ()) -> dict:
    """``metric(real, fake) -> float`` for every model's samples, with paired resampling: a bootstrap
    (``replace``) or random halves without replacement.

    ``fakes``: model name -> (M, D) features, row i of every model from the same noise. Returns
    {name: Spread} and, when ``reference`` names one of them, {"name - reference": Spread} of the differences
    (replicate by replicate, so what both models share, e.g. an unlucky draw of dataset images, cancels), and
    "a - b" the same way for each (a, b) of ``contrasts`` (e.g. a fine-tune against its plain-MSE baseline).
    """
    counts = {x.shape[0] for x in fakes.values()}
    if len(counts) != 1:
        raise ValueError(f"every model needs the same number of samples (paired by noise), got {sorted(counts)}")
    m = counts.pop()
    if not replace and min(real.shape[0], m) < 2 * MIN_IMAGES:
        bootstraps = 0  # halves of fewer than 4 points cannot vary: report no spread rather than a false zero
    g = torch.Generator().manual_seed(seed)
    reps: dict[str, list[float]] = {k: [] for k in fakes}
    for _ in range(bootstraps):
        ri, fi = _draw(real.shape[0], g, replace), _draw(m, g, replace)
        for k, f in fakes.items():
            reps[k].append(metric(real[ri.to(real.device)], f[fi.to(f.device)]))
    values = {k: metric(real, f) for k, f in fakes.items()}
    out = {k: _spread(values[k], reps[k]) for k in fakes}
    pairs = [(k, reference) for k in fakes if reference is not None and k != reference] + list(contrasts)
    for a, b in pairs:
        out[f"{a} - {b}"] = _spread(values[a] - values[b], [x - y for x, y in zip(reps[a], reps[b])])
    return out


def paired_means(values: dict[str, Tensor], bootstraps: int = 20, seed: int = 0, reference: str | None = None,
                 contrasts: tuple = ()) -> dict:
    """Per-image scores (name -> (N,), image i of every model made from the same input and noise) -> each model's
    mean, and the mean differences to ``reference`` and for each (a, b) of ``contrasts``, with a paired bootstrap
    over the images: one draw of images per replicate for every model, so what the images share cancels."""
    sizes = {v.shape[0] for v in values.values()}
    if len(sizes) != 1 or min(sizes) < 1:
        raise ValueError(f"every model needs a score for the same images, got counts {sorted(sizes)}")
    n = sizes.pop()
    g = torch.Generator().manual_seed(seed)
    reps: dict[str, list[float]] = {k: [] for k in values}
    for _ in range(bootstraps if n > 1 else 0):
        idx = torch.randint(n, (n,), generator=g)
        for k, v in values.items():
            reps[k].append(float(v[idx].double().mean()))
    means = {k: float(v.double().mean()) for k, v in values.items()}
    out = {k: _spread(means[k], reps[k]) for k in values}
    pairs = [(k, reference) for k in values if reference is not None and k != reference] + list(contrasts)
    for a, b in pairs:
        out[f"{a} - {b}"] = _spread(means[a] - means[b], [x - y for x, y in zip(reps[a], reps[b])])
    return out


def _draw(n: int, g: torch.Generator, replace: bool) -> Tensor:
    if replace:
        return torch.randint(n, (n,), generator=g)
    return torch.randperm(n, generator=g)[: max(MIN_IMAGES, n // 2)]


def pooled(features: Tensor) -> Tensor:
    """(B, C, ...) feature maps -> (B, C): the spatial mean, so images of any size give one vector each."""
    return features.flatten(2).mean(-1) if features.ndim > 2 else features


def noise_seed(*parts) -> int:
    """A generator seed from any integers/strings, well mixed (sha256) and within torch's range, so that derived
    noise streams never coincide with a caller's own seed + i."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def noised_features(features_fn, latents: Tensor, t_levels: list[float], sigma_of_t, noise_scaling, cond=None,
                    seed: int = 0, batch: int = 8, stream: str = "samples",
                    device: torch.device | None = None) -> dict[float, Tensor]:
    """Frozen-model features of ``latents`` (N, ...) noised to each level t' (fraction of the schedule).

    Row i of a ``stream`` gets noise from a generator keyed by (``seed``, ``stream``, t', i): every model's samples
    (one stream, paired by index like their sampling noise) see the same corruption, while the dataset's stream is
    independent of theirs, so no cross-set pair shares noise (which would correlate them and bias KID's cross
    term) and no sample is corrupted with its own starting noise. ``features_fn(x, sigma, cond)`` is the frozen
    tap (e.g. ModelView.frozen_features); ``cond``: a batch cond or a function of the chunk size, or None.
    Chunks move to ``device`` one at a time. Returns {t': (N, C) pooled features, on the CPU}.
    """
    out = {}
    for t in t_levels:
        chunks = []
        for start in range(0, latents.shape[0], batch):
            x0 = latents[start:start + batch].to(device if device is not None else latents.device)
            eps = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(
                noise_seed(seed, stream, float(t), start + j))) for j in range(x0.shape[0])]).to(x0)
            sigma = sigma_of_t(torch.full((x0.shape[0],), float(t))).to(x0)
            c = cond(x0.shape[0]) if callable(cond) else cond
            with torch.no_grad():
                chunks.append(pooled(features_fn(noise_scaling(sigma, eps, x0), sigma, c)).float().cpu())
        out[t] = torch.cat(chunks)
    return out


def levels_mean(metric):
    """A metric on (N, L, C) feature stacks: the mean over the L noise levels of ``metric`` per level."""
    def f(real, fake):
        return sum(metric(real[:, i], fake[:, i]) for i in range(real.shape[1])) / real.shape[1]
    return f


# FD costs an eigen-decomposition of a width x width matrix per (resample, model, level); its resamples are capped
# so that the total stays near this many decompositions of width 1024 (~1 min on a CPU). KID is cheap.
FD_BUDGET = 250


def fd_resamples(bootstraps: int, width: int, models: int, levels: int) -> int:
    """How many of ``bootstraps`` resamples FD gets within FD_BUDGET (0: FD without spread)."""
    per = FD_BUDGET / (models * levels * max(1.0, (width / 1024) ** 3))
    return max(0, min(bootstraps, int(per) - 1))


def distances(real: Tensor, fakes: dict[str, Tensor], bootstraps: int, seed: int, reference: str = "base",
              contrasts: tuple = ()) -> dict:
    """FD and KID (with spread) of every model's features against the dataset's; (N, L, C) stacks of noise levels
    are averaged over L. Returns {"FD": {row: spread dict}, "KID": {...}, "resamples": {"FD": n, "KID": n}}."""
    stacked = real.ndim == 3
    fd = levels_mean(frechet_distance) if stacked else frechet_distance
    kid = levels_mean(kernel_distance) if stacked else kernel_distance
    n_fd = fd_resamples(bootstraps, real.shape[-1], len(fakes), real.shape[1] if stacked else 1)
    return {"FD": {k: v.as_dict() for k, v in compare(real, fakes, fd, n_fd, seed, reference,
                                                      contrasts=contrasts).items()},
            "KID": {k: v.as_dict() for k, v in compare(real, fakes, kid, bootstraps, seed, reference,
                                                       replace=False, contrasts=contrasts).items()},
            "resamples": {"FD": n_fd, "KID": bootstraps}}


def build_report(metrics: dict, *, tap: str, width: int, levels: list[float], samples: int, dataset_images: int,
                 **run) -> dict:
    """The Evaluate report, as the node and the headless evaluation both write it: the run's description
    (``run``: dataset, cfg, steps, sampler, seed, bootstraps, latent_shape, ...), the ``distances`` result per
    feature space, and notes on what the self features are and when FD is biased."""
    notes = [f"self features: {tap}, {width} channels, pooled, at t' = {', '.join(map(str, levels))}"]
    points = min(samples, dataset_images)
    if points <= width:
        notes.append(f"FD is biased upward here: {points} points in {width} dimensions (a full-rank covariance needs "
                     "more than that); trust KID and the differences")
    return {"samples": samples, "dataset_images": dataset_images, **run, "noise_levels": list(levels),
            "metrics": metrics, "notes": notes}


def verdict(s: dict, higher_is_better: bool = False) -> str:
    """Plain words for a difference's 5-95% interval (a distance: lower is better; ``higher_is_better``: PSNR)."""
    if s["p05"] is None:
        return "no spread (bootstraps < 2)"
    up, down = ("better", "worse") if higher_is_better else ("worse", "better")
    if s["p05"] > 0:
        return f"{up} (higher), beyond the spread"
    if s["p95"] < 0:
        return f"{down} (lower), beyond the spread"
    return "within the spread: no measurable difference"


def report_lines(report: dict) -> list[str]:
    lines = [f"Self-Perceptual Evaluate: {report['samples']} samples per model vs {report['dataset_images']} "
             f"dataset images; cfg {report['cfg']}, {report['steps']} steps",
             "lower is better; mean +- std over resamples (FD: bootstrap, KID: random halves)", ""]
    for space, metrics in report["metrics"].items():
        for metric, rows in metrics.items():
            if metric == "resamples":
                continue
            lines.append(f"{space} {metric}" + (" (x1000)" if metric == "KID" else "")
                         + f", {metrics.get('resamples', {}).get(metric, 0)} resamples")
            scale = 1000.0 if metric == "KID" else 1.0
            for name, s in rows.items():
                tag = f"   {verdict(s)}" if " - " in name else ""
                spread = ("" if s["std"] is None else f"  +- {s['std'] * scale:.4f}  "
                          f"[{s['p05'] * scale:.4f}, {s['p95'] * scale:.4f}]")
                lines.append(f"  {name:<24} {s['value'] * scale:10.4f}{spread}{tag}")
            lines.append("")
    lines += report["notes"]
    return lines
