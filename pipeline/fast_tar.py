"""Shard readers: a fast raw-member tar walk, and the generic webdataset decode path.

Both turn one open shard stream into validated `Sample` tuples
`(key, label, image uint8 [1,H,W], mask uint8 [1,H,W] | None)`.

**Fast path** (`encoding == "raw"`): parses the 512-byte tar headers itself
(ustar, GNU long names, pax `path`/`size` records), reads each payload with one
`read()` and exposes the `.npy` pixels as a zero-copy `np.frombuffer` view; the
only pixel copy afterwards is the one into the batch buffer (`stream.Batcher`).
This is several times faster than webdataset's generic per-sample chain
(tarfile + group_by_keys + decode), which is kept for the `png` encoding and as
a fallback (`fast=False`).

**Robustness contract** (fuzzed in tests/pipeline/test_fast_tar.py): on any byte
string a reader either yields well-formed samples (right shape, dtype, npy
header, label an integer in range, all required members present) or raises
`ShardFormatError`. Header checksums are verified, sizes are bounded before any
allocation, a missing end-of-archive marker is an error (a truncated shard), and
every loop consumes input, so there is no silent wrong label and no infinite loop.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

import numpy as np

from sharding.contract import IMAGE_PNG, IMAGE_RAW, LABEL, MASK_PNG, MASK_RAW

BLOCK = 512
#: Members other than image/mask (json, cls, unknown) larger than this are refused.
MAX_SMALL_MEMBER = 16 << 20
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # same split as webdataset.tariterators.base_plus_ext


class ShardFormatError(ValueError):
    """A shard's bytes do not follow the tar format or the radstream sample contract."""


class Sample(NamedTuple):
    key: str
    label: int
    image: np.ndarray  # uint8 [1, H, W] (may be a read-only view of the read buffer)
    mask: np.ndarray | None


