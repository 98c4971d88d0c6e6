"""A training folder of images with optional captions, read defensively.

Policy (stated in the node's help page): files that cannot be used are skipped with a reason and counted;
the run fails, naming the folder and the reasons, when no usable image remains. Folder symlinks are not
followed (no loops, no escapes). Images are turned upright from EXIF, converted to RGB (transparency onto
white, 16-bit scaled to 8-bit, CMYK/palette converted) and downscaled while decoding when very large.
A caption is ``name.txt`` beside ``name.ext``; it must be UTF-8, and only its first MAX_CAPTION_CHARS
characters are read (a longer one is cut, with a note naming the file).

Sizes are bounded before any image is decoded: at most MAX_IMAGES image files, and the decoded cache
(``cache_bytes``: 3 bytes a pixel, uint8) is checked against the host's memory budget by the caller.

Repeats (kohya's convention, asked for with ``repeat_folders``): the images under a first-level subfolder named
``N_name`` count N times (``repeats``, 1..MAX_REPEATS; every other image once); ``repeated`` turns it into the sample
list the loop draws from. Off, every image counts once whatever its folder is called (``2023_trip``).
"""
from __future__ import annotations

import codecs
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MASK_SUFFIX = ".mask.png"  # name.mask.png beside name.ext: its loss mask (read with ``masks``; never an image then)
MIN_SIDE = 8
# Larger images are reduced while decoding (JPEG draft) or right after; beyond MAX_PIXELS they are refused
# rather than decoded, since a single decompression bomb could exhaust the server's memory.
MAX_PIXELS = 178_000_000  # PIL refuses twice its 89.5 MP warning limit too
RESIZE_MODES = ("center_crop", "buckets")
# Characters, not tokens: the bound applies before any tokenizer runs (a multi-megabyte caption made CLIP's
# tokenizer produce a million tokens). 2,000 characters is ~400-500 CLIP/T5 tokens, beyond the 77-token CLIP
# window (ComfyUI encodes longer prompts in 77-token chunks) and the 256-512 tokens T5 encoders are used with.
MAX_CAPTION_CHARS = 2000
MAX_IMAGES = 100_000  # image files in one dataset folder (subfolders included)
MAX_SCAN_ENTRIES = 1_000_000  # directory entries looked at while scanning, whatever they are
MAX_REPEATS = 1000  # per N_name folder; and at most MAX_IMAGES * 10 samples in all
REPEATS = re.compile(r"^(\d+)_(.+)$")


class DatasetError(ValueError):
    """The folder gives no usable training data; the message names the folder and why."""


@dataclass
class Skipped:
    path: Path
    reason: str


@dataclass
class Dataset:
    images: list[torch.Tensor] = field(default_factory=list)   # (H, W, 3) uint8; as_float() gives [0, 1]
    captions: list[str | None] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)  # (H, W) uint8 loss masks (``masks``), or None
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[Skipped] = field(default_factory=list)          # used, with a change (e.g. caption cut)
    repeats: list[int] = field(default_factory=list)            # how many times each image counts (N_name folders)

    def extend(self, other: "Dataset") -> None:
        """``other``'s images (and what belongs to them) after this one's, e.g. regularization images."""
        for name in ("images", "captions", "files", "masks", "repeats", "skipped", "notes"):
            getattr(self, name).extend(getattr(other, name))


def repeats_of(path: Path, folder: Path) -> int:
    """N for an image under ``folder``/N_name/..., else 1; an N outside 1..MAX_REPEATS is refused, naming the
    subfolder."""
    parts = path.relative_to(folder).parts
    m = REPEATS.match(parts[0]) if len(parts) > 1 else None
    if m is None:
        return 1
    n = int(m.group(1))
    if not 1 <= n <= MAX_REPEATS:
        raise DatasetError(f"dataset subfolder {parts[0]!r} of {folder}: repeat count {n} must be in 1..{MAX_REPEATS}")
    return n


def with_prefix(captions: list[str | None], prefix: str) -> list[str | None]:
    """``prefix`` (e.g. a trigger word with its separator, 'sks, ') put before every caption, as typed; an image
    without a caption gets the prefix alone (its separator stripped)."""
    if not prefix:
        return captions
    return [prefix + c if c else prefix.strip(" ,;") for c in captions]


MAX_SHUFFLES = 16  # caption variants per image (each is encoded once, before training)


