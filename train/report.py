"""The evaluation report in markdown, laid out after CLAIM's items (Mongan et al. 2020).

Sections: data (sources, counts per split and class, duplicates, split method
and level), model and training, results (headline with intervals, per class,
operating points, calibration, per source, confusion matrix), explanations and
shortcut probes, failures, external results, limitations. Every number comes
from the report dict (`report.json`); this module only lays it out, and
`limitations` turns what the data and results show into plain sentences.
`external_summaries` and `compare_runs` read finished reports back.
"""

from __future__ import annotations

import json
from pathlib import Path

from train.bootstrap import fmt
from train.probes import PROBES

#: Sources whose names mark a pediatric collection (the Kaggle release's Normal and Viral Pneumonia films).
PEDIATRIC_HINTS = ("pediatric", "paediatric", "chest-xray-pneumonia", "paultimothymooney", "guangzhou")
#: Below this many test films a class's interval is too wide to read much into.
SMALL_SUPPORT = 100
SPLITS = ("train", "val", "test")
COPIES_SHOWN = 10  # external films copying training films listed in report.md (report.json has all)
EXTERNAL = "external"  # RUN/external/<name>/: external tests


def _table(header: list[str], rows: list[list]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
    ]


def data_section(data: dict) -> list[str]:
    if not data:
        return []
    classes = data["classes"]
    asked = data.get("split_requested")
    requested = ""
    if asked not in (None, data["split_level"]):
        requested = f" ({asked} asked for; the input has no {asked} identifiers)"
    lines = [
        "## 1. Data",
        "",
        f"Shards `{data['shards']}` (input: {data.get('input')}, {data.get('dataset') or 'unnamed collection'}). "
        f"Split {data.get('fractions')} by **{data['split_level']}**{requested}; "
        f"largest class deviation from the target fractions: {data.get('max_class_deviation')} films. "
        f"Duplicate groups: {data['duplicate_groups']} ({data['duplicate_images']} films, "
        f"{data['mixed_label_groups']} with different labels), each kept inside one split.",
        "",
    ]
    counts = data["class_counts"]
    rows = [[name] + [counts.get(s, [0] * len(classes))[c] for s in SPLITS] for c, name in enumerate(classes)]
    lines += _table(["class", *SPLITS], rows)
    sources = data.get("sources") or {}
    if sources:
        lines += ["", "Films per source and class (train / val / test):", ""]
        rows = [
            [src] + ["/".join(str(by_split.get(s, [0] * len(classes))[c]) for s in SPLITS) for c in range(len(classes))]
            for src, by_split in sources.items()
        ]
        lines += _table(["source", *classes], rows)
    return lines + [""]


def training_section(training: dict) -> list[str]:
    if not training:
        return []
    t = training
    ran = f"{t['epochs_run']} of {t['epochs_planned']} epochs (patience {t['patience']})"
    stop = f"stopped early after {ran}" if t["early_stopped"] else f"ran all {ran}"

    return [
        "## 2. Model and training",
        "",
        f"{t['model']} ({t.get('weights', 'random init')}, "
        f"{t['in_chans']} input channel) at {t['image_size']} px from {t['stored_size']} px films; "
        f"{t['optimizer']} lr {t['lr']} ({t['scheduler']} schedule), batch {t['batch_size']} "
        f"per device, precision {t['precision']}, seed {t['seed']}. Training {stop}; the model is "
        f"epoch {t['best_epoch']}, chosen by {t['monitor']} = {fmt(t['monitor_value'], None, 3)} "
        f"on validation. Full config: `config.yaml` in the run folder.",
        "",
    ]


