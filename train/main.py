"""Train a ResNet18 (any timm model) on radstream shards, on 1 CPU to many GPUs.

Launch (from the repository root):

    # one GPU, bf16
    accelerate launch --config_file configs/accelerate/gpu_1.yaml train/main.py --config configs/default.yaml
    # 8 GPUs on one node
    accelerate launch --config_file configs/accelerate/gpu_8.yaml train/main.py --config configs/default.yaml
    # 2 nodes x 8 GPUs (run on each node with its --machine_rank)
    accelerate launch --config_file configs/accelerate/nodes_2x8.yaml --machine_rank 0 \
        --main_process_ip 10.0.0.1 train/main.py --config configs/default.yaml
    # 2 CPU processes (DDP over gloo, no GPU needed)
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml train/main.py --config configs/demo.yaml
    # one CPU process
    accelerate launch --cpu --num_processes 1 train/main.py --config configs/demo.yaml

Any config key can be overridden: `... train/main.py --config configs/demo.yaml train.epochs=3 optim.lr=3e-4`.
Outputs land in `train.output_dir`: config.yaml, metrics.jsonl, models/{best_model.*, checkpoint.pth},
report.{json,md} and figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch train/main.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, set_seed

from pipeline.loader import LoaderStateError, load_shard_manifest
from sharding.manifest import Manifest, ManifestError
from train.card import ModelCard, save_model_card
from train.checkpoint import (
    BEST_PTH,
    CHECKPOINT,
    CheckpointError,
    atomic_write,
    clean_stale_temporaries,
    load_checkpoint,
    save_checkpoint,
)
from train.config import Config, ConfigError, load_config, to_yaml
from train.loop import EarlyStopping, EpochProgress, EpochSpec, predict_split, train_one_epoch
from train.metrics import quick_metrics
from train.model import build_model
from train.optim import build_loss, build_optimizer, build_scheduler
from train.presets import build_augment, build_split_loader
from train.state import Position, TrainState


class RunError(RuntimeError):
    """A run cannot start or continue; the message says why and how to fix it."""


def check_manifest(cfg: Config, manifest: Manifest) -> None:
    """Refuse shards whose classes or stored image size differ from what the config pins (null pins nothing)."""
    problems = []
    if cfg.data.classes is not None and list(manifest.classes) != list(cfg.data.classes):
        problems.append(f"classes: manifest {list(manifest.classes)} vs config data.classes {cfg.data.classes}")
    if cfg.model.num_classes is not None and len(manifest.classes) != cfg.model.num_classes:
        problems.append(
            f"class count: manifest {len(manifest.classes)} vs config model.num_classes {cfg.model.num_classes}"
        )
    if cfg.data.stored_size is not None and manifest.image_size != cfg.data.stored_size:
        problems.append(f"image size: manifest {manifest.image_size} vs config data.stored_size {cfg.data.stored_size}")
    if cfg.data.mask_lungs and not manifest.masks:
        problems.append("data.mask_lungs=true but the shards carry no masks (rebuild with --include-masks)")
    if problems:
        raise RunError("the shards do not match the config: " + "; ".join(problems))


def resolved(cfg: Config, manifest: Manifest) -> Config:
    """The config with what the manifest knows filled in (classes, class count, stored size)."""
    data = replace(cfg.data, classes=list(manifest.classes), stored_size=manifest.image_size)
    return replace(cfg, data=data, model=replace(cfg.model, num_classes=len(manifest.classes)))


def build_accelerator(cfg: Config) -> Accelerator:
    """Accelerator from the launcher's environment plus the config's precision and timeout.

    Without CUDA, `cpu=True` is what makes accelerate form a gloo process group:
    otherwise `accelerate launch --multi_gpu --num_processes 2` on a CPU machine
    starts two unrelated single processes.
    """
    kwargs = {
        "kwargs_handlers": [InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.timeout_s))],
        "cpu": not torch.cuda.is_available(),
    }
    if cfg.train.mixed_precision:
        kwargs["mixed_precision"] = cfg.train.mixed_precision
    if cfg.logging.tensorboard:
        kwargs.update(log_with="tensorboard", project_dir=cfg.train.output_dir)
    return Accelerator(**kwargs)


def build_loaders(cfg: Config, manifest: Manifest, accelerator: Accelerator, splits=("train", "val")) -> dict:
    """This rank's loaders (train/presets.py), pinned on CUDA."""
    return {
        split: build_split_loader(
            cfg,
            split,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            pin_memory=accelerator.device.type == "cuda",
            manifest=manifest,
        )
        for split in splits
    }


