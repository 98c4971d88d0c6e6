"""A run's TensorBoard log: per-step losses and learning rate, validation losses, sample grids, written with torch's
SummaryWriter (which needs the ``tensorboard`` package; it is optional, so it is looked up when a log is asked for).
"""
from __future__ import annotations

from pathlib import Path

from torch import Tensor

from .objective import LossParts


def check_available() -> None:
    """Refuses, naming the package, when TensorBoard logging cannot run here."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ValueError("TensorBoard logging needs the tensorboard package: pip install tensorboard (into the "
                         "Python that runs ComfyUI), or turn the logging off") from None


class RunLog:
    """Event files under ``folder`` (created): scalars train/loss, train/self_perceptual, train/mse, train/direction
    (directional runs), train/learning_rate per optimizer step; validation/*; images samples/*."""

    def __init__(self, folder: Path):
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def step(self, step: int, parts: LossParts, learning_rate: float) -> None:
        w = self.writer
        w.add_scalar("train/loss", float(parts.loss), step)
        w.add_scalar("train/self_perceptual", float(parts.perceptual), step)
        w.add_scalar("train/mse", float(parts.mse), step)
        if parts.direction is not None:
            w.add_scalar("train/direction", float(parts.direction), step)
        w.add_scalar("train/learning_rate", learning_rate, step)

    def validation(self, step: int, perceptual: float, mse: float) -> None:
        self.writer.add_scalar("validation/self_perceptual", perceptual, step)
        self.writer.add_scalar("validation/mse", mse, step)

    def image(self, tag: str, step: int, image: Tensor) -> None:
        """``image``: (H, W, 3) in [0, 1]."""
        self.writer.add_image(tag, image.clamp(0, 1), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
