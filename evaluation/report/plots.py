"""Figures of a run: confusion matrix, ROC curves, training curves, reliability diagram."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def confusion_matrix_figure(cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str) -> Path:
    cm = np.asarray(cm)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, data, fmt, sub in ((axes[0], cm, "d", "counts"), (axes[1], norm, ".2f", "row-normalised (recall)")):
        ConfusionMatrixDisplay(data, display_labels=list(classes)).plot(
            ax=ax, cmap="Blues", values_format=fmt, colorbar=False, xticks_rotation=30
        )
        ax.set_title(f"{title}: {sub}")
    return _save(fig, path)


def roc_figure(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for c, name in enumerate(classes):
        positives = labels == c
        if 0 < positives.sum() < len(labels):
            RocCurveDisplay.from_predictions(positives, probs[:, c], name=name, ax=ax)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(f"{title}: one-vs-rest ROC")
    return _save(fig, path)


def training_curves_figure(metrics_jsonl: Path, path: Path) -> Path | None:
    if not metrics_jsonl.exists():
        return None
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    axes[0].plot(epochs, [r["val_loss"] for r in rows], "o-", label="val")
    axes[0].set_title("loss")
    axes[1].plot(epochs, [r["train_accuracy"] for r in rows], "o-", label="train")
    axes[1].plot(epochs, [r["val_accuracy"] for r in rows], "o-", label="val")
    axes[1].set_title("accuracy")
    axes[2].plot(epochs, [r["val_macro_f1"] for r in rows], "o-", color="C2", label="val")
    axes[2].set_title("macro-F1")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def reliability_figure(labels: np.ndarray, probs: np.ndarray, path: Path, title: str, bins: int = 15) -> Path:
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    acc = np.array([correct[which == b].mean() if (which == b).any() else np.nan for b in range(bins)])
    count = np.bincount(which, minlength=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.bar(centers, np.nan_to_num(acc), width=1 / bins, edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    for x, n in zip(centers, count):
        if n:
            ax.text(x, 0.02, str(n), ha="center", fontsize=6, rotation=90)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}: reliability diagram")
    ax.legend(loc="upper left")
    return _save(fig, path)
