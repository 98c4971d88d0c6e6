"""Where the pack reads and writes: dataset folders inside ComfyUI's input directory, LoRAs in models/loras.

Every write goes to a temporary file in the target folder and is renamed into place, so an interrupted
write never leaves a half file that a loader would list.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import folder_paths
import torch
from safetensors.torch import save_file

from ..selfperc_core.state import StateFileError, atomic_write, load_state_file, save_state_file

# Server owners may allow dataset folders outside the input directory (absolute paths) with this variable.
ALLOW_ANY_DATASET_PATH = "SELFPERC_ALLOW_ANY_DATASET_PATH"
# The resume sidecar: a safetensors file (tensors + a JSON header, no pickle) under a suffix that ComfyUI's model
# lists do not show, so it never appears as a LoRA. The old pickle sidecar is recognised only to be refused.
STATE_SUFFIX = ".selfperc_state"
LEGACY_STATE_SUFFIX = ".state.pt"


def dataset_folders() -> list[str]:
    """Subfolders of ComfyUI's input directory, offered in the node's list."""
    try:
        return sorted(folder_paths.get_input_subfolders())
    except OSError:
        return []


def resolve_dataset(folder: str, override: str = "") -> Path:
    """The dataset folder: ``override`` if given and allowed, else ``folder`` inside the input directory."""
    if override.strip():
        if os.environ.get(ALLOW_ANY_DATASET_PATH, "") not in ("1", "true", "yes"):
            raise PermissionError(f"dataset path {override!r} refused: paths outside ComfyUI's input directory "
                                  f"are off; the server owner can allow them with {ALLOW_ANY_DATASET_PATH}=1")
        return Path(override).expanduser().resolve()
    if not folder:
        raise ValueError("no dataset folder chosen: put a folder of images in ComfyUI's input directory")
    input_dir = Path(folder_paths.get_input_directory()).resolve()
    path = (input_dir / folder).resolve()
    if Path(folder).is_absolute() or (path != input_dir and input_dir not in path.parents):
        raise PermissionError(f"dataset folder {folder!r} is outside ComfyUI's input directory")
    return path


_NAME_OK = re.compile(r"^[\w\-. ]+$")


def lora_path(name: str, overwrite: bool) -> Path:
    """A file in models/loras for ``name`` (optionally one subfolder deep, '.safetensors' added).

    Refuses absolute paths, '..', and deeper nesting. Without ``overwrite`` an existing file gets a counter
    suffix (name_00001.safetensors, ...) instead of being replaced.
    """
    raw = name.strip().replace("\\", "/")
    if raw.endswith(".safetensors"):
        raw = raw[: -len(".safetensors")]
    parts = raw.split("/")
    if not raw or raw.startswith("/") or len(parts) > 2 or any(
            p in ("", ".", "..") or not _NAME_OK.match(p) for p in parts):
        raise ValueError(f"LoRA name {name!r} is not allowed: use letters, digits, '-', '_', '.', "
                         "at most one subfolder, no '..' or absolute path")
    root = Path(folder_paths.get_folder_paths("loras")[0]).resolve()
    base = root.joinpath(*parts)
    if root not in base.resolve().parents:
        raise ValueError(f"LoRA name {name!r} escapes models/loras")
    base.parent.mkdir(parents=True, exist_ok=True)
    path = base.with_name(base.name + ".safetensors")
    if overwrite or not path.exists():
        return path
    for i in range(1, 100000):
        cand = base.with_name(f"{base.name}_{i:05d}.safetensors")
        if not cand.exists():
            return cand
    raise FileExistsError(f"too many files named {base.name}_*.safetensors")


def save_lora(path: Path, sd: dict[str, torch.Tensor], metadata: dict) -> Path:
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    return atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata=meta))


def save_state(path: Path, state: dict) -> Path:
    """The resume sidecar (optimizer, step, RNG, loss curve) beside the LoRA: '<lora>.selfperc_state'."""
    return save_state_file(path, state)


def state_path(lora_file: Path) -> Path:
    return lora_file.with_name(lora_file.stem + STATE_SUFFIX)


def read_lora_file(name: str) -> dict[str, torch.Tensor]:
    """A LoRA from models/loras, read only if it is a safetensors file (other formats are pickles)."""
    from safetensors.torch import load_file

    path = Path(folder_paths.get_full_path_or_raise("loras", name))
    if path.suffix != ".safetensors":
        raise ValueError(f"{name}: only .safetensors LoRAs can be read (other formats are pickles, which can run "
                         "code)")
    return load_file(str(path))


def ema_path(lora_file: Path) -> Path:
    return lora_file.with_name(lora_file.stem + "_ema.safetensors")


def load_resume(lora_file: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The LoRA weights and resume state of an earlier run, read without unpickling anything.

    The state's size is bounded by the LoRA's before it is read (AdamW keeps two moments per weight).
    Raises StateFileError naming the file for a missing, oversized or foreign state file.
    """
    from safetensors.torch import load_file

    if lora_file.suffix != ".safetensors":
        raise StateFileError(f"{lora_file.name}: only .safetensors LoRAs can be resumed (other formats are pickles)")
    state_file = state_path(lora_file)
    if not state_file.is_file():
        legacy = lora_file.with_name(lora_file.stem + LEGACY_STATE_SUFFIX)
        if legacy.exists():
            raise StateFileError(f"{legacy.name} is an old pickle resume file: it is never loaded, because "
                                 "loading a pickle can run code; start a new run (this version writes "
                                 f"{STATE_SUFFIX} files)")
        raise StateFileError(f"no resume state {state_file.name} beside {lora_file.name}")
    weights = load_file(str(lora_file))
    state = load_state_file(state_file, max_bytes=4 * lora_file.stat().st_size + (16 << 20))
    if not (isinstance(state, dict) and isinstance(state.get("trainer"), dict)
            and {"optimizer", "step", "rng", "losses"} <= set(state["trainer"])):
        raise StateFileError(f"resume file {state_file.name} does not hold a fine-tune state")
    from safetensors import safe_open

    with safe_open(str(lora_file), framework="pt") as f:
        lora_steps = (f.metadata() or {}).get("steps")
    if lora_steps is not None and str(lora_steps) != str(state["trainer"]["step"]):
        raise StateFileError(f"{state_file.name} is at step {state['trainer']['step']} but {lora_file.name} at "
                             f"step {lora_steps}: the pair is out of step (a run stopped while saving?)")
    if isinstance(state.get("raw_weights"), dict):  # the LoRA file holds the EMA: continue from the raw weights
        weights = state["raw_weights"]
    return weights, state


def save_image_png(path: Path, image) -> Path:
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
