"""Resume state on disk without pickle: tensors in a safetensors file, everything else as JSON in its header.

Resume files sit beside LoRAs that users download in packs, so loading one must never run code: pickle
(``torch.load(weights_only=False)``, accelerate's custom checkpoints) can. A state is a nested structure of
dicts (str or int keys), lists, tuples, tensors, numbers, strings, booleans and None; ``pack_state`` splits it
into named tensors and a JSON skeleton, ``unpack_state`` puts it back. Files are written atomically.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "selfperc-state/1"
_KEY = "selfperc_state"


class StateFileError(ValueError):
    """A resume file that is not a valid state file of this format; the message names the file."""


def pack_state(state: Any) -> tuple[dict[str, torch.Tensor], str]:
    """Split ``state`` into {name: tensor} and a JSON skeleton that refers to the tensors by name."""
    tensors: dict[str, torch.Tensor] = {}
    names: dict[int, str] = {}  # one entry per tensor object (safetensors refuses shared memory)

    def enc(v):
        if isinstance(v, torch.Tensor):
            if id(v) not in names:
                names[id(v)] = f"t{len(tensors)}"
                tensors[names[id(v)]] = v.detach().to("cpu", copy=True).contiguous()
            return {"$tensor": names[id(v)]}
        if isinstance(v, dict):
            return {"$dict": [[k if isinstance(k, (int, str)) else _bad(k), enc(x)] for k, x in v.items()]}
        if isinstance(v, tuple):
            return {"$tuple": [enc(x) for x in v]}
        if isinstance(v, list):
            return [enc(x) for x in v]
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        return _bad(v)

    return tensors, json.dumps(enc(state))


def _bad(v):
    raise TypeError(f"cannot store a {type(v).__name__} in a state file")


def unpack_state(tensors: dict[str, torch.Tensor], skeleton: str) -> Any:
    """The inverse of ``pack_state``. Raises ValueError on a malformed skeleton."""
    def dec(v):
        if isinstance(v, list):
            return [dec(x) for x in v]
        if isinstance(v, dict):
            if set(v) == {"$tensor"}:
                if v["$tensor"] not in tensors:
                    raise ValueError(f"missing tensor {v['$tensor']!r}")
                return tensors[v["$tensor"]]
            if set(v) == {"$tuple"} and isinstance(v["$tuple"], list):
                return tuple(dec(x) for x in v["$tuple"])
            if set(v) == {"$dict"} and isinstance(v["$dict"], list):
                out = {}
                for pair in v["$dict"]:
                    if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], (int, str))):
                        raise ValueError("malformed dict entry")
                    out[pair[0]] = dec(pair[1])
                return out
            raise ValueError(f"unknown entry {sorted(v)[:3]}")
        return v

    return dec(json.loads(skeleton))


def atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """Write through ``write(tmp_path)`` to a temporary file beside ``path``, then rename it into place, so an
    interrupted write never leaves a half file that a loader would pick up."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The file gets the mode open() gives any new file (0666 less the process umask), not 0600: it is renamed into
    # place and must be readable as every other model file is. O_EXCL: never an existing file.
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = os.stat(tmp).st_mode & 0o777  # 0666 less the umask, read without changing the (process-wide) umask
    try:
        write(tmp)
        os.chmod(tmp, mode)  # writers may recreate the file as 0600 (safetensors 0.8 does)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def save_state_file(path: Path, state: Any) -> Path:
    tensors, skeleton = pack_state(state)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT, _KEY: skeleton}))


def load_state_file(path: Path, max_bytes: int | None = None) -> Any:
    """Read a state file written by ``save_state_file``; never unpickles.

    Raises StateFileError naming the file when it is larger than ``max_bytes``, not a safetensors file, or
    not in this format (for instance an old pickle ``.state.pt``).
    """
    path = Path(path)
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise StateFileError(f"resume file {path.name} is {size} bytes, more than the {max_bytes} a state for "
                             "this LoRA can take: refused")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT or _KEY not in meta:
            raise StateFileError(f"resume file {path.name} is a safetensors file but not a selfperc state "
                                 f"(format {meta.get('format')!r}): refused")
        return unpack_state(load_file(str(path)), meta[_KEY])
    except StateFileError:
        raise
    except (SafetensorError, OSError, ValueError, TypeError, RecursionError, json.JSONDecodeError) as e:
        raise StateFileError(f"resume file {path.name} is not a valid selfperc state file ({e}); it was not "
                             "loaded (pickle files are never loaded: they can run code)") from None


TRAINER_KEYS = ("optimizer", "step", "rng", "losses")


def save_run_state(path: Path, trainer_state: dict, weights: dict[str, torch.Tensor] | None = None,
                   metadata: dict | None = None) -> Path:
    """A resumable run, as the ComfyUI node and the headless trainer both write it: the Trainer's state (optimizer,
    step, RNG, losses, EMA), the trained weights by name (None: they are the LoRA file beside it) and metadata."""
    state = {"trainer": trainer_state, "metadata": metadata or {}}
    if weights is not None:
        state["weights"] = dict(weights)
    return save_state_file(path, state)


def load_run_state(path: Path, max_bytes: int | None = None) -> tuple[dict, dict[str, torch.Tensor] | None, dict]:
    """(trainer state, trained weights by name or None, metadata) of a file ``save_run_state`` wrote (also the older
    layouts: the node's 'raw_weights', the headless trainer's 'params' list). Never unpickles; raises StateFileError
    naming the file when it holds no run."""
    path = Path(path)
    state = load_state_file(path, max_bytes)
    trainer = state.get("trainer") if isinstance(state, dict) else None
    if not (isinstance(trainer, dict) and set(TRAINER_KEYS) <= set(trainer)):
        raise StateFileError(f"resume file {path.name} does not hold a fine-tune state")
    weights = state.get("weights", state.get("raw_weights"))
    if isinstance(state.get("params"), list):
        weights = {str(i): t for i, t in enumerate(state["params"])}
    if weights is not None and not (isinstance(weights, dict) and all(
            isinstance(v, torch.Tensor) for v in weights.values())):
        raise StateFileError(f"resume file {path.name}: its weights are not a set of named tensors")
    metadata = state.get("metadata")
    return trainer, weights, metadata if isinstance(metadata, dict) else {}