def model_card(cfg: Config, manifest: Manifest) -> ModelCard:
    """The card of this run's model (epoch and metric are filled in when a best model is saved)."""
    return ModelCard(
        model=cfg.model.name,
        classes=tuple(manifest.classes),
        image_size=cfg.data.image_size,
        stored_size=manifest.image_size,
        monitor=cfg.train.monitor,
        config=to_yaml_dict(cfg),
    )


def model_identity(cfg: Config, manifest: Manifest) -> dict:
    """What a checkpoint must share with this run to be resumed."""
    return {**model_card(cfg, manifest).identity(), "batch_size": cfg.train.batch_size, "seed": cfg.train.seed}


def resolve_resume(cfg: Config) -> Path | None:
    if not cfg.train.resume:
        return None
    if cfg.train.resume == "auto":
        path = Path(cfg.train.output_dir) / "models" / CHECKPOINT
        return path if path.exists() else None
    path = Path(cfg.train.resume)
    if not path.is_file():
        raise RunError(f"train.resume={cfg.train.resume!r}: no checkpoint file there (use 'auto' or a path)")
    return path


def prepare_output_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """Rank 0 creates the run folder and writes config.yaml; every rank learns if that failed."""
    out = Path(cfg.train.output_dir)
    problem = [None]
    if accelerator.is_main_process:
        try:
            (out / "models").mkdir(parents=True, exist_ok=True)
            for folder in (out, out / "models"):  # of a run killed mid-write; the real files are intact
                clean_stale_temporaries(folder)
            atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(to_yaml(cfg)))
        except OSError as exc:
            problem[0] = f"train.output_dir={out} is not writable ({exc.strerror or exc}); choose another folder"
    if accelerator.num_processes > 1:
        broadcast_object_list(problem, from_process=0)
    if problem[0]:
        raise RunError(problem[0])
    return out


def append_metrics(path: Path, row: dict, keep_through_epoch: int | None = None) -> None:
    """Append one epoch line; on resume first drop lines of epochs after the checkpoint."""
    lines = path.read_text().splitlines() if path.exists() else []
    if keep_through_epoch is not None:
        lines = [line for line in lines if json.loads(line)["epoch"] <= keep_through_epoch]
    lines.append(json.dumps(row, sort_keys=True))
    text = "\n".join(lines) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def build_state(cfg: Config, accelerator: Accelerator, manifest: Manifest, train_loader) -> TrainState:
    """Model, optimizer and schedule prepared for this process, with early stopping and the train loader."""
    set_seed(cfg.train.seed)
    model = build_model(cfg.model, num_classes=len(manifest.classes))
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    monitor_mode = "min" if cfg.train.monitor == "val_loss" else "max"
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.epochs, monitor_mode)
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.model.compile:
        model = torch.compile(model)
    stopper = EarlyStopping(cfg.train.patience, monitor_mode, cfg.train.min_delta)
    return TrainState(
        model, optimizer, scheduler, stopper, train_loader, accelerator, model_identity(cfg, manifest), to_yaml(cfg)
    )


def resume_position(cfg: Config, state: TrainState) -> Position:
    """Where this run starts: a fresh run at epoch 0, or where its checkpoint left off."""
    path = resolve_resume(cfg)
    if path is None:
        return Position()
    position = state.load_state_dict(load_checkpoint(path), path)
    where = f"epoch {position.epoch}" + (f", step {position.step} (mid-epoch)" if position.step else "")
    state.accelerator.print(f"resumed from {path} at {where}")
    return position


