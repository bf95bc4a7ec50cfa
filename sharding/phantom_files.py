"""The phantom's files besides its PNGs: metadata sheets with sources, DICOM films, a label CSV.

- **Sources** correlated with the class like the real release's: COVID from three
  sites, Lung_Opacity from one, Normal mostly from that one and 13 % from a
  pediatric collection, Viral Pneumonia all from the pediatric one.
- **`<Class>.metadata.xlsx`** as in the Kaggle release (FILE NAME, FORMAT, SIZE,
  URL), written byte-deterministically (fixed document times and zip entry times).
- **DICOM films** (`format="dicom"`): three encodings in turn, each rendering back
  to exactly the PNG phantom's pixels through `sharding.dicom`: 8-bit MONOCHROME2
  with a window; 8-bit MONOCHROME1 (stored inverted) with a window; 12-bit with a
  rescale slope/intercept and a window. Patient ids and study UIDs in the header.
- **`labels.csv`**: path, label, patient_id, source, for the `--labels` input kind.
"""

from __future__ import annotations

import datetime
import io
import zipfile

import numpy as np

#: (source, percent) per class: each class comes mostly from its own sites, like the real data.
SOURCES: dict[str, list[tuple[str, int]]] = {
    "COVID": [
        ("bimcv.example/covid19", 50),
        ("sirm.example/covid-19", 30),
        ("github.example/ieee8023/covid-chestxray-dataset", 20),
    ],
    "Lung_Opacity": [("rsna.example/pneumonia-detection-challenge", 100)],
    "Normal": [("rsna.example/pneumonia-detection-challenge", 87), ("pediatric.example/chest-xray-pneumonia", 13)],
    "Viral Pneumonia": [("pediatric.example/chest-xray-pneumonia", 100)],
}
FILMS_PER_PATIENT = 3
_EPOCH = datetime.datetime(2021, 1, 1)


def source_of(seed: int, class_name: str, index: int) -> str:
    """The site of film `index` of a class (a fixed function of seed and index)."""
    u = (index * 2654435761 + seed * 40503 + 17) % 100
    for source, percent in SOURCES[class_name]:
        if u < percent:
            return source
        u -= percent
    return SOURCES[class_name][-1][0]


def patient_of(class_name: str, index: int) -> str:
    """Consecutive films of a class belong to one patient, FILMS_PER_PATIENT at a time."""
    return f"{''.join(w[0] for w in class_name.replace('_', ' ').split()).upper()}{index // FILMS_PER_PATIENT:05d}"


def xlsx_bytes(rows: list[list]) -> bytes:
    """A one-sheet workbook of `rows`, the same bytes on every run."""
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    for row in rows:
        sheet.append(row)
    book.properties.created = _EPOCH
    raw = io.BytesIO()
    book.save(raw)
    out = io.BytesIO()
    with zipfile.ZipFile(raw) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "docProps/core.xml":  # openpyxl stamps the save time here
                data = _fixed_times(data)
            dst.writestr(
                zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)),
                data,
                compress_type=zipfile.ZIP_DEFLATED,
            )
    return out.getvalue()


def _fixed_times(core: bytes) -> bytes:
    import re

    stamp = _EPOCH.strftime("%Y-%m-%dT%H:%M:%SZ").encode()
    return re.sub(rb"(<dcterms:(?:created|modified)[^>]*>)[^<]*(</dcterms:)", rb"\g<1>" + stamp + rb"\g<2>", core)


def dicom_bytes(pixels: np.ndarray, *, seed: int, key: str, index: int, patient_id: str) -> bytes:
    """A DICOM film whose rendering (`sharding.dicom.render`) is exactly `pixels` (uint8 [H, W])."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    p = pixels.astype(np.uint16)
    variant = index % 3
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"radstream-phantom-{seed}-{key}"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[f"radstream-phantom-{seed}-{patient_id}"])
    ds.Modality, ds.ViewPosition = "DX", "PA"
    ds.PatientID, ds.PatientName = patient_id, "Phantom^Film"
    ds.SamplesPerPixel, ds.Rows, ds.Columns = 1, p.shape[0], p.shape[1]
    ds.BitsAllocated, ds.PixelRepresentation = 16, 0
    if variant == 2:  # 12-bit, rescaled: x = 2 * 8p - 1024 = 16p - 1024, window back to p exactly
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
        ds.WindowCenter, ds.WindowWidth = 1016, 4081
        stored = p * 8
    else:  # 8-bit values in 16-bit words; MONOCHROME1 stores the inverse, which the renderer flips back
        ds.BitsStored, ds.HighBit = 8, 7
        ds.PhotometricInterpretation = "MONOCHROME1" if variant == 1 else "MONOCHROME2"
        ds.WindowCenter, ds.WindowWidth = 128, 256
        stored = 255 - p if variant == 1 else p
    ds.PixelData = stored.astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
