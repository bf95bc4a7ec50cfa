"""Evaluate a run's best model and write the report a practitioner (and a reviewer) reads.

    python -m evaluation --run runs/demo [--split test|val]
    python -m evaluation --run runs/demo --shards shards/other_hospital [--split test|all] [--name NAME]
    accelerate launch --multi_gpu --num_processes 2 -m evaluation --run runs/demo

Internal evaluation writes into the run folder: report.json (every number),
report.md (laid out after CLAIM, see `evaluation.report.document`), predictions.jsonl and the
figures (confusion_matrix, roc, training_curves, reliability, gradcam and, with
wrong predictions, failures). `--shards OTHER` is an external test: another
shard set (another collection, or held-out sources), its classes mapped to the
model's by name (a subset is fine), evaluated once across ranks into
`RUN/external/<name>/`, and listed in the run's own report.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from pathlib import Path

from evaluation.report.schema import report_suffix, validate
from evaluation.statistics.registry import SUMMARY

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from accelerate import Accelerator

from evaluation.audits import facts, overlap, probes, sources
from evaluation.explain.gallery import confident_failures, explain_split
from evaluation.report import plots
from evaluation.report.document import compare_runs, limitations, report_markdown
from evaluation.report.external_section import EXTERNAL, external_summaries
from evaluation.report.overlap_section import overlap_headline
from evaluation.statistics import operating
from evaluation.statistics.bootstrap import fmt
from evaluation.statistics.metrics import classification_report
from evaluation.target import (
    EvaluationInputError,
    ExternalShardsError,
    Target,
    class_lut,
    needs_masks,
    open_run_data,
    predict_target,
    run_probes,
)
from pipeline.collection import open_collections
from pipeline.read import load_shard_manifest, split_digest
from sharding.manifest import ManifestError
from train.card import TrainedModel, load_trained_model
from train.checkpoint import BEST_PTH, atomic_write
from train.config import Config, load_config
from train.predictions import Predictions
from train.presets import build_split_loader


def write_report(
    out_dir: Path,
    split: str,
    preds: Predictions,
    classes,
    extra: dict,
    bootstrap: int = 2000,
    seed: int = 0,
    points: dict | None = None,
    training_curves: bool = True,
    images: dict | None = None,
) -> dict:
    """report.json (checked against evaluation.report.schema), report.md, predictions and the figures
    (`images`: name -> PIL image, e.g. gradcam, failures, copies); returns the report dict."""
    report = classification_report(preds.labels, preds.probs, classes, bootstrap=bootstrap, seed=seed)
    report["operating_points"] = operating.apply(preds.labels, preds.probs, classes, points or {}, bootstrap, seed)
    report.update(extra)
    report["split"] = split
    report["limitations"] = limitations(report)
    suffix = report_suffix(split, "external_test" in extra)
    figures = {
        "confusion_matrix": plots.confusion_matrix_figure(
            report["confusion_matrix"], classes, out_dir / f"confusion_matrix{suffix}.png", split
        ),
        "roc": plots.roc_figure(preds.labels, preds.probs, classes, out_dir / f"roc{suffix}.png", split),
        "reliability": plots.reliability_figure(preds.labels, preds.probs, out_dir / f"reliability{suffix}.png", split),
    }
    if training_curves:
        figures["training_curves"] = plots.training_curves_figure(
            out_dir / "metrics.jsonl", out_dir / "training_curves.png"
        )
    for name in (n for n in ("gradcam", "failures", "copies") if n in (images or {})):
        images[name].save(out_dir / f"{name}{suffix}.png")
        figures[name] = out_dir / f"{name}{suffix}.png"
    report["figures"] = {k: str(v.name) for k, v in figures.items() if v is not None}
    _write_json_and_markdown(out_dir, suffix, validate(report))
    predictions = [
        {"key": k, "label": int(y), "probs": [round(float(p), 6) for p in row]}
        for k, y, row in zip(preds.keys, preds.labels, preds.probs)
    ]
    atomic_write(
        out_dir / f"predictions{suffix}.jsonl",
        lambda tmp: tmp.write_text("".join(json.dumps(p) + "\n" for p in predictions)),
    )
    return report


def _write_json_and_markdown(out_dir: Path, suffix: str, report: dict) -> None:
    atomic_write(
        out_dir / f"report{suffix}.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2, sort_keys=True))
    )
    text = report_markdown(report, report["split"], out_dir)
    atomic_write(out_dir / f"report{suffix}.md", lambda tmp: tmp.write_text(text))


def _train_data_at(shards, classes):
    """The model's training collections, or None where they cannot be read (moved, deleted)."""
    try:
        return open_collections(shards, classes)
    except (ValueError, OSError):  # ManifestError and CollectionError are ValueErrors
        return None


