"""The fast raw tar reader: same samples as webdataset's generic path; fuzzed robustness."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.fast_tar import ShardFormatError, map_file, raw_samples
from pipeline.samples import generic_samples, read_samples
from sharding.writer import encode_sample, write_shard

from helpers.indexed_shards import image_index, key_of, label_of, make_image, make_mask

SIZE = 8
N = 4


@pytest.fixture(scope="module")
def shard_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("ft") / "a.tar"
    write_shard(
        path,
        [
            encode_sample(key_of(g), make_image(g, SIZE), label_of(g), {"g": g}, "raw", mask=make_mask(g, SIZE))
            for g in range(N)
        ],
    )
    return path.read_bytes()


def read_all(data: bytes, fast: bool = True, masks: bool = True):
    if fast:
        return list(raw_samples(io.BytesIO(data), image_size=SIZE, num_classes=4, masks=masks))
    return list(generic_samples(io.BytesIO(data), encoding="raw", image_size=SIZE, num_classes=4, masks=masks))


def assert_well_formed(sample, masks=True):
    assert isinstance(sample.key, str) and sample.key
    assert isinstance(sample.label, int) and 0 <= sample.label < 4
    assert sample.image.dtype == np.uint8 and sample.image.shape == (1, SIZE, SIZE)
    if masks:
        assert sample.mask.dtype == np.uint8 and sample.mask.shape == (1, SIZE, SIZE)


def drain(data: bytes, masks: bool = True, buffer: bool = False):
    """Property: only well-formed samples come out, else ShardFormatError (any other exception fails).

    buffer=False walks a stream (remote shards); True walks an in-memory buffer (the mmap path).
    """
    out = []
    try:
        for s in raw_samples(data if buffer else io.BytesIO(data), image_size=SIZE, num_classes=4, masks=masks):
            assert_well_formed(s, masks)
            out.append(s)
    except ShardFormatError:
        return out, True
    return out, False


def test_fast_matches_generic(shard_bytes, tmp_path):
    fast, generic = read_all(shard_bytes), read_all(shard_bytes, fast=False)
    path = tmp_path / "s.tar"
    path.write_bytes(shard_bytes)
    with open(path, "rb") as fh:
        assert map_file(fh) is not None
        mapped = list(read_samples(fh, encoding="raw", image_size=SIZE, num_classes=4, masks=True))
    assert [s.key for s in mapped] == [s.key for s in fast]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(mapped, fast))
    assert [s.key for s in fast] == [s.key for s in generic] == [key_of(g) for g in range(N)]
    for a, b in zip(fast, generic):
        assert a.label == b.label and np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
        assert image_index(a.image) == int(a.key[1:])


def test_pax_and_long_names_are_read():
    buf = io.BytesIO()
    key = "x" * 150  # forces a pax/GNU long name
    members = encode_sample(key, make_image(3, SIZE), 2, {}, "raw")
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            for ext in ("cls", "image.npy", "json"):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(members[ext])
                tf.addfile(info, io.BytesIO(members[ext]))
        (s,) = read_all(buf.getvalue(), masks=False)
        assert s.key == key and s.label == 2 and image_index(s.image) == 3


@pytest.mark.parametrize("bad", [b"7", b"-1", b"x", b"", b"99999999"])
def test_bad_label_raises(bad):
    sample = encode_sample("k", make_image(0, SIZE), 0, {}, "raw")
    sample["cls"] = bad
    buf = io.BytesIO()
    import webdataset as wds

    w = wds.TarWriter(buf, encoder=False)
    w.write(sample)
    w.close()
    with pytest.raises(ShardFormatError):
        read_all(buf.getvalue(), masks=False)


def test_missing_mask_raises_when_manifest_says_masks():
    sample = encode_sample("k", make_image(0, SIZE), 0, {}, "raw")
    buf = io.BytesIO()
    import webdataset as wds

    w = wds.TarWriter(buf, encoder=False)
    w.write(sample)
    w.close()
    with pytest.raises(ShardFormatError, match="mask"):
        read_all(buf.getvalue(), masks=True)
    assert len(read_all(buf.getvalue(), masks=False)) == 1


def test_every_truncation_is_a_prefix_or_an_error(shard_bytes):
    with tarfile.open(fileobj=io.BytesIO(shard_bytes)) as tf:
        last = tf.getmembers()[-1]
    end_marker = last.offset_data + (last.size + 511) // 512 * 512  # first zero block
    for cut, buffer in [(c, b) for c in range(0, len(shard_bytes), 97) for b in (False, True)]:
        out, raised = drain(shard_bytes[:cut], buffer=buffer)
        if cut >= end_marker + 512:  # only trailing zero padding was cut
            assert not raised and len(out) == N
            continue
        assert raised, f"truncation at {cut} went unnoticed"
        assert [s.key for s in out] == [key_of(g) for g in range(len(out))]
        assert all(s.label == label_of(int(s.key[1:])) for s in out)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096), st.booleans())
def test_fuzz_arbitrary_bytes(data, buffer):
    drain(data, buffer=buffer)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_fuzz_mutated_shard(shard_bytes, data):
    raw = bytearray(shard_bytes)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    out, _ = drain(bytes(raw[:cut]), buffer=data.draw(st.booleans()))
    assert len(out) <= N


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_fuzz_header_damage_never_mislabels(shard_bytes, data):
    """Damage confined to tar headers: every sample that still comes out has its true label and pixels."""
    headers = []
    with tarfile.open(fileobj=io.BytesIO(shard_bytes)) as tf:
        for m in tf.getmembers():
            headers.append(m.offset)
    raw = bytearray(shard_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        h = data.draw(st.sampled_from(headers))
        raw[h + data.draw(st.integers(0, 511))] = data.draw(st.integers(0, 255))
    out, _ = drain(bytes(raw), buffer=data.draw(st.booleans()))
    for s in out:
        g = int(s.key[1:])
        assert s.label == label_of(g) and image_index(s.image) == g
        assert np.array_equal(s.mask, make_mask(g, SIZE))