def shuffled_tags(caption: str | None, keep: int, n: int, seed: int) -> list[str | None]:
    """Up to ``n`` distinct orders of a comma-separated caption's tags, the first ``keep`` tags staying in place
    (kohya's keep_tokens); the caption's own order first. Drawn from ``seed``; a caption with fewer than two
    tags to move has only its own order."""
    if not caption or n < 1:
        return [caption]
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep], tags[keep:]
    out = [", ".join(tags)]
    g = torch.Generator().manual_seed(seed)
    for _ in range(8 * n):  # a few tags have fewer than n orders: stop trying after a while
        if len(out) >= n or len(tail) < 2:
            break
        order = ", ".join(head + [tail[i] for i in torch.randperm(len(tail), generator=g).tolist()])
        if order not in out:
            out.append(order)
    return out


def caption_orders(captions: list[str | None], n_prefixed: int, prefix: str, keep: int, n: int,
                   seed: int) -> list[list[str | None]]:
    """Per image, its caption's tag orders (``shuffled_tags``, image i from ``seed + i``), ``prefix`` before those
    of the first ``n_prefixed`` images (the dataset's own; regularization images follow without it)."""
    out = []
    for i, cap in enumerate(captions):
        orders = shuffled_tags(cap, keep, n, seed + i)
        out.append(with_prefix(orders, prefix) if i < n_prefixed else orders)
    return out


def mask_at(mask: torch.Tensor | None, latent_shape: tuple) -> torch.Tensor | None:
    """An image's loss mask (H, W) uint8 -> (1, [1,] h, w) in [0, 1] at its latent's size (C, [T,] h, w): the mean of
    the mask over each latent cell, what that latent position sees of it."""
    if mask is None:
        return None
    pooled = torch.nn.functional.adaptive_avg_pool2d(mask.float()[None, None] / 255.0, tuple(latent_shape[-2:]))[0]
    return pooled.reshape((1,) + (1,) * (len(latent_shape) - 3) + tuple(latent_shape[-2:]))


def pick_order(seed: int, n: int) -> int:
    """Which of ``n`` caption orders a sample reads at a step, from the loop's per-step seed."""
    return int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed + 0x9E3779B9)))


def repeated(indices: list[int], repeats: list[int]) -> list[int]:
    """Each index as many times as its image's repeat count (the loop then draws it that much more often)."""
    out = [i for i in indices for _ in range(repeats[i])]
    if len(out) > 10 * MAX_IMAGES:
        raise DatasetError(f"the repeat counts make {len(out)} samples, more than {10 * MAX_IMAGES}: lower them")
    return out


def as_float(image: torch.Tensor) -> torch.Tensor:
    """A dataset image (uint8, H x W x 3) as float in [0, 1]."""
    return image.float() / 255.0


def cache_bytes(n_images: int, resolution: int) -> int:
    """Memory the decoded images take before encoding (uint8 RGB at about resolution^2 pixels each)."""
    return n_images * resolution * resolution * 3


