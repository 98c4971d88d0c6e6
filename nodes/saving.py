"""What a fine-tune writes: the LoRA file (raw or EMA weights, ComfyUI or kohya keys) with its metadata, the EMA
beside it, the resume state (the core's run-state format, as the headless trainer writes it), sample grids; and
reading a run back to resume it."""
from __future__ import annotations

import hashlib
from pathlib import Path

import folder_paths
import torch

from ..selfperc_core import __version__
from ..selfperc_core.state import StateFileError, load_run_state, save_run_state
from . import files, lora


def model_fingerprint(model) -> str:
    """A short hash of the base model's first weights: identifies the base in the LoRA's metadata."""
    h = hashlib.sha256()
    for i, (k, v) in enumerate(model.model.diffusion_model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().flatten()[:4096].numpy().tobytes())
        if i > 16:
            break
    return h.hexdigest()[:16]


def metadata(model, session, plan, n_images: int) -> dict:
    """The LoRA file's metadata: the pack's version, the base model, every setting, the tap."""
    s = plan.settings
    return {"selfperc_version": __version__, "selfperc_objective": "self-perceptual (Lin & Yang 2024)",
            "base_model_hash": model_fingerprint(model), "base_model_type": type(model.model.model_config).__name__,
            "parameterization": session.view.parameterization, "mse_space": s.objective.mse_space,
            "feature_layer": s.objective.feature_layer, "tap": session.tap_name, "rank": s.rank,
            "alpha": s.lora.alpha, "training_dtype": str(plan.dtype).replace("torch.", ""),
            "dataset": plan.folder.name, "dataset_images": n_images, "guidance": s.objective.guidance,
            "gradient_accumulation": s.training.gradient_accumulation, "algorithm": s.lora.algorithm,
            "lora_dtype": s.lora.lora_dtype, "caption_prefix": s.training.caption_prefix,
            "settings": plan.train_settings.as_dict() | {"t_range": session.view.t_range}}


def save_run(plan, session, trainer, meta: dict) -> Path:
    """The LoRA file (the weights chosen, in the keys chosen), the EMA beside it for raw+ema, and the resume state
    (which keeps the raw weights whenever the LoRA file holds something else). The state is written after the
    LoRA: a run stopped in between leaves an older state, which ``load_resume`` refuses."""
    lo = plan.settings.lora
    meta = dict(meta, steps=trainer.step_count, format=lo.save_format)
    raw = lora.lora_state_dict(session.adapters)
    ema = lora.lora_state_dict(session.adapters, weights=trainer.ema_params()) if trainer.ema is not None else None

    def layout(sd):
        return lora.kohya_state_dict(session.mp, sd) if lo.save_format == "kohya" else sd
    if lo.save_weights == "raw+ema":
        files.save_lora(files.ema_path(plan.out_file), layout(ema), dict(meta, weights="ema"))
    use_ema = lo.save_weights == "ema"
    path = files.save_lora(plan.out_file, layout(ema if use_ema else raw), dict(meta, weights="ema" if use_ema
                                                                               else "raw"))
    keep_raw = use_ema or lo.save_format != "comfyui"
    save_run_state(files.state_path(plan.out_file), trainer.state_dict(), raw if keep_raw else None, meta)
    return path


def lora_metadata(lora_file: Path) -> dict:
    """A .safetensors LoRA's metadata (its header only)."""
    from safetensors import safe_open

    with safe_open(str(lora_file), framework="pt") as f:
        return dict(f.metadata() or {})


def load_resume(lora_file: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(the trained weights, the Trainer's state) of an earlier run, read without unpickling anything.

    The state's size is bounded by the LoRA's before it is read (AdamW keeps two moments per weight).
    Raises StateFileError naming the file for a missing, oversized, foreign or out-of-step state file.
    """
    from safetensors.torch import load_file

    if lora_file.suffix != ".safetensors":
        raise StateFileError(f"{lora_file.name}: only .safetensors LoRAs can be resumed (other formats are pickles)")
    state_file = files.state_path(lora_file)
    if not state_file.is_file():
        legacy = lora_file.with_name(lora_file.stem + files.LEGACY_STATE_SUFFIX)
        if legacy.exists():
            raise StateFileError(f"{legacy.name} is an old pickle resume file: it is never loaded, because "
                                 "loading a pickle can run code; start a new run (this version writes "
                                 f"{files.STATE_SUFFIX} files)")
        raise StateFileError(f"no resume state {state_file.name} beside {lora_file.name}")
    trainer, weights, _ = load_run_state(state_file, max_bytes=4 * lora_file.stat().st_size + (16 << 20))
    lora_steps = lora_metadata(lora_file).get("steps")
    if lora_steps is not None and str(lora_steps) != str(trainer["step"]):
        raise StateFileError(f"{state_file.name} is at step {trainer['step']} but {lora_file.name} at "
                             f"step {lora_steps}: the pair is out of step (a run stopped while saving?)")
    return (weights if weights is not None else load_file(str(lora_file))), trainer


def save_samples(plan, grid: torch.Tensor, step: int) -> dict:
    """The sample grid as output/selfperc_samples/<lora name>/step_NNNNNN.png (written atomically); the UI's image
    entry for it."""
    from PIL import Image

    sub = Path("selfperc_samples") / plan.out_file.stem
    path = Path(folder_paths.get_output_directory()) / sub / f"step_{step:06d}.png"
    arr = (grid[0].clamp(0, 1).numpy() * 255).round().astype("uint8")
    files.save_image_png(path, Image.fromarray(arr))
    return {"filename": path.name, "subfolder": sub.as_posix(), "type": "output"}
