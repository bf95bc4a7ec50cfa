"""Any collection in: class folders with any names, a label CSV with patients and sources, Kaggle metadata sheets."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from sharding.build import build_shards
from sharding.metadata import source_name
from sharding.source import CSV, FOLDERS, KAGGLE, SourceError, scan
from sharding.split import compose_groups


def _films(phantom_raw: Path) -> list[Path]:
    return sorted(phantom_raw.glob("*/images/*.png"))  # 48 films, 12 per Kaggle class


def _samples(root: Path) -> list[dict]:
    out = []
    for shard in sorted(root.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    out.append(json.loads(tf.extractfile(m).read()))
    return out


def _digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


@pytest.fixture()
def folders(phantom_raw, tmp_path) -> Path:
    """Five classes with arbitrary names, nested folders, hidden files and folders."""
    root = tmp_path / "folders"
    films = _films(phantom_raw)
    names = ["zebra", "Apple pie", "b-2", "nested", "Ω"]
    for i, film in enumerate(films[:40]):  # 8 per class
        name = names[i % 5]
        sub = root / name / ("deep/er" if name == "nested" and i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(film, sub / f"img{i}.png")
    (root / "zebra" / ".DS_Store").write_bytes(b"junk")
    (root / ".cache").mkdir()
    (root / ".cache" / "x.png").write_bytes(b"junk")
    return root


def test_class_folders_any_names_sorted_nested_hidden_ignored(folders, tmp_path):
    found = scan(folders)
    assert found.kind == FOLDERS and found.classes == ("Apple pie", "b-2", "nested", "zebra", "Ω")
    assert len(found.records) == 40 and not found.skipped and len({r.key for r in found.records}) == 40
    m = build_shards(folders, tmp_path / "s", shard_size=16, workers=1, progress=False)
    assert m.classes == found.classes and m.counts["written"] == 40
    assert [sum(m.split(s).class_counts[c] for s in m.splits) for c in range(5)] == [8] * 5
    assert m.build["input"] == FOLDERS
    metas = _samples(tmp_path / "s")
    assert {x["path"].split("/")[0] for x in metas} == set(found.classes) and all(x["source"] is None for x in metas)


def test_classes_option_fixes_order_and_picks_a_subset(folders):
    found = scan(folders, classes=["zebra", "nested"])
    assert found.classes == ("zebra", "nested")
    assert {r.class_name for r in found.records} == {"zebra", "nested"}
    assert all(r.label == found.classes.index(r.class_name) for r in found.records)
    assert len(found.skipped) == 24 and all("not in --classes" in s["reason"] for s in found.skipped)


def test_class_folders_byte_identical_with_one_and_two_workers(phantom_raw, tmp_path):
    root = tmp_path / "many"
    films = _films(phantom_raw)
    for i in range(140):  # enough for two workers (64 images each at least); repeats are exact duplicates
        (root / ("left" if i % 3 else "right")).mkdir(parents=True, exist_ok=True)
        shutil.copy(films[i % len(films)], root / ("left" if i % 3 else "right") / f"{i}.png")
    a = build_shards(root, tmp_path / "a", shard_size=32, workers=1, progress=False)
    build_shards(root, tmp_path / "b", shard_size=32, workers=2, progress=False)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b") and a.counts["written"] == 140
    assert a.counts["duplicate_groups"] > 0  # repeats grouped, so never across splits


def _write_csv(path: Path, rows: list[dict], columns=("path", "label", "patient_id", "source", "notes")) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture()
def labelled(phantom_raw, tmp_path) -> tuple[Path, Path]:
    """A flat folder of films and a CSV: 3 films per patient, 2 sites, plus rows naming missing files."""
    root = tmp_path / "flat"
    root.mkdir()
    rows = []
    for i, film in enumerate(_films(phantom_raw)):
        shutil.copy(film, root / f"f{i:03d}.png")
        rows.append(
            {
                "path": f"f{i:03d}.png",
                "label": "covid" if "COVID" in film.name else "other",
                "patient_id": f"P{i // 3}",
                "source": "site-a" if i % 4 else "site-b",
                "notes": "x",
            }
        )
    rows.append({"path": "gone.png", "label": "covid", "patient_id": "P99", "source": "", "notes": ""})
    rows.append({"path": "../outside.png", "label": "covid", "patient_id": "", "source": "", "notes": ""})
    return root, _write_csv(tmp_path / "labels.csv", rows)


def test_label_csv_patients_never_cross_splits_and_counts_reconcile(labelled, tmp_path):
    root, labels = labelled
    found = scan(root, labels=labels)
    assert found.kind == CSV and found.classes == ("covid", "other")
    assert [s["path"] for s in found.skipped] == ["../outside.png", "gone.png"]
    assert "no such file" in found.skipped[1]["reason"] and "outside" in found.skipped[0]["reason"]
    m = build_shards(root, tmp_path / "s", labels=labels, shard_size=10, workers=1, progress=False)
    assert m.counts["scanned"] == m.counts["written"] + m.counts["skipped"] == 50
    metas = _samples(tmp_path / "s")
    split_of: dict[str, set] = {}
    for x in metas:
        split_of.setdefault(x["patient_id"], set()).add(x["split"])
    assert len(split_of) == 16 and all(len(s) == 1 for s in split_of.values())  # no patient in two splits
    assert m.build["split"]["by"] == "patient"
    sources = {
        s: sum(sum(c) for c in [m.split(x).sources.get(s, [0, 0]) for x in m.splits]) for s in ("site-a", "site-b")
    }
    assert sources == {"site-a": 36, "site-b": 12}
    assert {x["source"] for x in metas} == {"site-a", "site-b"}


def test_label_csv_errors_name_the_problem(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    with pytest.raises(SourceError, match=r"lacks the column\(s\) \['label'\]"):
        scan(root, labels=_write_csv(tmp_path / "bad.csv", [{"path": "a.png"}], columns=("path",)))


def test_split_by_source_keeps_each_source_in_one_split(labelled, tmp_path):
    root, labels = labelled
    m = build_shards(root, tmp_path / "s", labels=labels, split_by="source", shard_size=10, workers=1, progress=False)
    where: dict[str, set] = {}
    for x in _samples(tmp_path / "s"):
        where.setdefault(x["source"], set()).add(x["split"])
    assert all(len(s) == 1 for s in where.values()) and m.build["split"]["by"] == "source"


def test_compose_groups_unites_duplicates_and_keys():
    # 0-1 duplicates, 1-2 same patient, 3 alone, 4-5 same patient, 6 no key
    assert compose_groups([0, 0, 1, 2, 3, 4, 5], ["a", "b", "b", None, "c", "c", None]) == [0, 0, 0, 1, 2, 2, 3]


def test_source_names_from_urls():
    assert (
        source_name("https://www.github.com/ieee8023/covid-chestxray-dataset/")
        == "github.com/ieee8023/covid-chestxray-dataset"
    )
    assert (
        source_name("https://bimcv.cipf.es/bimcv-projects/bimcv-covid19/#1590858128006")
        == "bimcv.cipf.es/bimcv-projects/bimcv-covid19"
    )
    assert source_name("  ") is None and source_name(None) is None


def test_kaggle_metadata_sheets_give_each_film_its_source(phantom_raw, tmp_path):
    from openpyxl import Workbook

    raw = tmp_path / "raw"
    shutil.copytree(phantom_raw, raw)
    for name in ("COVID", "Normal"):
        book = Workbook()
        sheet = book.active
        sheet.append(["FILE NAME", "FORMAT", "SIZE", "URL"])
        for i, path in enumerate(sorted((raw / name / "images").glob("*.png"))):
            url = "https://sirm.org/covid" if name == "COVID" and i % 2 else f"https://{name.lower()}.example/set/"
            sheet.append([path.stem.upper(), "PNG", "299*299", url])  # the real sheets' case differs
        book.save(raw / f"{name}.metadata.xlsx")
    (raw / "Lung_Opacity.metadata.xlsx").write_bytes(b"not a workbook")
    (raw / "Viral Pneumonia.metadata.xlsx").unlink()
    found = scan(raw)
    assert found.kind == KAGGLE
    by_class: dict[str, set] = {}
    for r in found.records:
        by_class.setdefault(r.class_name, set()).add(r.source)
    assert by_class["COVID"] == {"sirm.org/covid", "covid.example/set"}
    assert by_class["Normal"] == {"normal.example/set"} and by_class["Lung_Opacity"] == {None}
    assert any("Lung_Opacity.metadata.xlsx not read" in n for n in found.notes)
    assert any("no Viral Pneumonia.metadata.xlsx" in n for n in found.notes)
    m = build_shards(raw, tmp_path / "s", shard_size=16, workers=1, progress=False)
    table = m.split("train").sources
    assert set(table) == {"covid.example/set", "normal.example/set", "sirm.org/covid", "unknown"}
    assert table["normal.example/set"][m.classes.index("Normal")] == m.split("train").class_counts[2]
