"""The fast tar walk against Python's `tarfile` as the oracle: numbers, pax records, member lists, short reads.

Written from the mutants of `pipeline/fast_tar.py` that the fuzz tests let live (docs/testing.md): the fuzz
tests check that no byte string gives a malformed sample; these pin what the well-formed ones read as.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import webdataset as wds

from pipeline import fast_tar
from pipeline.fast_tar import (
    BLOCK,
    MAX_SMALL_MEMBER,
    ShardFormatError,
    _octal,
    _parse_pax,
    index_samples,
    tar_members,
    tar_members_buffer,
)
from sharding.writer import encode_sample, write_shard

from helpers.indexed_shards import make_image


class Trickle(io.RawIOBase):
    """A stream that returns at most `step` bytes a read, as a socket or an HTTP body may."""

    def __init__(self, data: bytes, step: int):
        self._data, self._pos, self._step = data, 0, step

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = len(self._data) - self._pos if n is None or n < 0 else n
        chunk = self._data[self._pos : self._pos + min(n, self._step)]
        self._pos += len(chunk)
        return chunk


# --- number fields ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field",
    [
        b"00000000644\0",
        b"     644 \0  ",
        b"644\0\0\0\0\0\0\0\0\0",
        b"644\0 garbage9",  # after the NUL: ignored
        b"77777777777\0",
        b"\0" * 12,  # empty: 0
        b" " * 11 + b"\0",
        tarfile.itn(8**11 + 5, 12, tarfile.GNU_FORMAT),  # GNU base-256, as tarfile writes a size over 8 GiB
        tarfile.itn(0x40 << 80 | 0x1234, 12, tarfile.GNU_FORMAT),  # the second byte has the sign bit's place set
        tarfile.itn(2**87 + 2**40 + 7, 12, tarfile.GNU_FORMAT),
    ],
)
def test_number_fields_read_as_tarfile_reads_them(field):
    assert _octal(field, "size") == tarfile.nti(field)


def test_base_256_uses_the_first_bytes_low_bits_by_hand():
    """GNU base-256: the 0x80 flag, then a big-endian number in the rest of the field (0x40 is the sign)."""
    assert _octal(bytes([0x81]) + (5).to_bytes(11, "big"), "size") == (1 << 88) + 5
    assert _octal(bytes([0xBF]) + bytes(11), "size") == 0x3F << 88


@pytest.mark.parametrize(
    "field,message",
    [
        (tarfile.itn(-5, 12, tarfile.GNU_FORMAT), "negative size in tar header"),
        (bytes([0xC0]) + bytes(11), "negative size in tar header"),
        (b"12a\0", "bad octal size in tar header: b'12a\\x00'"),
        (b"0000649\0", "bad octal size in tar header: b'0000649\\x00'"),
        (b"0000648\0", "bad octal size in tar header: b'0000648\\x00'"),
        (b"X644\0", "bad octal size in tar header: b'X644\\x00'"),
        (b"\t644\0", "bad octal size in tar header: b'\\t644\\x00'"),
    ],
)
def test_bad_number_fields_are_refused_with_the_whole_message(field, message):
    with pytest.raises(ShardFormatError) as refused:
        _octal(field, "size")
    assert str(refused.value) == message


# --- pax records -----------------------------------------------------------------------------------------------------


def _pax_payload(headers: dict[str, str]) -> bytes:
    """The pax extended header payload tarfile writes for `headers` (its first member)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("a.cls")
        info.pax_headers = headers
        tf.addfile(info)
    data = buf.getvalue()
    assert data[156:157] == b"x"
    return data[BLOCK : BLOCK + tarfile.nti(data[124:136])]