def epoch_row(epoch: int, result, val, scores: dict, lr: float) -> dict:
    """One line of metrics.jsonl."""
    return {
        "epoch": epoch,
        "train_loss": result.loss,
        "train_accuracy": result.accuracy,
        "val_loss": val.loss,
        "val_accuracy": scores["accuracy"],
        "val_macro_f1": scores["macro_f1"],
        "lr": lr,
        "img_per_s": result.images_per_s,
        "data_wait_frac": result.data_wait_frac,
        "epoch_s": result.seconds,
        "rank_steps": result.rank_steps,
        "train_samples_seen": result.samples_seen,
        "train_samples_repeated": result.samples_repeated,
    }


def step_scheduler(scheduler, value: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(value)
    elif scheduler is not None:
        scheduler.step()


def save_epoch(state: TrainState, card: ModelCard, out: Path, row: dict, improved: bool) -> None:
    """Rank 0: the metrics line, the best model when it improved, the end-of-epoch checkpoint."""
    epoch = row["epoch"]
    append_metrics(out / "metrics.jsonl", row, keep_through_epoch=epoch - 1)
    if improved:
        save_model_card(out / "models", state.weights(), replace(card, epoch=epoch, value=row[card.monitor]))
    save_checkpoint(out / "models" / CHECKPOINT, state.state_dict(epoch))


def report_epoch(
    accelerator: Accelerator, cfg: Config, row: dict, stopper: EarlyStopping, improved: bool, n_train: int, capped: bool
) -> None:
    accelerator.print(
        f"epoch {row['epoch']:3d}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.3f} | "
        f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.3f} f1 {row['val_macro_f1']:.3f} | "
        f"{row['img_per_s']:.0f} img/s, data wait {100 * row['data_wait_frac']:.1f}% | "
        f"{row['train_samples_seen']}/{n_train} train samples"
        + ("  *best*" if improved else f"  ({stopper.bad_epochs}/{stopper.patience} without improvement)")
    )
    if row["train_samples_seen"] < n_train and not capped:
        accelerator.print(
            f"warning: epoch {row['epoch']} trained on {row['train_samples_seen']} of {n_train} train "
            "samples (corrupt shards were skipped: see the warnings above and "
            "`python -m sharding verify`)"
        )


