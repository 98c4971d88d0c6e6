"""The naive reference of the same objective, kept here only as the baseline every faster choice is measured
against: a deep-copied frozen model (a second copy of the weights) and two separate FULL forward passes (no
early exit, all up-blocks run)."""
from __future__ import annotations

import copy


def naive_frozen_features(mp, layer_name: str = "mid_block", checkpointing: bool = False):
    """(x, sigma, cond) -> features from a deep copy of the base model, running the whole network.

    ``checkpointing``: checkpoint the copy's layers as the session checkpoints the online model's, so (c) runs
    under the same gradient-checkpointing setting as (b)."""
    from selfperc_pack.nodes.families import checkpointed_blocks, empty_conditioning, tap_point
    from selfperc_pack.nodes.inputs import collate, model_inputs
    from selfperc_pack.selfperc_core.adapter import checkpoint_forward, uncheckpoint_forward

    frozen = copy.deepcopy(mp.model)
    for m in frozen.modules():
        # The copy must be the plain base model: deepcopy also copies the session's LoRA and feature-tap hooks,
        # and a checkpointed layer's forward (a closure) would still call the ORIGINAL layer.
        m._forward_hooks.clear()
        m._forward_hooks_with_kwargs.clear()
        uncheckpoint_forward(m)
    frozen.requires_grad_(False)
    if checkpointing:
        for layer in checkpointed_blocks(frozen.diffusion_model):
            checkpoint_forward(layer, None)  # no adapter in the copy: nothing to replay
    tap = tap_point(frozen.diffusion_model, layer_name, early_exit=False)

    def features(x, sigma, cond=None):
        if cond is None:
            cond = collate([model_inputs(mp, empty_conditioning(mp), tuple(x.shape[1:]))] * x.shape[0])
        return tap.features(lambda x_, s_: frozen.apply_model(x_, s_, **cond), x, sigma)
    return features, frozen
