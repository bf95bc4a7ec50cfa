"""DICOM rendering against values worked out by hand from the standard (PS3.3 C.11.2.1.2 and C.7.6.3.1.2).

Each VOI function at chosen points, the VOI LUT's descriptor, colour films to luma, the first frame of a
multi-frame film, the size limits and every refusal's message whole.
"""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless

from sharding.dicom import MAX_PIXELS, DicomError, first_frame, header, is_dicom, load, read, render, voi

from helpers.dicoms import make_dicom


def window(center, width, function=None) -> Dataset:
    ds = Dataset()
    ds.WindowCenter, ds.WindowWidth = center, width
    if function is not None:
        ds.VOILUTFunction = function
    return ds


X = np.array([0.0, 75.0, 100.0, 125.0, 200.0])


def test_linear_window_by_the_standard():
    # c = 100, w = 51: y = (x - 99.5) / 50 + 0.5, clipped to [0, 1]
    np.testing.assert_allclose(voi(X, window(100, 51)), [0.0, 0.01, 0.51, 1.0, 1.0])
    np.testing.assert_allclose(voi(X, window(100, 51, "linear")), [0.0, 0.01, 0.51, 1.0, 1.0])  # any case


def test_a_window_of_width_one_is_a_threshold_and_narrower_is_refused():
    np.testing.assert_array_equal(voi(np.array([99.0, 99.5, 100.0]), window(100, 1)), [0.0, 0.0, 1.0])
    # width 2 is already linear: (x - 99.5) / 1 + 0.5
    np.testing.assert_array_equal(voi(np.array([99.0, 99.5, 100.0]), window(100, 2)), [0.0, 0.5, 1.0])
    with pytest.raises(DicomError, match=r"^WindowWidth 0.5 < 1$"):
        voi(X, window(100, 0.5))


def test_linear_exact_and_sigmoid_by_the_standard():
    np.testing.assert_allclose(
        voi(np.array([60.0, 90.0, 100.0, 130.0]), window(100, 50, "LINEAR_EXACT")), [0.0, 0.3, 0.5, 1.0]
    )
    got = voi(np.array([100.0, 125.0, 50.0]), window(100, 50, "SIGMOID"))
    np.testing.assert_allclose(got, [0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(4))])


def test_a_multi_valued_window_takes_its_first_values():
    ds = window([100, 3000], [51, 9000])
    np.testing.assert_allclose(voi(X, ds), [0.0, 0.01, 0.51, 1.0, 1.0])


def test_a_center_without_a_width_falls_back_to_the_percentile_window():
    ds = Dataset()
    ds.WindowCenter = 100
    x = np.linspace(0, 1000, 1001)
    lo, hi = np.percentile(x, [0.5, 99.5])
    np.testing.assert_allclose(voi(x, ds), np.clip((x - lo) / (hi - lo), 0, 1))
    flat = voi(np.full((3, 4), 7.0), Dataset())  # no window and one value: black, not NaN
    assert flat.shape == (3, 4) and not flat.any()


def lut_item(descriptor, data) -> Dataset:
    ds, item = Dataset(), Dataset()
    item.LUTDescriptor = list(descriptor)
    item.LUTData = data
    ds.VOILUTSequence = [item]
    return ds


def test_voi_lut_descriptor_entries_first_value_and_bits():
    # 4 entries from stored value 10, 8 bits; the 2 extra data words lie past the descriptor and are not used
    ds = lut_item([4, 10, 8], np.array([0, 51, 102, 255, 9, 9], "<u2").tobytes())
    got = voi(np.array([0.0, 10.0, 11.0, 12.4, 13.0, 99.0]), ds)
    np.testing.assert_allclose(got, np.array([0, 0, 51, 102, 255, 255]) / 255.0)
    # the data as a list of numbers (pydicom's US), and one number alone
    np.testing.assert_allclose(voi(np.array([10.0, 11.0]), lut_item([2, 10, 8], [255, 0])), [1.0, 0.0])
    np.testing.assert_allclose(voi(np.array([3.0]), lut_item([1, 0, 8], 51)), [0.2])


def test_a_voi_lut_of_zero_entries_has_65536():
    data = np.arange(65536, dtype="<u2")
    got = voi(np.array([0.0, 40000.0, 65535.0, 70000.0]), lut_item([0, 0, 16], data.tobytes()))
    np.testing.assert_allclose(got, np.array([0, 40000, 65535, 65535]) / 65535.0)


def stub(pixels, **attrs):
    return SimpleNamespace(pixel_array=pixels, **attrs)


def test_a_colour_film_becomes_its_luma():
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[1, 0] = (0, 0, 255)
    rgb[1, 1] = (10, 20, 30)
    got = first_frame(stub(rgb, SamplesPerPixel=3))
    np.testing.assert_allclose(got, [[76.245, 149.685], [29.07, 0.299 * 10 + 0.587 * 20 + 0.114 * 30]])
    assert got.dtype == np.float64


def test_a_frame_stack_or_three_channels_of_one_sample_are_refused_whole():
    with pytest.raises(DicomError, match=r"^DICOM pixel array of shape \[2, 4, 4\] is not one grayscale frame$"):
        first_frame(stub(np.zeros((2, 4, 4)), SamplesPerPixel=1))
    with pytest.raises(DicomError, match=r"^DICOM pixel array of shape \[4, 4, 3\] is not one grayscale frame$"):
        first_frame(stub(np.zeros((4, 4, 3))))  # no SamplesPerPixel: one sample, so not colour


