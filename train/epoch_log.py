"""What an epoch reports: its metrics.jsonl line, its console lines, its TensorBoard scalars (rank 0)."""

from __future__ import annotations

from accelerate import Accelerator

from train.config import Config
from train.loop import EarlyStopping


def epoch_row(epoch: int, result, val, scores: dict, lr: float) -> dict:
    """One line of metrics.jsonl."""
    return {
        "epoch": epoch,
        "train_loss": result.loss,
        "train_accuracy": result.accuracy,
        "val_loss": val.loss,
        "val_accuracy": scores["accuracy"],
        "val_macro_f1": scores["macro_f1"],
        "val_balanced_accuracy": scores["balanced_accuracy"],
        "lr": lr,
        "img_per_s": result.images_per_s,
        "data_wait_frac": result.data_wait_frac,
        "epoch_s": result.seconds,
        "rank_steps": result.rank_steps,
        "train_samples_seen": result.samples_seen,
        "train_samples_repeated": result.samples_repeated,
    }


def report_epoch(
    accelerator: Accelerator,
    cfg: Config,
    row: dict,
    stopper: EarlyStopping,
    improved: bool,
    n_train: int,
    partial: bool,
) -> None:
    """The epoch's line (and the mix's); `partial`: an epoch not meant to see every sample (capped, or a mix)."""
    accelerator.print(
        f"epoch {row['epoch']:3d}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.3f} | "
        f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.3f} f1 {row['val_macro_f1']:.3f} | "
        f"{row['img_per_s']:.0f} img/s, data wait {100 * row['data_wait_frac']:.1f}% | "
        f"{row['train_samples_seen']}/{n_train} train samples"
        + ("  *best*" if improved else f"  ({stopper.bad_epochs}/{stopper.patience} without improvement)")
    )
    if len(row.get("collections") or {}) > 1 or cfg.data.balance != "none":
        accelerator.print("          " + mix_summary(row["collections"], row.get("val_collections")))
    if row["train_samples_seen"] < n_train and not partial:
        accelerator.print(
            f"warning: epoch {row['epoch']} trained on {row['train_samples_seen']} of {n_train} train "
            "samples (corrupt shards were skipped: see the warnings above and "
            "`python -m sharding verify`)"
        )


def mix_summary(collections: dict, val: dict | None) -> str:
    """One line per epoch: each collection's draws, distinct films of its size, strata draws, val accuracy."""
    parts = []
    for name, c in collections.items():
        strata = c["strata"]
        shown = "" if list(strata) == ["all"] else " [" + " ".join(f"{k} {v['drawn']}" for k, v in strata.items()) + "]"
        acc = f", val acc {val[name]['accuracy']:.3f}" if val and name in val else ""
        parts.append(f"{name}: {c['drawn']} drawn, {c['distinct']}/{c['size']} distinct{shown}{acc}")
    return " | ".join(parts)


def scalars(row: dict) -> dict:
    """A metrics line as TensorBoard scalars: numbers as they are, each collection's counts and validation
    accuracy under their own tags (TensorBoard takes numbers only)."""
    out = {f"epoch/{k}": v for k, v in row.items() if k != "epoch" and isinstance(v, (int, float))}
    for name, c in (row.get("collections") or {}).items():
        out[f"collections/{name}/drawn"], out[f"collections/{name}/distinct"] = c["drawn"], c["distinct"]
    for name, v in (row.get("val_collections") or {}).items():
        out[f"collections/{name}/val_accuracy"] = v["accuracy"]
    return out
