"""The report's external-test parts: section 5 and the run's table of external results.

An external report (`RUN/external/<name>/`) says that it is one and how many of
its films copy training films (`evaluation.report.overlap_section`); the run's own report
lists every external result it has.
"""

from __future__ import annotations

import json
from pathlib import Path

from evaluation.report.markdown import table as _table
from evaluation.report.overlap_section import copies_of_training, overlap_lines
from evaluation.statistics.bootstrap import fmt
from evaluation.statistics.registry import SUMMARY, SUMMARY_NAMES

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
            "`python -m evaluation --run RUN --shards OTHER` on films from a source the model never saw.",
        ]
    rows = [
        [
            f"[{name}](external/{name}/report.md)",
            e["samples"],
            ", ".join(e["classes_evaluated"]),
            *(fmt(e[m.name], e["ci95"].get(m.name)) for m in SUMMARY),
            "not checked" if e.get("copies") is None else e["copies"],
        ]
        for name, e in external.items()
    ]
    header = ["shard set", "films", "classes", *(m.label for m in SUMMARY), "copies of training films"]
    return lines + ["", *_table(header, rows)]


def external_summaries(run_dir: Path) -> dict:
    """{name: headline} of every external report under RUN/external/."""
    out = {}
    for path in sorted((Path(run_dir) / EXTERNAL).glob("*/report.json")):
        r = json.loads(path.read_text())
        out[path.parent.name] = {
            key: r.get(key) for key in ("samples", "classes_evaluated", *SUMMARY_NAMES, "ci95", "split")
        }
        out[path.parent.name]["shards"] = r.get("shards")
        out[path.parent.name]["copies"] = copies_of_training(r)
    return out
