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


@torch.no_grad()
def preview_image(model_patcher, vae, latent_shape, positive: list, seed: int, steps: int = 8):
    """A small sample of the model being trained (adapter on), no CFG, for ``positive`` (a CONDITIONING);
    ('JPEG', PIL image, size) for the progress bar."""
    from PIL import Image

    latent = torch.zeros(1, *latent_shape)
    noise = comfy.sample.prepare_noise(latent, seed)
    samples = comfy.sample.sample(model_patcher, noise, steps, 1.0, "euler", "normal", positive, positive, latent,
                                  disable_pbar=True, seed=seed)
    img = vae.decode(samples)
    img = img.reshape(-1, *img.shape[-3:])[0].clamp(0, 1)  # video VAEs decode (B, T, H, W, 3): first frame
    arr = (img.float().cpu().numpy() * 255).round().astype("uint8")
    return ("JPEG", Image.fromarray(arr), 256)


@torch.no_grad()
def prompt_grid(model_patcher, vae, latent_shape, prompts: list[tuple[str, list]], seed: int, steps: int = 8):
    """One no-CFG sample per (label, CONDITIONING) from the same noise, as a labelled grid (1, H, W, 3)."""
    from .sample import frames, labelled_grid

    latent = torch.zeros(1, *latent_shape)
    noise = comfy.sample.prepare_noise(latent, seed)
    columns = []
    for label, cond in prompts:
        samples = comfy.sample.sample(model_patcher, noise, steps, 1.0, "euler", "normal", cond, cond, latent,
                                      disable_pbar=True, seed=seed)
        columns.append((label[:40], frames(vae.decode(samples)[..., :3])[:1].clamp(0, 1)))
    return labelled_grid(columns)