class Broken:
    """A dataset whose pixel data fails to decode with `error`."""

    def __init__(self, error, syntax=None):
        self.error = error
        if syntax is not None:
            self.file_meta = SimpleNamespace(TransferSyntaxUID=syntax)

    @property
    def pixel_array(self):
        raise self.error


def test_undecodable_pixel_data_says_why_whole():
    with pytest.raises(DicomError, match=r"^DICOM pixel data unreadable: bad length$"):
        first_frame(Broken(ValueError("bad length\nsecond line")))
    with pytest.raises(DicomError, match=r"^DICOM pixel data unreadable: KeyError$"):
        first_frame(Broken(KeyError()))  # no message: the exception's type
    with pytest.raises(DicomError, match=r"^DICOM pixel data unreadable: x{200}$"):
        first_frame(Broken(ValueError("x" * 300)))  # cut at 200 characters
    with pytest.raises(DicomError, match=r"^DICOM pixel data unreadable: oops$"):
        first_frame(Broken(ValueError("oops"), ExplicitVRLittleEndian))  # not compressed: no handler advice
    with pytest.raises(
        DicomError,
        match=r"^compressed DICOM \(RLE Lossless\) cannot be decoded here: oops; install a pixel data handler "
        r"\(pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg\)$",
    ):
        first_frame(Broken(ValueError("oops"), RLELossless))


def test_a_multi_frame_film_gives_its_first_frame_and_a_single_one_itself():
    frames = np.stack([np.full((4, 4), 100, np.uint16), np.full((4, 4), 900, np.uint16)])
    ds = read(make_dicom(frames))
    np.testing.assert_array_equal(first_frame(ds), np.full((4, 4), 100.0))
    single = read(make_dicom(np.full((4, 4), 7, np.uint16)))
    assert "NumberOfFrames" not in single
    np.testing.assert_array_equal(first_frame(single), np.full((4, 4), 7.0))


def raw_dataset(ds: Dataset) -> bytes:
    """`ds` written without the preamble and file meta: what some archives hold."""
    ds.preamble = None
    del ds.file_meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False, implicit_vr=True, little_endian=True)
    return buf.getvalue()


def test_files_without_a_preamble_are_read_too():
    data = raw_dataset(read(make_dicom(np.full((3, 5), 9, np.uint16))))
    assert data[128:132] != b"DICM" and not is_dicom(data)
    assert (int(read(data).Rows), int(read(data).Columns)) == (3, 5)


def test_is_dicom_by_name_in_any_case_or_by_its_marker():
    assert is_dicom(b"", "film.DCM") and is_dicom(b"", "FILM.Dicom") and is_dicom(b"", "a.dcm")
    assert not is_dicom(b"", "film.png") and not is_dicom(b"\0" * 200)
    assert is_dicom(b"\0" * 128 + b"DICM")


def saved(ds: Dataset) -> bytes:
    """A dataset edited in a test, as the bytes of a DICOM file."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def sized(rows: int, cols: int) -> bytes:
    ds = read(make_dicom(np.zeros((2, 2), np.uint16)))
    ds.Rows, ds.Columns = rows, cols  # the header only: read() refuses before decoding a pixel
    return saved(ds)


def test_frame_sizes_at_and_past_the_limits():
    assert int(read(sized(1, 1)).Rows) == 1
    assert int(read(sized(8000, MAX_PIXELS // 8000)).Rows) == 8000  # exactly MAX_PIXELS
    for rows, cols in ((0, 5), (5, 0), (8000, MAX_PIXELS // 8000 + 1)):
        with pytest.raises(DicomError, match=rf"^DICOM frame of {cols}x{rows} px is outside 1..64,000,000 px$"):
            read(sized(rows, cols))


def test_every_refusal_of_read_and_load_is_whole():
    ds = read(make_dicom(np.zeros((2, 2), np.uint16)))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, ds.file_meta, enforce_standard=True)
    buf.write(b"not deflated data" * 4)
    with pytest.raises(DicomError, match=r"^not a readable DICOM file: error: Error -3 while decompressing data"):
        read(buf.getvalue())
    ds = read(make_dicom(np.zeros((2, 2), np.uint16)))
    del ds.PixelData
    with pytest.raises(DicomError, match=r"^DICOM file without pixel data$"):
        read(saved(ds))
    ds = read(make_dicom(np.zeros((2, 2), np.uint16)))
    del ds.Rows
    with pytest.raises(DicomError, match=r"^DICOM file without valid Rows/Columns$"):
        read(saved(ds))
    ds = read(make_dicom(np.zeros((2, 2), np.uint16)))
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]  # and no LUTData
    ds.VOILUTSequence = [item]
    with pytest.raises(DicomError, match=r"^DICOM cannot be rendered: AttributeError: "):
        load(saved(ds))


def test_render_and_load_name_the_mode_and_keep_no_empty_field():
    ds = read(make_dicom(np.array([[0, 100], [200, 300]], np.uint16), window=(150, 301)))
    assert render(ds).tolist() == [[0, 85], [170, 255]]  # (x - 149.5) / 300 + 0.5, times 255, rounded
    pixels, kept, mode = load(make_dicom(np.zeros((2, 2), np.uint16), bits_stored=12, patient_id=""))
    assert mode == "DICOM MONOCHROME2 12-bit" and "patient_id" not in kept  # an empty field is not kept
    ds = read(make_dicom(np.zeros((2, 2), np.uint16)))
    del ds.BitsStored
    assert header(ds)["patient_id"] == "P1"
