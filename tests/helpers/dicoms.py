"""Hand-made DICOM files (pydicom) for the rendering and build tests."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def make_dicom(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple | None = None,
    function: str | None = None,
    voi_lut: tuple | None = None,
    patient_id: str | None = "P1",
    patient_name: str = "Doe^Jane",
    seed: int = 0,
) -> bytes:
    """A DICOM file of `pixels` (uint16/int16 [rows, cols] or [frames, rows, cols])."""
    arr = np.asarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"sop{seed}"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[f"study{seed}"])
    ds.Modality = "DX"
    ds.ViewPosition = "PA"
    ds.PatientSex = "F"
    ds.PatientAge = "042Y"
    ds.PatientName = patient_name
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = arr.shape[-2:]
    if arr.ndim == 3:
        ds.NumberOfFrames = arr.shape[0]
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if arr.dtype == np.int16 else 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept or 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if function is not None:
        ds.VOILUTFunction = function
    if voi_lut is not None:
        descriptor, data = voi_lut
        item = Dataset()
        item.LUTDescriptor = list(descriptor)
        item.LUTData = np.asarray(data, "<u2").tobytes()  # OW: bytes
        ds.VOILUTSequence = [item]
    ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def read(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))
