"""The report's external-test parts: section 5, the films that copy training films, the run's external table.

An external report (`RUN/external/<name>/`) says that it is one and how many of
its films copy training films (`train.overlap`), with the headline again
without them; the run's own report lists every external result it has.
"""

from __future__ import annotations

import json
from pathlib import Path

from train.bootstrap import fmt
from train.markdown import table as _table
from train.overlap import COPIES_SHOWN

EXTERNAL = "external"  # RUN/external/<name>/: external tests


def external_section(report: dict) -> list[str]:
    external = report.get("external") or {}
    lines = ["", "## 5. External test"]
    this = report.get("external_test")
    if this:
        return lines + [
            "",
            f"This report **is** an external test: the model of `{this['run']}` (trained on `{this['train_shards']}`) "
            f"on `{this['shards']}` ({this['name']}), classes mapped by name. Internal results: "
            "[the run's report](../../report.md).",
            *overlap_lines(report),
        ]
    if not external:
        return lines + [
            "",
            "None yet: results above are internal (films from the same collections as training). Run "
            "`python -m train.evaluate --run RUN --shards OTHER` on films from a source the model never saw.",
        ]
    rows = [
        [
            f"[{name}](external/{name}/report.md)",
            e["samples"],
            ", ".join(e["classes_evaluated"]),
            fmt(e["accuracy"], e["ci95"].get("accuracy")),
            fmt(e["balanced_accuracy"], e["ci95"].get("balanced_accuracy")),
            "not checked" if e.get("copies") is None else e["copies"],
        ]
        for name, e in external.items()
    ]
    header = ["shard set", "films", "classes", "accuracy", "balanced accuracy", "copies of training films"]
    return lines + ["", *_table(header, rows)]


def copies_of_training(report: dict) -> int | None:
    """How many external films copy training or validation films; None when not checked or not external."""
    o = report.get("training_overlap") or {}
    return o["exact"] + o["near"] if o.get("checked") else None


def _copy(n: int) -> str:
    return "copies a training or validation film" if n == 1 else "copy training or validation films"


def _near(o: dict) -> str:
    return "exact copies only" if o["near_distance"] is None else f"near: within {o['near_distance']} of 256 pHash bits"


def overlap_headline(overlap: dict) -> str:
    """One line: how many external films copy development films, and the accuracy without them."""
    if not overlap["checked"]:
        return "not checked against the training films (see the report)"
    n = overlap["exact"] + overlap["near"]
    line = f"{n} of {overlap['films']} films {_copy(n)} ({overlap['exact']} exact, {overlap['near']} near)"
    rest = overlap.get("without_copies")
    if rest:
        line += f"; without them: accuracy {fmt(rest['accuracy'], rest['ci95'].get('accuracy'))}"
    return line


def overlap_limitation(report: dict) -> str | None:
    """The limitation sentence about external films that are (or may be) development films; None if none."""
    o = report.get("training_overlap")
    if o and not o["checked"]:
        return "The external films were not checked against the training films: some may be training films."
    n = copies_of_training(report)
    if not n:
        return None
    if not o.get("without_copies"):
        return f"Every external film {_copy(1)}: this is not an external test."
    return (
        f"{n} external film{'s' * (n != 1)} {_copy(n)}: the external result above counts films the model was "
        "developed on (section 5 gives it without them)."
    )


def overlap_lines(report: dict) -> list[str]:
    """The external films checked against the development films, and the results without the copies."""
    o = report.get("training_overlap")
    if not o:
        return []
    if not o["checked"]:
        return ["", f"Overlap with the training films **not checked**: {o['reason']}."]
    n, films = copies_of_training(report), o["films"]
    against = f"the {o['reference_films']:,} {' and '.join(o['reference_splits'])} films"
    if not n:
        return [
            "",
            f"Overlap with the training films: no copy of {against} found among the {films} films ({_near(o)}; "
            "crops, flips and burned-in edits are not detected).",
        ]
    conflicts = f", {o['different_label']} of them labelled differently there" if o["different_label"] else ""
    lines = [
        "",
        f"Overlap with the training films: **{n} of {films} films ({n / films:.0%}) {_copy(n)}** (checked against "
        f"{against}: {o['exact']} exact, {o['near']} near{conflicts}; {_near(o)}); report.json lists them all "
        "under `training_overlap.copies`."
        + (
            " A near copy is a perceptual-hash match, a candidate: judge each pair by eye in the figure below."
            if o["near"]
            else ""
        ),
    ]
    listing = [
        [i, f"`{k}`", c["class"], f"`{c['reference_key']}`", c["reference_class"], c["kind"], c["bits"]]
        for i, (k, c) in enumerate(sorted(o["copies"].items())[:COPIES_SHOWN], 1)
    ]
    figure = (report.get("figures") or {}).get("copies")
    shown = ["", *_table(["#", "external film", "class", "copied film", "its class", "kind", "bits apart"], listing)]
    if figure:
        shown += [
            "",
            f"Each row of `{figure}`: the external film, then the film it copies.",
            "",
            f"![copies]({figure})",
        ]
    rest = o.get("without_copies")
    if not rest:
        return lines + ["", "**No film is left without a copy: this is not an external test.**", *shown]
    rows = [
        [label, r["samples"], ", ".join(r["classes_evaluated"])]
        + [fmt(r[m], r["ci95"].get(m)) for m in ("accuracy", "balanced_accuracy", "macro_f1")]
        for label, r in (("all films", report), ("without the copies", rest))
    ]
    return lines + ["", *_table(["films", "n", "classes", "accuracy", "balanced accuracy", "macro-F1"], rows), *shown]


def external_summaries(run_dir: Path) -> dict:
    """{name: headline} of every external report under RUN/external/."""
    out = {}
    for path in sorted((Path(run_dir) / EXTERNAL).glob("*/report.json")):
        r = json.loads(path.read_text())
        out[path.parent.name] = {
            key: r.get(key)
            for key in ("samples", "classes_evaluated", "accuracy", "balanced_accuracy", "macro_f1", "ci95", "split")
        }
        out[path.parent.name]["shards"] = r.get("shards")
        out[path.parent.name]["copies"] = copies_of_training(r)
    return out
