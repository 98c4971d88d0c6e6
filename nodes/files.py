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

from ..selfperc_core.state import StateFileError, atomic_write  # noqa: F401  (StateFileError: the nodes' error)

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


def save_image_png(path: Path, image) -> Path:
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
