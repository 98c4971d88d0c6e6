"""The super-resolution fine-tune (SR3 / CDM) on ComfyUI's concat-conditioned upscalers.

Each training image is the high-res target; its low-res condition is the image averaged down by the VAE's factor
(the upscaler's latent is at the low-res size, as SD_4XUpscale_Conditioning makes it), degraded afresh at every step
(selfperc_core.super_resolution) and given to the model the way core ComfyUI gives it: the conditioning's
``concat_image`` and ``noise_augmentation``, through the model's own extra_conds (SD x4: the augmentation noise and
its level as ``y``). The online and the frozen model read the same condition.

Which models take it: those whose extra_conds turns ``concat_image`` into ``c_concat`` (detected by a probe, not by
class): the SD x4 upscaler in ComfyUI 0.3.75. Other concat-conditioned families (InstructPix2Pix, inpainting,
image-to-video models) read a latent image instead of a low-res one and are refused by name.
"""
from __future__ import annotations

import io as _io
import json
from dataclasses import asdict, dataclass, field

import comfy.samplers
import node_helpers
import numpy as np
import torch
from PIL import Image

from ..selfperc_core.dataset import as_float
from ..selfperc_core.super_resolution import Degradation, check_factor, degrade, downscale, draw_degradation

CPU = torch.device("cpu")


@dataclass(frozen=True)
class SuperResolution:
    """The SR mode's settings (from Self-Perceptual Super-Resolution, into the Objective's super_resolution)."""
    degradation: Degradation = field(default_factory=Degradation)

    def validate(self) -> "SuperResolution":
        self.degradation.validate()
        return self


def factor_of(vae) -> int:
    """The upscaler's factor: the VAE's spatial ratio (the latent, and so the condition, is 1/f of the image)."""
    ratio = getattr(vae, "downscale_ratio", None)
    if not isinstance(ratio, int):
        raise ValueError(f"this VAE's spatial ratio ({ratio!r}) is not one integer factor: super-resolution needs an "
                         "image VAE such as the SD x4 upscaler's")
    return ratio


def check_resolution(resolution: int, factor: int) -> None:
    check_factor(factor, resolution, resolution, f"resolution {resolution}")


def with_low_res(conditioning: list, low: torch.Tensor, augmentation: float = 0.0) -> list:
    """The conditioning with a low-res image (B, 3, h, w) in [-1, 1], as core SD_4XUpscale_Conditioning sets it."""
    return node_helpers.conditioning_set_values(conditioning, {"concat_image": low,
                                                               "noise_augmentation": augmentation})


def concat_inputs(model_patcher, low: torch.Tensor, level: float, seed: int, latent_shape: tuple) -> dict:
    """The model inputs that carry a low-res image (1, 3, h, w) in [-1, 1] at augmentation ``level``, made by the
    model's own extra_conds as core sampling makes them from SD_4XUpscale_Conditioning's conditioning."""
    noise = torch.zeros((1, *latent_shape))
    conds = [{"concat_image": low, "noise_augmentation": float(level), "model_conds": {}}]
    conds = comfy.samplers.encode_model_conds(model_patcher.model.extra_conds, conds, noise, CPU, "positive",
                                              latent_image=noise, denoise_mask=None, seed=seed)
    return {k: v.process_cond(batch_size=1, area=None, device=CPU) for k, v in conds[0]["model_conds"].items()}


def check_model(sr: SuperResolution, model) -> None:
    """The model must read a low-res image (feature-detected with a probe image); augmentation needs the model's
    own augmentation schedule."""
    base = model.model
    name = type(base.model_config).__name__
    shape = (base.latent_format.latent_channels, 8, 8)
    probe = torch.linspace(-1, 1, 3 * 64).view(1, 3, 8, 8)
    try:
        got = concat_inputs(model, probe, 0.0, 10, shape).get("c_concat")
    except Exception as e:  # noqa: BLE001 - any failure means the model does not take the input
        raise ValueError(f"{name} has no low-res concat input (its extra_conds failed on concat_image: {e}); "
                         "super-resolution needs an upscaler such as SD x4") from None
    if got is None or not torch.equal(got.cond.float(), probe):
        raise ValueError(f"{name} has no low-res concat input (concat_image): super-resolution needs an upscaler such "
                         "as the SD x4 upscaler")
    if sr.degradation.noise_augmentation_max and getattr(base, "noise_augmentor", None) is None:
        raise ValueError(f"{name} has no noise augmentation of its condition: set noise_augmentation_max 0")


def low_res_images(images: list[torch.Tensor], factor: int, files: list) -> list[torch.Tensor]:
    """Each dataset image (H, W, C) uint8 -> its low-res image (3, H/f, W/f) in [-1, 1], once (the clean one:
    the degradations are drawn per step)."""
    out = []
    for img, path in zip(images, files):
        check_factor(factor, img.shape[0], img.shape[1], f"image {getattr(path, 'name', path)}")
        x = as_float(img)[None, :, :, :3].movedim(-1, 1) * 2.0 - 1.0
        out.append(downscale(x, factor)[0])
    return out


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """A JPEG round trip of (B, 3, h, w) in [-1, 1] at ``quality`` (pillow), in memory."""
    out = []
    for img in x:
        arr = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        buf = _io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
        back = np.asarray(Image.open(_io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32)
        out.append(torch.from_numpy(back).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(out).to(x.dtype)


def condition_fn(model_patcher, lows: list[torch.Tensor], latent_shapes: list[tuple], sr: SuperResolution):
    """The core Trainer's ``condition``: (image index, its model inputs, seed) -> those inputs with this step's
    degraded low-res image and augmentation level."""
    d = sr.degradation

    def condition(i: int, cond: dict, seed: int) -> dict:
        draw = draw_degradation(d, seed)
        low = degrade(lows[i][None], draw, jpeg)
        return dict(cond, **concat_inputs(model_patcher, low, draw.level, draw.seed, latent_shapes[i]))
    return condition


def fixed_conditions(condition, conds: list[dict], indices: list[int], seed: int) -> list[dict]:
    """Held-out images' conditions drawn once (from ``seed``): validation compares weights, not draws."""
    return [condition(i, conds[i], (seed + i) % 2 ** 64) for i in indices]


def check_resume(meta: dict, sr: SuperResolution | None, name: str) -> None:
    """A run resumes in the task it was started in: an upscaler run with the same degradation, another without."""
    was = meta.get("super_resolution")
    if (was is not None) != (sr is not None):
        raise ValueError(f"{name} was trained {'as' if was else 'not as'} an upscaler (super-resolution); resume it "
                         f"{'with the same' if was else 'without a'} Self-Perceptual Super-Resolution")
    if sr is not None and json.loads(was) != asdict(sr.degradation):
        raise ValueError(f"{name} was trained with the degradation {was}, not {json.dumps(asdict(sr.degradation))}; "
                         "resume it with the settings it was started with")


def check_vae(vae, model) -> None:
    """The VAE must make the upscaler's latents (SD x4: its own 4x VAE, not an SD one)."""
    have, want = getattr(vae, "latent_channels", None), model.model.latent_format.latent_channels
    if have is not None and have != want:
        raise ValueError(f"this VAE makes {have}-channel latents but the upscaler reads {want}: connect its own VAE")


def metadata(sr: SuperResolution, factor: int) -> dict:
    return {"selfperc_task": "super-resolution (SR3 / CDM)", "super_resolution_factor": factor,
            "super_resolution": asdict(sr.degradation)}
