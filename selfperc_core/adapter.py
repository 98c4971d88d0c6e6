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

        # dicts (e.g. ComfyUI's transformer_options, which the model updates per block) as they are now, for
        # the recomputation in backward
        kw = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}

        def run(*a):
            if switch is None:
                return original(*a, **kw)
            with switch.state(state):
                return original(*a, **kw)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    module._selfperc_forward = original
    module.forward = forward


# ``x += y`` reaches a torch function mode as ``x.add_(y)``, and Python rebinds x to its result, so an
# out-of-place result keeps the code's meaning; ``x.add_(y)`` written as a bare statement would not, which is why
# this is applied only to blocks known to use the augmented form (tested: same forward with and without it).
_INPLACE = {
    torch.Tensor.add_: torch.Tensor.add, torch.Tensor.sub_: torch.Tensor.sub,
    torch.Tensor.mul_: torch.Tensor.mul, torch.Tensor.div_: torch.Tensor.div,
}


class OutOfPlace(torch.overrides.TorchFunctionMode):
    """Runs augmented assignments (x += y, x *= y, ...) out of place: ``x += y`` rebinds x to a new tensor.

    Inference code adds to tensors that autograd saved for backward (ComfyUI's Flux blocks normalise ``img``,
    then ``img += ...``): without this, backward fails, and under checkpointing the recomputation silently
    reads the overwritten values and gives wrong input gradients.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return _INPLACE.get(func, func)(*args, **(kwargs or {}))


def out_of_place_forward(module: torch.nn.Module) -> None:
    """Make ``module.forward`` run under OutOfPlace while gradients are on (forward and recomputation).

    Apply it before ``checkpoint_forward``; ``uncheckpoint_forward`` undoes both."""
    if hasattr(module, "_selfperc_oop_forward"):
        return
    original = module.forward

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        with OutOfPlace():
            return original(*args, **kwargs)

    module._selfperc_oop_forward = original
    module.forward = forward


def uncheckpoint_forward(module: torch.nn.Module) -> None:
    """Undo ``checkpoint_forward`` and ``out_of_place_forward`` (whichever were applied)."""
    for attr in ("_selfperc_forward", "_selfperc_oop_forward"):
        if hasattr(module, attr):
            module.forward = getattr(module, attr)
            delattr(module, attr)
