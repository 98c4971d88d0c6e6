"""Feature tap: where the frozen network's features are read, and reading them with the forward stopped there.

The perceptual network only needs the layers up to the tapped one (the paper's best is the UNet mid-block),
so the rest of the network (all up-blocks) is never run: the hook raises a private exception that ends the
forward. Autograd keeps the graph up to the tap, so gradients still flow back into the input.

Transformers have no mid-block: the tap is the block at a fraction of the whole stack's depth (double-stream then
single-stream blocks), block n//2 by default, as the one DiT implementation of this loss we know of; its image
tokens are laid out as a (B, C, h, w) grid (``to_grid``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

DEFAULT_DEPTH = 0.5


class _StopForward(Exception):
    """Raised from the tap's hook to end a forward pass early; never escapes FeatureTap.__call__."""


def _identity(out: Any, shape: tuple) -> Tensor:
    return out


class FeatureTap:
    """A layer of a network to read: ``module``'s output during a forward, as features.

    Args:
        module: the layer to read (for an SD UNet, ``middle_block[-1]``: a hook on ``middle_block`` itself
            never fires because its children are called one by one).
        name: what the tap is, for people ("mid_block", "block 28 of 57").
        to_features: (the module's raw output, the input's shape) -> (B, C, h, w) features (e.g. a transformer
            block's image tokens as a grid); default: the output itself.
        early_exit: stop the forward right after the layer (default). Off runs the whole network (needed where
            every module's hooks must run, e.g. FSDP), and for tests and benchmarks of what early exit saves.

    Describing a tap costs nothing: the hook is put on at the first read and taken off by ``remove`` (or the
    ``with`` block's end). It is armed only inside a read: a recomputation by gradient checkpointing during
    backward runs the layer again but must neither capture nor stop.
    """

    def __init__(self, module: torch.nn.Module, name: str = "", to_features: Callable[[Any, tuple], Tensor] = _identity,
                 early_exit: bool = True):
        self.module, self.name, self.to_features, self.early_exit = module, name, to_features, early_exit
        self._armed = False
        self._out = None
        self._handle = None

    def _hook(self, module, inputs, output):
        if not self._armed:
            return None
        self._armed = False  # a layer used twice in one pass is read at its first use
        self._out = output
        if self.early_exit:
            raise _StopForward
        return None

    def __call__(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run ``fn(*args, **kwargs)`` (a forward of the network holding the module); return the module's raw
        output."""
        if self._handle is None:
            self._handle = self.module.register_forward_hook(self._hook)
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
        return out

    def features(self, predict: Callable[..., Any], x: Tensor, *args) -> Tensor:
        """The (B, C, h, w) features of ``predict(x, *args)`` at this layer."""
        return self.to_features(self(predict, x, *args), tuple(x.shape))

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def check_depth(depth: float) -> float:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"tap_depth {depth} must be within 0..1")
    return depth


def block_at_depth(n_blocks: int, depth: float = DEFAULT_DEPTH) -> int:
    """Index of the block at ``depth`` (0..1) of a stack of ``n_blocks``: min(n - 1, floor(depth * n))."""
    return min(n_blocks - 1, int(check_depth(depth) * n_blocks))


def to_grid(tokens: Tensor, grid: tuple[int, ...]) -> Tensor:
    """(B, N, C) image tokens in row-major grid order (or (B, T, H, W, C)) -> (B, C, T*h, w) features."""
    if tokens.ndim == 5:
        tokens = tokens.flatten(1, 3)
    b, n, c = tokens.shape
    h, w = (grid[0] if len(grid) == 2 else grid[0] * grid[1]), grid[-1]
    if n != h * w:
        raise RuntimeError(f"the tapped block gave {n} image tokens, not the {h}x{w} grid the latent makes")
    return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)
