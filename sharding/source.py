"""Walk the raw inputs into records: the Kaggle layout, class folders, or a label CSV.

Three input kinds, detected in this order (the build summary names the one used):

1. **label CSV** (`labels=FILE.csv`): columns `path` (relative to the raw folder) and
   `label`, optional `patient_id` and `source`; other columns are ignored. A row
   naming a missing file (or one outside the raw folder) is skipped with its reason.
2. **Kaggle layout**: `<Class>/images/*.png` (masks in `<Class>/masks/`) for the
   Kaggle class folders, in the raw folder or up to three levels below it (the
   unzipped `COVID-19_Radiography_Dataset/`). Its `<Class>.metadata.xlsx` sheets,
   when present, give each film's source (`sharding.metadata`).
3. **class folders** (the ImageFolder convention): `<raw>/<class>/**/<image>` with
   any class names; nested folders are allowed, hidden files and folders ignored.

Classes: Kaggle's fixed order for the Kaggle layout, sorted names otherwise;
`classes=[...]` fixes an order or picks a subset (inputs of other classes are
skipped with the reason). Nothing here decodes an image: a file that is not an
image is skipped later, with its reason, by the build.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from sharding.contract import CLASSES, DATASET_DIR, sample_key

#: How deep below the given folder we look for the Kaggle class folders.
MAX_DEPTH = 3
KAGGLE, FOLDERS, CSV = "kaggle", "class folders", "label csv"


class SourceError(ValueError):
    """The raw inputs cannot be read as any input kind; the message says what was expected."""


@dataclass(frozen=True)
class Record:
    """One candidate image file of a known class."""

    path: str  # absolute path of the image file
    rel: str  # path relative to the dataset root, POSIX separators (the sample json's `path`)
    class_name: str
    label: int
    key: str  # WebDataset key, unique in the dataset
    mask_path: str | None  # absolute path of the matching mask, if there is one
    patient_id: str | None = None  # from a label CSV (DICOM headers add theirs in the build)
    source: str | None = None  # the site the film came from (metadata sheet or CSV), if known


@dataclass(frozen=True)
class Scan:
    """What a walk of the raw inputs found."""

    root: Path  # the folder the records' `rel` paths are relative to
    records: tuple[Record, ...]  # sorted by key
    skipped: tuple[dict, ...]  # {"path", "reason"} for files that never became records
    kind: str = KAGGLE  # which input kind was read
    classes: tuple[str, ...] = CLASSES  # label order
    notes: tuple[str, ...] = ()  # things the build summary should say (e.g. a metadata sheet not read)

    @property
    def scanned(self) -> int:
        return len(self.records) + len(self.skipped)


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _is_kaggle_root(path: Path) -> bool:
    return any((path / name / "images").is_dir() for name in CLASSES)


def find_kaggle_root(raw: Path) -> Path | None:
    """The folder holding the Kaggle class folders: `raw`, `raw/COVID-19_Radiography_Dataset`, or below."""
    if _is_kaggle_root(raw):
        return raw
    if _is_kaggle_root(raw / DATASET_DIR):
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
                if _is_kaggle_root(child):
                    return child
                nxt.append(child)
        frontier = nxt
    return None


def _files(folder: Path) -> list[Path]:
    """Visible regular files under `folder`, recursively, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(out)


def _class_order(found: list[str], classes: list[str] | None, kaggle: bool) -> tuple[str, ...]:
    if classes:
        if len(set(classes)) != len(classes):
            raise SourceError(f"--classes {classes} names a class twice")
        return tuple(classes)
    if kaggle:
        return tuple(c for c in CLASSES if c in found)
    return tuple(sorted(found))


class _Collector:
    """Records and skips of one walk, with unique keys (a second file for a key is skipped)."""

    def __init__(self, root: Path, classes: tuple[str, ...]):
        self.root, self.classes = root, classes
        self.records: list[Record] = []
        self.skipped: list[dict] = []
        self.seen: dict[str, str] = {}

    def skip(self, path: Path | str, reason: str) -> None:
        rel = path if isinstance(path, str) else path.relative_to(self.root).as_posix()
        self.skipped.append({"path": rel, "reason": reason})

    def add(self, path: Path, class_name: str, key: str, mask: Path | None = None, **extra) -> None:
        rel = path.relative_to(self.root).as_posix()
        if class_name not in self.classes:
            self.skip(rel, f"class {class_name!r} is not in --classes {list(self.classes)}")
            return
        if key in self.seen:
            self.skip(rel, f"same sample key {key!r} as {self.seen[key]}")
            return
        self.seen[key] = rel
        self.records.append(
            Record(
                str(path.resolve()),
                rel,
                class_name,
                self.classes.index(class_name),
                key,
                str(mask.resolve()) if mask is not None else None,
                **extra,
            )
        )

    def scan(self, kind: str, notes: tuple[str, ...] = ()) -> Scan:
        return Scan(
            self.root,
            tuple(sorted(self.records, key=lambda r: r.key)),
            tuple(sorted(self.skipped, key=lambda s: s["path"])),
            kind,
            self.classes,
            notes,
        )


