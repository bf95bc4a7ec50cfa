"""How the report shows films that copy the films the model was developed on (`evaluation.audits.overlap`).

Internal reports check the evaluated split against the other splits (the
build groups exact duplicates, and near ones only with `--near-dup-distance`);
external reports check every film against the training and validation films.
Either way the report counts the copies, repeats the headline without them,
lists them and shows them beside the films they copy.
"""

from __future__ import annotations

from evaluation.audits.overlap import COPIES_SHOWN
from evaluation.report.markdown import table as _table
from evaluation.statistics.bootstrap import fmt
from evaluation.statistics.registry import SUMMARY

_SPLIT_WORDS = {"train": "training", "val": "validation", "test": "test"}


def copies_of_training(report: dict) -> int | None:
    """How many evaluated films copy reference films (exact or near); None when not checked."""
    o = report.get("training_overlap") or {}
    return o["exact"] + o["near"] if o.get("checked") else None


def _films(report: dict) -> str:
    """'external films' or 'test films': what was checked."""
    return "external films" if report.get("external_test") else f"{report.get('split', 'test')} films"


def _copy(n: int, overlap: dict) -> str:
    kinds = " or ".join(_SPLIT_WORDS.get(s, s) for s in overlap.get("reference_splits") or ["train"])
    return f"copies a {kinds} film" if n == 1 else f"copy {kinds} films"


def overlap_headline(overlap: dict) -> str:
    """One line: how many films copy reference films, and the accuracy without them."""
    if not overlap["checked"]:
        return "not checked against the training films (see the report)"
    n = overlap["exact"] + overlap["near"]
    line = f"{n} of {overlap['films']} films {_copy(n, overlap)} ({overlap['exact']} exact, {overlap['near']} near)"
    rest = overlap.get("without_copies")
    if rest:
        line += f"; without them: accuracy {fmt(rest['accuracy'], rest['ci95'].get('accuracy'))}"
    return line


def overlap_limitation(report: dict) -> str | None:
    """The limitation sentence about evaluated films that are (or may be) development films; None if none."""
    o = report.get("training_overlap")
    what = _films(report)
    if o and not o["checked"]:
        return f"The {what} were not checked against the training films: some may be training films."
    n = copies_of_training(report)
    if not n:
        return None
    if not o.get("without_copies"):
        return f"Every one of the {what} {_copy(1, o)}: this is no independent test."
    external = bool(report.get("external_test"))
    fix = "" if external or not o["near"] else " `sharding build --near-dup-distance D` keeps near copies in one split."
    return (
        f"{n} {what[:-1] if n == 1 else what} {_copy(n, o)}: the results above count films the model was developed "
        f"on (section {5 if external else 1} gives them without those).{fix}"
    )


def internal_overlap_section(report: dict) -> list[str]:
    """Section 1's subsection for an internal report: the evaluated split against the run's other splits."""
    if report.get("external_test") or not report.get("training_overlap"):
        return []
    heading = f"### {report.get('split', 'test').capitalize()} films against the training films"
    return [heading, *overlap_lines(report), ""]


def overlap_lines(report: dict) -> list[str]:
    """The evaluated films checked against the reference films, and the results without the copies."""
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
            f"Overlap with the training films: no copy of {against} found among the {films} films "
            f"({_near(o)}; crops, flips and burned-in edits are not detected).",
        ]
    conflicts = f", {o['different_label']} of them labelled differently there" if o["different_label"] else ""
    candidates = " A near copy is a perceptual-hash match, a candidate: judge each pair by eye below."
    lines = [
        "",
        f"Overlap with the training films: **{n} of {films} films ({n / films:.0%}) {_copy(n, o)}** (checked "
        f"against {against}: {o['exact']} exact, {o['near']} near{conflicts}; {_near(o)}); report.json lists "
        f"them all under `training_overlap.copies`.{candidates if o['near'] else ''}",
    ]
    listing = [
        [i, f"`{k}`", c["class"], f"`{c['reference_key']}`", c["reference_class"], c["kind"], c["bits"]]
        for i, (k, c) in enumerate(sorted(o["copies"].items())[:COPIES_SHOWN], 1)
    ]
    figure = (report.get("figures") or {}).get("copies")
    shown = ["", *_table(["#", "film", "class", "copied film", "its class", "kind", "bits apart"], listing)]
    if figure:
        shown += ["", f"Each row of `{figure}`: the film, then the film it copies.", "", f"![copies]({figure})"]
    rest = o.get("without_copies")
    if not rest:
        return lines + ["", "**No film is left without a copy: this is no independent test.**", *shown]
    rows = [
        [label, r["samples"], ", ".join(r["classes_evaluated"])]
        + [fmt(r[m.name], r["ci95"].get(m.name)) for m in SUMMARY]
        for label, r in (("all films", report), ("without the copies", rest))
    ]
    return lines + ["", *_table(["films", "n", "classes", *(m.label for m in SUMMARY)], rows), *shown]


def _near(o: dict) -> str:
    return "exact copies only" if o["near_distance"] is None else f"near: within {o['near_distance']} of 256 pHash bits"
