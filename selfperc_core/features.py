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


# Transformers have no mid-block: the tap is the block at a fraction of the whole stack's depth (double-stream then
# single-stream blocks), block n//2 by default, as the one DiT implementation of this loss we know of.
DEFAULT_DEPTH = 0.5


def block_at_depth(n_blocks: int, depth: float = DEFAULT_DEPTH) -> int:
    """Index of the block at ``depth`` (0..1) of a stack of ``n_blocks``: min(n - 1, floor(depth * n))."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"tap_depth {depth} must be within 0..1")
    return min(n_blocks - 1, int(depth * n_blocks))


def to_grid(tokens: Tensor, grid: tuple[int, ...]) -> Tensor:
    """(B, N, C) image tokens in row-major grid order (or (B, T, H, W, C)) -> (B, C, T*h, w) features."""
    if tokens.ndim == 5:
        tokens = tokens.flatten(1, 3)
    b, n, c = tokens.shape
    h, w = (grid[0] if len(grid) == 2 else grid[0] * grid[1]), grid[-1]
    if n != h * w:
        raise RuntimeError(f"the tapped block gave {n} image tokens, not the {h}x{w} grid the latent makes")
    return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)
