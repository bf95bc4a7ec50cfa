"""Image preprocessing shared by sharding and prediction.

One function decides how any input image becomes the stored uint8 299x299
grayscale array, so an image served to `evaluation.predict` is prepared exactly
like a training image. Normalisation is *not* done here: it happens on the
device at training time (pipeline.augment).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from sharding import dicom
from sharding.contract import IMAGE_SIZE

#: Largest image (in pixels) we agree to decode: 64 Mpx is far above any
#: radiograph in circulation and far below what would exhaust memory.
MAX_PIXELS = 64_000_000


class PreprocessError(ValueError):
    """An input file cannot be turned into a training image; the message says why."""


@dataclass(frozen=True)
class SourceInfo:
    """What the source file looked like before preprocessing."""

    width: int
    height: int
    mode: str
    format: str | None
    meta: dict | None = None  # DICOM header fields kept for the sample json (patient_id, study_uid, ...)


def to_gray(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit grayscale ("L").

    16-bit and float images are stretched from their own min..max to 0..255:
    PIL's own `convert("L")` clips them at 255, which turns most 12/16-bit
    radiographs white.
    """
    if img.mode == "L":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
        return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels carry no film: composite on black like a lightbox.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("L")
    if img.mode in ("P", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB").convert("L")
    return img.convert("L")


def preprocess(img: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """PIL image of any mode/size -> uint8 array [size, size] (antialiased resize)."""
    gray = to_gray(img)
    if gray.size != (size, size):
        gray = gray.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(gray, dtype=np.uint8).copy()


def open_image(source: str | Path | bytes) -> Image.Image:
    """Open and fully decode an image file or bytes, first frame only, EXIF-upright.

    Raises PreprocessError with the reason for anything that is not a decodable
    image of a sane size.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if not data:
        raise PreprocessError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                raise PreprocessError(f"image of {img.width}x{img.height} px exceeds the {MAX_PIXELS:,} px limit")
            if getattr(img, "is_animated", False):
                img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img) if img.format in ("JPEG", "MPO", "TIFF", "WEBP") else img
    except PreprocessError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise PreprocessError(f"decompression bomb refused: {exc}") from None
    except Exception as exc:  # PIL raises many types for bad bytes
        raise PreprocessError(f"not a decodable image: {type(exc).__name__}: {exc}") from None
    if img.width < 1 or img.height < 1:
        raise PreprocessError("image has no pixels")
    return img


def load_image(source: str | Path | bytes, size: int = IMAGE_SIZE) -> tuple[np.ndarray, SourceInfo]:
    """Decode and preprocess one image (PNG, JPEG, ... or DICOM); returns (uint8 [size, size], SourceInfo)."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if dicom.is_dicom(data, "" if isinstance(source, bytes) else str(source)):
        try:
            pixels, meta, mode = dicom.load(data)
        except dicom.DicomError as exc:
            raise PreprocessError(str(exc)) from None
        img = Image.fromarray(pixels, mode="L")
        info = SourceInfo(img.width, img.height, mode, "DICOM", meta)
        return preprocess(img, size), info
    img = open_image(data)
    info = SourceInfo(img.width, img.height, img.mode, img.format)
    try:
        return preprocess(img, size), info
    except Exception as exc:
        raise PreprocessError(f"cannot convert mode {img.mode}: {type(exc).__name__}: {exc}") from None


def load_mask(source: str | Path | bytes, size: int = IMAGE_SIZE) -> np.ndarray:
    """Decode a lung mask and resize it (nearest) to uint8 [size, size] in {0, 1}."""
    img = to_gray(open_image(source))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.NEAREST)
    return (np.asarray(img) >= 128).astype(np.uint8)
