"""Self-Perceptual node pack for ComfyUI (Lin & Yang, "Diffusion Model with Perceptual Loss")."""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

WEB_DIRECTORY = "./web"


class SelfPerceptualExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .nodes import NODES

        return NODES


async def comfy_entrypoint() -> SelfPerceptualExtension:
    return SelfPerceptualExtension()
