"""The Kaggle release's `<Class>.metadata.xlsx` sheets: which site each film came from.

Each sheet lists `FILE NAME` (the image's stem, case aside), `FORMAT`, `SIZE` and
`URL`: the page of the collection the film was taken from. The source of a film
is that URL reduced to a stable site name: host (without `www.`) and path,
without query, fragment or trailing slash, e.g. `github.com/ieee8023/covid-chestxray-dataset`.
A sheet that is missing or unreadable leaves its class's sources unknown and
says so in the build summary; it never stops a build.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

SHEET = "{}.metadata.xlsx"
COLUMNS = ("FILE NAME", "URL")


def source_name(url: str) -> str | None:
    """A stable site name for a collection URL (None for an empty cell)."""
    text = str(url or "").strip()
    if not text:
        return None
    parsed = urllib.parse.urlsplit(text if "://" in text else f"https://{text}")
    host = parsed.netloc.lower().removeprefix("www.")
    return (host + parsed.path.rstrip("/")) or None


def read_sheet(path: Path) -> dict[str, str]:
    """{file stem (lower case): source} from one metadata sheet; raises ValueError naming the problem."""
    from openpyxl import load_workbook

    book = load_workbook(path, read_only=True, data_only=True)
    try:
        rows = book.active.iter_rows(values_only=True)
        header = [str(c).strip().upper() if c is not None else "" for c in next(rows, ())]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise ValueError(f"no {missing} column (has {header})")
        name_col, url_col = header.index("FILE NAME"), header.index("URL")
        out = {}
        for row in rows:
            if row is None or len(row) <= max(name_col, url_col) or row[name_col] is None:
                continue
            stem = Path(str(row[name_col]).strip()).stem.lower()
            source = source_name(row[url_col])
            if stem and source:
                out[stem] = source
        return out
    finally:
        book.close()


def read_sources(root: Path, classes: list[str]) -> tuple[dict[tuple[str, str], str], tuple[str, ...]]:
    """({(class, stem lower case): source}, notes) from the sheets beside the class folders."""
    sources: dict[tuple[str, str], str] = {}
    notes = []
    for name in classes:
        path = root / SHEET.format(name)
        if not path.is_file():
            notes.append(f"no {path.name}: sources of {name} unknown")
            continue
        try:
            sheet = read_sheet(path)
        except ImportError:
            notes.append(f"{path.name} not read: openpyxl is not installed (pip install openpyxl)")
            continue
        except Exception as exc:  # noqa: BLE001 - a damaged sheet must not stop the build
            notes.append(f"{path.name} not read ({type(exc).__name__}: {exc}): sources of {name} unknown")
            continue
        sources.update({(name, stem): src for stem, src in sheet.items()})
    return sources, tuple(notes)