def fit(cfg: Config, accelerator: Accelerator) -> dict:
    """The whole training run; returns the last epoch's metrics row."""
    manifest = load_shard_manifest(cfg.data.shards)
    check_manifest(cfg, manifest)
    cfg = resolved(cfg, manifest)
    loaders = build_loaders(cfg, manifest, accelerator)
    out = prepare_output_dir(cfg, accelerator)
    state = build_state(cfg, accelerator, manifest, loaders["train"])
    loss_fn = build_loss(cfg.optim, manifest.split("train").class_counts, accelerator.device)
    position = resume_position(cfg, state)
    if cfg.logging.tensorboard:
        accelerator.init_trackers("tb")
    steps = loaders["train"].steps_per_epoch
    capped = bool(cfg.train.max_steps_per_epoch) and cfg.train.max_steps_per_epoch < steps
    steps = min(steps, cfg.train.max_steps_per_epoch) if capped else steps
    train_aug, eval_aug = (
        build_augment(cfg, True).to(accelerator.device),
        build_augment(cfg, False).to(accelerator.device),
    )
    n_train = manifest.split("train").samples
    accelerator.print(
        f"training {cfg.model.name} on {n_train} images, {accelerator.num_processes} process(es) on "
        f"{accelerator.device}, {steps} steps/epoch of {cfg.train.batch_size}/device ({loaders['train'].plan} "
        f"shuffle), mixed precision {accelerator.mixed_precision}"
    )

    def checkpoint_mid_epoch(epoch: int, done: int, progress: EpochProgress) -> None:
        if accelerator.is_main_process:
            save_checkpoint(out / "models" / CHECKPOINT, state.state_dict(epoch, progress))

    row: dict = {}
    for epoch in range(position.epoch, cfg.train.epochs):
        if state.stopper.should_stop:
            break
        start = position.step if epoch == position.epoch else 0
        loaders["train"].set_epoch(epoch)
        spec = EpochSpec(
            epoch,
            steps,
            cfg.train.seed,
            start,
            n_train,
            cfg.train.grad_accum,
            cfg.train.log_every,
            cfg.train.checkpoint_every_steps,
        )
        result = train_one_epoch(
            state.model,
            state.optimizer,
            loaders["train"],
            train_aug,
            loss_fn,
            accelerator,
            spec,
            carried=position.carried if start else None,
            on_checkpoint=lambda done, progress, epoch=epoch: checkpoint_mid_epoch(epoch, done, progress),
            log=accelerator.log if cfg.logging.tensorboard else None,
            progress=cfg.logging.progress,
        )
        val = predict_split(
            state.model, loaders["val"], eval_aug, accelerator, progress=cfg.logging.progress, desc="val"
        )
        row = epoch_row(
            epoch,
            result,
            val,
            quick_metrics(val.labels, val.probs, len(manifest.classes)),
            state.optimizer.param_groups[0]["lr"],
        )
        improved = state.stopper.step(row[cfg.train.monitor], epoch)
        step_scheduler(state.scheduler, row[cfg.train.monitor])
        if accelerator.is_main_process:
            save_epoch(state, model_card(cfg, manifest), out, row, improved)
            if cfg.logging.tensorboard:
                accelerator.log({f"epoch/{k}": v for k, v in row.items() if k != "epoch"}, step=epoch)
        accelerator.wait_for_everyone()
        report_epoch(accelerator, cfg, row, state.stopper, improved, n_train, capped)
    if state.stopper.should_stop:
        accelerator.print(
            f"early stop: no {cfg.train.monitor} improvement for {state.stopper.patience} epochs; "
            f"best epoch {state.stopper.best_epoch} ({cfg.train.monitor} {state.stopper.best:.4f})"
        )
    if cfg.logging.tensorboard:
        accelerator.end_training()
    return row


def to_yaml_dict(cfg: Config) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def run_test_report(cfg: Config, accelerator: Accelerator) -> None:
    """Evaluate the best model on the test split and write the report (rank 0 writes)."""
    from train.evaluate import evaluate_run

    best = Path(cfg.train.output_dir) / "models" / BEST_PTH
    if best.exists():
        evaluate_run(Path(cfg.train.output_dir), split="test", accelerator=accelerator, cfg=cfg)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--config", default=None, help="YAML file in configs/ (defaults if omitted)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=3")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    accelerator = build_accelerator(cfg)
    try:
        fit(cfg, accelerator)
        if cfg.eval.test_at_end:
            run_test_report(cfg, accelerator)
    except (RunError, ManifestError, CheckpointError, ConfigError, LoaderStateError) as exc:
        print(f"error (rank {accelerator.process_index}): {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, file size limit, folder removed mid-run: files in place stay intact
        where = f" ({exc.filename})" if exc.filename else ""
        print(
            f"error (rank {accelerator.process_index}): {exc.strerror or exc}{where}; the files already in "
            f"{cfg.train.output_dir} are intact (each is written atomically): fix this and rerun with "
            "train.resume=auto",
            file=sys.stderr,
        )
        return 1
    except RuntimeError as exc:
        if not _peer_failure(exc):
            raise
        print(
            f"error (rank {accelerator.process_index}): a peer process stopped answering and the collective "
            f"gave up after train.timeout_s={cfg.train.timeout_s} s ({str(exc).splitlines()[0][-160:]}); a rank "
            f"is stalled or dead. The files in {cfg.train.output_dir} are intact: rerun with train.resume=auto",
            file=sys.stderr,
        )
        return 3
    return 0


def _peer_failure(exc: RuntimeError) -> bool:
    """A collective that timed out or lost its peer (gloo raises plain RuntimeErrors for these)."""
    if isinstance(exc, torch.distributed.DistError):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("timed out", "timeout", "connection closed", "connection reset", "closed by peer"))


if __name__ == "__main__":
    sys.exit(main())
