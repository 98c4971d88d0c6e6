"""The loss curve as an image: training loss raw and smoothed, and the validation losses, readable at a glance."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

RAW, SMOOTH, VAL_SP, VAL_MSE = (170, 190, 225), (30, 80, 200), (230, 120, 20), (40, 150, 60)


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing): s_i = m_i / (1 - weight^(i+1))."""
    out, m = [], 0.0
    for i, v in enumerate(values):
        m = weight * m + (1 - weight) * v
        out.append(m / (1 - weight ** (i + 1)))
    return out


def loss_curve_image(losses: list[float], validation: list[tuple[int, float, float]] = (), width: int = 768,
                     height: int = 384) -> torch.Tensor:
    """(1, H, W, 3) in [0, 1]: raw and smoothed training loss per step, validation (self-perceptual, MSE) at its
    steps; one linear axis for the self-perceptual values, the validation MSE on its own scale at the right."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 64, width - 64, 28, height - 36
    steps = max(len(losses), max((s for s, _, _ in validation), default=0), 1)
    ys = list(losses) + [sp for _, sp, _ in validation]
    lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0

    def xy(step, v, vlo=lo, vhi=hi):
        x = left + (right - left) * step / steps
        return x, bottom - (bottom - top) * (v - vlo) / (vhi - vlo)

    d.rectangle([left, top, right, bottom], outline="black")
    for frac in (0.0, 0.5, 1.0):
        v = lo + frac * (hi - lo)
        d.text((4, xy(0, v)[1] - 6), f"{v:.4g}", fill="black", font=font)
    d.text((left, bottom + 8), "step 0", fill="black", font=font)
    d.text((right - 60, bottom + 8), f"step {steps}", fill="black", font=font)
    if len(losses) > 1:
        d.line([xy(i + 1, v) for i, v in enumerate(losses)], fill=RAW, width=1)
        d.line([xy(i + 1, v) for i, v in enumerate(smoothed(losses))], fill=SMOOTH, width=2)
    if validation:
        pts = [xy(s, sp) for s, sp, _ in validation]
        if len(pts) > 1:
            d.line(pts, fill=VAL_SP, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=VAL_SP)
        mses = [m for _, _, m in validation]
        mlo, mhi = min(mses), max(mses) if max(mses) > min(mses) else min(mses) + 1.0
        for s, _, m in validation:
            x, y = xy(s, m, mlo, mhi)
            d.rectangle([x - 2, y - 2, x + 2, y + 2], fill=VAL_MSE)
        d.text((right + 4, top), f"{mhi:.3g}", fill=VAL_MSE, font=font)
        d.text((right + 4, bottom - 10), f"{mlo:.3g}", fill=VAL_MSE, font=font)
    legend = [("train (raw)", RAW), ("train (smoothed)", SMOOTH)]
    if validation:
        legend += [("validation self-perceptual", VAL_SP), ("validation MSE (right scale)", VAL_MSE)]
    x = left
    for label, colour in legend:
        d.rectangle([x, 8, x + 10, 18], fill=colour)
        d.text((x + 14, 7), label, fill="black", font=font)
        x += 20 + 7 * len(label)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
