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
    made = {}
    base.convert("L").save(folder / "mode_L.png"); made["mode_L.png"] = "L"
    la = base.convert("LA"); la.putalpha(128); la.save(folder / "mode_LA.png"); made["mode_LA.png"] = "LA"
    base.convert("P", palette=Image.ADAPTIVE).save(folder / "mode_P.png"); made["mode_P.png"] = "P"
    rgba = base.convert("RGBA"); rgba.putalpha(0); rgba.save(folder / "mode_RGBA.png"); made["mode_RGBA.png"] = "RGBA"
    base.convert("CMYK").save(folder / "mode_CMYK.jpg"); made["mode_CMYK.jpg"] = "CMYK"
    a16 = (np.asarray(base.convert("L"), np.uint16) * 257)
    Image.fromarray(a16).save(folder / "mode_16bit.png"); made["mode_16bit.png"] = "I;16"
    # EXIF orientation 6 (rotate 90 CW to view): stored 64x48 landscape, upright it is 48x64 portrait
    exif = Image.Exif(); exif[0x0112] = 6
    base.save(folder / "exif_rotated.jpg", exif=exif.tobytes()); made["exif_rotated.jpg"] = "EXIF 6"
    return made


def write_bad_files(folder: Path) -> dict[str, str]:
    """Files that must be skipped with a reason; returns {file name: why}."""
    folder.mkdir(parents=True, exist_ok=True)
    bad = {}
    (folder / "corrupt.png").write_bytes(b"this is not an image at all" * 10); bad["corrupt.png"] = "corrupt"
    data = png_bytes(_rgb((128, 128)))
    (folder / "truncated.png").write_bytes(data[: len(data) // 3]); bad["truncated.png"] = "truncated PNG"
    jpg = io.BytesIO(); _rgb((128, 128)).save(jpg, format="JPEG")
    (folder / "truncated.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 3])
    bad["truncated.jpg"] = "truncated JPEG"
    _rgb((5, 4)).save(folder / "tiny.png"); bad["tiny.png"] = "smaller than 8x8"
    _rgb().save(folder / "badcaption.png")
    (folder / "badcaption.txt").write_bytes("caf\xe9 au lait".encode("latin-1")); bad["badcaption.png"] = "not UTF-8"
    return bad


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
