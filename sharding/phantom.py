"""Synthetic chest radiographs in the exact on-disk layout of the Kaggle dataset.

The phantom is the project's embedded default: it lets every command run with
no account and no network. Each image is a frontal-film-like picture (body
silhouette, two dark lung fields that match the mask, mediastinum and heart
shadow, rib arcs, noise, exposure variation); each class adds its own pattern
inside the lungs:

- COVID: bilateral, peripheral / lower-zone ground-glass patches;
- Lung_Opacity: one or two dense focal consolidations;
- Viral Pneumonia: diffuse bilateral interstitial streaks;
- Normal: clear lungs.

Every image's global mean is re-drawn from one class-independent distribution
after the pattern is added, so no class is recognisable by brightness alone.

Each image is a pure function of (seed, class, index): generation is
parallel, resumable and byte-identical for a seed. Like the real data, a small
share of images are exact copies of another image of the same class, and a
smaller share are near copies of an image of *another* class (label noise).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import struct
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sharding import phantom_files as files
from sharding import phantom_sites as sites
from sharding.contract import CLASSES, DATASET_DIR, IMAGE_SIZE, MASK_SIZE, REAL_COUNTS

STAMP = ".phantom.json"
#: Bump whenever the drawing code changes the bytes: an existing phantom with
#: another version is stale and is not mistaken for an up-to-date one.
GENERATOR_VERSION = 5  # 5: metadata sheets (xlsx) with sources, labels.csv, the DICOM format


@dataclass(frozen=True)
class PhantomSpec:
    """Everything that determines the phantom's bytes."""

    counts: tuple[int, ...]
    seed: int = 0
    dup_fraction: float = 0.02
    near_dup_fraction: float = 0.005
    markers: bool = False
    format: str = "png"  # "png", or "dicom": the same pixels in DICOM films (see sharding.phantom_files)
    site_styles: bool = False  # each source acquires in its own style (sharding.phantom_sites)
    site: str | None = None  # every film from this one (new) site, in its style, every class present

    def __post_init__(self) -> None:
        if self.site is not None and (not self.site.strip() or not self.site.isprintable() or "," in self.site):
            raise ValueError(f"site must be a printable name without commas, got {self.site!r}")
        if self.format not in ("png", "dicom"):
            raise ValueError(f"format must be png or dicom, got {self.format!r}")
        if len(self.counts) != len(CLASSES) or any(c < 0 for c in self.counts):
            raise ValueError(f"counts must be {len(CLASSES)} non-negative integers, got {self.counts}")
        for name in ("dup_fraction", "near_dup_fraction"):
            if not 0.0 <= getattr(self, name) < 0.5:
                raise ValueError(f"{name} must be in [0, 0.5), got {getattr(self, name)}")


def counts_for(per_class: int, realistic_ratio: bool = False, full_size: bool = False) -> tuple[int, ...]:
    """Per-class image counts: equal, scaled to the real class ratio, or the real counts."""
    if full_size:
        return tuple(REAL_COUNTS[c] for c in CLASSES)
    if not realistic_ratio:
        return (per_class,) * len(CLASSES)
    total = sum(REAL_COUNTS.values())
    return tuple(max(1, round(per_class * len(CLASSES) * REAL_COUNTS[c] / total)) for c in CLASSES)


# --------------------------------------------------------------------------- drawing

# Pixel-centre coordinates as 1-D axes: shapes are evaluated on their bounding box
# by broadcasting, never on a full 2-D grid (this keeps one core above 200 films/s).
_AXIS = np.arange(IMAGE_SIZE, dtype=np.float32)
_MASK_AXIS = (np.arange(MASK_SIZE, dtype=np.float32) + 0.5) * (IMAGE_SIZE / MASK_SIZE) - 0.5
_TAGS = ("PORTABLE", "AP SUPINE", "PA ERECT", "R")
#: Uniform noise scaled to this has standard deviation 1 (uniform draws cost a fifth of normal ones).
_UNIT_UNIFORM = math.sqrt(12.0)


