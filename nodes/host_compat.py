"""What the pack needs from the host ComfyUI that newer releases changed, found by feature (never by version):
cloning without dynamic VRAM loading, the training flag, out-of-memory errors, and host symbols looked up when
used, so that one moved symbol disables what needs it with a message naming it, not the whole pack."""
from __future__ import annotations

import contextlib
import importlib
import inspect
import logging

log = logging.getLogger("selfperc")

TESTED = "0.3.75"          # the ComfyUI the test suite runs (README: The test host)
REQUIRES = ">=0.3.75"      # pyproject's [tool.comfy] requires-comfyui


class MissingHostFeature(RuntimeError):
    pass


def host_version() -> str | None:
    try:
        return importlib.import_module("comfyui_version").__version__
    except (ImportError, AttributeError):
        return None


def host_symbol(module: str, name: str, what: str):
    """``module.name`` of the host, or an error naming it, what needs it and the tested ComfyUI."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise MissingHostFeature(f"{what} needs ComfyUI's {module}.{name}, which this ComfyUI "
                                 f"({host_version() or 'unknown version'}) does not have ({e}); the pack is tested "
                                 f"with ComfyUI {TESTED}") from None


def clone_for_training(model):
    """A clone whose weights the pack may replace by trainable tensors: newer ComfyUI loads models through a
    dynamic VRAM patcher that stages weights itself, and its clone() can opt out of that (disable_dynamic)."""
    try:
        params = inspect.signature(model.clone).parameters
    except (TypeError, ValueError):
        params = {}
    if "disable_dynamic" in params:
        return model.clone(disable_dynamic=True)
    return model.clone()


@contextlib.contextmanager
def training_mode():
    """The host's training flag, where it has one (newer ComfyUI's Flux rope uses a fused kernel without backward
    unless it is set; core Train LoRA sets it around its loop); restored on exit, whatever happened."""
    import comfy.model_management as mm

    if not hasattr(mm, "in_training"):
        yield
        return
    prev = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = prev


def is_oom(e: BaseException) -> bool:
    """Out of memory the host's way: newer ComfyUI raises some as accelerator errors and offers is_oom()."""
    import comfy.model_management as mm

    check = getattr(mm, "is_oom", None)
    if callable(check):
        try:
            if check(e):
                return True
        except Exception:  # a check that cannot read this exception: fall back to the type
            pass
    return isinstance(e, mm.OOM_EXCEPTION)


def _parse(v: str) -> tuple:
    return tuple(int(p) for p in v.split(".")[:3] if p.isdigit())


def warn_if_untested() -> None:
    """One line at load when the host is older than the declared range (behaviour is never decided by it)."""
    v = host_version()
    if v is not None and _parse(v) and _parse(v) < _parse(REQUIRES.lstrip(">=")):
        log.warning("selfperc: ComfyUI %s is older than the tested range (%s); nodes may fail", v, REQUIRES)
