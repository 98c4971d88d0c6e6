"""The ComfyUI layer: one io.ComfyNode per module, adapting ComfyUI objects to selfperc_core."""
from .distance import PerceptualDistance
from .sample import SelfPerceptualSampler
from .train import SelfPerceptualFineTune

NODES = [SelfPerceptualFineTune, SelfPerceptualSampler, PerceptualDistance]
