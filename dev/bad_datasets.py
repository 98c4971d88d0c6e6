"""Dataset folders that go wrong in every way the fine-tune node must survive (issue: reliability)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from dev.datasets import photo


def _rgb(size=(64, 48), name="astronaut") -> Image.Image:
    return Image.fromarray(photo(name)).convert("RGB").resize(size)


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_odd_modes(folder: Path) -> dict[str, str]:
    """One image per awkward mode; returns {file name: what it is}. All must load."""
    folder.mkdir(parents=True, exist_ok=True)
    base = _rgb()
    la = base.convert("LA")
    la.putalpha(128)
    rgba = base.convert("RGBA")
    rgba.putalpha(0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to view: stored 64x48 landscape, upright it is 48x64 portrait
    made = {
        "mode_L.png": (base.convert("L"), {}),
        "mode_LA.png": (la, {}),
        "mode_P.png": (base.convert("P", palette=Image.ADAPTIVE), {}),
        "mode_RGBA.png": (rgba, {}),
        "mode_CMYK.jpg": (base.convert("CMYK"), {}),
        "mode_16bit.png": (Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257), {}),
        "exif_rotated.jpg": (base, {"exif": exif.tobytes()}),
    }
    for name, (im, kw) in made.items():
        im.save(folder / name, **kw)
    return {name: im.mode for name, (im, _) in made.items()}


def write_bad_files(folder: Path) -> dict[str, str]:
    """Files that must be skipped with a reason; returns {file name: why}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corrupt.png").write_bytes(b"this is not an image at all" * 10)
    data = png_bytes(_rgb((128, 128)))
    (folder / "truncated.png").write_bytes(data[: len(data) // 3])
    jpg = io.BytesIO()
    _rgb((128, 128)).save(jpg, format="JPEG")
    (folder / "truncated.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 3])
    _rgb((5, 4)).save(folder / "tiny.png")
    _rgb().save(folder / "badcaption.png")
    (folder / "badcaption.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    return {"corrupt.png": "corrupt", "truncated.png": "truncated PNG", "truncated.jpg": "truncated JPEG",
            "tiny.png": "smaller than 8x8", "badcaption.png": "caption not UTF-8"}


def write_symlink_loop(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    loop = folder / "loop"
    if not loop.exists():
        os.symlink(".", loop)


def write_large_jpeg(path: Path, size=(12000, 9000)) -> Path:
    """A 108-megapixel JPEG (smooth gradient, compresses well)."""
    w, h = size
    im = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    im.save(path, quality=70)
    return path
