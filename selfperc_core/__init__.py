"""Pure-torch core of the self-perceptual objective (Lin & Yang 2024, arXiv 2401.00110).

Never imports ComfyUI: the host (ComfyUI nodes, the headless trainer, tests) adapts a model to it by passing
plain tensors and callables.
"""
from .adapter import AdapterSwitch, checkpoint_forward
from .features import FeatureTap
from .objective import LossConfig, LossParts, self_perceptual_loss
from .schedule import noise_coefficients, split_prediction
from .timesteps import T_PRIME_STRATEGIES, draw_t, draw_t_prime

__version__ = "0.2.0"  # the pack's version (pyproject.toml says the same; a test checks it)

__all__ = [
    "AdapterSwitch", "checkpoint_forward", "FeatureTap", "LossConfig", "LossParts", "self_perceptual_loss",
    "noise_coefficients", "split_prediction", "T_PRIME_STRATEGIES", "draw_t", "draw_t_prime", "__version__",
]
