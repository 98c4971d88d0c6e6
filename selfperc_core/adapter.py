"""The adapter switch: the frozen network is the online network with its adapter (LoRA) turned off.

No second copy of the weights is kept. The host's adapters read ``switch.enabled`` whenever they run; the
objective turns it off for the perceptual passes.

Gradient checkpointing recomputes a block's forward during backward, when the switch may be in another
state than during the original forward; ``checkpoint_forward`` records the state at call time and replays it
during recomputation, so the recomputed activations are the ones autograd saved.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.utils.checkpoint


class AdapterSwitch:
    """A shared on/off flag for every adapter of one training run."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    @contextlib.contextmanager
    def state(self, enabled: bool):
        """Set the switch for the duration of the block, then restore the previous state."""
        prev, self.enabled = self.enabled, enabled
        try:
            yield self
        finally:
            self.enabled = prev

    def off(self):
        """Adapter off: the network is the frozen base model."""
        return self.state(False)

    def gate(self, adapter: Callable, identity: Callable = lambda w: w) -> Callable:
        """``adapter`` while the switch is on, ``identity`` while it is off."""
        return lambda *a, **k: adapter(*a, **k) if self.enabled else identity(*a, **k)


def checkpoint_forward(module: torch.nn.Module, switch: AdapterSwitch | None) -> None:
    """Make ``module.forward`` gradient-checkpointed (non-reentrant), replaying the switch state in recompute.

    Undo with ``uncheckpoint_forward``.
    """
    if hasattr(module, "_selfperc_forward"):
        return
    original = module.forward

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        state = switch.enabled if switch is not None else None

        def run(*a):
            # Fresh copies of the inputs: some blocks (ComfyUI's Flux, ...) add to their inputs in place, which
            # would change what the recomputation in backward starts from.
            a = [x.clone() if isinstance(x, torch.Tensor) else x for x in a]
            kw = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            if switch is None:
                return original(*a, **kw)
            with switch.state(state):
                return original(*a, **kw)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    module._selfperc_forward = original
    module.forward = forward


def uncheckpoint_forward(module: torch.nn.Module) -> None:
    if hasattr(module, "_selfperc_forward"):
        module.forward = module._selfperc_forward
        del module._selfperc_forward