def _span(axis: np.ndarray, lo: float, hi: float) -> slice:
    return slice(int(np.searchsorted(axis, lo, "left")), int(np.searchsorted(axis, hi, "right")))


def _ellipse(xs, ys, cx, cy, ax, ay, soft: float = 0.0) -> np.ndarray:
    """Ellipse on the grid ys x xs: 1 inside, 0 outside, a linear edge of width `soft` (in e = r^2)."""
    out = np.zeros((len(ys), len(xs)), np.float32)
    rows, cols = _span(ys, cy - ay, cy + ay), _span(xs, cx - ax, cx + ax)
    e = ((ys[rows, None] - cy) / ay) ** 2 + ((xs[None, cols] - cx) / ax) ** 2
    out[rows, cols] = (e <= 1.0) if soft <= 0 else np.clip((1.0 - e) / soft, 0.0, 1.0)
    return out


def _noise(rng: np.random.Generator, shape, std: float) -> np.ndarray:
    """Zero-mean film grain with the given standard deviation."""
    return (rng.random(shape, dtype=np.float32) - 0.5) * np.float32(std * _UNIT_UNIFORM)


def _add_blob(out: np.ndarray, cx, cy, sigma, amp, scale: float = 1.0) -> None:
    """out += amp * min(1, scale * gaussian), evaluated only within 3 sigma (the rest is ~0)."""
    r = 3.0 * sigma
    x0, x1 = max(0, int(cx - r)), min(IMAGE_SIZE, int(cx + r) + 1)
    y0, y1 = max(0, int(cy - r)), min(IMAGE_SIZE, int(cy + r) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    xs = np.arange(x0, x1, dtype=np.float32) - cx
    ys = np.arange(y0, y1, dtype=np.float32) - cy
    g = np.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2.0 * sigma * sigma))
    if scale != 1.0:
        g = np.minimum(g * scale, 1.0)
    out[y0:y1, x0:x1] += amp * g


@dataclass(frozen=True)
class _Anatomy:
    lungs: tuple[tuple[float, float, float, float], ...]  # (cx, cy, ax, ay) patient right, left
    heart: tuple[float, float, float, float]


def _anatomy(rng: np.random.Generator, style: sites.SiteStyle | None = None) -> _Anatomy:
    s = rng.uniform(0.92, 1.08)
    dx, dy = rng.uniform(-8, 8), rng.uniform(-8, 8)
    if style is not None:  # the site's patient zoom and placement (the mask follows)
        s, dx, dy = s * style.zoom, dx + style.shift[0], dy + style.shift[1]
    right = (96 + dx, 142 + dy, 44 * s, 86 * s)
    left = (204 + dx, 142 + dy, 42 * s, 84 * s)
    heart = (168 + dx, 205 + dy, 46 * s, 40 * s)
    return _Anatomy((right, left), heart)


def _lung_field(anat: _Anatomy, xx, yy, soft: float) -> np.ndarray:
    lungs = np.maximum(*(_ellipse(xx, yy, *lung, soft=soft) for lung in anat.lungs))
    heart = _ellipse(xx, yy, *anat.heart, soft=soft)
    return lungs * (1.0 - heart)


