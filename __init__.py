"""Self-Perceptual node pack for ComfyUI (Lin & Yang, "Diffusion Model with Perceptual Loss").

ComfyUI calls ``comfy_entrypoint``; the ComfyUI-facing code is imported only then, so the package can be
imported without a ComfyUI (e.g. by test runners).
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import SelfPerceptualExtension
    from .nodes.host_compat import warn_if_untested

    warn_if_untested()

    return SelfPerceptualExtension()