def test_pax_records_read_as_tarfile_wrote_them_across_every_length_boundary():
    for n in range(0, 1100, 7):  # record lengths cross 10, 100 and 1000: the length counts its own digits
        headers = {"comment": "é" * (n % 50) + "v=" * (n // 2), "path": f"dir with spaces/{n} x=y.cls"}
        assert _parse_pax(_pax_payload(headers)) == headers


def test_pax_padding_ends_the_records():
    assert _parse_pax(b"11 path=ab\n\0\0\0\0") == {"path": "ab"}
    assert _parse_pax(b"11 path=ab\n8 a=b c\n") == {"path": "ab", "a": "b c"}


@pytest.mark.parametrize(
    "payload,message",
    [
        (b"12path=abc\n", "malformed pax record"),
        (b"1x path=abc\n", "malformed pax record length"),
        (b" 7 a=b\n", "malformed pax record length"),
        (b"1 path=abc\n", "pax record length out of range"),
        (b"99 path=abc\n", "pax record length out of range"),
        (b"11 path=ab\n99 a=b\n", "pax record length out of range"),
        (b"11 path=abX", "malformed pax record"),
        (b"11 pathabc\n", "malformed pax record"),
        (b"11 path=\xff\xfe\n", "pax record is not UTF-8"),
    ],
)
def test_malformed_pax_records_are_refused_with_the_whole_message(payload, message):
    with pytest.raises(ShardFormatError) as refused:
        _parse_pax(payload)
    assert str(refused.value) == message


# --- member lists ----------------------------------------------------------------------------------------------------


def _oracle(data: bytes) -> list[tuple[str, str, bytes]]:
    """tarfile's regular files, split into (key, lower-case extension) as webdataset splits them."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for member in tf.getmembers():
            if member.isreg():
                key, ext = wds.tariterators.base_plus_ext(member.name)
                out.append((key or "", (ext or "").lower(), tf.extractfile(member).read()))
    return out


def _ours(data: bytes, step: int | None = None) -> list[tuple[str, str, bytes]]:
    """tar_members over a stream, and tar_members_buffer over bytes, a bytearray and a memoryview: all equal."""
    stream = io.BytesIO(data) if step is None else Trickle(data, step)
    walked = [(k, e, bytes(p)) for k, e, p in tar_members(stream)]
    for buf in (data, bytearray(data), memoryview(data)):
        assert walked == [(k, e, bytes(p)) for k, e, p in tar_members_buffer(buf)]
    return walked


def _refused(data: bytes, message: str, sizes: dict[str, int] | None = None) -> None:
    """Both walks (a stream and a buffer) refuse `data` with exactly `message`."""
    for walk in (lambda: list(tar_members(io.BytesIO(data), sizes)), lambda: list(tar_members_buffer(data, sizes))):
        with pytest.raises(ShardFormatError) as refused:
            walk()
        assert str(refused.value) == message


def _archive(fmt: int, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, payload in members:
            if payload is not None:
                info.size = len(payload)
            tf.addfile(info, None if payload is None else io.BytesIO(payload))
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, **fields) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for k, v in fields.items():
        setattr(info, k, v)
    return info


def _mixed_members(long: str) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [
        (_info(f"{long}/dir", tarfile.DIRTYPE), None),  # a long-named directory, then a short-named file
        (_info("s0.cls"), b"1"),
        (_info("s0.IMAGE.NPY"), b"pixels" * 100),
        (_info(f"{long}/link", tarfile.SYMTYPE, linkname="s0.cls"), None),
        (_info("s1.cls"), b"2"),
        (_info(f"{long}/s2.json", pax_headers={"comment": "same"}), b"{}"),
        (_info(f"{long}/s3.json", pax_headers={"comment": "same"}), b"{1}"),
        (_info("s4.cls", tarfile.CONTTYPE), b"3"),
        (_info("s5.cls", tarfile.AREGTYPE), b"0"),
        (_info("s6.cls", pax_headers={"comment": "twice"}), b"1"),  # the same pax header twice: read once
        (_info("s6.json", pax_headers={"comment": "twice"}), b"{}"),
        (_info("noext"), b"?"),
    ]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_are_tarfiles_regular_files_in_every_format(fmt):
    long = "p" * 60 + "/" + "q" * 60  # over 100 bytes: a ustar prefix, a GNU long name or a pax path
    data = _archive(fmt, _mixed_members(long))
    want = _oracle(data)
    assert [(k, e) for k, e, _ in want] == [
        ("s0", "cls"),
        ("s0", "image.npy"),
        ("s1", "cls"),
        (f"{long}/s2", "json"),
        (f"{long}/s3", "json"),
        ("s4", "cls"),
        ("s5", "cls"),
        ("s6", "cls"),
        ("s6", "json"),
        ("", ""),
    ]
    assert _ours(data) == want


@pytest.mark.parametrize("step", [1, 7, 300, 511, 513])
def test_short_reads_give_the_same_members(step):
    data = _archive(tarfile.GNU_FORMAT, _mixed_members("r" * 120))
    assert _ours(data, step) == _oracle(data)


def test_an_unknown_member_type_with_a_payload_over_a_mebibyte_is_skipped_on_a_stream():
    big = bytes(range(256)) * (6 << 10)  # 1.5 MiB: more than one skip read
    data = _archive(tarfile.PAX_FORMAT, [(_info("a.cls"), b"0"), (_info("b.bin", b"Z"), big), (_info("c.cls"), b"1")])
    assert _ours(data) == _oracle(data) == [("a", "cls", b"0"), ("c", "cls", b"1")]
    assert _ours(data, 4096) == _oracle(data)


@pytest.mark.parametrize("kind", [tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE])
def test_a_pax_size_overrides_the_header_size_as_in_tarfile(kind):
    data = _archive(tarfile.PAX_FORMAT, [(_info("a.bin", kind, pax_headers={"size": "5"}), b"12345")])
    header = 2 * BLOCK if data[156:157] == b"x" else 0
    data = _set_fields(data, at=header, size=b"00000000000\0")  # the ustar size says 0; the pax record says 5
    assert _ours(data) == _oracle(data) == [("a", "bin", b"12345")]


@pytest.mark.parametrize(
    "length,stream_message,buffer_message",
    [
        (2 * BLOCK, "truncated shard: no end-of-archive marker", "truncated shard: no end-of-archive marker"),
        (
            2 * BLOCK + 100,
            "truncated shard: tar header needs 412 bytes, got 0",
            "truncated shard: no end-of-archive marker",
        ),
        (BLOCK, "truncated shard: member 'a.cls' needs 512 bytes, got 0", "truncated shard: member needs 1 bytes"),
        (BLOCK + 3, "truncated shard: member 'a.cls' needs 512 bytes, got 3", "truncated shard: member needs 1 bytes"),
    ],
)
def test_a_shard_that_ends_early_is_refused_with_the_whole_message(length, stream_message, buffer_message):
    """Each walk says what it can: a stream how many bytes it got, a buffer which part runs past its end."""
    data = _archive(tarfile.USTAR_FORMAT, [(_info("a.cls"), b"0")])
    assert [k for k, _, _ in tar_members_buffer(data[: 3 * BLOCK])] == ["a"]  # one zero block ends it
    for walk, message in ((lambda d: tar_members(io.BytesIO(d)), stream_message), (tar_members_buffer, buffer_message)):
        with pytest.raises(ShardFormatError) as refused:
            list(walk(data[:length]))
        assert str(refused.value) == message


def test_a_truncated_skip_is_refused_with_the_whole_message():
    data = _archive(tarfile.PAX_FORMAT, [(_info("b.bin", b"Z"), bytes(5000))])
    with pytest.raises(ShardFormatError) as refused:
        list(tar_members(io.BytesIO(data[: 2 * BLOCK + 1000])))
    assert str(refused.value) == "truncated shard while skipping non-file member"


class Recording(io.BytesIO):
    """A stream that records the largest read it was asked for."""

    largest = 0

    def read(self, n: int | None = -1) -> bytes:
        self.largest = max(self.largest, n if n is not None and n >= 0 else 1 << 62)
        return super().read(n)


def test_skipping_reads_at_most_a_mebibyte_at_a_time():
    """A hostile shard's huge non-file member costs bounded memory to skip."""
    data = _archive(tarfile.PAX_FORMAT, [(_info("b.bin", b"Z"), bytes(3 << 20)), (_info("c.cls"), b"1")])
    stream = Recording(data)
    assert [(k, e) for k, e, _ in tar_members(stream)] == [("c", "cls")]
    assert stream.largest == 1 << 20


def test_a_pax_size_that_is_not_a_number_is_refused():
    data = _archive(tarfile.PAX_FORMAT, [(_info("a.bin", pax_headers={"size": "5x"}), b"12345")])
    _refused(data, "bad pax size")


def test_a_global_pax_header_is_skipped():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "all"}) as tf:
        info = tarfile.TarInfo("a.cls")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"7"))
    data = buf.getvalue()
    assert data[156:157] == b"g"
    assert _ours(data) == _oracle(data) == [("a", "cls", b"7")]


