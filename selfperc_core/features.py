"""Feature tap: read one layer's output of the frozen network and stop the forward pass right there.

The perceptual network only needs the layers up to the tapped one (the paper's best is the UNet mid-block),
so the rest of the network (all up-blocks) is never run: the hook raises a private exception that ends the
forward. Autograd keeps the graph up to the tap, so gradients still flow back into the input.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor


class _StopForward(Exception):
    """Raised from the tap's hook to end a forward pass early; never escapes FeatureTap.__call__."""


class FeatureTap:
    """Capture ``module``'s output during ``fn(*args)``; with ``early_exit``, end the forward there.

    Args:
        module: the layer to read (for an SD UNet, ``middle_block[-1]``: a hook on ``middle_block`` itself
            never fires because its children are called one by one).
        early_exit: stop the forward right after the layer (default). Off runs the whole network, for tests
            and for benchmarks of what early exit saves.
        transform: applied to the layer's raw output (e.g. tokens -> (B, C, H, W) for transformer blocks).

    The hook is only armed inside ``__call__``: a recomputation by gradient checkpointing during backward
    runs the layer again but must neither capture nor stop.
    """

    def __init__(self, module: torch.nn.Module, early_exit: bool = True,
                 transform: Callable[[Any], Tensor] | None = None):
        self.module = module
        self.early_exit = early_exit
        self.transform = transform
        self._armed = False
        self._out = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if not self._armed:
            return None
        self._armed = False  # a layer used twice in one pass is read at its first use
        self._out = output
        if self.early_exit:
            raise _StopForward
        return None

    def __call__(self, fn: Callable[..., Any], *args, **kwargs) -> Tensor:
        """Run ``fn(*args, **kwargs)`` (a forward of the network holding the module); return the tapped output."""
        self._armed, self._out = True, None
        try:
            fn(*args, **kwargs)
        except _StopForward:
            pass
        finally:
            self._armed = False
        out, self._out = self._out, None
        if out is None:
            raise RuntimeError(f"the tapped layer {type(self.module).__name__} did not run in this forward pass")
        return self.transform(out) if self.transform is not None else out

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