def npy_header(image_size: int) -> bytes:
    """The exact .npy v1 header `np.save` writes for uint8 [1, S, S] (128 bytes for S=299)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (1, image_size, image_size)}
    )
    return buf.getvalue()


def _read_exact(stream: BinaryIO, n: int, what: str) -> bytes:
    data = stream.read(n) or b""
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            raise ShardFormatError(f"truncated shard: {what} needs {n} bytes, got {got}")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _skip(stream: BinaryIO, n: int, what: str) -> None:
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise ShardFormatError(f"truncated shard while skipping {what}")
        n -= len(chunk)


def _octal(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:  # GNU base-256
        if field[0] & 0x40:
            raise ShardFormatError(f"negative {what} in tar header")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if not all(48 <= c <= 55 for c in text):
        raise ShardFormatError(f"bad octal {what} in tar header: {field!r}")
    return int(text, 8)


def _cstr(field: bytes) -> str:
    try:
        return field.split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        raise ShardFormatError(f"member name is not UTF-8: {field!r}") from None


def _parse_pax(payload: bytes) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(payload):
        if payload[pos] == 0:  # padding
            break
        space = payload.find(b" ", pos)
        if space < 0:
            raise ShardFormatError("malformed pax record")
        try:
            length = int(payload[pos:space])
        except ValueError:
            raise ShardFormatError("malformed pax record length") from None
        if length <= space - pos or pos + length > len(payload):
            raise ShardFormatError("pax record length out of range")
        record = payload[space + 1 : pos + length]
        if not record.endswith(b"\n") or b"=" not in record:
            raise ShardFormatError("malformed pax record")
        k, v = record[:-1].split(b"=", 1)
        try:
            records[k.decode("utf-8")] = v.decode("utf-8")
        except UnicodeDecodeError:
            raise ShardFormatError("pax record is not UTF-8") from None
        pos += length
    return records


def tar_members(stream: BinaryIO, sizes: dict[str, int] | None = None) -> Iterator[tuple[str, bytes | None]]:
    """Regular-file members of a tar stream as (name, payload).

    `sizes` maps a member extension to the only payload size it may have (checked
    before reading). Payloads of non-regular members are skipped. Raises
    ShardFormatError on a bad checksum, a bad field, truncation or a missing end marker.
    """
    sizes = sizes or {}
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = stream.read(BLOCK) or b""
        if len(header) < BLOCK:
            if len(header) == 0:
                raise ShardFormatError("truncated shard: no end-of-archive marker")
            header += _read_exact(stream, BLOCK - len(header), "tar header")
        if header.count(0) == BLOCK:
            return  # end-of-archive (the second zero block, if any, is not needed)
        stored = _octal(header[148:156], "checksum")
        actual = sum(header) - sum(header[148:156]) + 8 * 32
        if stored != actual:
            raise ShardFormatError(f"tar header checksum mismatch (stored {stored}, computed {actual})")
        size = _octal(header[124:136], "size")
        kind = header[156:157]
        if "size" in pax and kind in (b"0", b"\0", b"7"):
            try:
                size = int(pax["size"])
            except ValueError:
                raise ShardFormatError("bad pax size") from None
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if kind in (b"x", b"g", b"L"):
            if size > MAX_SMALL_MEMBER:
                raise ShardFormatError(f"tar extension header too large: {size} bytes")
            payload = _read_exact(stream, padded, "tar extension header")[:size]
            if kind == b"x":
                pax = _parse_pax(payload)
            elif kind == b"L":
                long_name = _cstr(payload)
            continue
        if kind not in (b"0", b"\0", b"7"):  # directory, link, device...: no sample data
            _skip(stream, padded, "non-file member")
            long_name, pax = None, {}
            continue
        name = pax.get("path") or long_name
        if name is None:
            name = _cstr(header[0:100])
            if header[257:262] == b"ustar" and header[345] != 0:
                name = _cstr(header[345:500]) + "/" + name
        long_name, pax = None, {}
        match = _KEY_EXT.match(name)
        ext = match.group(2).lower() if match else ""
        expected = sizes.get(ext)
        if expected is not None and size != expected:
            raise ShardFormatError(f"member {name!r} has {size} bytes, expected {expected}")
        if expected is None and size > MAX_SMALL_MEMBER:
            raise ShardFormatError(f"member {name!r} is too large ({size} bytes)")
        payload = _read_exact(stream, padded, f"member {name!r}")
        yield name, payload if padded == size else memoryview(payload)[:size]


def _label(payload, key: str, num_classes: int) -> int:
    text = bytes(payload).strip()
    if not text or not text.isdigit() or len(text) > 6:
        raise ShardFormatError(f"sample {key!r}: label {bytes(payload)[:20]!r} is not a class index")
    label = int(text)
    if label >= num_classes:
        raise ShardFormatError(f"sample {key!r}: label {label} out of range (classes: {num_classes})")
    return label


def raw_samples(
    stream: BinaryIO, *, image_size: int, num_classes: int, masks: bool
) -> Iterator[Sample]:
    """Fast path: validated samples of a raw-encoded shard (see the module docstring)."""
    header = npy_header(image_size)
    hlen = len(header)
    pixels = image_size * image_size
    image_ext, mask_ext, label_ext = IMAGE_RAW, MASK_RAW, LABEL
    sizes = {image_ext: hlen + pixels, mask_ext: hlen + pixels}
    shape = (1, image_size, image_size)
    key = None
    fields: dict[str, object] = {}

    def finish() -> Sample:
        if image_ext not in fields or label_ext not in fields:
            missing = [e for e in (image_ext, label_ext) if e not in fields]
            raise ShardFormatError(f"sample {key!r} lacks {missing}")
        if masks and mask_ext not in fields:
            raise ShardFormatError(f"sample {key!r} lacks {mask_ext} (manifest says masks)")
        mask = fields.get(mask_ext) if masks else None
        return Sample(key, fields[label_ext], fields[image_ext], mask)  # type: ignore[arg-type]

    for name, payload in tar_members(stream, sizes):
        match = _KEY_EXT.match(name)
        if match is None:
            continue
        k, ext = match.group(1), match.group(2).lower()
        if k != key:
            if key is not None:
                yield finish()
            key, fields = k, {}
        if ext in fields:
            raise ShardFormatError(f"sample {key!r} has two {ext!r} members")
        if ext == image_ext or ext == mask_ext:
            if payload[:hlen] != header:
                raise ShardFormatError(f"sample {key!r}: {ext} is not uint8 {list(shape)} .npy")
            fields[ext] = np.frombuffer(payload, np.uint8, count=pixels, offset=hlen).reshape(shape)
        elif ext == label_ext:
            fields[ext] = _label(payload, key, num_classes)
        else:
            fields[ext] = None  # json and unknown members: not needed for training
    if key is not None:
        yield finish()


def _decode_image(data: bytes, ext: str, key: str, image_size: int) -> np.ndarray:
    shape = (1, image_size, image_size)
    try:
        if ext.endswith("npy"):
            array = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as img:
                if img.mode not in ("L", "P", "1"):
                    raise ShardFormatError(f"sample {key!r}: {ext} has mode {img.mode}, expected L")
                array = np.asarray(img.convert("L") if img.mode != "L" else img)
    except ShardFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a format error
        raise ShardFormatError(f"sample {key!r}: cannot decode {ext}: {exc}") from None
    if array.dtype != np.uint8 or array.size != image_size * image_size or array.ndim not in (2, 3):
        raise ShardFormatError(f"sample {key!r}: {ext} is {array.dtype} {list(array.shape)}, expected uint8 {list(shape)}")
    return array.reshape(shape)


def generic_samples(
    stream: BinaryIO, *, encoding: str, image_size: int, num_classes: int, masks: bool
) -> Iterator[Sample]:
    """Generic path: webdataset's tar iterator + group_by_keys, then per-sample decode (png or npy)."""
    import tarfile

    from webdataset import tariterators

    image_ext = IMAGE_RAW if encoding == "raw" else IMAGE_PNG
    mask_ext = MASK_RAW if encoding == "raw" else MASK_PNG
    try:
        members = tariterators.tar_file_expander([{"url": "shard", "stream": stream}])
        for raw in tariterators.group_by_keys(members):
            key = raw.get("__key__")
            if image_ext not in raw or LABEL not in raw:
                raise ShardFormatError(f"sample {key!r} lacks {image_ext} or {LABEL}")
            if masks and mask_ext not in raw:
                raise ShardFormatError(f"sample {key!r} lacks {mask_ext} (manifest says masks)")
            image = _decode_image(raw[image_ext], image_ext, key, image_size)
            mask = _decode_image(raw[mask_ext], mask_ext, key, image_size) if masks else None
            yield Sample(key, _label(raw[LABEL], key, num_classes), image, mask)
    except ShardFormatError:
        raise
    except (tarfile.TarError, ValueError, KeyError, OSError, EOFError) as exc:
        raise ShardFormatError(f"unreadable tar: {type(exc).__name__}: {exc}") from None


def read_samples(
    stream: BinaryIO, *, encoding: str, image_size: int, num_classes: int, masks: bool, fast: bool = True
) -> Iterator[Sample]:
    """Samples of one shard stream: the fast path for raw shards, else the generic path."""
    if fast and encoding == "raw":
        return raw_samples(stream, image_size=image_size, num_classes=num_classes, masks=masks)
    return generic_samples(stream, encoding=encoding, image_size=image_size, num_classes=num_classes, masks=masks)


__all__ = ["ShardFormatError", "Sample", "generic_samples", "npy_header", "raw_samples", "read_samples", "tar_members"]