def report_extras(
    run_dir: Path, trained: TrainedModel, cfg: Config, target: Target, preds: Predictions, probe_preds: dict
) -> tuple[dict, dict]:
    """Everything beyond the metrics (rank 0): (report entries: data and training facts, sources, probes,
    failures, lung share; images: the Grad-CAM, failure and copies galleries)."""
    classes, images = list(trained.card.classes), {}
    seed, resamples = cfg.train.seed, cfg.eval.bootstrap_resamples
    extra: dict = {
        "model_epoch": trained.card.epoch,
        "model_path": str(run_dir / "models" / BEST_PTH),
        "data": facts.data_facts(target.data),
        "training": facts.training_facts(run_dir, trained.card, cfg),
        "shards": target.shards,
        "splits": list(target.splits),
    }
    extra["run"] = str(run_dir)
    if target.external:
        extra["title"] = f"External test on {target.external} ({target.split_name})"
        extra["external_test"] = {
            "name": target.external,
            "run": str(run_dir),
            "shards": target.shards,
            "train_shards": target.train_shards,
        }
    check_overlap = bool(target.external) or "train" not in target.splits
    refs = [target.data.split_shards(s, cfg.data.verify_checksums) for s in target.splits]
    # the films' provenance came with their pixels; shards built before build version 3 store no pHash
    films = overlap.predicted_films(preds, classes, refs)
    if films is None and check_overlap:
        films = overlap.film_hashes([r for split in refs for r in split], cfg.data.cache_dir)
    if check_overlap:
        # internal splits too: the build groups exact duplicates, near ones only with --near-dup-distance
        extra["training_overlap"], copies = overlap.training_overlap(
            cfg,
            target.train_shards or cfg.data.shards,
            trained.card.train_digest,
            films,
            preds,
            classes,
            exclude=() if target.external else target.splits,
        )
        if copies is not None:
            images["copies"] = copies
    site_of = dict(zip(preds.keys, sources.qualified_sources(preds)))
    if target.data.mixed:  # each collection's results, then its sources within it
        extra["per_collection"] = sources.per_source(
            preds.keys, preds.labels, preds.probs, dict(zip(preds.keys, preds.collections)), classes, resamples, seed
        )
    if set(site_of.values()) - {sources.UNKNOWN}:
        extra["per_source"] = sources.per_source(
            preds.keys, preds.labels, preds.probs, site_of, classes, resamples, seed
        )
    train_data = target.data if not target.external else _train_data_at(target.train_shards, classes)
    extra["single_source_classes"] = sources.single_source_classes(train_data) if train_data else []
    if probe_preds:
        extra["probes"] = {
            name: probes.probe_result(p.labels, p.probs, resamples, seed) for name, p in probe_preds.items()
        }
        extra["probe_verdict"] = probes.verdict(extra["probes"], sorted(set(preds.labels.tolist())))
    if cfg.eval.gradcam_per_class > 0:
        extra["failures"] = confident_failures(preds, classes, cfg.eval.gradcam_per_class, site_of)
        loaders = [
            build_split_loader(cfg, s, collections=target.data, num_workers=min(cfg.data.num_workers, 2), train=False)
            for s in target.splits
        ]
        explained = explain_split(
            trained, itertools.chain(*loaders), classes, cfg.eval.gradcam_per_class, extra["failures"], target.lut
        )
        images["gradcam"] = explained.pop("grid")
        if "failures_grid" in explained:
            images["failures"] = explained.pop("failures_grid")
        extra.update(explained)
    if not target.external:
        extra["external"] = external_summaries(run_dir)
    return extra, images