def _pax_of_size(total: int) -> bytes:
    """An archive whose first member has a pax header of exactly `total` bytes."""
    value = "v" * (total - len(" comment=\n") - len(str(total)))  # one record: "<length> comment=<value>\n"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("a.cls")
        info.pax_headers, info.size = {"comment": value}, 1
        tf.addfile(info, io.BytesIO(b"3"))
    data = buf.getvalue()
    assert tarfile.nti(data[124:136]) == total
    return data


def test_extension_headers_up_to_the_limit_are_read_and_larger_ones_refused():
    at_limit = _pax_of_size(MAX_SMALL_MEMBER)
    assert _ours(at_limit) == [("a", "cls", b"3")]
    over = _pax_of_size(MAX_SMALL_MEMBER + 1)
    _refused(over, f"tar extension header too large: {MAX_SMALL_MEMBER + 1} bytes")


def test_a_stream_cut_inside_an_extension_header_names_it():
    data = _archive(tarfile.PAX_FORMAT, [(_info("a.cls", pax_headers={"comment": "x" * 600}), b"0")])
    with pytest.raises(ShardFormatError) as refused:
        list(tar_members(io.BytesIO(data[: BLOCK + 100])))
    assert str(refused.value) == "truncated shard: tar extension header needs 1024 bytes, got 100"


