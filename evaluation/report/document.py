"""The evaluation report in markdown, laid out after CLAIM's items (Mongan et al. 2020).

Sections: data (sources, counts per split and class, duplicates, split method
and level), model and training, results (headline with intervals, per class,
operating points, calibration, per source, confusion matrix), explanations and
shortcut probes, failures, external results, limitations. Every number comes
from the report dict (`report.json`); this module only lays it out, and
`limitations` turns what the data and results show into plain sentences.
`compare_runs` reads finished reports back; the external-test parts live in
`evaluation.report.external_section`.
"""

from __future__ import annotations

import json
from pathlib import Path

from evaluation.audits.probes import PROBES
from evaluation.report.external_section import external_section
from evaluation.report.markdown import table as _table
from evaluation.report.overlap_section import internal_overlap_section, overlap_limitation
from evaluation.report.schema import report_suffix
from evaluation.statistics.bootstrap import fmt
from evaluation.statistics.registry import NAMES, SUMMARY_NAMES
from pipeline.provenance import UNKNOWN

#: Sources whose names mark a pediatric collection (the Kaggle release's Normal and Viral Pneumonia films).
PEDIATRIC_HINTS = ("pediatric", "paediatric", "chest-xray-pneumonia", "paultimothymooney", "guangzhou")
#: Below this many test films a class's interval is too wide to read much into.
SMALL_SUPPORT = 100
SPLITS = ("train", "val", "test")


