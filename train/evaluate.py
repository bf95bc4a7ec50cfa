"""Evaluate a run's best model on a split and write the report a practitioner reads.

    python -m train.evaluate --run runs/demo [--split test] [--shards DIR]
    accelerate launch --multi_gpu --num_processes 2 -m train.evaluate --run runs/demo

Writes into the run folder: report.json (every number), report.md (tables),
and figures: confusion_matrix.png, roc.png, training_curves.png,
reliability.png, gradcam.png (with the lung-mask outline when the shards
carry masks) and, with masks, the Grad-CAM lung share per class.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from sharding.grid import image_grid
from train import explain, operating, plots, sources
from train.bootstrap import fmt
from train.card import TrainedModel, load_trained_model
from train.checkpoint import BEST_PTH, atomic_write
from train.config import Config, load_config
from train.loop import Predictions, predict_split
from train.metrics import classification_report
from train.presets import build_split_loader


def explain_split(trained: TrainedModel, cfg: Config, shards: str, split: str, classes, per_class: int) -> dict:
    """Grad-CAM over the whole split (one process): lung shares and a grid of examples."""
    augment, device, model = trained.augment, trained.device, trained.net
    loader = build_split_loader(cfg, split, shards=shards, num_workers=min(cfg.data.num_workers, 2))
    shares, labels = [], []
    picks: dict[tuple[int, bool], list] = {}
    for batch in loader:
        batch = batch.to(device)
        images, _ = augment(batch.images, batch.masks)  # masks: data.mask_lungs needs them
        preds = model(images).argmax(1).tolist()
        cams = explain.gradcam(model, images)
        masks = None
        if batch.masks is not None:
            masks = F.interpolate(batch.masks.float(), size=cams.shape[-2:], mode="nearest").squeeze(1).cpu().numpy()
            shares.append(explain.lung_share(cams, masks))
            labels.append(batch.labels.cpu().numpy())
        small = F.interpolate(batch.images.float(), size=cams.shape[-2:], mode="bilinear").squeeze(1).cpu().numpy()
        for i, (label, pred) in enumerate(zip(batch.labels.tolist(), preds)):
            slot = picks.setdefault((label, label == pred), [])
            if len(slot) < per_class:
                slot.append(
                    (explain.overlay(small[i], cams[i]), None if masks is None else masks[i], f"{classes[pred]}")
                )
    rows, outlines = [], []
    for c, name in enumerate(classes):
        good, bad = picks.get((c, True), []), picks.get((c, False), [])
        rows.append((f"{name}\n{len(good)} right | {len(bad)} wrong", [p[0] for p in good + bad]))
        outlines.append([p[1] for p in good + bad])
    result: dict = {"grid": image_grid(rows, tile=150, label_width=150, outlines=outlines)}
    if shares:
        result["lung_share"] = explain.summarize_shares(np.concatenate(shares), np.concatenate(labels), classes)
    return result


def _per_source_markdown(report: dict, split: str) -> list[str]:
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
    lines += [
        "",
        f"## Results per source ({split})",
        "",
        "| source | films | accuracy (95 % CI) | " + " | ".join(f"sensitivity {c}" for c in classes) + " |",
        "| --- | --- | --- |" + " --- |" * len(classes),
    ]
    for name, m in per.items():
        cells = [
            fmt(m["per_class"][c]["sensitivity"], m["per_class"][c]["sensitivity_ci95"])
            + f" (n={m['per_class'][c]['support']})"
            if c in m["per_class"]
            else ""
            for c in classes
        ]
        lines.append(
            f"| {name} | {m['support']} | {fmt(m['accuracy'], m['accuracy_ci95'])} | " + " | ".join(cells) + " |"
        )
    return lines


def report_markdown(report: dict, split: str, run_dir: Path) -> str:
    classes = report["classes"]
    ci = report.get("ci95", {})
    boot = report.get("bootstrap", {})
    lines = [
        f"# Evaluation on the {split} split ({report['samples']} images)",
        "",
        f"Run: `{run_dir}`, model epoch {report.get('model_epoch')}. Values with 95 % confidence intervals "
        f"(stratified bootstrap, {boot.get('resamples', 0)} resamples, seed {boot.get('seed')}); macro averages over "
        f"the classes with {split} samples: {', '.join(report.get('classes_evaluated', classes))}.",
        "",
        "| metric | value (95 % CI) |",
        "| --- | --- |",
    ]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_roc_auc"):
        lines.append(f"| {key} | {fmt(report.get(key), ci.get(key))} |")
    lines.append(f"| ece | {fmt(report.get('ece'), None, 3)} |")
    lines += [
        "",
        "| class | sensitivity | specificity | PPV | ROC-AUC | support |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in classes:
        m = report["per_class"][name]
        if not m["support"]:
            lines.append(f"| {name} | no {split} samples | | | | 0 |")
            continue
        cells = [fmt(m[k], m.get(f"{k}_ci95")) for k in ("sensitivity", "specificity", "ppv", "roc_auc")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['support']} |")
    points = report.get("operating_points") or {}
    if points:
        lines += [
            "",
            f"## Operating points (chosen on validation, frozen, applied to {split})",
            "",
            "A film is flagged for a class when its probability reaches the class's threshold.",
            "",
            "| class | point | threshold | sensitivity | specificity |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, by_point in points.items():
            for point, m in by_point.items():
                lines.append(
                    f"| {name} | {point} | {m['threshold']:.3f} | "
                    f"{fmt(m['sensitivity'], m.get('sensitivity_ci95'))} | "
                    f"{fmt(m['specificity'], m.get('specificity_ci95'))} |"
                )
    lines += _per_source_markdown(report, split)
    lines += [
        "",
        "Confusion matrix (rows: true class, columns: predicted):",
        "",
        "| true \\ predicted | " + " | ".join(classes) + " |",
        "| --- |" + " --- |" * len(classes),
    ]
    for name, row in zip(classes, report["confusion_matrix"]):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    share = report.get("lung_share")
    if share:
        lines += [
            "",
            "## Where the model looks: Grad-CAM mass inside the lung mask",
            "",
            "A low share means the model reads markers, borders or artefacts instead of lungs.",
            "",
            "| class | mean lung share | 10th percentile | images |",
            "| --- | --- | --- | --- |",
        ]
        for name, s in share.items():
            if s["n"]:
                lines.append(f"| {name} | {s['mean']:.3f} | {s['p10']:.3f} | {s['n']} |")
    lines += [
        "",
        "Figures: ![confusion](confusion_matrix.png) ![roc](roc.png) ![curves](training_curves.png) "
        "![reliability](reliability.png) ![gradcam](gradcam.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(
    run_dir: Path,
    split: str,
    preds: Predictions,
    classes,
    extra: dict,
    bootstrap: int = 2000,
    seed: int = 0,
    points: dict | None = None,
) -> dict:
    """report.json, report.md and the figures; returns the report dict."""
    report = classification_report(preds.labels, preds.probs, classes, bootstrap=bootstrap, seed=seed)
    report["operating_points"] = operating.apply(preds.labels, preds.probs, classes, points or {}, bootstrap, seed)
    report.update({k: v for k, v in extra.items() if k != "grid"})
    report["split"] = split
    suffix = "" if split == "test" else f"_{split}"
    figures = {
        "confusion_matrix": plots.confusion_matrix_figure(
            report["confusion_matrix"], classes, run_dir / f"confusion_matrix{suffix}.png", split
        ),
        "roc": plots.roc_figure(preds.labels, preds.probs, classes, run_dir / f"roc{suffix}.png", split),
        "reliability": plots.reliability_figure(preds.labels, preds.probs, run_dir / f"reliability{suffix}.png", split),
        "training_curves": plots.training_curves_figure(run_dir / "metrics.jsonl", run_dir / "training_curves.png"),
    }
    if "grid" in extra:
        extra["grid"].save(run_dir / f"gradcam{suffix}.png")
        figures["gradcam"] = run_dir / f"gradcam{suffix}.png"
    report["figures"] = {k: str(v.name) for k, v in figures.items() if v is not None}
    atomic_write(
        run_dir / f"report{suffix}.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2, sort_keys=True))
    )
    atomic_write(run_dir / f"report{suffix}.md", lambda tmp: tmp.write_text(report_markdown(report, split, run_dir)))
    predictions = [
        {"key": k, "label": int(y), "probs": [round(float(p), 6) for p in row]}
        for k, y, row in zip(preds.keys, preds.labels, preds.probs)
    ]
    atomic_write(
        run_dir / f"predictions{suffix}.jsonl",
        lambda tmp: tmp.write_text("".join(json.dumps(p) + "\n" for p in predictions)),
    )
    return report


def evaluate_run(
    run_dir: Path,
    split: str = "test",
    accelerator: Accelerator | None = None,
    cfg: Config | None = None,
    shards: str | None = None,
) -> dict | None:
    """Evaluate best_model on `split` across all ranks; rank 0 writes and returns the report."""
    run_dir = Path(run_dir)
    cfg = cfg or load_config(run_dir / "config.yaml")
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    shards = shards or cfg.data.shards
    model_path = run_dir / "models" / BEST_PTH
    trained = load_trained_model(model_path, accelerator.device)
    loader = build_split_loader(
        cfg,
        split,
        shards=shards,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        pin_memory=accelerator.device.type == "cuda",
    )
    classes = list(loader.manifest.classes)
    preds = predict_split(trained.net, loader, trained.augment, accelerator)
    expected = loader.manifest.split(split).samples
    if len(preds.keys) != expected:
        raise RuntimeError(f"evaluation counted {len(preds.keys)} samples, the manifest lists {expected}")
    if not accelerator.is_main_process:
        return None
    extra: dict = {"model_epoch": trained.card.epoch, "model_path": str(model_path)}
    site_of = sources.sample_sources(loader.urls, cfg.data.cache_dir)
    if set(site_of.values()) - {sources.UNKNOWN}:
        extra["per_source"] = sources.per_source(
            preds.keys, preds.labels, preds.probs, site_of, classes, cfg.eval.bootstrap_resamples, cfg.train.seed
        )
    extra["single_source_classes"] = sources.single_source_classes(loader.manifest)
    if cfg.eval.gradcam_per_class > 0:
        extra.update(explain_split(trained, cfg, shards, split, classes, cfg.eval.gradcam_per_class))
    report = write_report(
        run_dir,
        split,
        preds,
        classes,
        extra,
        cfg.eval.bootstrap_resamples,
        cfg.train.seed,
        trained.card.operating_points,
    )
    ci = report["ci95"]
    print(
        f"{split}: accuracy {fmt(report['accuracy'], ci.get('accuracy'))}  macro-F1 "
        f"{fmt(report['macro_f1'], ci.get('macro_f1'))}  balanced accuracy "
        f"{fmt(report['balanced_accuracy'], ci.get('balanced_accuracy'))}  ({report['samples']} images; 95 % CI)"
    )
    share = (report.get("lung_share") or {}).get("all", {}).get("mean")
    if share is not None:
        print(f"{split}: Grad-CAM lung share (mean, all classes) {share:.3f}")
    print(f"report: {run_dir / ('report.md' if split == 'test' else f'report_{split}.md')}")
    return report


def compare_runs(run_dirs: list[Path], split: str = "test") -> str:
    """Markdown table of headline metrics and Grad-CAM lung share of finished runs, side by side."""
    suffix = "" if split == "test" else f"_{split}"
    reports = {str(d): json.loads((Path(d) / f"report{suffix}.json").read_text()) for d in run_dirs}
    classes = next(iter(reports.values()))["classes"]
    rows = ["accuracy", "macro_f1", "balanced_accuracy"] + [f"lung share {c}" for c in classes + ["all"]]
    lines = ["| metric | " + " | ".join(f"`{d}`" for d in reports) + " |", "| --- |" + " --- |" * len(reports)]
    for row in rows:
        cells = []
        for report in reports.values():
            if row.startswith("lung share"):
                value = (report.get("lung_share") or {}).get(row.split(" ", 2)[2], {}).get("mean")
            else:
                value = report.get(row)
            cells.append("n/a" if value is None else f"{value:.3f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate a run's best model and write its report.")
    parser.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="RUN",
        help="print a side-by-side table of finished runs' reports instead of evaluating",
    )
    parser.add_argument("--run", help="run folder (holds config.yaml and models/)")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--shards", default=None, help="shard folder/URL (default: the run's data.shards)")
    args = parser.parse_args(argv)
    if args.compare:
        missing = [d for d in args.compare if not (Path(d) / "report.json").exists()]
        if missing:
            print(f"error: no report.json in {missing}; evaluate those runs first", file=sys.stderr)
            return 2
        print(compare_runs([Path(d) for d in args.compare], args.split), end="")
        return 0
    if not args.run:
        parser.error("--run is required (or --compare RUN RUN ...)")
    run_dir = Path(args.run)
    if not (run_dir / "config.yaml").exists() or not (run_dir / "models" / BEST_PTH).exists():
        print(f"error: {run_dir} is not a finished run (needs config.yaml and models/{BEST_PTH})", file=sys.stderr)
        return 2
    evaluate_run(run_dir, args.split, shards=args.shards)
    return 0


if __name__ == "__main__":
    sys.exit(main())
