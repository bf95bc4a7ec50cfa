"""Walk a raw dataset folder (Kaggle layout, real or phantom) into records.

The Kaggle archive unpacks to ``COVID-19_Radiography_Dataset/<Class>/images/*.png``
with masks in ``<Class>/masks/`` (same file names) and a few metadata files
beside the class folders. Users may point at ``data/raw`` (the parent), at the
dataset folder itself, or at any folder a few levels above it: we look for the
folder that holds the class folders.

Nothing here decodes an image; files that turn out not to be images are
skipped later, with their reason, by the build.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sharding.contract import CLASSES, DATASET_DIR, sample_key

#: How deep below the given folder we look for the class folders.
MAX_DEPTH = 3


class SourceError(ValueError):
    """The raw folder does not look like the dataset; the message says what was expected."""


@dataclass(frozen=True)
class Record:
    """One candidate image file of a known class."""

    path: str  # absolute path of the image file
    rel: str  # path relative to the dataset root, POSIX separators (stored in the sample json)
    class_name: str
    label: int
    key: str  # WebDataset key, unique in the dataset
    mask_path: str | None  # absolute path of the matching mask, if there is one


@dataclass(frozen=True)
class Scan:
    """What a walk of the raw folder found."""

    root: Path  # the folder holding the class folders
    records: tuple[Record, ...]  # sorted by key
    skipped: tuple[dict, ...]  # {"path", "reason"} for files that never became records

    @property
    def scanned(self) -> int:
        return len(self.records) + len(self.skipped)


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _has_class_folder(path: Path) -> bool:
    return any((path / name).is_dir() for name in CLASSES)


def find_root(raw: str | Path) -> Path:
    """The folder holding the class folders: `raw`, `raw/COVID-19_Radiography_Dataset`, or below."""
    raw = Path(raw)
    if not raw.is_dir():
        raise SourceError(f"raw folder {raw} does not exist or is not a folder")
    if _has_class_folder(raw):
        return raw
    if (raw / DATASET_DIR).is_dir() and _has_class_folder(raw / DATASET_DIR):
        return raw / DATASET_DIR
    frontier = [raw]
    for _ in range(MAX_DEPTH):
        nxt = []
        for folder in frontier:
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p))
            except OSError:
                continue
            for child in children:
                if _has_class_folder(child):
                    return child
                nxt.append(child)
        frontier = nxt
    raise SourceError(
        f"no class folders found in {raw} (searched {MAX_DEPTH} levels down); expected a folder "
        f"holding {', '.join(repr(c) for c in CLASSES)} (each with an images/ subfolder), e.g. "
        f"{raw / DATASET_DIR}; fetch it with `python -m sharding download --out {raw}` or make a "
        f"phantom with `python -m sharding phantom --out {raw}`"
    )


def _files(folder: Path) -> list[Path]:
    """Visible regular files under `folder`, recursively, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(out)


def scan(raw: str | Path) -> Scan:
    """Records for every file in `<Class>/images/` (or directly in `<Class>/`) of each known class.

    Files under an unknown class folder are skipped with the reason. Two files
    that would get the same key (e.g. `a.png` and `a.jpg`) keep the first one.
    Metadata files next to the class folders are not inputs and not counted.
    """
    root = find_root(raw)
    records: list[Record] = []
    skipped: list[dict] = []
    seen: dict[str, str] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and _visible(p)):
        if folder.name not in CLASSES:
            for path in _files(folder):
                skipped.append(
                    {
                        "path": path.relative_to(root).as_posix(),
                        "reason": f"unknown class folder {folder.name!r}; expected one of {list(CLASSES)}",
                    }
                )
            continue
        name = folder.name
        images = folder / "images"
        masks = folder / "masks"
        if images.is_dir():
            candidates = _files(images)
            # Anything else in the class folder (other than masks/) is not an input we know.
            for other in sorted(p for p in folder.iterdir() if _visible(p) and p not in (images, masks)):
                for path in _files(other) if other.is_dir() else [other]:
                    skipped.append(
                        {
                            "path": path.relative_to(root).as_posix(),
                            "reason": "not under the class's images/ or masks/ folder",
                        }
                    )
        else:  # older releases: images directly in the class folder
            candidates = [p for p in _files(folder) if p.parent == folder]
        for path in candidates:
            rel = path.relative_to(root).as_posix()
            key = sample_key(name, path.stem)
            if key in seen:
                skipped.append({"path": rel, "reason": f"same sample key {key!r} as {seen[key]}"})
                continue
            seen[key] = rel
            mask = masks / path.relative_to(images) if images.is_dir() else None
            if mask is not None and not mask.is_file():
                alt = sorted(masks.glob(f"{path.stem}.*")) if masks.is_dir() else []
                mask = alt[0] if alt else None
            records.append(
                Record(
                    path=str(path.resolve()),
                    rel=rel,
                    class_name=name,
                    label=CLASSES.index(name),
                    key=key,
                    mask_path=str(mask.resolve()) if mask is not None else None,
                )
            )
    records.sort(key=lambda r: r.key)
    skipped.sort(key=lambda s: s["path"])
    return Scan(root=root, records=tuple(records), skipped=tuple(skipped))