def scan_kaggle(root: Path, classes: list[str] | None = None) -> Scan:
    """Records for every file in `<Class>/images/` of each class (masks matched by file name)."""
    from sharding.metadata import read_sources

    folders = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    order = _class_order([f.name for f in folders if f.name in CLASSES], classes, kaggle=True)
    out = _Collector(root, order)
    sources, notes = read_sources(root, [f.name for f in folders if f.name in CLASSES])
    for folder in folders:
        if folder.name not in CLASSES:
            for path in _files(folder):
                out.skip(path, f"unknown class folder {folder.name!r}; expected one of {list(CLASSES)}")
            continue
        images, masks = folder / "images", folder / "masks"
        for other in sorted(p for p in folder.iterdir() if _visible(p) and p not in (images, masks)):
            for path in _files(other) if other.is_dir() else [other]:
                out.skip(path, "not under the class's images/ or masks/ folder")
        for path in _files(images) if images.is_dir() else []:
            mask = masks / path.relative_to(images)
            if not mask.is_file():
                alt = sorted(masks.glob(f"{path.stem}.*")) if masks.is_dir() else []
                mask = alt[0] if alt else None
            out.add(
                path,
                folder.name,
                sample_key(folder.name, path.stem),
                mask,
                source=sources.get((folder.name, path.stem.lower())),
            )
    return out.scan(KAGGLE, notes)


def scan_folders(root: Path, classes: list[str] | None = None) -> Scan:
    """Records for `<root>/<class>/**/<file>`: every visible subfolder is a class."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    files = {folder: _files(folder) for folder in folders}
    if not any(files.values()):
        raise SourceError(
            f"{root} holds no inputs. Give the Kaggle layout ({DATASET_DIR}/ with class folders "
            f"{', '.join(repr(c) for c in CLASSES)}, each with images/; `python -m sharding download --out {root}` "
            f"or `python -m sharding phantom --out {root}`), class folders ({root}/<class>/<image>, searched "
            f"{MAX_DEPTH} levels down for the Kaggle layout first), or a label CSV with --labels FILE.csv"
        )
    out = _Collector(root, _class_order([f.name for f in folders if files[f]], classes, kaggle=False))
    for folder in folders:
        for path in files[folder]:
            stem = path.relative_to(folder).with_suffix("").as_posix().replace("/", "_")
            out.add(path, folder.name, sample_key(folder.name, stem))
    return out.scan(FOLDERS)


def scan_csv(root: Path, labels: Path, classes: list[str] | None = None) -> Scan:
    """Records for the rows of a label CSV: path (relative to `root`), label, optional patient_id, source."""
    try:
        with open(labels, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
            columns = set(rows[0]) if rows else set()
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(f"cannot read the label CSV {labels}: {exc}") from None
    missing = {"path", "label"} - columns
    if missing:
        raise SourceError(
            f"label CSV {labels} lacks the column(s) {sorted(missing)}; it needs path and label "
            "(optional: patient_id, source)"
        )
    names = sorted({(r["label"] or "").strip() for r in rows} - {""})
    out = _Collector(root, _class_order(names, classes, kaggle=False))
    base = root.resolve()
    for i, row in enumerate(rows, start=2):  # line numbers as a spreadsheet shows them (header = 1)
        rel, label = (row["path"] or "").strip(), (row["label"] or "").strip()
        path = (root / rel).resolve()
        where = rel or f"{labels.name} line {i}"
        if not rel or not label:
            out.skip(where, f"{labels.name} line {i}: empty path or label")
        elif Path(rel).is_absolute() or not path.is_relative_to(base):
            out.skip(where, f"{labels.name} line {i}: path is outside the raw folder {root}")
        elif not path.is_file():
            out.skip(where, f"{labels.name} line {i}: no such file under {root}")
        else:
            rel_path = root / path.relative_to(base)
            stem = path.relative_to(base).with_suffix("").as_posix().replace("/", "_")
            out.add(
                rel_path,
                label,
                sample_key(label, stem),
                patient_id=(row.get("patient_id") or "").strip() or None,
                source=(row.get("source") or "").strip() or None,
            )
    return out.scan(CSV)


def scan(raw: str | Path, labels: str | Path | None = None, classes: list[str] | None = None) -> Scan:
    """Detect the input kind under `raw` (see the module docstring) and walk it."""
    raw = Path(raw)
    if not raw.is_dir():
        raise SourceError(f"raw folder {raw} does not exist or is not a folder")
    if labels is not None:
        return scan_csv(raw, Path(labels), classes)
    root = find_kaggle_root(raw)
    if root is not None:
        return scan_kaggle(root, classes)
    return scan_folders(raw, classes)


__all__ = ["CSV", "FOLDERS", "KAGGLE", "Record", "Scan", "SourceError", "scan"]