def _pattern(cls: int, anat: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Class-specific additive pattern (before masking to the lungs)."""
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    name = CLASSES[cls]
    if name == "COVID":
        for side, (cx, cy, ax, ay) in zip((-1, 1), anat.lungs):
            for _ in range(rng.integers(2, 4)):
                px = cx + side * ax * rng.uniform(0.35, 0.8)
                py = cy + ay * rng.uniform(0.0, 0.7)
                _add_blob(out, px, py, rng.uniform(14, 24), rng.uniform(24, 40))
        out *= 1.0 + _noise(rng, out.shape, 0.25)
    elif name == "Lung_Opacity":
        for _ in range(rng.integers(1, 3)):
            cx, cy, ax, ay = anat.lungs[rng.integers(0, 2)]
            px = cx + ax * rng.uniform(-0.6, 0.6)
            py = cy + ay * rng.uniform(-0.6, 0.6)
            sigma = rng.uniform(7, 13)
            _add_blob(out, px, py, sigma, rng.uniform(65, 95), scale=1.6)
    elif name == "Viral Pneumonia":
        layer = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        draw = ImageDraw.Draw(layer)
        for side, (cx, cy, ax, ay) in zip((-1, 1), anat.lungs):
            hx, hy = cx - side * ax * 0.7, cy - ay * 0.1  # hilum: medial
            for _ in range(rng.integers(18, 28)):
                ang = rng.uniform(-1.2, 1.2) + (0 if side > 0 else math.pi)
                length = rng.uniform(25, 70)
                x0, y0 = hx + rng.uniform(-6, 6), hy + rng.uniform(-30, 30)
                x1, y1 = x0 + length * math.cos(ang), y0 + length * math.sin(ang)
                draw.line((x0, y0, x1, y1), fill=int(rng.integers(14, 26)), width=int(rng.integers(1, 3)))
        out += np.asarray(layer, np.float32) + 6.0
    return out


def _marker(img: np.ndarray, cls: int, rng: np.random.Generator) -> None:
    """Burn a class-correlated text tag into a corner, as hospital films carry."""
    if rng.random() > 0.9:  # not every film carries its hospital's tag
        return
    text = _TAGS[cls]
    patch = Image.new("L", (70, 12), 0)
    ImageDraw.Draw(patch).text((1, 0), text, fill=255, font=ImageFont.load_default())
    patch = patch.resize((140, 24), Image.Resampling.NEAREST)
    arr = np.asarray(patch, np.float32)
    corner = cls % 4
    y0 = 6 if corner < 2 else IMAGE_SIZE - 30
    x0 = 6 if corner % 2 == 0 else IMAGE_SIZE - 146
    region = img[y0 : y0 + 24, x0 : x0 + 140]
    np.maximum(region, arr * 0.95, out=region)


def site_of(spec: PhantomSpec, cls: int, index: int) -> str:
    """The source (site) of film `index` of class `cls`."""
    return spec.site or files.source_of(spec.seed, CLASSES[cls], index)


def patient_of(spec: PhantomSpec, cls: int, index: int) -> str:
    """A film's patient id; a new site's patients are its own."""
    patient = files.patient_of(CLASSES[cls], index)
    return (
        patient
        if spec.site is None
        else f"{sites.style_for(spec.site).tag}{sites.site_number(spec.site) % 10**6:06d}-{patient}"
    )


def _render(spec: PhantomSpec, cls: int, index: int, jitter: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [299, 299], mask uint8 [256, 256] in {0, 255}) for one phantom film."""
    style = sites.style_for(site_of(spec, cls, index)) if spec.site_styles or spec.site else None
    key = [spec.seed, cls, index, 1 if jitter else 0]
    if spec.site is not None:  # another site's patients: other films than the default phantom's
        key.append(sites.site_number(spec.site))
    rng = np.random.default_rng(key)
    anat = _anatomy(rng, style)
    ax = _AXIS
    body = _ellipse(ax, ax, 150 + rng.uniform(-5, 5), 170, rng.uniform(128, 142), rng.uniform(155, 175), soft=0.08)
    lungs = _lung_field(anat, ax, ax, soft=0.12)
    img = 18.0 + 125.0 * body
    img -= rng.uniform(62, 78) * lungs
    medi = body * np.clip(1.0 - np.abs(ax - 150 - rng.uniform(-4, 4)) / 22.0, 0, 1)[None, :]
    medi[:41] = 0.0  # the mediastinum starts below the neck
    img += 35.0 * medi
    period = rng.uniform(19, 25)
    curve = rng.uniform(0.004, 0.007)
    (rx0, ry0, rax, ray), (lx0, ly0, lax, lay) = anat.lungs
    rows = _span(ax, min(ry0 - ray, ly0 - lay), max(ry0 + ray, ly0 + lay))
    cols = _span(ax, rx0 - rax, lx0 + lax)
    ribs = 0.5 * (1.0 + np.cos(2 * np.pi * (ax[rows, None] - curve * (ax[None, cols] - 150.0) ** 2) / period))
    ribs *= ribs
    img[rows, cols] += rng.uniform(12, 20) * (ribs * ribs) * lungs[rows, cols]
    img += _pattern(cls, anat, rng) * lungs
    img += (10.0 * (ax / IMAGE_SIZE - 0.5) * rng.uniform(-1, 1))[:, None]  # exposure gradient
    img += _noise(rng, img.shape, 4.0 if style is None else style.grain)
    # Class-independent exposure: re-draw the mean and contrast for every film.
    gain = rng.uniform(0.85, 1.15)
    # A float32 mean's summation order (so its last bit) changes between numpy versions;
    # summed in float64 it is the same everywhere, and so are the films.
    img = (img - float(img.mean(dtype=np.float64))) * gain + rng.uniform(100, 125)
    if spec.markers:
        _marker(img, cls, rng)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8) if style is None else sites.acquire(img, style)
    mask = (_lung_field(anat, _MASK_AXIS, _MASK_AXIS, soft=0.0) > 0.5).astype(np.uint8) * 255
    return image, mask


