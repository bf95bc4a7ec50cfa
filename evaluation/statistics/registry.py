"""The headline metrics: one registry that every table, comparison, external row and printout reads.

Adding a metric means adding it here (and computing it in `metrics.classification_report` with its
interval in `bootstrap.bootstrap_ci`); the report's tables, `--compare`, the external-test rows, the
results without copies of training films and the printed headline follow.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """One headline metric of a report."""

    name: str  # its key in report.json (and in report.json's ci95)
    label: str  # how tables and the printed headline name it
    summary: bool  # shown in the compact tables (external tests, without copies, --compare, printout)
    interval: str  # how its 95 % interval is computed
    meaning: str  # one line for the docs


#: In the order tables show them; the printed headline shows the summary ones in this order.
HEADLINE: tuple[Metric, ...] = (
    Metric(
        "accuracy",
        "accuracy",
        True,
        "stratified bootstrap percentile; Wilson's interval at N films where the bootstrap has no width",
        "share of films whose most probable class is their label",
    ),
    Metric(
        "macro_f1",
        "macro-F1",
        True,
        "stratified bootstrap percentile",
        "mean F1 over the classes with films in the evaluated split",
    ),
    Metric(
        "balanced_accuracy",
        "balanced accuracy",
        True,
        "stratified bootstrap percentile; Wilson's at the effective count where the bootstrap has no width",
        "mean sensitivity over the classes with films in the evaluated split",
    ),
    Metric(
        "macro_roc_auc",
        "macro ROC-AUC",
        False,
        "stratified bootstrap percentile",
        "mean one-vs-rest ROC-AUC over the classes with both positives and negatives",
    ),
)

NAMES: tuple[str, ...] = tuple(m.name for m in HEADLINE)
SUMMARY: tuple[Metric, ...] = tuple(m for m in HEADLINE if m.summary)
SUMMARY_NAMES: tuple[str, ...] = tuple(m.name for m in SUMMARY)


def markdown() -> str:
    """The headline metrics as a Markdown table (docs/evaluation.md holds it; a test keeps it current)."""
    rows = [
        "| key in report.json | shown as | in compact tables | 95 % interval | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    rows += [
        f"| `{m.name}` | {m.label} | {'yes' if m.summary else 'no'} | {m.interval} | {m.meaning} |" for m in HEADLINE
    ]
    return "\n".join(rows) + "\n"


__all__ = ["HEADLINE", "Metric", "NAMES", "SUMMARY", "SUMMARY_NAMES", "markdown"]

if __name__ == "__main__":
    print(markdown(), end="")
