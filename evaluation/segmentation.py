"""How well a lung segmenter draws the lungs: per-film Dice and IoU on splits with drawn masks, 95 % intervals.

The masks are made by `sharding.segmenter.Segmenter.masks`, the function `sharding build --lung-model`
runs, on one thread as there, at the films' stored side, against the shards' drawn masks; each film is
scored once. The interval is the percentile bootstrap of the mean over films (2,000 resamples,
`seeds.BOOTSTRAP`). Films whose drawn mask is empty have no mask (`mask_missing`) and are counted, not scored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evaluation.statistics.bootstrap import interval, resample_indices
from pipeline.loader import build_loader, load_shard_manifest
from sharding import seeds
from sharding.contract import SPLITS
from sharding.segmenter import Scores, check_drawn_masks, load_segmenter, score_batches

#: The worst films listed per split: where a reader looks first.
WORST = 5


def mean_with_interval(values: np.ndarray, seed: int = 0, resamples: int = 2000) -> dict:
    """{"mean", "ci95"} of per-film values: percentile bootstrap of the mean (ci95 None with under 2 films)."""
    if len(values) == 0:
        return {"mean": None, "ci95": None}
    ci = None
    if len(values) > 1:
        idx = resample_indices(np.zeros(len(values), np.int64), resamples, seeds.rng(seed, seeds.BOOTSTRAP))
        ci = interval(values[idx].mean(axis=1))
    return {"mean": float(values.mean()), "ci95": ci}


def evaluate_segmenter(model: str | Path, shards: str, splits: tuple[str, ...], num_workers: int = 2) -> dict:
    """{"model", "sha256", "shards", "splits": {split: {"films", "no_mask", "dice", "iou", "worst"}}}."""
    check_drawn_masks(load_shard_manifest(shards), str(shards))
    segmenter = load_segmenter(model)
    out: dict = {"model": str(model), "sha256": segmenter.sha256, "shards": str(shards), "splits": {}}
    for split in splits:
        parts = [
            score_batches(
                segmenter,
                build_loader(shards, s, batch_size=64, num_workers=num_workers, masks=True, train=False),
                threads=1,
            )
            for s in (SPLITS if split == "all" else (split,))
        ]
        scores = Scores(
            [k for p in parts for k in p.keys],
            np.concatenate([p.dice for p in parts]),
            np.concatenate([p.iou for p in parts]),
            sum(p.no_mask for p in parts),
        )
        order = np.argsort(scores.dice, kind="stable")[:WORST]
        out["splits"][split] = {
            "films": len(scores.dice),
            "no_mask": scores.no_mask,
            "dice": mean_with_interval(scores.dice),
            "iou": mean_with_interval(scores.iou),
            "worst": [[scores.keys[i], round(float(scores.dice[i]), 4)] for i in order],
        }
    return out


def _fmt(stat: dict) -> str:
    if stat["mean"] is None:
        return "—"
    ci = stat["ci95"]
    return f"{stat['mean']:.3f}" + ("" if ci is None else f" ({ci[0]:.3f}–{ci[1]:.3f})")


def table(report: dict) -> str:
    """A Markdown table of a report: one row per split."""
    lines = [
        f"segmenter {report['model']} (sha256 {report['sha256'][:12]}) on {report['shards']}",
        "",
        "| split | films scored | without a drawn mask | Dice (95 % CI) | IoU (95 % CI) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for split, s in report["splits"].items():
        lines.append(f"| {split} | {s['films']} | {s['no_mask']} | {_fmt(s['dice'])} | {_fmt(s['iou'])} |")
    return "\n".join(lines)


__all__ = ["evaluate_segmenter", "mean_with_interval", "table"]
