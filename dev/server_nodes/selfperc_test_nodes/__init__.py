"""Test-only nodes for the real server: the tiny model of any family (dev/tiny_families.py), built in the server
process from ComfyUI's own classes, with its stand-in VAE, text encoder and conditioning (dev/stand_ins.py).

Loaded only by the test server (an extra custom_nodes folder); never shipped in the pack's node list.
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

import torch  # noqa: E402

from dev.stand_ins import CaptionEncoder, PatchVAE  # noqa: E402
from dev.tiny_clips import FAMILY_CLIPS, tiny_clip  # noqa: E402
from dev.tiny_families import FAMILIES, UPSCALERS, latent_shape, spec, tiny_conditioning, tiny_model  # noqa: E402


class SelfPercTestTinyFamily:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(FAMILIES) + list(UPSCALERS),), "side": ("INT", {"default": 4, "min": 1, "max": 64})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT")
    FUNCTION = "build"
    CATEGORY = "selfperc_tests"

    def build(self, family, side):
        mp = tiny_model(family)
        shape = latent_shape(family, None, side=side)
        return (mp, CaptionEncoder(family), PatchVAE(shape, spec(family)[2]), tiny_conditioning(family),
                {"samples": torch.zeros(shape)})


class SelfPercTestTinyClip:
    """A tiny text encoder of the host's own class with the family's real tokenizer (dev/tiny_clips.py)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(FAMILY_CLIPS),)}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "build"
    CATEGORY = "selfperc_tests"

    def build(self, family):
        return (tiny_clip(family),)


NODE_CLASS_MAPPINGS = {"SelfPercTestTinyFamily": SelfPercTestTinyFamily, "SelfPercTestTinyClip": SelfPercTestTinyClip}