def _source_of(spec: PhantomSpec, cls: int, index: int) -> tuple[str, int, int]:
    """Which film this index shows: ('orig'|'dup'|'near', class, index)."""
    rng = np.random.default_rng([spec.seed, cls, index, 7])
    u = rng.random()
    if index > 0 and u < spec.dup_fraction:
        return "dup", cls, int(rng.integers(0, index))
    if u > 1.0 - spec.near_dup_fraction:
        others = [c for c in range(len(CLASSES)) if c != cls and spec.counts[c] > 0]
        if others:
            other = others[int(rng.integers(0, len(others)))]
            return "near", other, int(rng.integers(0, spec.counts[other]))
    return "orig", cls, index


def render_sample(spec: PhantomSpec, cls: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The image and mask stored as `<Class>-<index+1>.png`, duplicates resolved."""
    kind, src_cls, src_idx = _source_of(spec, cls, index)
    if kind == "dup":
        return render_sample(spec, src_cls, src_idx)
    if kind == "near":
        image, mask = _render(spec, src_cls, src_idx)
        rng = np.random.default_rng([spec.seed, cls, index, 3])
        noisy = image.astype(np.int16) + rng.integers(-2, 3, image.shape, dtype=np.int16)
        return np.clip(noisy, 0, 255).astype(np.uint8), mask
    return _render(spec, cls, index)


# --------------------------------------------------------------------------- writing


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(array: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of `array` (H x W uint8), as PIL reads back in mode "L".

    Written here rather than by PIL because PIL tries every row filter and deflates
    at best: 2.3 ms a film, more than drawing it. One "Up" filter and Z_RLE
    take 0.7 ms and give files as small (measured on phantom films).
    """
    height, width = array.shape
    rows = np.empty((height, width + 1), np.uint8)
    rows[:, 0] = 2  # PNG filter type "Up": each row minus the row above
    rows[0, 1:] = array[0]
    np.subtract(array[1:], array[:-1], out=rows[1:, 1:])  # uint8 wrap-around is the PNG definition
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)),
            _png_chunk(b"IDAT", deflate.compress(rows.tobytes()) + deflate.flush()),
            _png_chunk(b"IEND", b""),
        )
    )


def _write_png(path: Path, array: np.ndarray) -> None:
    path.write_bytes(png_bytes(array))


def _write_class_chunk(args: tuple[PhantomSpec, str, int, int, int]) -> int:
    spec, root, cls, start, stop = args
    name = CLASSES[cls]
    base = Path(root) / name
    for index in range(start, stop):
        image, mask = render_sample(spec, cls, index)
        key = f"{name}-{index + 1}"
        if spec.format == "dicom":
            data = files.dicom_bytes(
                image, seed=spec.seed, key=key, index=index, patient_id=patient_of(spec, cls, index)
            )
            (base / "images" / f"{key}.dcm").write_bytes(data)
        else:
            _write_png(base / "images" / f"{key}.png", image)
        _write_png(base / "masks" / f"{key}.png", mask)
    return stop - start


