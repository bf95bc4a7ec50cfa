"""The shard contract: class order, sample member names and the image shape.

Everything that writes or reads a shard imports these names from here, so the
format has exactly one definition. The README's "Shard format" section
describes the same thing for people.
"""

from __future__ import annotations

import re

#: Class names in their fixed label order (COVID=0 ... Viral Pneumonia=3).
#: The folder names of the Kaggle dataset, "Viral Pneumonia" with its space.
CLASSES: tuple[str, ...] = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")

#: Real image counts per class in the Kaggle release (21,165 in all).
REAL_COUNTS: dict[str, int] = {"COVID": 3616, "Lung_Opacity": 6012, "Normal": 10192, "Viral Pneumonia": 1345}

#: Side of the square, single-channel uint8 image stored in every shard.
IMAGE_SIZE = 299
#: Side of the binary lung masks in the Kaggle release.
MASK_SIZE = 256
#: Name of the dataset folder inside the Kaggle archive.
DATASET_DIR = "COVID-19_Radiography_Dataset"

SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Sample member extensions inside a shard (WebDataset keeps `<key>.<ext>`).
IMAGE_RAW = "image.npy"  # uint8 [1, H, W], NumPy .npy v1 (no pickle)
IMAGE_PNG = "image.png"  # 8-bit grayscale PNG, H x W
MASK_RAW = "mask.npy"  # uint8 [1, H, W] in {0, 1}
MASK_PNG = "mask.png"  # 8-bit PNG with values {0, 1}
LABEL = "cls"  # ASCII integer, the class index
META = "json"  # UTF-8 JSON: source, original size/mode, sha256 of pixels, split

ENCODINGS: tuple[str, ...] = ("raw", "png")


def image_member(encoding: str) -> str:
    """Member extension of the image for a shard encoding (`raw` or `png`)."""
    return {"raw": IMAGE_RAW, "png": IMAGE_PNG}[encoding]


def mask_member(encoding: str) -> str:
    """Member extension of the mask for a shard encoding (`raw` or `png`)."""
    return {"raw": MASK_RAW, "png": MASK_PNG}[encoding]


def class_index(name: str) -> int:
    """Index of a class folder name; raises ValueError naming the known classes."""
    try:
        return CLASSES.index(name)
    except ValueError:
        raise ValueError(f"unknown class {name!r}; expected one of {list(CLASSES)}") from None


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sample_key(class_name: str, stem: str) -> str:
    """Stable WebDataset key for a source file: class slug + file stem slug.

    Keys may not contain dots (WebDataset splits key and extension at the
    first dot) and should not contain spaces, so both are replaced.
    """
    cls = _UNSAFE.sub("_", class_name)
    name = _UNSAFE.sub("_", stem)
    return name if name.startswith(cls + "-") else f"{cls}--{name}"