def test_a_member_of_the_wrong_size_is_refused_naming_it():
    data = _archive(tarfile.USTAR_FORMAT, [(_info("k.cls"), b"12")])
    _refused(data, "member 'k.cls' has 2 bytes, expected 1", {"cls": 1})


def test_the_index_points_at_each_images_pixels_and_marks_missing_masks(tmp_path):
    path = tmp_path / "a.tar"
    write_shard(path, [encode_sample(f"k{i}", make_image(i, 8), i % 4, {}, "raw") for i in range(3)])
    data = path.read_bytes()
    index = index_samples(data, image_size=8, num_classes=4, masks=False)
    assert [(key, label, mask) for key, label, _, mask, _ in index] == [("k0", 0, -1), ("k1", 1, -1), ("k2", 2, -1)]
    for i, (_, _, image, _, _) in enumerate(index):
        pixels = np.frombuffer(data, np.uint8, count=64, offset=image).reshape(1, 8, 8)
        assert np.array_equal(pixels, make_image(i, 8))


def test_long_pax_headers_that_share_their_first_block_are_each_read():
    """Only a one-block pax header is recognised by comparison; longer ones are parsed every time."""
    stem = "d" * 550
    data = _archive(tarfile.PAX_FORMAT, [(_info(f"{stem}/a.cls"), b"0"), (_info(f"{stem}/b.cls"), b"1")])
    assert _ours(data) == _oracle(data) == [(f"{stem}/a", "cls", b"0"), (f"{stem}/b", "cls", b"1")]


