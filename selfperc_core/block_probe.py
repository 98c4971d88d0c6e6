"""Finding a transformer's block stack and its image tokens by watching one forward pass (the generic tap).

For a model no table describes, the candidates are its lists of blocks; one probe forward (no gradient) records each
block call's inputs and output in call order. Then:
- a block *holds the image tokens* if its output has a tensor of exactly the latent grid's n tokens (an image
  stream), or a longer one in which those tokens sit at a known place (a joint text + image sequence);
- the stack is the longest list whose blocks hold the image tokens (ties: the one called last), preceded by the lists
  called before it whose blocks hold them beside a text stream (dual-stream stages; refiners of the image alone,
  or of the text alone, are not part of it);
- in a joint sequence the image tokens are found where the previous image tensor (a dual-stream block's image
  output, or a refiner's) reappears exactly in the list's first block's input, at its start or its end; they are
  then read from that side (a text of another length moves nothing). Only lists whose input held them so count.
Anything else is refused: a guess that is not checked this way could read the wrong tokens silently.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .features import FeatureTap, block_at_depth


def token_count(t: Any) -> int | None:
    """Tokens of a (B, N, C) or channels-last (B, *grid, C) tensor; None for anything else."""
    return math.prod(t.shape[1:-1]) if isinstance(t, Tensor) and t.ndim >= 3 else None


def tensors(out: Any) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def find_in(joint: Tensor, ref: Tensor) -> int | None:
    """The offset at which ``ref`` (B, m, C) appears exactly in ``joint`` (B, L, C) along the tokens, or None."""
    if joint.ndim != 3 or ref.ndim != 3 or joint.shape[0] != ref.shape[0] or joint.shape[2] != ref.shape[2] \
            or joint.shape[1] <= ref.shape[1]:
        return None
    m = ref.shape[1]
    starts = (joint[0] == ref[0, 0]).all(-1).nonzero().flatten().tolist()
    return next((o for o in starts if o + m <= joint.shape[1] and torch.equal(joint[:, o:o + m], ref)), None)


@dataclass(frozen=True)
class Picker:
    """Where a stack block's output holds the image tokens: its element ``element`` (None: the output itself), all of
    it (``joint`` None), or the n tokens at the start (``joint`` "first") or at the end (``joint`` "last", ``tail``
    tokens before the end) of a joint sequence: measured from the side the image sits on, so that a text of another
    length (another caption, a batch's repeated sequences) moves nothing."""
    element: int | None
    joint: str | None = None
    tail: int = 0

    def __call__(self, out: Any, n: int) -> Tensor:
        t = tensors(out)[self.element] if self.element is not None else out
        if self.joint is None:
            return t
        if self.joint == "first":
            return t[:, :n]
        end = t.shape[1] - self.tail
        return t[:, end - n:end]


def own_tensor(out: Any, n: int) -> tuple[list[int], int | None]:
    """(the indices of the output's tensors of exactly n tokens, the element to pick: None for the output itself)."""
    parts = tensors(out)
    hits = [i for i, t in enumerate(parts) if token_count(t) == n]
    return hits, (None if not isinstance(out, (tuple, list)) else (hits[0] if hits else None))


def joint_side(joint: Tensor, ref: Tensor, n: int) -> tuple[str, int] | None:
    """Where ``ref``'s first n tokens (the image) sit in ``joint``: ("first", 0) at its start, ("last", tail) at its
    end (``tail`` tokens of padding after them), None if elsewhere or absent: a middle place would move with the
    text's length."""
    o = find_in(joint, ref)
    if o is None:
        return None
    if o == 0:
        return "first", 0
    tail = joint.shape[1] - (o + ref.shape[1])
    return ("last", tail + ref.shape[1] - n) if tail == 0 else None


class BlockProbe:
    """The module docstring's rules, applied while one forward runs: hooks on every block of ``lists`` note which
    hold the image tokens and where. A list's joint sequence is located in its first block's input before that
    block runs (blocks may add to their input in place); nothing is copied."""

    def __init__(self, lists: dict[str, torch.nn.ModuleList], n: int):
        self.lists, self.n = lists, n
        self.order: list[str] = []
        self.sizes: dict[str, int] = {}
        self.picks: dict[str, Picker] = {}
        self.with_text: set[str] = set()
        self.sides: dict[str, tuple[str, int]] = {}  # lists whose input holds the image tokens in a joint sequence
        self.ambiguous: set[str] = set()              # lists with two tensors of n tokens (a text as long?)
        self.last_image: Tensor | None = None

    def before(self, stack: str, index: int, args, kwargs) -> None:
        if index == 0 and stack not in self.sides and self.last_image is not None:
            ins = [a for a in [*args, *kwargs.values()] if isinstance(a, Tensor)]
            side = next((p for p in (joint_side(x, self.last_image, self.n) for x in ins) if p is not None), None)
            if side is not None:
                self.sides[stack] = side

    def after(self, stack: str, index: int, output: Any) -> None:
        if stack not in self.order:
            self.order.append(stack)
        self.sizes[stack] = max(self.sizes.get(stack, 0), index + 1)
        parts = tensors(output)
        hits, element = own_tensor(output, self.n)
        if len(hits) > 1:
            self.ambiguous.add(stack)
        if len(hits) == 1:
            self.picks.setdefault(stack, Picker(element))
            if len(parts) > 1:
                self.with_text.add(stack)
            self.last_image = parts[hits[0]]
            return
        joint = [i for i, t in enumerate(parts) if isinstance(t, Tensor) and t.ndim == 3 and t.shape[1] > self.n]
        if len(joint) == 1 and stack in self.sides:
            side, tail = self.sides[stack]
            self.picks.setdefault(stack, Picker(joint[0] if isinstance(output, (tuple, list)) else None, side, tail))
            self.with_text.add(stack)

    def run(self, forward: Callable[[], Any]) -> None:
        handles = []
        try:
            for name, blocks in self.lists.items():
                for i, b in enumerate(blocks):
                    handles.append(b.register_forward_pre_hook(
                        lambda m, a, k, name=name, i=i: self.before(name, i, a, k), with_kwargs=True))
                    handles.append(b.register_forward_hook(lambda m, a, o, name=name, i=i: self.after(name, i, o)))
            with torch.no_grad():
                forward()
        finally:
            for h in handles:
                h.remove()

    def stack(self, what: str, hint: str = "") -> tuple[list[tuple[str, int]], dict[str, Picker]]:
        """(the stack's blocks in order as (list name, index), a Picker per list); raises ValueError naming ``what``,
        the reason and ``hint`` when no list holds the image tokens."""
        holding = [s for s in self.order if s in self.picks]
        if not holding:
            why = (f"; {', '.join(sorted(self.ambiguous))} output two tensors of {self.n} tokens (is the text as long "
                   "as the image? another resolution or caption length tells them apart)" if self.ambiguous else "")
            raise ValueError(f"{what}: no block list's output holds the latent's {self.n} image tokens, as their own "
                             "tensor or at the start or end of a joint text + image sequence" + why
                             + (f"; {hint}" if hint else ""))
        main = max(reversed(holding), key=lambda s: self.sizes[s])
        stages = [s for s in holding[:holding.index(main)] if s in self.with_text] + [main]
        return [(s, i) for s in stages for i in range(self.sizes[s])], {s: self.picks[s] for s in stages}


class ProbedTap(FeatureTap):
    """A FeatureTap whose layer is found at the first read: a probe forward over ``lists`` (``probe``), then the block
    at ``depth`` of the stack found, its image tokens laid out by ``to_grid(tokens, input shape)``.

    ``n_tokens(input shape)`` is the latent grid's token count; ``what`` and ``hint`` begin and end a refusal;
    ``on_found(description)`` is told what was found.
    """

    def __init__(self, lists: dict[str, torch.nn.ModuleList], depth: float, n_tokens: Callable[[tuple], int],
                 to_grid: Callable[[Tensor, tuple], Tensor], what: str, hint: str = "", early_exit: bool = True,
                 on_found: Callable[[str], None] | None = None):
        super().__init__(None, "(found at the first read)", self._features, early_exit)
        self.lists, self.depth, self.n_tokens, self.grid, self.what, self.hint = lists, depth, n_tokens, to_grid, what, hint
        self.on_found = on_found
        self.picker: Picker | None = None

    def _features(self, out: Any, shape: tuple) -> Tensor:
        return self.grid(self.picker(out, self.n_tokens(shape)), shape)

    def __call__(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        if self.module is None:
            probe = BlockProbe(self.lists, self.n_tokens(tuple(args[0].shape)))
            probe.run(lambda: fn(*args, **kwargs))
            stack, pickers = probe.stack(self.what, self.hint)
            name, i = stack[block_at_depth(len(stack), self.depth)]
            self.module, self.picker = self.lists[name][i], pickers[name]
            self.name = f"block {block_at_depth(len(stack), self.depth)} of {len(stack)}"
            if self.on_found is not None:
                self.on_found(f"stack {' + '.join(dict.fromkeys(s for s, _ in stack))} ({len(stack)} blocks), tap "
                              f"{name}[{i}], image tokens {self._where()}")
        return super().__call__(fn, *args, **kwargs)

    def _where(self) -> str:
        p = self.picker
        part = "the output" if p.element is None else f"output element {p.element}"
        return part if p.joint is None else f"{part}, the {p.joint} tokens of a joint sequence"
