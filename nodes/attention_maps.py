"""Prompt-to-Prompt Attention Maps: which words went where, read off a Prompt-to-Prompt or Pix2Pix-Zero Guider
after it sampled."""
from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageDraw, ImageFont

from .distance import colormap
from .prompt_to_prompt import PromptToPromptGuider

TILE = 96
LABEL = 14
MAX_TOKENS = 24
MAX_PAIRS = 4


def map_tiles(maps: torch.Tensor, grid: tuple, positions: list) -> torch.Tensor:
    """(Q, K) maps summed over steps and layers -> one (TILE, TILE) tile per token position, each normalised
    to its own maximum (so a weakly attended word is still visible)."""
    h, w = grid
    m = maps[:, positions].T.reshape(-1, 1, h, w).float()
    m = m / m.flatten(1).amax(1).clamp_min(1e-12).reshape(-1, 1, 1, 1)
    return torch.nn.functional.interpolate(m, size=(TILE, TILE), mode="bilinear", align_corners=False)[:, 0]


def grid_image(rows: list[tuple[torch.Tensor, list[str]]]) -> torch.Tensor:
    """Rows of tiles with their labels -> one (1, H, W, 3) IMAGE."""
    cols = max(len(labels) for _, labels in rows)
    img = Image.new("RGB", (cols * TILE, len(rows) * (TILE + LABEL)), (0, 0, 0))
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    for r, (tiles, labels) in enumerate(rows):
        rgb = (colormap(tiles).numpy() * 255).astype(np.uint8)
        for c, label in enumerate(labels):
            x, y = c * TILE, r * (TILE + LABEL)
            img.paste(Image.fromarray(rgb[c]), (x, y + LABEL))
            draw.text((x + 2, y + 1), label[:14], fill=(255, 255, 255), font=font)
    return torch.from_numpy(np.asarray(img, np.float32) / 255)[None]


class SelfPerceptualAttentionMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfPerceptualAttentionMaps",
            display_name="Prompt-to-Prompt Attention Maps",
            category="selfperc/editing",
            description="The cross-attention map of every word of the source and target prompts (summed over the "
                        "steps and the map-level layers; each tile scaled to its own maximum), and local "
                        "blending's last mask, from the Prompt-to-Prompt (or Pix2Pix-Zero) Guider's last sampling.",
            inputs=[
                io.Guider.Input("guider", tooltip="The Prompt-to-Prompt or Pix2Pix-Zero Guider that sampled."),
                io.Latent.Input("samples", tooltip="SamplerCustomAdvanced's output of that guider (it makes this "
                                                   "node run after the sampling)."),
            ],
            outputs=[io.Image.Output(display_name="maps", tooltip="One row per branch (source, target) of the "
                                                                  f"first {MAX_PAIRS} images; one tile per token.")],
        )

    @classmethod
    def execute(cls, guider, samples):
        if not isinstance(guider, PromptToPromptGuider):
            raise ValueError(f"the guider is a {type(guider).__name__}, not a Prompt-to-Prompt or Pix2Pix-Zero Guider")
        run = guider.run
        if run is None or run.maps is None:
            raise ValueError("the Prompt-to-Prompt Guider has not sampled yet (connect its SamplerCustomAdvanced "
                             "output to samples)")
        if samples["samples"].shape[0] != 2 * run.pairs:
            raise ValueError(f"samples has {samples['samples'].shape[0]} images, the guider's last sampling made "
                             f"{2 * run.pairs}: connect that sampling's output")
        plan, rows = run.plan, []
        for p in range(min(run.pairs, MAX_PAIRS)):
            for prompt, row in ((plan.source, p), (plan.target, run.pairs + p)):
                pos = prompt.real[:MAX_TOKENS]
                tiles, labels = map_tiles(run.maps[row], run.grid, pos), list(prompt.labels[:MAX_TOKENS])
                if run.mask is not None and prompt is plan.target:
                    m = torch.nn.functional.interpolate(run.mask[p:p + 1].float(), size=(TILE, TILE))[:, 0]
                    tiles, labels = torch.cat([tiles, m]), labels + ["blend mask"]
                rows.append((tiles, labels))
        return io.NodeOutput(grid_image(rows))