def evaluate_target(
    run_dir: Path, trained: TrainedModel, cfg: Config, target: Target, accelerator: Accelerator
) -> dict | None:
    """Predict on every rank, then rank 0 writes the report into `target.out_dir` and returns it."""
    preds = predict_target(trained, cfg, target, accelerator)
    probe_preds = run_probes(trained, cfg, target, accelerator)
    if not accelerator.is_main_process:
        return None
    target.out_dir.mkdir(parents=True, exist_ok=True)
    extra, images = report_extras(run_dir, trained, cfg, target, preds, probe_preds)
    report = write_report(
        target.out_dir,
        target.split_name,
        preds,
        list(trained.card.classes),
        extra,
        cfg.eval.bootstrap_resamples,
        cfg.train.seed,
        trained.card.operating_points,
        training_curves=not target.external,
        images=images,
    )
    _print_headline(report, target)
    return report


def _print_headline(report: dict, target: Target) -> None:
    ci = report["ci95"]
    where = target.split_name if not target.external else f"{target.external} ({target.split_name})"
    figures = "  ".join(f"{m.label} {fmt(report[m.name], ci.get(m.name))}" for m in SUMMARY)
    print(f"{where}: {figures}  ({report['samples']} films; 95 % CI)")
    share = (report.get("lung_share") or {}).get("all", {}).get("mean")
    if share is not None:
        print(f"{where}: Grad-CAM lung share (mean, all classes) {share:.3f}")
    if report.get("probe_verdict"):
        print(f"{where}: {report['probe_verdict']}")
    overlap = report.get("training_overlap")
    if overlap:
        print(f"{where}: {overlap_headline(overlap)}")
    suffix = report_suffix(target.split_name, bool(target.external))
    print(f"report: {target.out_dir / f'report{suffix}.md'}")


def evaluate_run(
    run_dir: Path,
    split: str = "test",
    accelerator: Accelerator | None = None,
    cfg: Config | None = None,
    shards: str | None = None,
) -> dict | None:
    """Evaluate best_model on the run's own `split` across all ranks; rank 0 writes and returns the report."""
    run_dir = Path(run_dir)
    cfg = cfg or load_config(run_dir / "config.yaml")
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    shards = shards or cfg.data.shards
    data = open_run_data(shards, cfg.data.classes)
    if not data.samples(split):
        raise EvaluationInputError(f"{shards} has no {split} films to evaluate; rebuild the shards from more films")
    trained = load_trained_model(run_dir / "models" / BEST_PTH, accelerator.device)
    needs_masks(trained.cfg, data, str(shards))
    target = Target(data, (split,), run_dir, split)
    return evaluate_target(run_dir, trained, cfg, target, accelerator)