@pytest.mark.parametrize("walk", ["stream", "buffer"])
def test_a_pax_header_identical_to_the_previous_one_is_parsed_once(monkeypatch, walk):
    """The documented shortcut: shards whose every member carries the same pax record cost one parse."""
    import pipeline.fast_tar as fast_tar

    parsed = []
    real = fast_tar._parse_pax

    def counting(payload):
        parsed.append(bytes(payload))
        return real(payload)

    monkeypatch.setattr(fast_tar, "_parse_pax", counting)
    same = {"comment": "one record for all"}
    data = _archive(tarfile.PAX_FORMAT, [(_info(f"k{i}.cls", pax_headers=same), b"1") for i in range(5)])
    members = list(tar_members(io.BytesIO(data)) if walk == "stream" else tar_members_buffer(data))
    assert [k for k, _, _ in members] == [f"k{i}" for i in range(5)]
    assert len(parsed) == 1


def test_a_global_pax_header_over_the_limit_is_refused_like_any_extension_header():
    value = "v" * (MAX_SMALL_MEMBER + 1 - len(" comment=\n") - len(str(MAX_SMALL_MEMBER + 1)))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": value}) as tf:
        info = tarfile.TarInfo("a.cls")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"7"))
    data = buf.getvalue()
    assert data[156:157] == b"g" and tarfile.nti(data[124:136]) == MAX_SMALL_MEMBER + 1
    _refused(data, f"tar extension header too large: {MAX_SMALL_MEMBER + 1} bytes")


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_names_at_the_field_edges_read_as_tarfile_reads_them(fmt):
    """A 100-byte name fills its field with no NUL; a one-letter ustar prefix is still a prefix."""
    names = ["n" * 96 + ".cls", "a/" + "b" * 95 + ".cls"]
    data = _archive(fmt, [(_info(name), b"1") for name in names])
    assert _ours(data) == _oracle(data) == [(name[:-4], "cls", b"1") for name in names]


def test_a_name_that_is_not_utf8_is_refused_naming_its_bytes():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        info = tarfile.TarInfo("\xff.cls")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"1"))
    data = buf.getvalue()
    _refused(data, f"member name is not UTF-8: {data[:100]!r}")


def test_a_mapped_shards_payloads_are_views_of_the_mapping(tmp_path):
    """Zero-copy: the shuffle buffer holds views into the page cache, not private copies."""
    import mmap

    path = tmp_path / "a.tar"
    path.write_bytes(_archive(tarfile.USTAR_FORMAT, [(_info("a.cls"), b"1"), (_info("a.json"), b"{}")]))
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
    payloads = [p for _, _, p in tar_members_buffer(mapped)]
    assert [bytes(p) for p in payloads] == [b"1", b"{}"] and all(p.obj is mapped for p in payloads)
    del payloads


def test_repeated_one_block_pax_headers_skip_their_header_checks(monkeypatch):
    """The buffer walk's shortcut: a pax header identical to the last is one comparison, not a header check."""
    import pipeline.fast_tar as fast_tar

    checked = []
    real = fast_tar._check_header
    monkeypatch.setattr(fast_tar, "_check_header", lambda header: checked.append(1) or real(header))
    same = {"comment": "one record for all"}
    data = _archive(tarfile.PAX_FORMAT, [(_info(f"k{i}.cls", pax_headers=same), b"1") for i in range(5)])
    assert len(list(tar_members_buffer(data))) == 5
    assert len(checked) == 1 + 5  # the first pax header, then each member's own header


# --- samples (raw_samples): the shard contract on top of the members --------------------------------------------------


def _npy(dtype: str = "|u1", size: int = 8) -> bytes:
    """An image member: the .npy header for [1, size, size] of `dtype`, then size^2 bytes of pixels."""
    buf = io.BytesIO()
    shape = (1, size, size)
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + bytes(range(size * size))


