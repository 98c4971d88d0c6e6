"""Dataset folders of real photos, from the images that scikit-image's wheel ships (no downloads)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# (skimage.data name, saved as, size): RGB and grayscale, different sizes and aspect ratios, PNG and JPEG.
PHOTOS = [
    ("astronaut", "astronaut.png", (96, 96)),
    ("coffee", "coffee.jpg", (120, 80)),
    ("chelsea", "chelsea.png", (100, 76)),
    ("camera", "camera.png", (80, 80)),          # grayscale
    ("rocket", "rocket.jpg", (64, 96)),
    ("motorcycle_left", "motorcycle.png", (110, 80)),
]
CAPTIONS = {
    "astronaut": "a photo of an astronaut", "coffee": "a cup of coffee", "chelsea": "a photo of a cat",
    "camera": "a man with a camera", "rocket": "a rocket on a launch pad", "motorcycle_left": "a motorcycle",
}


def photo_path(name: str) -> Path:
    """A photo file inside the installed scikit-image wheel (skimage/data/)."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    for ext in (".png", ".jpg"):
        if (folder / (name + ext)).exists():
            return folder / (name + ext)
    raise FileNotFoundError(f"scikit-image ships no photo named {name}")


def photo(name: str) -> np.ndarray:
    with Image.open(photo_path(name)) as im:
        return np.asarray(im)


def make_dataset(folder: Path, names: list[str] | None = None, captions: bool = True,
                 sizes: dict[str, tuple[int, int]] | None = None) -> Path:
    """Write photos (and name.txt captions) into ``folder``; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, fname, size in PHOTOS:
        if names is not None and name not in names:
            continue
        im = Image.fromarray(photo(name))
        im = im.resize((sizes or {}).get(name, size), Image.LANCZOS)
        im.save(folder / fname, quality=92) if fname.endswith(".jpg") else im.save(folder / fname)
        if captions:
            (folder / fname).with_suffix(".txt").write_text(CAPTIONS[name], encoding="utf-8")
    return folder
