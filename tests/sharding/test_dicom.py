"""DICOM rendering against hand-computed pixels, hostile files, and DICOM inputs through a real build."""

from __future__ import annotations

import csv
import io
import json
import tarfile

import numpy as np
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

from sharding import dicom
from sharding.build import build_shards
from sharding.preprocess import PreprocessError, load_image

from helpers.dicoms import make_dicom, read


def _window(x, c, w):
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR, to 0..255, written out by hand."""
    x = np.asarray(x, np.float64)
    y = np.where(
        x <= c - 0.5 - (w - 1) / 2,
        0.0,
        np.where(x > c - 0.5 + (w - 1) / 2, 255.0, ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0),
    )
    return np.rint(y).astype(np.uint8)


STORED = np.array([[0, 100, 400, 900], [1500, 2100, 3000, 4095]], np.uint16)  # 12-bit values


def test_rescale_then_linear_window():
    ds = read(make_dicom(STORED, bits_stored=12, slope=2.0, intercept=-1024.0, window=(1000, 3000)))
    expected = _window(STORED * 2.0 - 1024.0, 1000, 3000)
    assert np.array_equal(dicom.render(ds), expected)
    assert expected.min() == 0 and expected.max() == 255  # the window clips at both ends here


def test_monochrome1_is_inverted_after_the_window():
    mono2 = dicom.render(read(make_dicom(STORED, bits_stored=12, slope=2.0, intercept=-1024.0, window=(1000, 3000))))
    mono1 = dicom.render(
        read(
            make_dicom(
                STORED, bits_stored=12, slope=2.0, intercept=-1024.0, window=(1000, 3000), photometric="MONOCHROME1"
            )
        )
    )
    assert np.array_equal(mono1, 255 - mono2)


def test_voi_lut_sequence_wins_over_the_window():
    stored = np.array([[8, 10, 11], [12, 13, 20]], np.uint16)
    ds = read(make_dicom(stored, window=(0, 1), voi_lut=((4, 10, 8), [0, 100, 200, 255])))
    # index = stored - first mapped (10), clipped to the 4 entries; 8-bit LUT scaled to 0..255
    assert dicom.render(ds).tolist() == [[0, 0, 100], [200, 255, 255]]


def test_no_window_uses_a_percentile_window_over_the_film():
    ramp = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    out = dicom.render(read(make_dicom(ramp, bits_stored=12)))
    lo, hi = np.percentile(ramp.astype(np.float64), [0.5, 99.5])
    expected = np.rint(np.clip((ramp - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(out, expected) and out[0, 0] == 0 and out[-1, -1] == 255


def test_signed_16_bit_with_sigmoid_function():
    stored = np.array([[-1000, -200, 0], [50, 300, 2000]], np.int16)
    out = dicom.render(read(make_dicom(stored, slope=1.0, intercept=0.0, window=(0, 400), function="SIGMOID")))
    expected = np.rint(255.0 / (1.0 + np.exp(-4.0 * stored.astype(np.float64) / 400))).astype(np.uint8)
    assert np.array_equal(out, expected)


def test_multi_frame_takes_the_first_frame():
    frames = np.stack([STORED, STORED[::-1]]).astype(np.uint16)
    first = dicom.render(read(make_dicom(frames, bits_stored=12, window=(2048, 4096))))
    assert np.array_equal(first, _window(STORED, 2048, 4096))


def test_load_image_keeps_header_fields_never_the_name(tmp_path):
    path = tmp_path / "film.dcm"
    path.write_bytes(make_dicom(STORED, bits_stored=12, window=(2048, 4096), patient_id="PAT-7"))
    pixels, info = load_image(path)
    assert pixels.shape == (299, 299) and pixels.dtype == np.uint8 and info.format == "DICOM"
    assert info.meta["patient_id"] == "PAT-7" and info.meta["view"] == "PA" and info.meta["age"] == "042Y"
    assert "Doe" not in json.dumps(info.meta)
    # no .dcm suffix: the DICM marker is enough
    other = tmp_path / "film.bin"
    other.write_bytes(path.read_bytes())
    assert np.array_equal(load_image(other)[0], pixels)


def _compressed() -> bytes:
    ds = read(make_dicom(STORED, bits_stored=12))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a real codestream"])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    "name,data,reason",
    [
        ("truncated", lambda: make_dicom(STORED)[:300], "DICOM"),
        ("short pixel data", lambda: make_dicom(STORED)[:-6], "pixel data"),
        ("huge", None, "outside 1..64,000,000 px"),
        ("compressed", _compressed, "pylibjpeg"),
    ],
)
def test_hostile_or_undecodable_dicoms_are_refused_with_a_reason(name, data, reason):
    if data is None:
        ds = read(make_dicom(STORED))
        ds.Rows, ds.Columns = 60000, 60000
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        blob = buf.getvalue()
    else:
        blob = data()
    with pytest.raises(PreprocessError, match=reason):
        load_image(blob)


def test_dicom_folder_with_a_label_csv_builds_with_patients_from_the_headers(tmp_path):
    """No patient column in the CSV: the DICOM PatientID groups a patient's films into one split."""
    root = tmp_path / "dcm"
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        film = rng.integers(0, 4096, (32, 32), dtype=np.uint16)
        photometric = "MONOCHROME1" if i % 5 == 0 else "MONOCHROME2"
        (root / f"{i:03d}.dcm").write_bytes(
            make_dicom(
                film, bits_stored=12, window=(2048, 4096), seed=i, patient_id=f"PT{i // 4}", photometric=photometric
            )
        )
        rows.append({"path": f"{i:03d}.dcm", "label": "pneumonia" if i % 3 else "normal"})
    (root / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 10)
    rows.append({"path": "broken.dcm", "label": "normal"})
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    m = build_shards(root, tmp_path / "s", labels=labels, shard_size=16, workers=1, progress=False)
    assert m.classes == ("normal", "pneumonia") and m.counts["written"] == 60 and m.counts["skipped"] == 1
    assert m.skipped[0]["path"] == "broken.dcm" and "DICOM" in m.skipped[0]["reason"]
    assert m.build["split"]["by"] == "patient"
    split_of: dict[str, set] = {}
    for shard in sorted((tmp_path / "s").glob("*.tar")):
        with tarfile.open(shard) as tf:
            for member in tf.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(member).read())
                    assert meta["orig_mode"].startswith("DICOM MONOCHROME") and "study_uid" in meta
                    split_of.setdefault(meta["patient_id"], set()).add(meta["split"])
    assert len(split_of) == 15 and all(len(s) == 1 for s in split_of.values())
    again = build_shards(root, tmp_path / "t", labels=labels, shard_size=16, workers=1, progress=False)
    assert [s.sha256 for s in again.split("train").shards] == [s.sha256 for s in m.split("train").shards]


def test_dicom_label_csv_build_byte_identical_with_one_and_two_workers(tmp_path):
    from sharding.phantom import PhantomSpec, generate

    raw = generate(tmp_path / "raw", PhantomSpec(counts=(40, 40, 40, 40), seed=3, format="dicom"))
    a = build_shards(raw, tmp_path / "a", labels=raw / "labels.csv", shard_size=50, workers=1, progress=False)
    b = build_shards(raw, tmp_path / "b", labels=raw / "labels.csv", shard_size=50, workers=2, progress=False)
    assert a.counts["written"] == 160 and a.build["input"] == "label csv"
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    for split in a.splits:
        assert [s.sha256 for s in a.split(split).shards] == [s.sha256 for s in b.split(split).shards]
