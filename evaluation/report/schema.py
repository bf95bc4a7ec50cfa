"""report.json's schema: every top-level key, its type and its meaning, in one dataclass.

`write_report` checks each report against it before anything is written (an unknown or
misspelt key, a missing result or a value of the wrong type is a bug, caught here and
in the tests), and docs/evaluation.md's key reference is generated from it
(`python -m evaluation.report.schema`; a test keeps it current). Sections stay plain
JSON objects; their own keys are described on their line.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, dataclass, fields

from train.config import field_docs


@dataclass
class Report:
    """The evaluation report (report.json): results first, then what they were measured on and audits."""

    samples: int
    """Films evaluated."""
    classes: list
    """The model's classes, in label order."""
    classes_evaluated: list
    """The classes with films in the evaluated split: macro averages run over these."""
    accuracy: float
    """Share of films whose most probable class is their label."""
    balanced_accuracy: float
    """Mean sensitivity over `classes_evaluated`."""
    macro_f1: float
    """Mean F1 over `classes_evaluated`."""
    macro_roc_auc: float | None
    """Mean one-vs-rest ROC-AUC over classes with positives and negatives (null when none has both)."""
    ci95: dict
    """95 % interval `[low, high]` of each headline metric (see "Headline metrics")."""
    bootstrap: dict
    """How the intervals were computed: `resamples`, `seed`, `stratified`."""
    ece: float
    """Expected calibration error, 15 equal-width bins of the top probability."""
    per_class: dict
    """Per class: `support`, `sensitivity`, `specificity`, `ppv` (= `precision`), `f1`, `roc_auc`, with `*_ci95`
    intervals (null where undefined)."""
    confusion_matrix: list
    """Counts, rows = true class, columns = predicted, in `classes` order."""
    confusion_matrix_normalized: list
    """The confusion matrix with each row divided by its count."""
    operating_points: dict
    """Per class and point (`youden`, `target_sensitivity`): the frozen threshold, test rates with intervals, and
    the validation rates it was chosen at."""
    split: str
    """The evaluated split: `test`, `val`, or `all` (external shard sets)."""
    limitations: list
    """Plain sentences on what the data and results do not support."""
    figures: dict
    """Figure name -> PNG file beside the report (confusion_matrix, roc, reliability, training_curves, gradcam,
    failures, copies)."""
    model_epoch: int | None = None
    """The epoch of the evaluated best model."""
    model_path: str | None = None
    """Its weights file."""
    data: dict | None = None
    """Facts about the shards: counts per split and class, sources, duplicates, split method."""
    training: dict | None = None
    """Facts about the training: model, precision, processes, batch, epochs, early stopping."""
    shards: str | list | None = None
    """The evaluated shard set (a run's several collections: each one's `name` and `path`)."""
    splits: list | None = None
    """The splits of `shards` read (`all`: every split)."""
    run: str | None = None
    """The run folder of the model."""
    title: str | None = None
    """External reports: the title of report.md."""
    external_test: dict | None = None
    """External reports: `name`, `run`, `shards`, `train_shards`."""
    training_overlap: dict | None = None
    """Evaluated films that copy training or validation films (exact and near), and the results without them."""
    per_collection: dict | None = None
    """Several collections: per collection, support, accuracy and per-class sensitivity with intervals (the
    headline pools them)."""
    per_source: dict | None = None
    """Per source (site; `collection/source` with several collections): support, accuracy and per-class
    sensitivity with intervals."""
    single_source_classes: list | None = None
    """Classes whose training films all come from one known source (the shortcut risk)."""
    probes: dict | None = None
    """Shortcut probes (`lungs_blanked`, `lungs_only`): metrics with intervals and their chance levels."""
    probe_verdict: str | None = None
    """The probes' verdict in one sentence."""
    failures: dict | None = None
    """Per true class, the most confident wrong predictions (key, predicted class, probability, source)."""
    lung_share: dict | None = None
    """Grad-CAM mass inside the lung masks, per class and `all` (mean and films)."""
    external: dict | None = None
    """Internal reports: the headline of every external report under `external/`."""


class ReportSchemaError(ValueError):
    """A report does not follow `Report` (a bug in the code that assembled it)."""


def _accepts(value: object, hint: object) -> bool:
    if hint is typing.Any:
        return True
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_accepts(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typing.get_origin(hint) or hint)  # type: ignore[arg-type]


def validate(report: dict) -> dict:
    """`report` itself when it follows `Report`; else ReportSchemaError naming every problem."""
    hints = typing.get_type_hints(Report)
    known = {f.name: f for f in fields(Report)}
    problems = [f"unknown key {k!r}" for k in report if k not in known]
    problems += [f"missing {n!r}" for n, f in known.items() if f.default is MISSING and n not in report]
    problems += [
        f"{k!r} is {type(v).__name__}, not {hints[k]}"
        for k, v in report.items()
        if k in known and not _accepts(v, hints[k])
    ]
    if problems:
        raise ReportSchemaError("report.json does not follow evaluation.report.schema.Report: " + "; ".join(problems))
    return report


def report_suffix(split: str, external: bool) -> str:
    """The suffix of a report's files: none for a run's test report and for external reports (one per
    folder), `_val` for a run's validation report."""
    return "" if split in ("test", "all") or external else f"_{split}"


def markdown() -> str:
    """report.json's key reference as a Markdown table (docs/evaluation.md; a test keeps it current)."""
    docs, hints = field_docs(Report), typing.get_type_hints(Report)
    rows = ["| key | type | always | meaning |", "| --- | --- | --- | --- |"]
    for f in fields(Report):
        kind = str(hints[f.name]).replace("<class '", "").replace("'>", "").replace("NoneType", "null")
        meaning = " ".join(docs.get(f.name, "").split())
        rows.append(f"| `{f.name}` | {kind} | {'yes' if f.default is MISSING else 'no'} | {meaning} |")
    return "\n".join(rows) + "\n"


__all__ = ["Report", "ReportSchemaError", "markdown", "report_suffix", "validate"]

if __name__ == "__main__":
    print(markdown(), end="")