def _samples(members: list[tuple[str, bytes]], masks: bool = False, fmt: int = tarfile.USTAR_FORMAT):
    from pipeline.fast_tar import raw_samples

    data = _archive(fmt, [(_info(name), payload) for name, payload in members])
    kw = {"image_size": 8, "num_classes": 4, "masks": masks}
    stream, buffer = list(raw_samples(io.BytesIO(data), **kw)), list(raw_samples(data, **kw))
    assert [(s.key, s.label) for s in stream] == [(s.key, s.label) for s in buffer]
    return buffer


@pytest.mark.parametrize(
    "members,message",
    [
        ([("k.cls", b"1")], "sample 'k' lacks ['image.npy']"),
        ([("k.image.npy", _npy())], "sample 'k' lacks ['cls']"),
        ([("k.json", b"{}")], "sample 'k' lacks ['image.npy', 'cls']"),
        ([("k.cls", b"1"), ("k.cls", b"2")], "sample 'k' has two 'cls' members"),
        ([("k.cls", b"1"), ("k.image.npy", _npy("|i1"))], "sample 'k': image.npy is not uint8 [1, 8, 8] .npy"),
        ([("k.cls", b"x"), ("k.image.npy", _npy())], "sample 'k': label b'x' is not a class index"),
        ([("k.cls", b"0000001"), ("k.image.npy", _npy())], "sample 'k': label b'0000001' is not a class index"),
        ([("k.cls", b"7" * 30)], f"sample 'k': label {b'7' * 20!r} is not a class index"),  # 20 bytes shown
        ([("k.cls", b"4"), ("k.image.npy", _npy())], "sample 'k': label 4 out of range (classes: 4)"),
        ([("k.cls", b"1"), ("k.image.npy", _npy() + b"!")], "member 'k.image.npy' has 193 bytes, expected 192"),
        ([("k.cls", b"1"), ("k.image.npy", _npy())], "sample 'k' lacks mask.npy (manifest says masks)"),
    ],
)
def test_each_broken_sample_is_refused_with_the_whole_message(members, message):
    from pipeline.fast_tar import raw_samples

    data = _archive(tarfile.USTAR_FORMAT, [(_info(name), payload) for name, payload in members])
    masks = "mask" in message
    for source in (io.BytesIO(data), data):
        with pytest.raises(ShardFormatError) as refused:
            list(raw_samples(source, image_size=8, num_classes=4, masks=masks))
        assert str(refused.value) == message


def test_labels_of_up_to_six_digits_with_spaces_around_are_read():
    samples = _samples([("a.cls", b" 000003\n"), ("a.image.npy", _npy()), ("b.cls", b"0"), ("b.image.npy", _npy())])
    assert [(s.key, s.label) for s in samples] == [("a", 3), ("b", 0)]


def test_members_without_an_extension_are_skipped_and_masks_read_only_when_asked():
    members = [("a.cls", b"1"), ("a.image.npy", _npy()), ("a.mask.npy", _npy()), ("README", b"?")]
    members += [("b.cls", b"2"), ("b.image.npy", _npy()), ("b.mask.npy", _npy())]
    without = _samples(members, masks=False)
    assert [(s.key, s.label, s.mask) for s in without] == [("a", 1, None), ("b", 2, None)]
    with_masks = _samples(members, masks=True)
    assert all(s.mask is not None and s.mask.shape == (1, 8, 8) for s in with_masks)
    assert np.array_equal(with_masks[0].image[0].ravel(), np.arange(64, dtype=np.uint8))


def test_a_long_name_used_twice_in_a_row_is_read_twice():
    long = "L" * 150
    data = _archive(tarfile.GNU_FORMAT, [(_info(f"{long}.cls"), b"1"), (_info(f"{long}.cls"), b"2")])
    assert _ours(data) == _oracle(data) == [(long, "cls", b"1"), (long, "cls", b"2")]


_FIELDS = {"size": slice(124, 136), "mtime": slice(136, 148), "checksum": slice(148, 156)}


