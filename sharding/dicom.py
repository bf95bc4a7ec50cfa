"""DICOM films -> 8-bit grayscale, in the order a radiology viewer applies (DICOM PS3.3 C.11):

1. the **Modality LUT**: RescaleSlope/RescaleIntercept, or a Modality LUT Sequence;
2. the **VOI LUT**: a VOI LUT Sequence, else WindowCenter/WindowWidth (LINEAR, LINEAR_EXACT or
   SIGMOID per VOILUTFunction), else a 0.5-99.5 percentile window over the film's own pixels;
3. **MONOCHROME1** inverted (its high values are dark), after the window;
4. 8 bits; the usual resize follows in `sharding.preprocess`.

Multi-frame files give their first frame; colour ones their BT.601 luma. Header
fields kept for the sample json: PatientID, StudyInstanceUID, ViewPosition,
PatientSex, PatientAge (never the patient's name). Hostile files (truncated,
pixel data of the wrong length, huge dimensions) and compressed transfer syntaxes
without an installed pixel-data handler raise `PreprocessError` with the reason:
the build skips them like any unreadable image.
"""

from __future__ import annotations

import io

import numpy as np

#: Largest frame we agree to decode (same bound as PNG/JPEG inputs).
MAX_PIXELS = 64_000_000
#: Header fields kept per sample, by sample-json name.
KEPT = {
    "patient_id": "PatientID",
    "study_uid": "StudyInstanceUID",
    "view": "ViewPosition",
    "sex": "PatientSex",
    "age": "PatientAge",
}


class DicomError(ValueError):
    """A DICOM file cannot be rendered; the message says why (the build skips it)."""


def is_dicom(data: bytes, name: str = "") -> bool:
    """A `.dcm` name or the `DICM` marker after the 128-byte preamble."""
    return name.lower().endswith((".dcm", ".dicom")) or data[128:132] == b"DICM"


def read(data: bytes):
    """The dataset of a DICOM file, its size checked before any pixel is decoded."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad bytes
        raise DicomError(f"not a readable DICOM file: {type(exc).__name__}: {exc}") from None
    if "PixelData" not in ds:
        raise DicomError("DICOM file without pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise DicomError("DICOM file without valid Rows/Columns") from None
    if rows < 1 or cols < 1 or rows * cols > MAX_PIXELS:
        raise DicomError(f"DICOM frame of {cols}x{rows} px is outside 1..{MAX_PIXELS:,} px")
    return ds


def first_frame(ds) -> np.ndarray:
    """The stored values of the first frame, float64 [rows, cols] (colour: luma)."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        arr = ds.pixel_array if int(getattr(ds, "NumberOfFrames", 1) or 1) == 1 else _frame0(ds)
    except Exception as exc:  # noqa: BLE001 - missing handler, wrong length, bad encapsulation
        text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if syntax is not None and syntax.is_compressed:
            raise DicomError(
                f"compressed DICOM ({syntax.name}) cannot be decoded here: {text}; install a pixel "
                "data handler (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg)"
            ) from None
        raise DicomError(f"DICOM pixel data unreadable: {text}") from None
    arr = np.asarray(arr)
    if arr.ndim == 3 and int(getattr(ds, "SamplesPerPixel", 1)) == 3:
        arr = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
    elif arr.ndim != 2:
        raise DicomError(f"DICOM pixel array of shape {list(arr.shape)} is not one grayscale frame")
    return arr.astype(np.float64)


def _frame0(ds) -> np.ndarray:
    from pydicom.pixels import pixel_array

    return pixel_array(ds, index=0)


def modality(arr: np.ndarray, ds) -> np.ndarray:
    """Stored values -> modality values (rescale, or a Modality LUT Sequence)."""
    from pydicom.pixels import apply_modality_lut

    return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)


def _first(value) -> float:
    """A DICOM number or the first of a multi-valued one."""
    try:
        return float(value)
    except TypeError:
        return float(value[0])


def voi(x: np.ndarray, ds) -> np.ndarray:
    """Modality values -> display values in [0, 1]."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        item = ds.VOILUTSequence[0]
        entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
        entries = entries or 65536
        lut = np.asarray(_lut_data(item), dtype=np.float64)[:entries]
        idx = np.clip(np.rint(x) - first_mapped, 0, len(lut) - 1).astype(np.int64)
        return lut[idx] / float(2**bits - 1)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
        if function == "SIGMOID":
            return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
        if function == "LINEAR_EXACT":
            return np.clip((x - c) / w + 0.5, 0.0, 1.0)
        if w < 1:
            raise DicomError(f"WindowWidth {w} < 1")
        return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0) if w > 1 else (x > c - 0.5).astype(np.float64)
    lo, hi = np.percentile(x, [0.5, 99.5])
    return np.zeros_like(x) if hi <= lo else np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def _lut_data(item) -> np.ndarray:
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        return np.frombuffer(data, dtype="<u2")
    return np.atleast_1d(np.asarray(data))


def render(ds) -> np.ndarray:
    """uint8 [rows, cols]: modality LUT -> VOI LUT/window -> MONOCHROME1 inverted -> 8 bits."""
    display = voi(modality(first_frame(ds), ds), ds)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        display = 1.0 - display
    return np.rint(display * 255.0).astype(np.uint8)


def header(ds) -> dict:
    """The kept header fields present in `ds` (strings)."""
    out = {}
    for name, keyword in KEPT.items():
        value = getattr(ds, keyword, None)
        if value not in (None, ""):
            out[name] = str(value)
    return out


def load(data: bytes) -> tuple[np.ndarray, dict, str]:
    """(uint8 [rows, cols] display image, kept header fields, a short mode description)."""
    ds = read(data)
    try:
        pixels = render(ds)
    except DicomError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed LUT or window must be a skip, not a crash
        raise DicomError(f"DICOM cannot be rendered: {type(exc).__name__}: {exc}") from None
    mode = f"DICOM {getattr(ds, 'PhotometricInterpretation', '?')} {getattr(ds, 'BitsStored', '?')}-bit"
    return pixels, header(ds), mode