def data_section(data: dict) -> list[str]:
    if not data:
        return []
    classes = data["classes"]
    asked = data.get("split_requested")
    requested = ""
    if asked not in (None, data["split_level"]):
        requested = f" ({asked} asked for; the input has no {asked} identifiers)"
    if data.get("collections"):
        where = "Collections, mixed in every training epoch by weight: " + "; ".join(
            f"**{name}** `{c['shards']}` (weight {c['weight']:g}, input: {c.get('input')}, "
            f"{c.get('dataset') or 'unnamed collection'})"
            for name, c in data["collections"].items()
        )
    else:
        where = f"Shards `{data['shards']}` (input: {data.get('input')}, {data.get('dataset') or 'unnamed collection'})"
    lines = [
        "## 1. Data",
        "",
        f"{where}. Split {data.get('fractions')} by **{data['split_level']}**{requested}; "
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
    precision = "fp32 (no mixed precision)" if t["precision"] == "no" else f"mixed precision {t['precision']}"
    n, accum = t.get("processes"), t.get("grad_accum") or 1
    steps = f" × {accum} accumulated steps" if accum > 1 else ""
    devices = f" × {n} process{'es' * (n != 1)}{steps} (global batch {n * accum * t['batch_size']})" if n else ""

    return [
        "## 2. Model and training",
        "",
        f"{t['model']} ({t.get('weights', 'random init')}, "
        f"{t['in_chans']} input channel) at {t['image_size']} px from {t['stored_size']} px films; "
        f"{t['optimizer']} lr {t['lr']} ({t['scheduler']} schedule), batch {t['batch_size']} "
        f"per device{devices}, {precision}, seed {t['seed']}. Training {stop}; the model is "
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
        f"{boot.get('seed')}; where the bootstrap gives accuracy, balanced accuracy or a class rate no width "
        "(30 of 30 right) the Wilson interval replaces it; macro-F1 and ROC-AUC keep the bootstrap's)"
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
    rows = [[k, fmt(report.get(k), ci.get(k))] for k in NAMES]
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
    rows, missed = [], []
    for name, by_point in points.items():
        for point, m in by_point.items():
            val = m.get("validation") or {}
            target = val.get("target")
            rows.append(
                [
                    name,
                    point if target is None else f"sensitivity ≥ {target:.2f}",
                    f"{m['threshold']:.3f}",
                    fmt(val.get("sensitivity"), None),
                    fmt(val.get("specificity"), None),
                    fmt(m["sensitivity"], m.get("sensitivity_ci95")),
                    fmt(m["specificity"], m.get("specificity_ci95")),
                ]
            )
            if target is not None and m["sensitivity"] < target:
                ci = m.get("sensitivity_ci95")
                where = "" if ci is None else ", interval wholly below" if ci[1] < target else ", within its interval"
                missed.append(f"{name} {fmt(m['sensitivity'], ci, 3)}{where}")
    header = ["class", "point", "threshold", "val. sensitivity", "val. specificity"]
    lines = [
        "",
        f"### Operating points (chosen on validation, frozen, applied to {split})",
        "",
        "A film is flagged for a class when its probability reaches the class's threshold; the thresholds were "
        f"fixed on the validation films before the {split} films were seen.",
        "",
        *_table(header + [f"{split} sensitivity", f"{split} specificity"], rows),
    ]
    if missed:
        lines += [
            "",
            f"Below the sensitivity target on {split}, though met on validation: {'; '.join(missed)}. A threshold "
            "fixed on validation films carries over only as far as those films resemble these; where the interval "
            "lies wholly below the target, choose the threshold on more (or more representative) films before "
            "relying on it.",
        ]
    return lines


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
    for key, what in (("per_collection", "collection"), ("per_source", "source")):
        if report.get(key):
            lines += ["", f"### Results per {what} ({split})", "", *_table(*group_table(report, key, what))]
    return lines


def group_table(report: dict, key: str, what: str) -> tuple[list, list]:
    """(header, rows) of a per-collection or per-source table: films, accuracy, sensitivity per class."""
    classes = report["classes"]
    rows = []
    for name, m in report[key].items():
        cells = [
            fmt(m["per_class"][c]["sensitivity"], m["per_class"][c]["sensitivity_ci95"])
            + f" (n={m['per_class'][c]['support']})"
            if c in m["per_class"]
            else ""
            for c in classes
        ]
        rows.append([name, m["support"], fmt(m["accuracy"], m["accuracy_ci95"]), *cells])
    return [what, "films", "accuracy (95 % CI)", *(f"sensitivity {c}" for c in classes)], rows


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
    where = "evaluated" if report.get("split") == "all" else report.get("split", "test")
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
    if overlap_limitation(report):
        out.append(overlap_limitation(report))
    if external_test:
        out += external_limitations(report)
    if data.get("masks_predicted"):
        who = f" {data['lung_model'][:12]}" if data.get("lung_model") else ""
        out.append(
            f"The lung masks of {data['masks_predicted']} films of these shards were predicted by the segmenter{who} "
            "(sharding build --lung-model), not drawn: the probes, the lung share and any lung crop are as good as "
            "its masks (python -m train.lungs evaluate gives its Dice)."
        )
    if (report.get("probes") or {}).get("lungs_blanked", {}).get("shortcut"):
        out.append("The shortcut probe fires: part of the accuracy comes from outside the lungs.")
    if not report.get("external") and not external_test:
        out.append(
            "No external test: performance on another hospital's films is unknown (10+ points lower is typical)."
        )
    return out


def external_limitations(report: dict) -> list[str]:
    """What limits an external test: where its films come from, and what could not be checked on them."""
    out = []
    listed = {s: r for s, r in (report.get("per_source") or {}).items() if r.get("support")}
    sources = {s: r for s, r in listed.items() if s != UNKNOWN and not s.endswith("/" + UNKNOWN)}
    unnamed = report["samples"] - sum(r["support"] for r in sources.values())
    if unnamed:
        which = "The evaluated films name" if not sources else f"{unnamed} of the evaluated films name"
        out.append(
            f"{which} no source: whether they come from one hospital or several, and how each does, is unknown "
            "(a label CSV with a source column records it)."
        )
    if len(sources) == 1 and not unnamed:
        out.append(
            f"All {report['samples']} evaluated films come from one source ({next(iter(sources))}): this is "
            "one site's result, and another hospital can differ from it as much as it differs from the training data."
        )
    elif len(sources) > 1:
        single = {
            c: [s for s, r in sources.items() if (r.get("per_class") or {}).get(c, {}).get("support")]
            for c, m in report["per_class"].items()
            if m["support"]
        }
        if single and all(len(v) == 1 for v in single.values()):
            pairs = ", ".join(f"{c} from {v[0]}" for c, v in single.items())
            out.append(
                f"Each class of this set comes from one source ({pairs}): its per-class results mix the class "
                "with its site."
            )
    if not (report.get("probes") or {}).get("lungs_blanked"):
        out.append(
            "These films carry no lung masks: the shortcut probe and the Grad-CAM lung share could not be measured "
            "on them (build the shards with --include-masks from masks that come with the films)."
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
        *internal_overlap_section(report),
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
        + " ".join(
            f"![{k}]({v})" for k, v in sorted((report.get("figures") or {}).items()) if k not in ("failures", "copies")
        ),
        "",
    ]
    return "\n".join(lines)


def compare_runs(run_dirs: list[Path], split: str = "test") -> str:
    """Markdown table of headline metrics, shortcut probes and Grad-CAM lung share of finished runs, side by side."""
    suffix = report_suffix(split, external=False)
    reports = {str(d): json.loads((Path(d) / f"report{suffix}.json").read_text()) for d in run_dirs}
    classes = next(iter(reports.values()))["classes"]
    rows = list(SUMMARY_NAMES)
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
