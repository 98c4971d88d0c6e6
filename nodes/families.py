"""What the pack knows about each ComfyUI model family, in one table (FAMILIES), and what follows from it: where
the frozen model's features are read, which blocks are checkpointed or run out of place, which extra inputs a
training forward needs, and whether the model has an unconditional input.

UNets (SD1.x, SD2.x, SDXL): the paper's mid-block output, ``middle_block[-1]`` (a hook on ``middle_block``
itself never fires: the UNet calls its children one by one), or another input/output block.
Transformers have no mid-block: the tap is the block at a depth fraction of the whole stack (double-stream then
single-stream blocks; the rule and the token-to-grid reshape are the core's, shared with the headless trainer).
Its image tokens only (text tokens carry no spatial features) are reshaped to a (B, C, h, w) grid, so the
distance and the heatmap work as for UNets.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..selfperc_core.block_probe import ProbedTap
from ..selfperc_core.features import DEFAULT_DEPTH, FeatureTap, block_at_depth, to_grid

log = logging.getLogger("selfperc")
MID_BLOCK = "mid_block"
# Model inputs that add reference-image tokens beside the image's (Flux Kontext, Qwen-Image edit, ... any family's
# edit models): the tap reads the image's own tokens by position, which these shift, so they are refused for now.
REFERENCE_INPUTS = ("ref_latents", "ref_latent", "time_dim_concat", "image_cond")
UNET_LAYERS = [MID_BLOCK] + [f"input_block_{i}" for i in range(12)] + [f"output_block_{i}" for i in range(12)]


def item(i: int) -> Callable:
    """A block returning a tuple: element i holds the image tokens (B, N, C)."""
    return lambda out, n, dm: out[i]


def joint(image_first: bool, pad_multiple_attr: str | None = None) -> Callable:
    """A single-stream block over the joint [text, image] (or [image, text]) sequence: the n image tokens.

    Models that pad the image tokens to a multiple (Z-Image) put the padding after them.
    """
    def pick(out, n, dm):
        if image_first:
            return out[:, :n]
        mult = getattr(dm, pad_multiple_attr, None) if pad_multiple_attr else None
        pad = (-n) % mult if mult else 0
        end = out.shape[1] - pad
        return out[:, end - n:end]
    return pick


def whole(out, n, dm):
    """A block over image tokens only (Wan, Cosmos)."""
    return out


def _no_inputs(dm) -> dict:
    return {}


def _hunyuan_inputs(dm) -> dict:
    # distilled HunyuanImage models add a second timestep from the sampler's schedule (there is none in training)
    return {"disable_time_r": True} if getattr(dm, "time_r_in", None) is not None else {}


@dataclass(frozen=True)
class ModelFamily:
    """One diffusion-model class (comfy/ldm/...), as the pack needs to know it."""
    # transformers: (block list attribute, picker) in forward order; picker(block output, n image tokens, model) ->
    # the image tokens. UNets: () (their tap is a named block)
    stacks: tuple[tuple[str, Callable], ...] = ()
    # ComfyUI's code of these blocks adds in place to tensors autograd saved (img += ...): they run under
    # adapter.OutOfPlace while training (see there)
    inplace: bool = False
    # keyword inputs a training forward adds to apply_model
    call_inputs: Callable[[torch.nn.Module], dict] = field(default=_no_inputs)
    generic: bool = False  # not in the table: the stack and tokens are found at run time (generic_family)

    @property
    def unet(self) -> bool:
        return not self.stacks


# Keyed by the diffusion model's class name (comfy/ldm/...). Pickers follow each block's forward's return.
FAMILIES: dict[str, ModelFamily] = {
    "UNetModel": ModelFamily(),  # SD1.x, SD2.x, SDXL
    "Flux": ModelFamily((("double_blocks", item(0)), ("single_blocks", joint(image_first=False))), inplace=True),
    "Chroma": ModelFamily((("double_blocks", item(0)), ("single_blocks", joint(image_first=False))), inplace=True),
    "OpenAISignatureMMDITWrapper": ModelFamily((("joint_blocks", item(1)),)),  # SD3, SD3.5: (context, x)
    "QwenImageTransformer2DModel": ModelFamily((("transformer_blocks", item(1)),)),  # (txt, img)
    "NextDiT": ModelFamily((("layers", joint(image_first=False, pad_multiple_attr="pad_tokens_multiple")),)),
    "HiDreamImageTransformer2DModel": ModelFamily((("double_stream_blocks", item(0)),
                                                   ("single_stream_blocks", joint(image_first=True)))),
    "HunyuanVideo": ModelFamily((("double_blocks", item(0)), ("single_blocks", joint(image_first=True))),
                                inplace=True, call_inputs=_hunyuan_inputs),
    "WanModel": ModelFamily((("blocks", whole),)),
    "MiniTrainDIT": ModelFamily((("blocks", whole),)),  # Cosmos Predict2: (B, T, H, W, D)
}


REPORT = ("please report the class name with your ComfyUI version so that it can be added to the pack's table "
          "(nodes/families.py)")
_warned: set[str] = set()


def candidate_lists(dm) -> dict[str, torch.nn.ModuleList]:
    """The model's own lists of blocks of one class, in registration order: where a generic tap looks."""
    return {n: m for n, m in dm.named_children()
            if isinstance(m, torch.nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1}


def generic_family(dm) -> ModelFamily:
    """A family not in the table: every candidate list is checkpointed and run out of place (identical values; needed
    for blocks that add in place); the tap is found by a probe forward (``block_probe``: ``tap_point``)."""
    lists = candidate_lists(dm)
    if not lists:
        raise ValueError(f"{type(dm).__name__} is not supported yet: it is not in the pack's table (UNets and "
                         f"{', '.join(sorted(k for k in FAMILIES if k != 'UNetModel'))}) and has no list of blocks of "
                         "one class to read features from; " + REPORT)
    return ModelFamily(tuple((name, None) for name in lists), inplace=True, generic=True)


def generic_tap(dm, depth: float, early_exit: bool) -> FeatureTap:
    key = type(dm).__name__

    def found(description: str) -> None:
        if key not in _warned:
            _warned.add(key)
            log.warning("selfperc: %s is not in the pack's table: the generic tap found %s; %s", key, description,
                        REPORT)

    def n_tokens(shape: tuple) -> int:
        return math.prod(token_grid(dm, shape))

    return ProbedTap(candidate_lists(dm), depth, n_tokens, lambda t, shape: to_grid(t, token_grid(dm, shape)),
                     f"{key} is not in the pack's table and the generic tap cannot read it", REPORT, early_exit, found)


def family_of(dm) -> ModelFamily:
    """The table's entry for a diffusion model (its class or the nearest base class listed); a transformer not in
    the table gets the generic guess (``generic_family``)."""
    for cls in type(dm).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    return generic_family(dm)


def is_unet(dm) -> bool:
    return hasattr(dm, "middle_block") and hasattr(dm, "input_blocks")


def blocks(dm) -> list[tuple[torch.nn.Module, Callable]]:
    """Every block of a transformer's main stack, in forward order, with its image-token picker."""
    out = []
    for attr, pick in family_of(dm).stacks:
        out.extend((b, pick) for b in getattr(dm, attr))
    return out


def patch_size(dm) -> tuple[int, ...]:
    """The transformer's patch size over the latent's spatial dims, e.g. (2, 2) or (1, 2, 2) for video."""
    p = getattr(dm, "patch_size", None)
    if p is None and hasattr(dm, "params"):
        p = getattr(dm.params, "patch_size", None)
    if p is None and hasattr(dm, "patch_spatial"):  # Cosmos
        p = (dm.patch_temporal, dm.patch_spatial, dm.patch_spatial)
    if p is None:
        p = 1
    return tuple(p) if isinstance(p, (tuple, list)) else (p,)


def token_grid(dm, latent_shape: tuple) -> tuple[int, ...]:
    """The image-token grid a latent of shape (B, C, [T,] H, W) becomes (patchified, padded up)."""
    dims = latent_shape[2:]
    p = patch_size(dm)
    if len(p) == 1:  # one number: the spatial patch (height and width)
        p = (p[0], p[0])
    p = (1,) * (len(dims) - len(p)) + p[-len(dims):]
    return tuple(-(-d // q) for d, q in zip(dims, p))


def unet_layers(dm) -> dict[str, torch.nn.Module]:
    layers = {MID_BLOCK: dm.middle_block[-1]}
    for i, blk in enumerate(dm.input_blocks):
        layers[f"input_block_{i}"] = blk[-1]
    for i, blk in enumerate(dm.output_blocks):
        layers[f"output_block_{i}"] = blk[-1]
    return layers


def tap_point(dm, layer: str = MID_BLOCK, depth: float = DEFAULT_DEPTH, early_exit: bool = True) -> FeatureTap:
    """The tap for ``layer`` (UNets: a block name; transformers: mid_block = the block at ``depth``). Refuses an
    unsupported model or layer, naming it; describing the tap touches nothing (its hook goes on at the first read)."""
    if is_unet(dm):
        layers = unet_layers(dm)
        if layer not in layers:
            raise ValueError(f"feature layer {layer!r} does not exist in this UNet; it has {', '.join(layers)}")
        return FeatureTap(layers[layer], layer, early_exit=early_exit)
    stack = blocks(dm)
    if layer != MID_BLOCK:
        raise ValueError(f"feature layer {layer!r} is a UNet block; {type(dm).__name__} is a transformer: use "
                         f"{MID_BLOCK} with tap_depth (0..1 of its {len(stack)} blocks)")
    if family_of(dm).generic:
        return generic_tap(dm, depth, early_exit)
    i = block_at_depth(len(stack), depth)
    module, pick = stack[i]

    def features(out, shape):
        grid = token_grid(dm, shape)
        return to_grid(pick(out, math.prod(grid), dm), grid)
    return FeatureTap(module, f"block {i} of {len(stack)}", features, early_exit)


def adds_in_place(dm) -> bool:
    """Whether the model's blocks must run their in-place arithmetic out of place to be differentiable."""
    return not is_unet(dm) and family_of(dm).inplace


def checkpointed_blocks(dm) -> list[torch.nn.Module]:
    """What to gradient-checkpoint: the layers inside a UNet's blocks (the blocks themselves are never called,
    the UNet iterates their children), or every block of a transformer's main stack."""
    if is_unet(dm):
        layers = []
        for blk in [*dm.input_blocks, dm.middle_block, *dm.output_blocks]:
            layers.extend(blk)
        return layers + [m for m in (getattr(dm, "out", None),) if m is not None]
    return [b for b, _ in blocks(dm)]


def call_inputs(dm) -> dict:
    """Keyword inputs a training forward of this model adds to apply_model (see ModelFamily.call_inputs)."""
    return {} if is_unet(dm) else family_of(dm).call_inputs(dm)


def empty_conditioning(model_patcher) -> list:
    """Unconditional input when neither a text encoder nor a conditioning is connected.

    Only for UNets that declare a cross-attention width and read nothing else from the text encoder (SD1.x,
    SD2.x): zeros of that width. Every other family needs its encoder's output (SDXL's pooled vector, the
    transformers' token streams), so the caller is told to connect one.
    """
    model = model_patcher.model
    ctx = model.model_config.unet_config.get("context_dim")
    adm = model.model_config.unet_config.get("adm_in_channels")
    if ctx is None or adm or not is_unet(model.diffusion_model):
        raise ValueError(f"{type(model).__name__} needs its text encoder's output to train or sample: connect "
                         "the loader's CLIP (captions are optional; without them the empty prompt is used) or a "
                         "conditioning (e.g. CLIPTextEncode with an empty text)")
    return [[torch.zeros(1, 77, ctx), {}]]