def scan_folder(folder: Path) -> tuple[list[Path], list[Skipped]]:
    """Image files under ``folder`` (recursive, sorted, folder symlinks not followed).

    Entries are counted while they are read (os.scandir), so a folder of millions of names is refused after
    MAX_SCAN_ENTRIES of them, not after listing it all.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DatasetError(f"dataset folder not found: {folder}")
    if not folder.is_dir():
        raise DatasetError(f"dataset path is not a folder: {folder}")
    found, skipped, seen = [], [], 0

    def walk(d: Path) -> None:
        nonlocal seen
        try:
            with os.scandir(d) as it:
                entries = []
                for e in it:
                    seen += 1
                    if seen > MAX_SCAN_ENTRIES:
                        raise DatasetError(f"dataset folder {folder} holds more than {MAX_SCAN_ENTRIES} entries: "
                                           "pick a smaller folder")
                    entries.append(e)
        except OSError as e:
            skipped.append(Skipped(d, f"cannot list folder: {e.strerror}"))
            return
        for e in sorted(entries, key=lambda e: e.name):
            path = Path(e.path)
            if e.is_dir(follow_symlinks=False):
                walk(path)
            elif e.is_symlink() and path.is_dir():
                skipped.append(Skipped(path, "folder symlink not followed"))
            elif e.name.lower().endswith(IMAGE_EXTS):
                if not path.is_file():  # FIFO (would block the read), device, broken link
                    skipped.append(Skipped(path, "not a regular readable file"))
                    continue
                found.append(path)
                if len(found) > MAX_IMAGES:
                    raise DatasetError(f"dataset folder {folder} has more than {MAX_IMAGES} images: pick a smaller "
                                       "folder")
    walk(folder)
    return found, skipped


def open_image(path: Path, max_side: int) -> Image.Image:
    """Decode to an upright RGB image no larger than ``max_side`` on its long side."""
    return _decode(path, max_side)[0]


def _decode(path: Path, max_side: int) -> tuple[Image.Image, Image.Image | None]:
    """(the upright RGB image, transparency onto white, no larger than ``max_side``; its alpha channel, or None)."""
    alpha = None
    with warnings.catch_warnings(), Image.open(path) as im:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # large is fine: we reduce it
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise ValueError(f"{w}x{h} is over {MAX_PIXELS} pixels")
        if im.format == "JPEG":
            im.draft("RGB", (max_side, max_side))  # decode at reduced scale: no full-size buffer
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            a = np.asarray(im, dtype=np.float64)
            a = a / (65535.0 if a.max() > 255 else 255.0)
            im = Image.fromarray((a.clip(0, 1) * 255).round().astype(np.uint8), "L")
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            alpha = rgba.getchannel("A")
            im = Image.new("RGB", rgba.size, (255, 255, 255))
            im.paste(rgba, mask=alpha)
        im = im.convert("RGB")
        if max(im.size) > max_side:
            im.thumbnail((max_side, max_side), Image.LANCZOS)
            alpha = alpha.resize(im.size, Image.BILINEAR) if alpha is not None else None
        return im, alpha


def is_mask_file(path: Path) -> bool:
    return path.name.lower().endswith(MASK_SUFFIX)


def mask_path(image: Path) -> Path:
    return image.with_name(image.stem + MASK_SUFFIX)


def read_mask(image: Path, size: tuple[int, int], alpha: Image.Image | None, max_side: int) -> Image.Image | None:
    """The loss mask of ``image`` (decoded at ``size``): ``name.mask.png`` beside it (grey levels, white = full
    weight), else its alpha channel, else None. A mask file of another aspect ratio is an error naming it."""
    side = mask_path(image)
    if side.is_file():
        m = _decode(side, max_side)[0].convert("L")
        if abs(m.size[0] * size[1] - m.size[1] * size[0]) > 0.01 * size[0] * size[1]:
            raise ValueError(f"its mask {side.name} is {m.size[0]}x{m.size[1]}, not the image's shape "
                             f"{size[0]}x{size[1]}")
        return m.resize(size, Image.BILINEAR) if m.size != size else m
    return alpha


def read_caption(image_path: Path, max_chars: int = MAX_CAPTION_CHARS) -> tuple[str | None, bool]:
    """(caption, cut): the text of ``name.txt`` beside the image, at most ``max_chars`` characters.

    Only the first 4 * max_chars bytes are read (UTF-8 needs at most 4 bytes a character), so the file's
    size never matters; ``cut`` says the caption was longer and was cut.
    """
    txt = image_path.with_suffix(".txt")
    if not txt.exists():
        return None, False
    if not txt.is_file():
        raise ValueError(f"caption {txt.name} is not a regular file")
    limit = 4 * max_chars
    with open(txt, "rb") as f:
        data = f.read(limit + 1)
    longer = len(data) > limit
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:  # final=False: a character cut by the byte limit is left out, not an error
        text = decoder.decode(data[:limit], final=not longer)
    except UnicodeDecodeError as e:
        raise ValueError(f"caption {txt.name} is not UTF-8 (byte {e.start})") from None
    text = text.strip()
    cut = longer or len(text) > max_chars
    return text[:max_chars].strip(), cut


def bucket_size(w: int, h: int, resolution: int, multiple: int = 64) -> tuple[int, int]:
    """Width and height with about resolution^2 pixels, the image's aspect ratio, multiples of ``multiple``."""
    scale = (resolution * resolution / (w * h)) ** 0.5
    bw = max(multiple, int(round(w * scale / multiple)) * multiple)
    bh = max(multiple, int(round(h * scale / multiple)) * multiple)
    return bw, bh


