"""The ComfyUI layer: one io.ComfyNode per module, adapting ComfyUI objects to selfperc_core."""
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from .attention_maps import SelfPerceptualAttentionMaps
from .direction import SelfPerceptualDirection
from .distance import PerceptualDistance
from .edit_guider import SelfPerceptualInversionGuider
from .evaluate import SelfPerceptualEvaluate
from .invert import SelfPerceptualInvert
from .null_text import SelfPerceptualNullTextInversion
from .optimize_embedding import SelfPerceptualOptimizeEmbedding
from .options import OPTION_NODES
from .p2p_guider import SelfPerceptualPromptToPrompt
from .pix2pix_zero_guider import SelfPerceptualPix2PixZero
from .sample import SelfPerceptualSampler
from .train import SelfPerceptualFineTune
from .upscale_evaluate import SelfPerceptualUpscaleEvaluate
from .upscaler import SelfPerceptualSuperResolution

NODES = [SelfPerceptualFineTune, *OPTION_NODES, SelfPerceptualSampler, PerceptualDistance, SelfPerceptualEvaluate,
         SelfPerceptualInvert, SelfPerceptualNullTextInversion, SelfPerceptualInversionGuider,
         SelfPerceptualPromptToPrompt, SelfPerceptualPix2PixZero, SelfPerceptualAttentionMaps,
         SelfPerceptualOptimizeEmbedding, SelfPerceptualDirection, SelfPerceptualSuperResolution,
         SelfPerceptualUpscaleEvaluate]


class SelfPerceptualExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