def _set_fields(data: bytes, at: int = 0, checksum_style: bytes = b"%06o\0 ", **fields: bytes) -> bytes:
    """The header at `at` with `fields` (raw bytes) written in; its checksum, unless given, summed and written anew."""
    header = bytearray(data[at : at + BLOCK])
    for name, value in fields.items():
        assert len(value) == len(header[_FIELDS[name]]), (name, value)
        header[_FIELDS[name]] = value
    if "checksum" not in fields:
        header[148:156] = b" " * 8
        header[148:156] = (checksum_style % sum(header)).ljust(8, b" ")
    return data[:at] + bytes(header) + data[at + BLOCK :]


def _rewrite_header(data: bytes, *, checksum: str | None = None, size: str | None = None) -> bytes:
    """The first header with its size and checksum fields written another way (the checksum recomputed)."""
    fields = {} if size is None else {"size": (size % tarfile.nti(data[124:136])).encode()}
    return _set_fields(data, checksum_style=(checksum or "%06o\0 ").encode(), **fields)


@pytest.mark.parametrize(
    "checksum,size",
    [
        ("%07o\0", None),
        ("%06o  ", None),
        ("%o\0", None),
        (None, "%012o"),
        (None, "%11o\0"),
        (None, "%-11o\0"),
        ("%08o", "%012o"),
    ],
)
def test_number_fields_in_each_writers_style_are_read(checksum, size):
    """tar writers differ: 7 digits and a NUL, two spaces, no padding, 12 digits, leading or trailing spaces."""
    data = _rewrite_header(_archive(tarfile.USTAR_FORMAT, [(_info("a.cls"), b"1")]), checksum=checksum, size=size)
    assert _ours(data) == _oracle(data) == [("a", "cls", b"1")]


@pytest.mark.parametrize("size", [8**10 + 1, 8**10 * 7 + 1])
def test_a_size_of_a_gibibyte_or_more_is_read_in_full_and_refused(size):
    """Eleven octal digits reach 8 GiB: the first digit counts (a regular member over 16 MiB is refused)."""
    data = _set_fields(_archive(tarfile.USTAR_FORMAT, [(_info("k.bin"), b"1")]), size=b"%011o\0" % size)
    with pytest.raises(ShardFormatError, match=rf"^member 'k.bin' is too large \({size} bytes\)$"):
        list(tar_members(io.BytesIO(data)))
    with pytest.raises(ShardFormatError, match=rf"^truncated shard: member needs {size} bytes$"):  # checked first
        list(tar_members_buffer(data))


def test_a_checksum_over_32767_is_read_in_full():
    """Many high bytes (UTF-8 names in the name and prefix fields) make a six-digit checksum start with 1."""
    name = "é" * 70 + "/" + "é" * 45 + ".cls"
    data = _archive(tarfile.USTAR_FORMAT, [(_info(name), b"1")])
    assert tarfile.nti(data[148:156]) > 0o77777
    assert _ours(data) == _oracle(data) == [(name[:-4], "cls", b"1")]


def test_an_unknown_member_over_the_limit_is_refused_and_one_at_it_read():
    at = _archive(tarfile.USTAR_FORMAT, [(_info("k.bin"), bytes(MAX_SMALL_MEMBER))])
    assert [(k, e, len(p)) for k, e, p in tar_members_buffer(at)] == [("k", "bin", MAX_SMALL_MEMBER)]
    over = _archive(tarfile.USTAR_FORMAT, [(_info("k.bin"), bytes(MAX_SMALL_MEMBER + 1))])
    _refused(over, f"member 'k.bin' is too large ({MAX_SMALL_MEMBER + 1} bytes)")


def test_a_header_whose_bytes_sum_past_65521_checks_out():
    """The checksum is a plain sum (up to 130,560); the fast check takes it modulo 65521 (Adler-32's base)."""
    cjk = "\u9fff"  # three bytes of 0xE9 0xBF 0xBF in UTF-8
    info = _info(cjk * 40 + "/" + cjk * 31 + ".cls", linkname=cjk * 33, uname=cjk * 10, gname=cjk * 10)
    data = _archive(tarfile.USTAR_FORMAT, [(info, b"1")])
    assert tarfile.nti(data[148:156]) >= 65521
    assert _ours(data) == _oracle(data) == [(info.name[:-4], "cls", b"1")]


