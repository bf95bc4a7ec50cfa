"""Hostile raw inputs (issue 7, guarantees 5 and 6): arbitrary bytes, extreme sizes, odd modes, crafted zips.

Every input is either converted correctly (the pixel expectations below) or
refused with a PreprocessError saying why; a build over a folder of them never
crashes, reconciles its counts and stays within a memory bound.
"""

from __future__ import annotations

import io
import json
import stat
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sharding.contract import CLASSES, DATASET_DIR, IMAGE_SIZE
from sharding.download import DownloadError, safe_extract
from sharding.preprocess import MAX_PIXELS, PreprocessError, load_image

from helpers.archives import zip_bytes

S = IMAGE_SIZE


# --------------------------------------------------------------------------- crafted files


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header claims width x height 8-bit gray, with whatever (little) pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", idat or zlib.compress(b"\0" * 64))
        + _chunk(b"IEND", b"")
    )


def gray_png_streamed(width: int, height: int, value: int = 0) -> bytes:
    """A valid, fully populated gray PNG of any size, built row by row (never the whole raster in memory)."""
    comp = zlib.compressobj(9)
    row = b"\0" + bytes([value]) * width
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    return png_claiming(width, height, b"".join(parts))


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def halves(left: int, right: int, mode: str = "L", size=(S, S)) -> Image.Image:
    w, h = size
    arr = np.full((h, w), left, np.uint8)
    arr[:, w // 2 :] = right
    return Image.fromarray(arr, mode="L").convert(mode) if mode != "L" else Image.fromarray(arr, mode="L")


def sixteen_bit() -> tuple[bytes, np.ndarray]:
    arr = (1000 + (np.arange(S * S).reshape(S, S) * 7) % 4001).astype(np.uint16)  # 1000..5000
    img = Image.fromarray(arr)  # mode I;16
    assert img.mode.startswith("I;16")
    return save(img, "PNG"), arr


def palette_with_transparency() -> bytes:
    img = Image.new("P", (S, S), 0)
    img.putpalette([255, 255, 255, 128, 128, 128] + [0, 0, 0] * 254)
    img.paste(1, (S // 2, 0, S, S))  # right half: opaque gray 128
    return save(img, "PNG", transparency=0)  # left half: palette 0 (white) fully transparent


def cmyk_jpeg() -> bytes:
    img = Image.new("CMYK", (S, S), (0, 0, 0, 0))  # white
    img.paste((0, 0, 0, 255), (S // 2, 0, S, S))  # right half black
    return save(img, "JPEG", quality=95)


def la_png() -> bytes:
    arr = np.zeros((S, S, 2), np.uint8)
    arr[..., 0] = 200
    arr[:, : S // 2, 1] = 255  # left opaque, right transparent
    return save(Image.fromarray(arr, mode="LA"), "PNG")


def animated_png() -> bytes:
    first, second = Image.new("L", (S, S), 50), Image.new("L", (S, S), 200)
    return save(first, "PNG", save_all=True, append_images=[second], duration=100, loop=0)


def exif_rotated_jpeg() -> bytes:
    """200x100 stored: left half dark, right half bright; EXIF orientation 6 (display rotated 90 deg CW)."""
    img = halves(20, 235, size=(200, 100))
    exif = Image.Exif()
    exif[0x0112] = 6
    return save(img, "JPEG", quality=95, exif=exif.tobytes())


# --------------------------------------------------------------------------- fuzzing


def _valid_or_refused(data: bytes) -> None:
    try:
        arr, info = load_image(data)
    except PreprocessError as exc:
        assert str(exc)  # a reason
        return
    assert arr.dtype == np.uint8 and arr.shape == (S, S)
    assert info.width >= 1 and info.height >= 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_fuzz_arbitrary_bytes_only_preprocess_error_or_valid_image(data):
    _valid_or_refused(data)


_SEEDS = [
    save(halves(10, 240), "PNG"),
    save(halves(10, 240), "JPEG"),
    cmyk_jpeg(),
    animated_png(),
    la_png(),
    sixteen_bit()[0],
    palette_with_transparency(),
    save(halves(10, 240, size=(8, 8)), "GIF"),
    save(halves(10, 240, size=(8, 8)), "BMP"),
    save(halves(10, 240, size=(8, 8)), "TIFF"),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(_SEEDS))), st.data())
def test_fuzz_mutated_real_images(which, data):
    blob = bytearray(_SEEDS[which])
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    _valid_or_refused(bytes(blob[: max(cut, len(blob) // 2)]))


# --------------------------------------------------------------------------- each odd input, pixel expectations


def test_one_pixel_image_fills_the_frame():
    arr, info = load_image(save(Image.new("L", (1, 1), 77), "PNG"))
    assert (info.width, info.height) == (1, 1)
    assert arr.shape == (S, S) and (arr == 77).all()


def test_header_above_max_pixels_refused_before_decoding():
    side = 10_000  # 100 Mpx > MAX_PIXELS (64 Mpx): refused from the header, the raster is never allocated
    assert side * side > MAX_PIXELS
    with pytest.raises(PreprocessError, match="exceeds"):
        load_image(png_claiming(side, side))


def test_decompression_bomb_refused():
    with pytest.raises(PreprocessError, match="bomb|exceeds"):
        load_image(png_claiming(100_000, 100_000))


BOUNDED = r"""
import resource, sys, time
from sharding.preprocess import load_image, PreprocessError
data = open(sys.argv[1], "rb").read()
t = time.perf_counter()
try:
    arr, info = load_image(data)
    result = f"ok {arr.shape} {arr.dtype} {info.width}x{info.height}"
except PreprocessError as exc:
    result = f"refused {exc}"
print(result)
print("MAXRSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
print("SECONDS", time.perf_counter() - t)
"""


def _bounded(tmp_path, blob: bytes, env, cwd) -> tuple[str, float, float]:
    path = tmp_path / "input.bin"
    path.write_bytes(blob)
    run = subprocess.run(
        [sys.executable, "-c", BOUNDED, str(path)], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    return lines[0], int(lines[1].split()[1]) / 1024, float(lines[2].split()[1])


@pytest.mark.slow
def test_extreme_sizes_memory_bounded(tmp_path, subprocess_env, repo_root):
    base = _bounded(tmp_path, save(Image.new("L", (1, 1), 0), "PNG"), subprocess_env, repo_root)
    # a bomb claiming 10^10 px: refused in well under a second, memory as for a 1x1 image
    bomb = _bounded(tmp_path, png_claiming(100_000, 100_000), subprocess_env, repo_root)
    assert bomb[0].startswith("refused") and bomb[1] < base[1] + 50 and bomb[2] < 2.0, bomb
    # a real, fully populated 10000x10000 gray PNG: refused by MAX_PIXELS, raster never allocated (100 MB)
    big = _bounded(tmp_path, gray_png_streamed(10_000, 10_000, 90), subprocess_env, repo_root)
    assert big[0].startswith("refused") and "exceeds" in big[0] and big[1] < base[1] + 50, big
    # a large accepted one (6000x6000 = 36 Mpx) is decoded and resized within a few rasters of memory
    ok = _bounded(tmp_path, gray_png_streamed(6000, 6000, 90), subprocess_env, repo_root)
    assert ok[0] == "ok (299, 299) uint8 6000x6000", ok
    assert ok[1] < base[1] + 4 * 36 + 50, ok  # MiB


def test_sixteen_bit_stretched_min_max_to_0_255():
    blob, src = sixteen_bit()
    arr, info = load_image(blob)
    lo, hi = float(src.min()), float(src.max())
    expected = np.rint((src.astype(np.float64) - lo) * 255.0 / (hi - lo)).astype(np.uint8)
    assert info.mode.startswith("I")
    assert np.array_equal(arr, expected)
    assert arr.min() == 0 and arr.max() == 255  # not clipped white as PIL's convert("L") would


def test_palette_transparency_composited_on_black():
    arr, info = load_image(palette_with_transparency())
    assert info.mode == "P"
    assert (arr[:, : S // 2 - 1] == 0).all()  # transparent white -> black (lightbox)
    assert (arr[:, S // 2 + 1 :] == 128).all()


def test_cmyk_jpeg_converted_with_the_right_polarity():
    arr, info = load_image(cmyk_jpeg())
    assert info.mode == "CMYK"
    assert arr[:, : S // 2 - 8].mean() > 245 and arr[:, S // 2 + 8 :].mean() < 10


def test_la_alpha_composited():
    arr, info = load_image(la_png())
    assert info.mode == "LA"
    assert (arr[:, : S // 2 - 1] == 200).all() and (arr[:, S // 2 + 1 :] == 0).all()


def test_animated_png_first_frame():
    arr, _ = load_image(animated_png())
    assert (arr == 50).all()


def test_exif_orientation_applied():
    arr, info = load_image(exif_rotated_jpeg())
    assert (info.width, info.height) == (100, 200)  # upright: portrait
    # stored left (dark) half is at the top once rotated 90 degrees clockwise
    assert arr[: S // 2 - 10].mean() < 40 and arr[S // 2 + 10 :].mean() > 215
    # and the columns are uniform (not the stored left/right split)
    assert abs(float(arr[:, :100].mean()) - float(arr[:, -100:].mean())) < 5


# --------------------------------------------------------------------------- a build over all of them

HOSTILE = {
    "garbage.png": b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 40,
    "empty.png": b"",
    "truncated.png": None,  # filled in below
    "bomb.png": None,
    "huge.png": None,
    "one_pixel.png": None,
    "sixteen.png": None,
    "palette.png": None,
    "cmyk.jpg": None,
    "la.png": None,
    "animated.png": None,
    "rotated.jpg": None,
    "text.png": b"just some text, not an image\n",
}
REFUSED = {"garbage.png", "empty.png", "truncated.png", "bomb.png", "huge.png", "text.png"}

MEASURED_BUILD = r"""
import resource, sys
from sharding.__main__ import main
rc = main(sys.argv[1:])
print("MAXRSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(rc)
"""


@pytest.mark.slow
def test_build_over_hostile_folder_reconciles_and_stays_bounded(raw_copy, tmp_path, subprocess_env, repo_root):
    files = dict(HOSTILE)
    files["truncated.png"] = save(halves(10, 240), "PNG")[:300]
    files["bomb.png"] = png_claiming(100_000, 100_000)
    files["huge.png"] = png_claiming(10_000, 10_000)
    files["one_pixel.png"] = save(Image.new("L", (1, 1), 77), "PNG")
    files["sixteen.png"] = sixteen_bit()[0]
    files["palette.png"] = palette_with_transparency()
    files["cmyk.jpg"] = cmyk_jpeg()
    files["la.png"] = la_png()
    files["animated.png"] = animated_png()
    files["rotated.jpg"] = exif_rotated_jpeg()
    before = sum(1 for p in raw_copy.rglob("*") if p.is_file() and "/images/" in p.as_posix())

    def measured_build(out):
        run = subprocess.run(
            [
                sys.executable,
                "-c",
                MEASURED_BUILD,
                "build",
                "--raw",
                str(raw_copy),
                "--out",
                str(out),
                "--workers",
                "1",
                "--shard-size",
                "16",
                "--quiet",
            ],
            env=subprocess_env,
            cwd=repo_root,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        return run, int(run.stdout.split("MAXRSS_KIB")[1].split()[0]) / 1024

    _, baseline_mib = measured_build(tmp_path / "baseline")  # the same films without the hostile ones
    for i, (name, blob) in enumerate(sorted(files.items())):
        (raw_copy / CLASSES[i % 4] / "images" / f"hostile_{name}").write_bytes(blob)
    out = tmp_path / "shards"
    run, peak_mib = measured_build(out)
    assert "Traceback" not in run.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    skipped = {s["path"].rsplit("hostile_", 1)[-1]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == REFUSED, skipped
    assert all(reason for reason in skipped.values())
    assert "exceeds" in skipped["huge.png"] and ("bomb" in skipped["bomb.png"] or "exceeds" in skipped["bomb.png"])
    assert counts["scanned"] == before + len(files)
    assert counts["written"] == before + len(files) - len(REFUSED)
    assert counts["scanned"] == counts["written"] + counts["skipped"]
    # the bomb and the 10^8 px header are refused unallocated: the hostile files cost no more than a few films
    assert peak_mib < baseline_mib + 150, f"build peak RSS {peak_mib:.0f} MiB vs {baseline_mib:.0f} MiB without them"
    from sharding.verify import verify

    assert verify(out).ok


# ----------------------------------------------------------------- zip slip: what the download test does not cover


GOOD = {f"{DATASET_DIR}/{c}/images/{c}-1.png": b"x" for c in CLASSES}


@pytest.mark.parametrize(
    "evil",
    [
        "..\\escape.txt",  # Windows separators
        f"{DATASET_DIR}\\..\\..\\escape.txt",
        "C:/escape.txt",
        "C:\\escape.txt",
        "c:escape.txt",  # drive letters
        "\\\\server\\share\\escape.txt",
        "//server/share/escape.txt",
        f"{DATASET_DIR}/COVID/../../../escape.txt",
        "./../escape.txt",
    ],
)
def test_zip_slip_variants_refused_before_anything_is_written(tmp_path, evil):
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_bytes({**GOOD, evil: b"pwned"}))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DownloadError, match="unsafe path|outside"):
        safe_extract(archive, dest)
    assert not any(dest.iterdir()), "nothing may be written when any member is unsafe"
    assert not list(tmp_path.rglob("escape.txt"))


@pytest.mark.parametrize("kind", [stat.S_IFLNK, stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK])
def test_links_and_special_files_refused(tmp_path, kind):
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_bytes(GOOD, special={f"{DATASET_DIR}/COVID/images/odd": kind}))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DownloadError, match="link or special"):
        safe_extract(archive, dest)
    assert not any(dest.iterdir())


def test_symlink_then_write_through_it_refused(tmp_path):
    """A link member followed by a file 'inside' it: the link alone stops the archive, nothing lands outside."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo(f"{DATASET_DIR}/COVID/images")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, str(tmp_path / "outside"))
        zf.writestr(f"{DATASET_DIR}/COVID/images/x.png", b"pwned")
    (tmp_path / "outside").mkdir()
    archive = tmp_path / "a.zip"
    archive.write_bytes(buf.getvalue())
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DownloadError):
        safe_extract(archive, dest)
    assert not any((tmp_path / "outside").iterdir()) and not any(dest.iterdir())


def test_safe_members_extract_normally(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_bytes({**GOOD, f"{DATASET_DIR}/./README.md.txt": b"ok", f"{DATASET_DIR}/a..b.txt": b"ok"}))
    dest = tmp_path / "dest"
    dest.mkdir()
    assert safe_extract(archive, dest) == len(GOOD) + 2
    assert (dest / DATASET_DIR / "a..b.txt").read_bytes() == b"ok"


# --------------------------------------------------------------------------- a hostile manifest


@pytest.mark.parametrize(
    "name",
    [
        "../outside.tar",
        "/etc/passwd.tar",
        "a/b.tar",
        "x.tar; touch pwned",
        "$(touch pwned).tar",
        ".hidden.tar",
        "train-000000.tar\n",
        "x..tar",
        "x.npy",
    ],
)
def test_manifest_with_unsafe_shard_name_refused(built_raw, tmp_path, name):
    from sharding.manifest import ManifestError, load_manifest

    data = json.loads((built_raw / "manifest.json").read_text())
    data["splits"]["train"]["shards"][0]["name"] = name
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="unsafe shard name"):
        load_manifest(tmp_path)