def _write_metadata(root: Path, spec: PhantomSpec) -> None:
    """The Kaggle metadata sheets (with each film's source) and labels.csv (with patient ids)."""
    suffix = ".dcm" if spec.format == "dicom" else ".png"
    labels = []
    for cls, name in enumerate(CLASSES):
        rows = [["FILE NAME", "FORMAT", "SIZE", "URL"]]
        for index in range(spec.counts[cls]):
            source = site_of(spec, cls, index)
            rows.append([f"{name}-{index + 1}", spec.format.upper(), f"{IMAGE_SIZE}*{IMAGE_SIZE}", f"https://{source}"])
            labels.append([f"{name}/images/{name}-{index + 1}{suffix}", name, patient_of(spec, cls, index), source])
        (root / f"{name}.metadata.xlsx").write_bytes(files.xlsx_bytes(rows))
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "label", "patient_id", "source"])
        writer.writerows(labels)
    (root / "README.md.txt").write_text(
        "radstream phantom: synthetic chest radiographs in the layout of the COVID-19 Radiography Database.\n"
        f"Spec: {json.dumps(_stamped(spec))}\nNot real patient data; for tests and demos only.\n"
    )


def _stamped(spec: PhantomSpec) -> dict:
    """The spec as its stamp holds it; the site fields only when set (older stamps stay valid)."""
    out = asdict(spec)
    for name, default in (("site_styles", False), ("site", None)):
        if out[name] == default:
            del out[name]
    return out


def generate(out: str | Path, spec: PhantomSpec, workers: int = 1, force: bool = False, progress=None) -> Path:
    """Write the phantom under `out/COVID-19_Radiography_Dataset`; returns that folder.

    Written to a temporary sibling and renamed into place, so an interrupted run
    never leaves a partial dataset. Re-running with the same spec is a no-op.
    """
    out = Path(out)
    target = out / DATASET_DIR
    stamp = json.dumps({**_stamped(spec), "generator": GENERATOR_VERSION}, sort_keys=True)
    if target.exists() and not force:
        existing = target / STAMP
        found = json.loads(existing.read_text()) if existing.exists() else None
        if found is not None and json.dumps(found, sort_keys=True) == stamp:
            return target
        # A phantom of the same spec from an older generator is ours and stale: replace it.
        same_spec = found is not None and {k: v for k, v in found.items() if k != "generator"} == json.loads(
            json.dumps(_stamped(spec))
        )
        if not same_spec:
            raise FileExistsError(f"{target} already exists with different contents; pass --force to replace it")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{DATASET_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for name in CLASSES:
        (tmp / name / "images").mkdir(parents=True)
        (tmp / name / "masks").mkdir(parents=True)
    chunk = 256
    jobs = [
        (spec, str(tmp), cls, start, min(start + chunk, n))
        for cls, n in enumerate(spec.counts)
        for start in range(0, n, chunk)
    ]
    try:
        if workers <= 1:
            done = map(_write_class_chunk, jobs)
            for n in done:
                progress and progress(n)
        else:
            with ProcessPoolExecutor(workers) as pool:
                for n in pool.map(_write_class_chunk, jobs):
                    progress and progress(n)
        _write_metadata(tmp, spec)
        (tmp / STAMP).write_text(stamp)
        if target.exists():
            trash = out / f".{DATASET_DIR}.old-{os.getpid()}"
            target.rename(trash)
            tmp.rename(target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def contact_sheet(spec: PhantomSpec, per_class: int = 4, tile: int = 160) -> Image.Image:
    """A grid image, one row per class, of the first films of the phantom."""
    from sharding.grid import image_grid

    rows = []
    for cls, name in enumerate(CLASSES):
        n = min(per_class, spec.counts[cls])
        rows.append((name, [render_sample(spec, cls, i)[0] for i in range(n)]))
    return image_grid(rows, tile=tile)