def test_a_base_256_size_field_is_read_by_the_exact_path():
    data = _set_fields(_archive(tarfile.USTAR_FORMAT, [(_info("a.cls"), b"1")]), size=bytes([0x80]) + bytes(10) + b"\1")
    assert _ours(data) == _oracle(data) == [("a", "cls", b"1")]


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("checksum", b"12x4\0   ", "bad octal checksum in tar header: b'12x4\\x00   '"),
        ("size", b"0000000001x\0", "bad octal size in tar header: b'0000000001x\\x00'"),
        ("checksum", b"000001\0 ", "tar header checksum mismatch (stored 1)"),
    ],
)
def test_bad_header_fields_are_refused_naming_the_field(field, value, message):
    _refused(_set_fields(_archive(tarfile.USTAR_FORMAT, [(_info("a.cls"), b"1")]), **{field: value}), message)


READ = [("a", "cls", b"1")]


@pytest.mark.parametrize(
    "fields,tarfile_reads",
    [
        ({"checksum_style": b"%06o X"}, None),  # a stray byte after the checksum's space
        ({"size": b"00000000001X", "mtime": bytes(12)}, None),  # ... after the size's digits, before an empty mtime
        ({"checksum_style": b"+%05o\0 "}, READ),  # a sign, which int() and tarfile take
        ({"size": b"+0000000001\0"}, READ),
        ({"size": b"-0000000001\0"}, [("a", "cls", b"")]),  # tarfile: a member of size -1
        ({"size": b"0000_000001\0"}, READ),  # an underscore, which int() takes
        ({"size": b"\t0000000001\0"[:12]}, READ),  # a tab, which int() and tarfile strip
    ],
)
def test_number_fields_int_would_read_are_refused_unless_plain_octal(fields, tarfile_reads):
    """Only digits, spaces and NULs make a number field (stricter than tarfile, as no tar writer writes the rest)."""
    data = _set_fields(_archive(tarfile.USTAR_FORMAT, [(_info("a.cls"), b"1")]), **fields)
    field, where = ("size", slice(124, 136)) if "size" in fields else ("checksum", slice(148, 156))
    _refused(data, f"bad octal {field} in tar header: {data[where]!r}")
    if tarfile_reads is None:
        with pytest.raises(tarfile.ReadError):
            _oracle(data)
    else:
        assert _oracle(data) == tarfile_reads


@pytest.mark.parametrize("walk", [lambda data: tar_members(io.BytesIO(data)), tar_members_buffer])
def test_canonical_headers_are_read_without_the_exact_path_and_other_styles_with_it(monkeypatch, walk):
    """The speed contract: tarfile's and GNU tar's "%06o\\0 " and "%011o\\0" fields take the fast path."""
    calls = []
    exact = fast_tar._octal
    monkeypatch.setattr(fast_tar, "_octal", lambda field, what: calls.append(what) or exact(field, what))
    long = "p" * 60 + "/" + "x" * 90  # ustar: prefix and name; GNU: a long-name member; pax: a path record
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        members = [(_info(long + ".cls"), b"1"), (_info("a.bin", pax_headers={"k": "v"} if fmt == 2 else {}), b"22")]
        assert len(list(walk(_archive(fmt, members)))) == 2
    assert calls == []
    for checksum, size in (("%06o \0", None), ("%06o  ", None), (None, "%11o ")):
        data = _rewrite_header(_archive(tarfile.USTAR_FORMAT, [(_info("a.cls"), b"1")]), checksum=checksum, size=size)
        assert [(k, e, bytes(p)) for k, e, p in walk(data)] == _oracle(data) == [("a", "cls", b"1")]
    assert calls == ["checksum", "size"] * 3