def fit(im: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to cover (width, height), then centre-crop to it."""
    return ImageOps.fit(im, (width, height), Image.LANCZOS, centering=(0.5, 0.5))


def to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im, dtype=np.uint8))


def load_dataset(folder: Path, resolution: int, mode: str = "center_crop", multiple: int = 64,
                 max_cache_bytes: int | None = None, max_images: int | None = None,
                 repeat_folders: bool = False, no_upscale: bool = False, masks: bool = False) -> Dataset:
    """Read every usable image of ``folder`` at ``resolution`` (module docstring states the policy).

    ``max_cache_bytes`` bounds the decoded images' memory (``cache_bytes``), checked before decoding any;
    ``max_images`` reads only the first that many image files (in scan order, sorted by path); ``repeat_folders``:
    kohya's N_name subfolders repeat their images (checked before decoding any); ``no_upscale``: images that would
    have to be enlarged to their training size are skipped (a super-resolution target must not be an upscaled
    image); ``masks``: each image's loss mask (``read_mask``) is read and cropped with it, and ``name.mask.png``
    files are masks, not images; an image whose mask is all black is skipped.
    """
    if mode not in RESIZE_MODES:
        raise DatasetError(f"unknown resize mode {mode!r}; choose one of {RESIZE_MODES}")
    if resolution < 8 or resolution % 8:
        raise DatasetError(f"resolution {resolution} must be a multiple of 8")
    files, skipped = scan_folder(folder)
    if masks:
        files = [f for f in files if not is_mask_file(f)]
    files = files[:max_images] if max_images is not None else files
    counts = {path: repeats_of(path, folder) if repeat_folders else 1 for path in files}  # before any decoding
    if sum(counts.values()) > 10 * MAX_IMAGES:
        raise DatasetError(f"dataset folder {folder}: the repeat counts make {sum(counts.values())} samples, more "
                           f"than {10 * MAX_IMAGES}: lower them")
    need = cache_bytes(len(files), resolution) * (4 if masks else 3) // 3
    if max_cache_bytes is not None and need > max_cache_bytes:
        raise DatasetError(f"dataset folder {folder}: {len(files)} images at {resolution}px need "
                           f"{need / 2**30:.1f} GiB in memory before encoding, more than the "
                           f"{max_cache_bytes / 2**30:.1f} GiB allowed; use fewer images or a lower resolution")
    ds = Dataset(skipped=skipped)
    for path in files:
        try:
            _read_one(ds, path, resolution, mode, multiple, no_upscale, masks)
            ds.repeats.append(counts[path])
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            ds.skipped.append(Skipped(path, str(e) or type(e).__name__))
    if not ds.images:
        detail = "; ".join(f"{s.path.name}: {s.reason}" for s in ds.skipped[:10])
        what = "no image files" if not files else "no usable images"
        raise DatasetError(f"dataset folder {folder} has {what}"
                           + (f" (extensions {', '.join(IMAGE_EXTS)})" if not files else "")
                           + (f"; skipped: {detail}" if detail else ""))
    return ds


def _read_one(ds: Dataset, path: Path, resolution: int, mode: str, multiple: int, no_upscale: bool,
              masks: bool) -> None:
    """One image (its caption, its mask) into ``ds``; raises what makes it unusable."""
    caption, cut = read_caption(path)
    im, alpha = _decode(path, max_side=4 * resolution)
    if min(im.size) < MIN_SIDE:
        raise ValueError(f"{im.size[0]}x{im.size[1]} is smaller than {MIN_SIDE}x{MIN_SIDE}")
    size = bucket_size(*im.size, resolution, multiple) if mode == "buckets" else (resolution, resolution)
    if no_upscale and max(size[0] / im.size[0], size[1] / im.size[1]) > 1:  # fit() would enlarge it
        raise ValueError(f"{im.size[0]}x{im.size[1]} would be enlarged to cover {size[0]}x{size[1]}: a "
                         "super-resolution target must not be an upscaled image (lower resolution)")
    mask = None
    if masks:
        m = read_mask(path, im.size, alpha, 4 * resolution)
        if m is not None:
            mask = to_tensor(fit(m, *size))
            if int(mask.max()) == 0:
                raise ValueError("its mask is all black (nothing to train on)")
    ds.images.append(to_tensor(fit(im, *size)))
    ds.masks.append(mask)
    ds.captions.append(caption)
    ds.files.append(path)
    if cut:
        ds.notes.append(Skipped(path.with_suffix(".txt"), f"caption cut to its first {MAX_CAPTION_CHARS} characters"))
