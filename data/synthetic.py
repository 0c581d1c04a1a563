"""Natural-looking JPEG folders for tests and benchmarks: smooth random colour fields, not noise, so that
JPEG compresses them as it does photographs (about 100 KB at 500 x 375)."""
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


def smooth_field(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """An RGB image: a coarse random colour grid upsampled bicubically, blurred, with fine grain added."""
    coarse = rng.integers(0, 256, size=(max(2, height // 48), max(2, width // 48), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC).filter(ImageFilter.GaussianBlur(3))
    grain = rng.normal(0, 12, size=(height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def write_jpeg_folder(root: Path, classes: int, per_class: int, sizes: list[tuple[int, int]], seed: int = 0,
                      quality: int = 93) -> list[Path]:
    """``root/<class>/<i>.jpg`` for ``classes`` x ``per_class`` images, their (height, width) cycling through
    ``sizes``; returns the paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for c in range(classes):
        folder = Path(root) / f"class{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            height, width = sizes[(c * per_class + i) % len(sizes)]
            path = folder / f"{i:05d}.jpg"
            smooth_field(rng, height, width).save(path, quality=quality)
            paths.append(path)
    return paths
