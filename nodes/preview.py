"""What the training node shows while it runs: a text line with the loss, and small no-CFG samples."""
from __future__ import annotations

import logging

import comfy.sample
import torch

log = logging.getLogger("selfperc")


def send_text(text: str, node_id) -> None:
    """The loss line under the node's progress bar (ComfyUI's progress_text message)."""
    try:
        from server import PromptServer

        if PromptServer.instance is not None and node_id is not None:
            PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # no server in-process (tests, scripts): the console bar still shows the loss
        pass


def unconditional(model_patcher, cond: torch.Tensor | None):
    """ComfyUI conditioning for the given context, or zeros (unconditional, as in training without CLIP)."""
    if cond is None:
        dim = model_patcher.model.model_config.unet_config.get("context_dim") or 768
        cond = torch.zeros(1, 77, dim)
    return [[cond, {}]]


@torch.no_grad()
def preview_image(model_patcher, vae, latent_shape, cond, seed: int, steps: int = 8):
    """A small sample of the model being trained (adapter on), no CFG; ('JPEG', PIL image, size) for the bar."""
    from PIL import Image

    c, h, w = latent_shape
    latent = torch.zeros(1, c, h, w)
    noise = comfy.sample.prepare_noise(latent, seed)
    positive = unconditional(model_patcher, cond)
    samples = comfy.sample.sample(model_patcher, noise, steps, 1.0, "euler", "normal", positive, positive, latent,
                                  disable_pbar=True, seed=seed)
    img = vae.decode(samples)[0].clamp(0, 1)
    arr = (img.float().cpu().numpy() * 255).round().astype("uint8")
    return ("JPEG", Image.fromarray(arr), 256)