def headline_section(report: dict, split: str) -> list[str]:
    ci = report.get("ci95", {})
    boot = report.get("bootstrap", {})
    films = f"{report['samples']} films (all splits)" if split == "all" else f"{report['samples']} {split} films"
    intervals = (
        f"Values with 95 % confidence intervals (stratified bootstrap, {boot['resamples']} resamples, seed "
        f"{boot.get('seed')}; a rate of exactly 0 or 1 gets its Wilson interval, where the bootstrap has no width)"
        if boot.get("resamples")
        else "No confidence intervals (eval.bootstrap_resamples=0)"
    )
    lines = [
        "## 3. Results",
        "",
        f"{films}. {intervals}; macro averages over the classes with films here: "
        f"{', '.join(report.get('classes_evaluated', report['classes']))}.",
        "",
    ]
    rows = [[k, fmt(report.get(k), ci.get(k))] for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_roc_auc")]
    rows.append(["ece (calibration, 15 bins)", fmt(report.get("ece"), None, 3)])
    lines += _table(["metric", "value (95 % CI)"], rows) + [""]
    rows = []
    for name in report["classes"]:
        m = report["per_class"][name]
        if not m["support"]:
            rows.append([name, f"no {split} films", "", "", "", 0])
            continue
        cells = [fmt(m[k], m.get(f"{k}_ci95")) for k in ("sensitivity", "specificity", "ppv", "roc_auc")]
        rows.append([name, *cells, m["support"]])
    return lines + _table(["class", "sensitivity", "specificity", "PPV", "ROC-AUC", "films"], rows)


def operating_section(report: dict, split: str) -> list[str]:
    points = report.get("operating_points") or {}
    if not points:
        return []
    rows = [
        [
            name,
            point,
            f"{m['threshold']:.3f}",
            fmt(m["sensitivity"], m.get("sensitivity_ci95")),
            fmt(m["specificity"], m.get("specificity_ci95")),
        ]
        for name, by_point in points.items()
        for point, m in by_point.items()
    ]
    return [
        "",
        f"### Operating points (chosen on validation, frozen, applied to {split})",
        "",
        "A film is flagged for a class when its probability reaches the class's threshold.",
        "",
        *_table(["class", "point", "threshold", "sensitivity", "specificity"], rows),
    ]


def source_section(report: dict, split: str) -> list[str]:
    lines = []
    single = report.get("single_source_classes") or []
    if single:
        lines += [
            "",
            f"**Warning: {', '.join(single)} came from a single source in training.** The model may "
            "recognise the source (scanner, hospital, markers, borders), not the disease; test it on a source "
            "it never saw before trusting these numbers.",
        ]
    per = report.get("per_source")
    if not per:
        return lines
    classes = report["classes"]
    rows = []
    for name, m in per.items():
        cells = [
            fmt(m["per_class"][c]["sensitivity"], m["per_class"][c]["sensitivity_ci95"])
            + f" (n={m['per_class'][c]['support']})"
            if c in m["per_class"]
            else ""
            for c in classes
        ]
        rows.append([name, m["support"], fmt(m["accuracy"], m["accuracy_ci95"]), *cells])
    header = ["source", "films", "accuracy (95 % CI)", *(f"sensitivity {c}" for c in classes)]
    return lines + ["", f"### Results per source ({split})", "", *_table(header, rows)]


def confusion_section(report: dict) -> list[str]:
    classes = report["classes"]
    rows = [[name, *row] for name, row in zip(classes, report["confusion_matrix"])]
    return [
        "",
        "Confusion matrix (rows: true class, columns: predicted):",
        "",
        *_table(["true \\ predicted", *classes], rows),
    ]


def explanation_section(report: dict, split: str) -> list[str]:
    lines = ["", "## 4. Explanations and shortcut probes"]
    share = report.get("lung_share")
    if share:
        rows = [[n, f"{s['mean']:.3f}", f"{s['p10']:.3f}", s["n"]] for n, s in share.items() if s["n"]]
        lines += [
            "",
            "Grad-CAM mass inside the lung mask: a low share means the model reads markers, borders or "
            "artefacts instead of lungs.",
            "",
            *_table(["class", "mean lung share", "10th percentile", "films"], rows),
        ]
    probes = report.get("probes")
    verdict = report.get("probe_verdict", "")
    if probes:
        rows = [["full film", fmt(report["accuracy"], report["ci95"].get("accuracy")), ""]]
        rows[0].append(fmt(report["balanced_accuracy"], report["ci95"].get("balanced_accuracy")))
        for key, label in PROBES.items():
            p = probes[key]
            rows.append(
                [
                    label,
                    fmt(p["accuracy"], p["ci95"]["accuracy"]),
                    f"{p['chance']['accuracy']:.2f}",
                    fmt(p["balanced_accuracy"], p["ci95"]["balanced_accuracy"]),
                ]
            )
        rows[0][2] = rows[1][2]
        lines += [
            "",
            f"Shortcut probes on the {split} films: blanked pixels take the mean of the film's kept pixels.",
            "",
            *_table(["input", "accuracy (95 % CI)", "chance", "balanced accuracy (95 % CI)"], rows),
            "",
            f"Balanced-accuracy chance level: {probes['lungs_blanked']['chance']['balanced_accuracy']:.2f}. "
            + (f"**{verdict}**" if probes["lungs_blanked"]["shortcut"] else verdict),
        ]
    if not share and not probes:
        lines += ["", f"No lung masks in these shards: no lung share and no shortcut probes ({split})."]
    return lines


def failure_section(report: dict) -> list[str]:
    failures = report.get("failures")
    if not failures:
        return []
    rows = [
        [true, f["key"], f["predicted"], f"{f['confidence']:.3f}", f.get("source", "")]
        for true, items in failures.items()
        for f in items
    ]
    if not rows:
        return ["", "### Failure gallery", "", "No wrong predictions."]
    return [
        "",
        "### Failure gallery: the most confident wrong predictions per class",
        "",
        *_table(["true class", "key", "predicted", "confidence", "source"], rows),
        "",
        f"![failures]({report['figures']['failures']})" if (report.get("figures") or {}).get("failures") else "",
    ]


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
    """How many external films copy training films (exact or near); None when not checked or not external."""
    o = report.get("training_overlap") or {}
    return o["exact"] + o["near"] if o.get("checked") else None


def overlap_headline(overlap: dict) -> str:
    """One line: how many external films copy training films, and the accuracy without them."""
    if not overlap["checked"]:
        return "not checked against the training films (see the report)"
    n = overlap["exact"] + overlap["near"]
    line = f"{n} of {overlap['films']} films {_copy(n)} ({overlap['exact']} exact, {overlap['near']} near)"
    rest = overlap.get("without_copies")
    if rest:
        line += f"; without them: accuracy {fmt(rest['accuracy'], rest['ci95'].get('accuracy'))}"
    return line


def _copy(n: int) -> str:
    return "copies a training film" if n == 1 else "copy training films"


def overlap_lines(report: dict) -> list[str]:
    """The external films checked against the training films, and the results without the copies."""
    o = report.get("training_overlap")
    if not o:
        return []
    if not o["checked"]:
        return ["", f"Overlap with the training films **not checked**: {o['reason']}."]
    n, films = copies_of_training(report), o["films"]
    near = f"near: pHash within {o['near_distance']} of 256 bits" if o["near_distance"] is not None else "exact only"
    if not n:
        return [
            "",
            f"Overlap with the training films: none of the {films} films copies one of the "
            f"{o['train_films']} training films ({near}).",
        ]
    lines = [
        "",
        f"Overlap with the training films: **{n} of {films} films ({n / films:.0%}) {_copy(n)}** "
        f"({o['exact']} exact, {o['near']} near; {near}); report.json lists them all under "
        "`training_overlap.copies`. The results above count them; without them:",
    ]
    shown = list(o["copies"].items())[:COPIES_SHOWN]
    listing = [[f"`{k}`", f"`{c['train_key']}`", c["kind"], c["bits"]] for k, c in shown]
    listing = ["", *_table(["external film", "training film", "kind", "bits apart"], listing)]
    rest = o.get("without_copies")
    if not rest:
        return lines[:-1] + [
            "",
            f"Overlap with the training films: **all {films} films copy training films**: "
            "this is not an external test.",
        ]
    rows = [
        [label, r["samples"], *(fmt(r[m], r["ci95"].get(m)) for m in ("accuracy", "balanced_accuracy", "macro_f1"))]
        for label, r in (("all films", report), ("without the copies", rest))
    ]
    return lines + ["", *_table(["films", "n", "accuracy", "balanced accuracy", "macro-F1"], rows), *listing]


def limitations(report: dict) -> list[str]:
    """Plain sentences about what limits these results, from what the data and results show."""
    out = []
    single = report.get("single_source_classes") or []
    if single:
        out.append(f"{', '.join(single)}: every training film came from one source; source and label are confounded.")
    data = report.get("data") or {}
    pediatric = [s for s in (data.get("sources") or {}) if any(h in s.lower() for h in PEDIATRIC_HINTS)]
    if pediatric:
        out.append(
            f"Films from a pediatric collection ({', '.join(pediatric)}) sit beside adult films: the model can "
            "separate children from adults instead of diseases."
        )
    where = "these" if report.get("split") == "all" else report.get("split", "test")
    small = [f"{n} ({m['support']})" for n, m in report["per_class"].items() if 0 < m["support"] < SMALL_SUPPORT]
    if small:
        out.append(f"Few {where} films for {', '.join(small)}: their intervals are wide.")
    absent = [n for n, m in report["per_class"].items() if not m["support"]]
    if absent:
        out.append(f"No {where} films for {', '.join(absent)}: nothing is known about them from this report.")
    external_test = bool(report.get("external_test"))
    if data.get("split_level") == "sample" and not external_test:
        out.append(
            "No patient identifiers: the split is by film (exact and near duplicates grouped), so one patient's "
            "films can sit on both sides of it and inflate the results."
        )
    overlap = report.get("training_overlap")
    if overlap and not overlap["checked"]:
        out.append("The external films were not checked against the training films: some may be training films.")
    elif copies_of_training(report):
        n = copies_of_training(report)
        out.append(
            f"{n} external film{'s' * (n != 1)} {_copy(n)}: the external result above is partly a "
            "training result (section 5 gives it without them)."
        )
    if (report.get("probes") or {}).get("lungs_blanked", {}).get("shortcut"):
        out.append("The shortcut probe fires: part of the accuracy comes from outside the lungs.")
    if not report.get("external") and not external_test:
        out.append(
            "No external test: performance on another hospital's films is unknown (10+ points lower is typical)."
        )
    return out


def report_markdown(report: dict, split: str, run_dir: Path) -> str:
    title = report.get("title") or f"Evaluation on the {split} split"
    lines = [
        f"# {title} ({report['samples']} films)",
        "",
        f"Run: `{report.get('run', run_dir)}`, model epoch {report.get('model_epoch')}.",
        "",
        *data_section(report.get("data") or {}),
        *training_section(report.get("training") or {}),
        *headline_section(report, split),
        *operating_section(report, split),
        "",
        f"Calibration: expected calibration error {fmt(report.get('ece'), None, 3)} (reliability diagram below).",
        *source_section(report, split),
        *confusion_section(report),
        *explanation_section(report, split),
        *failure_section(report),
        *external_section(report),
        "",
        "## 6. Limitations",
        "",
        *(f"- {s}" for s in report.get("limitations") or limitations(report)),
        "",
        "Figures: "
        + " ".join(f"![{k}]({v})" for k, v in sorted((report.get("figures") or {}).items()) if k != "failures"),
        "",
    ]
    return "\n".join(lines)


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


def compare_runs(run_dirs: list[Path], split: str = "test") -> str:
    """Markdown table of headline metrics, shortcut probes and Grad-CAM lung share of finished runs, side by side."""
    suffix = "" if split == "test" else f"_{split}"
    reports = {str(d): json.loads((Path(d) / f"report{suffix}.json").read_text()) for d in run_dirs}
    classes = next(iter(reports.values()))["classes"]
    rows = ["accuracy", "macro_f1", "balanced_accuracy"]
    rows += [f"{p} balanced_accuracy" for p in PROBES] + [f"lung share {c}" for c in classes + ["all"]]
    lines = ["| metric | " + " | ".join(f"`{d}`" for d in reports) + " |", "| --- |" + " --- |" * len(reports)]
    for row in rows:
        cells = []
        for report in reports.values():
            name = row.split(" ", 1)[0]
            ci = None
            if row.startswith("lung share"):
                value = (report.get("lung_share") or {}).get(row.split(" ", 2)[2], {}).get("mean")
            elif name in PROBES:
                probe = (report.get("probes") or {}).get(name, {})
                value, ci = probe.get("balanced_accuracy"), (probe.get("ci95") or {}).get("balanced_accuracy")
            else:
                value, ci = report.get(row), (report.get("ci95") or {}).get(row)
            cells.append("n/a" if value is None else fmt(value, ci) if ci else f"{value:.3f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