def external_name(shards: str) -> str:
    """A folder name for an external shard set: its last path component, made filesystem-safe."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(shards).rstrip("/").rsplit("/", 1)[-1]).strip("._")
    return name or EXTERNAL


def evaluate_external(
    run_dir: Path,
    shards: str,
    split: str = "test",
    name: str | None = None,
    accelerator: Accelerator | None = None,
    train_shards: str | None = None,
) -> dict | None:
    """Evaluate the run's model on another shard set into RUN/external/<name>/ and list it in the run's report.

    `train_shards` (default: the run's `data.shards`) are the films the external ones are checked against."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    data = open_collections(shards)
    manifest = data.manifest
    trained = load_trained_model(run_dir / "models" / BEST_PTH, accelerator.device)
    lut = class_lut(list(trained.card.classes), list(manifest.classes), str(shards))
    splits = tuple(s for s in manifest.splits if manifest.split(s).samples) if split == "all" else (split,)
    if not splits or split != "all" and (split not in manifest.splits or not manifest.split(split).samples):
        raise ExternalShardsError(f"{shards} has no {split} films; use --split all to evaluate every film")
    name = external_name(name or shards)  # a name, never a path out of RUN/external
    needs_masks(trained.cfg, data, str(shards))
    train_shards = train_shards or cfg.data.shards
    target = Target(data, splits, run_dir / EXTERNAL / name, split, lut, name, train_shards)
    report = evaluate_target(run_dir, trained, cfg, target, accelerator)
    if report is not None and (run_dir / "report.json").exists():
        update_run_report(run_dir)
    return report


def update_run_report(run_dir: Path) -> None:
    """Re-render the run's report.{json,md} with the current external results (and their limitations)."""
    report = json.loads((run_dir / "report.json").read_text())
    report["external"] = external_summaries(run_dir)
    report["limitations"] = limitations(report)
    _write_json_and_markdown(run_dir, "", report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation", description="Evaluate a run's best model and write its report."
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="RUN",
        help="print a side-by-side table of finished runs' reports instead of evaluating",
    )
    parser.add_argument("--run", help="run folder (holds config.yaml and models/)")
    parser.add_argument(
        "--split", default="test", choices=("val", "test", "all"), help="all: every film (external shards only)"
    )
    parser.add_argument(
        "--shards",
        default=None,
        help="another shard set for an external test, into RUN/external/NAME/ (the run's own shards, e.g. "
        "moved, are evaluated as usual)",
    )
    parser.add_argument("--name", default=None, help="the external set's name (default: the --shards folder name)")
    parser.add_argument(
        "--train-shards",
        default=None,
        help="where the run's training shards are now, if moved (external films are checked against them)",
    )
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
    if args.train_shards and not args.shards:
        parser.error("--train-shards goes with an external test (--shards OTHER)")
    run_dir = Path(args.run)
    if not (run_dir / "config.yaml").exists() or not (run_dir / "models" / BEST_PTH).exists():
        print(f"error: {run_dir} is not a finished run (needs config.yaml and models/{BEST_PTH})", file=sys.stderr)
        return 2
    try:
        if args.shards and not same_shard_set(args.shards, run_dir):
            evaluate_external(run_dir, args.shards, args.split, args.name, train_shards=args.train_shards)
        elif args.split == "all":
            parser.error("--split all is for an external shard set (--shards OTHER)")
        else:
            evaluate_run(run_dir, args.split, shards=args.shards)
    except (EvaluationInputError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def same_shard_set(shards: str, run_dir: Path) -> bool:
    """Whether `shards` are the run's own: the same path, or a copy whose train split is the one the model trained on
    (its digest in best_model.json; cards without one fall back to the build fingerprint of the run's shards)."""
    run_shards = load_config(run_dir / "config.yaml").data.shards
    if not isinstance(run_shards, str):  # several collections: one other shard set is never all of them
        return False
    if Path(shards).resolve() == Path(run_shards).resolve():
        return True
    other = load_shard_manifest(shards)
    card = json.loads((run_dir / "models" / BEST_PTH).with_suffix(".json").read_text())
    if card.get("train_digest"):
        return "train" in other.splits and split_digest(other, "train") == card["train_digest"]
    run_data = _train_data_at(run_shards, None)
    fingerprint = run_data.manifest.build.get("fingerprint") if run_data is not None else None
    return bool(fingerprint) and other.build.get("fingerprint") == fingerprint


if __name__ == "__main__":
    sys.exit(main())
