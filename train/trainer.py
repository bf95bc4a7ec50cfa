"""A training run, stage by stage: set up (manifest, config, loaders, state), epochs, checkpoints, report.

`fit(cfg, accelerator)` reads as its table of contents: `setup_run` -> `resume_position`
-> `run_epoch` per epoch (train, validate, decide, save) -> the early-stop note.
The entry script (`train/main.py`) owns launching, arguments and exit codes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from pipeline.collection import CollectionError, CollectionSet, open_collections
from pipeline.ring import shm_free, shm_problem
from sharding.segmenter import SegmenterError, segmenter_ref
from train.card import ModelCard, save_model_card
from train.checkpoint import (
    BEST_PTH,
    CHECKPOINT,
    atomic_write,
    clean_stale_temporaries,
    load_checkpoint,
    save_checkpoint,
)
from train.config import Config, to_yaml
from train.epoch_log import epoch_row, report_epoch, scalars
from train.loop import EarlyStopping, EpochProgress, EpochSpec, train_one_epoch
from train.model import build_model
from train.optim import build_loss, build_optimizer, build_scheduler
from train.predictions import predict_split
from train.presets import build_augment, build_split_loader, masks_used
from train.ranks import check_shared_folder, every_rank_ok, on_rank0, rank0_decides
from train.state import Position, TrainState
from train.validation import choose, per_collection, per_source, quick_metrics, worst_source


class RunError(RuntimeError):
    """A run cannot start or continue; the message says why and how to fix it."""


def open_data(cfg: Config) -> CollectionSet:
    """The run's shard collections (one, or several mixed: `pipeline.collection`), checked against the config."""
    try:
        data = open_collections(cfg.data.shards, cfg.data.classes)
    except CollectionError as exc:
        raise RunError(f"the shards do not match the config: {exc}") from None
    check_data(cfg, data)
    return data


def check_data(cfg: Config, data: CollectionSet) -> None:
    """Refuse shards whose classes or stored image size differ from what the config pins (null pins nothing)."""
    problems = []
    absent = [c for c, n in zip(data.classes, data.class_counts("train")) if n == 0]
    if cfg.data.classes is not None and absent:
        problems.append(f"config data.classes names {absent}, which no train split holds")
    if cfg.model.num_classes is not None and len(data.classes) != cfg.model.num_classes:
        problems.append(f"class count: shards {len(data.classes)} vs config model.num_classes {cfg.model.num_classes}")
    if cfg.data.stored_size is not None and data.manifest.image_size != cfg.data.stored_size:
        problems.append(
            f"image size: manifest {data.manifest.image_size} vs config data.stored_size {cfg.data.stored_size}"
        )
    if cfg.data.mask_lungs and not data.masks:
        problems.append("data.mask_lungs=true but the shards carry no masks (rebuild with --include-masks)")
    if cfg.data.crop == "lungs" and not data.masks:
        problems.append("data.crop=lungs but the shards carry no masks (rebuild with --include-masks)")
    for split in ("train", "val"):
        if data.samples(split) == 0:
            problems.append(
                f"the {split} split is empty (train {data.samples('train')}, val {data.samples('val')}): build from "
                "more images; patient or source groups larger than a split's share leave it empty (see the build "
                "summary's split line)"
            )
    if problems:
        raise RunError("the shards do not match the config: " + "; ".join(problems))


def lung_segmenter(cfg: Config, data: CollectionSet) -> tuple[dict, str | None]:
    """(the card's `segmenter`, a problem or None), once per run and per rank (the file is a local path).

    `data.lung_model` names it (path and sha256); without it, the segmenter that predicted the training shards'
    masks is recorded by its digest alone (prediction then asks for `--lung-model PATH`). A file other than the
    one that predicted the shards' masks is refused: its boxes would not be the ones the model learned from."""
    built = sorted({m.build.get("options", {}).get("lung_model") for m in data.manifests} - {None})
    if not cfg.data.lung_model:
        return ({"sha256": built[0]} if len(built) == 1 else {}), None
    try:
        ref = segmenter_ref(cfg.data.lung_model)
    except SegmenterError as exc:
        return {}, f"data.lung_model: {exc}"
    if built and ref["sha256"] not in built:
        return ref, (
            f"data.lung_model {cfg.data.lung_model} (sha256 {ref['sha256'][:12]}) is not the segmenter that predicted "
            f"the training shards' masks ({', '.join(b[:12] for b in built)}): name that one"
        )
    return ref, None


def resolved(cfg: Config, data: CollectionSet) -> Config:
    """The config with what the manifests know filled in (classes, class count, stored size)."""
    config = replace(cfg.data, classes=list(data.classes), stored_size=data.manifest.image_size)
    return replace(cfg, data=config, model=replace(cfg.model, num_classes=len(data.classes)))


def build_loaders(cfg: Config, data: CollectionSet, accelerator: Accelerator, splits=("train", "val")) -> dict:
    """This rank's loaders (train/presets.py), pinned on CUDA; masks are read only when the step uses them."""
    return {
        split: build_split_loader(
            cfg,
            split,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            pin_memory=accelerator.device.type == "cuda",
            collections=data,
            masks=masks_used(cfg),
        )
        for split in splits
    }


def shared_memory_problem(loaders: dict, local_ranks: int, free: int | None) -> str | None:
    """Whether this node's batch rings fit in /dev/shm: `local_ranks` ranks, each with every loader's ring
    (train and val can be alive at once). None when they fit or `free` is unknown."""
    per_rank = sum(loader.shared_memory_bytes for loader in loaders.values())
    sizes = ", ".join(f"{name} {loader.shared_memory_bytes / 2**20:,.0f} MB" for name, loader in loaders.items())
    return shm_problem(local_ranks * per_rank, free, f"{local_ranks} rank(s) x ({sizes})")


def model_card(cfg: Config, data: CollectionSet, segmenter: dict | None = None) -> ModelCard:
    """The card of this run's model (epoch and metric are filled in when a best model is saved)."""
    return ModelCard(
        model=cfg.model.name,
        classes=tuple(data.classes),
        image_size=cfg.data.image_size,
        stored_size=data.manifest.image_size,
        monitor=cfg.train.monitor,
        config=to_yaml_dict(cfg),
        train_digest=data.digest("train"),
        collections=data.describe() if data.mixed else [],
        segmenter=segmenter or {},
    )


def model_identity(cfg: Config, data: CollectionSet) -> dict:
    """What a checkpoint must share with this run to be resumed."""
    return {**model_card(cfg, data).identity(), "batch_size": cfg.train.batch_size, "seed": cfg.train.seed}


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


def earlier_run(out: Path, cfg: Config) -> str | None:
    """Why a fresh run must not start in `out`: it holds another run's model, which it would overwrite (and
    whose external reports it would list as its own); None when it may."""
    try:
        if resolve_resume(cfg) is not None:
            return None
    except RunError:
        return None  # a bad train.resume is reported on every rank by build_state
    found = [p for p in (out / "models" / CHECKPOINT, out / "models" / BEST_PTH) if p.exists()]
    if not found:
        return None
    return (
        f"train.output_dir={out} already holds a run ({found[0].relative_to(out)}); continue it with "
        "train.resume=auto, or start this one in a new train.output_dir (or delete that folder first)"
    )


def prepare_output_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """Rank 0 creates the run folder and writes config.yaml; every rank learns if that failed."""
    out = Path(cfg.train.output_dir)

    def prepare() -> None:
        problem = earlier_run(out, cfg)
        if problem:
            raise RunError(problem)
        try:
            (out / "models").mkdir(parents=True, exist_ok=True)
            for folder in (out, out / "models"):  # of a run killed mid-write; the real files are intact
                clean_stale_temporaries(folder)
            atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(to_yaml(cfg)))
        except OSError as exc:
            raise RunError(
                f"train.output_dir={out} is not writable ({exc.strerror or exc}); choose another folder"
            ) from None

    rank0_decides(accelerator, prepare)
    check_shared_folder(accelerator, out)
    return out


def append_metrics(path: Path, row: dict, keep_through_epoch: int | None = None) -> None:
    """Append one epoch line; on resume first drop lines of epochs after the checkpoint."""
    lines = path.read_text().splitlines() if path.exists() else []
    if keep_through_epoch is not None:
        lines = [line for line in lines if json.loads(line)["epoch"] <= keep_through_epoch]
    lines.append(json.dumps(row, sort_keys=True))
    text = "\n".join(lines) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def build_state(cfg: Config, accelerator: Accelerator, data: CollectionSet, train_loader) -> TrainState:
    """Model, optimizer and schedule prepared for this process, with early stopping and the train loader."""
    set_seed(cfg.train.seed)
    model = build_model(cfg.model, num_classes=len(data.classes))
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
        model, optimizer, scheduler, stopper, train_loader, accelerator, model_identity(cfg, data), to_yaml(cfg)
    )


def resume_position(cfg: Config, state: TrainState) -> Position:
    """Where this run starts: a fresh run at epoch 0, or where its checkpoint left off (rank 0's answer)."""
    path = rank0_decides(state.accelerator, lambda: resolve_resume(cfg))
    if path is None:
        return Position()
    position = state.load_state_dict(load_checkpoint(path), path)
    where = f"epoch {position.epoch}" + (f", step {position.step} (mid-epoch)" if position.step else "")
    state.accelerator.print(f"resumed from {path} at {where}")
    return position


def step_scheduler(scheduler, value: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(value)
    elif scheduler is not None:
        scheduler.step()


def save_epoch(state: TrainState, card: ModelCard, out: Path, row: dict, improved: bool) -> None:
    """Rank 0: the metrics line, the best model when it improved (card with its operating points), the checkpoint."""
    epoch = row["epoch"]
    append_metrics(out / "metrics.jsonl", row, keep_through_epoch=epoch - 1)
    if improved:
        save_model_card(out / "models", state.weights(), replace(card, epoch=epoch, value=row[card.monitor]))
    save_checkpoint(out / "models" / CHECKPOINT, state.state_dict(epoch))


@dataclass
class Run:
    """What a training run holds once set up: config (resolved against the manifests), data, state, outputs."""

    cfg: Config
    data: CollectionSet  # the shard collections (one, or several mixed)
    accelerator: Accelerator
    loaders: dict
    state: TrainState
    loss_fn: torch.nn.Module
    augment: dict  # "train" / "eval" -> DeviceAugment on the device
    out: Path
    steps: int  # per epoch, after train.max_steps_per_epoch
    capped: bool  # whether max_steps_per_epoch cut the epoch
    segmenter: dict  # the model card's lung segmenter (`lung_segmenter`)


def use_deterministic_kernels(enabled: bool) -> None:
    """train.deterministic: torch's deterministic kernels and cuDNN without autotuning (slower on GPU).

    A non-deterministic op then warns instead of stopping the run (`warn_only`), so
    a model with one such op still trains and says which op it was. Otherwise cuDNN
    autotunes: train batches have one shape, so each convolution's fastest kernel is
    chosen once (no effect on CPU).
    """
    if not enabled:
        torch.backends.cudnn.benchmark = True
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible GEMMs
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def setup_run(cfg: Config, accelerator: Accelerator) -> Run:
    """Manifest -> resolved config -> loaders -> run folder -> model state; checks before any work."""
    use_deterministic_kernels(cfg.train.deterministic)
    data = open_data(cfg)
    segmenter, problem = lung_segmenter(cfg, data)
    every_rank_ok(accelerator, problem, RunError)
    cfg = resolved(cfg, data)
    loaders = build_loaders(cfg, data, accelerator)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    every_rank_ok(accelerator, shared_memory_problem(loaders, local_ranks, shm_free()), RunError)
    out = prepare_output_dir(cfg, accelerator)
    state = build_state(cfg, accelerator, data, loaders["train"])
    loss_fn = build_loss(cfg.optim, data.class_counts("train"), accelerator.device)
    augment = {name: build_augment(cfg, name == "train").to(accelerator.device) for name in ("train", "eval")}
    steps, cap = loaders["train"].steps_per_epoch, cfg.train.max_steps_per_epoch
    capped = bool(cap) and cap < steps
    return Run(
        cfg, data, accelerator, loaders, state, loss_fn, augment, out, cap if capped else steps, capped, segmenter
    )


def run_epoch(run: Run, epoch: int, position: Position) -> tuple[dict, bool]:
    """Train one epoch (from a resumed step), validate, decide: (metrics row, improved)."""
    cfg, acc, state = run.cfg, run.accelerator, run.state
    start = position.step if epoch == position.epoch else 0
    run.loaders["train"].set_epoch(epoch)
    spec = EpochSpec(
        epoch,
        run.steps,
        cfg.train.seed,
        start,
        run.data.samples("train"),
        cfg.train.grad_accum,
        cfg.train.log_every,
        cfg.train.checkpoint_every_steps,
    )

    def checkpoint(done: int, progress: EpochProgress) -> None:
        path = run.out / "models" / CHECKPOINT
        on_rank0(acc, lambda: save_checkpoint(path, state.state_dict(epoch, progress)), f"writing {path}")

    result = train_one_epoch(
        state.model,
        state.optimizer,
        run.loaders["train"],
        run.augment["train"],
        run.loss_fn,
        acc,
        spec,
        carried=position.carried if start else None,
        on_checkpoint=checkpoint,
        log=acc.log if cfg.logging.tensorboard else None,
        progress=cfg.logging.progress,
    )
    val = predict_split(
        state.model, run.loaders["val"], run.augment["eval"], acc, progress=cfg.logging.progress, desc="val"
    )
    scores = quick_metrics(val.labels, val.probs, len(run.data.classes))
    row = epoch_row(epoch, result, val, scores, state.optimizer.param_groups[0]["lr"])
    train_loader = run.loaders["train"]
    if result.coverage is not None:  # what each collection and stratum gave this epoch: the mix's proof
        row["collections"] = train_loader.strata().composition(result.coverage, run.data.names)
    if run.data.mixed:
        row["val_collections"] = per_collection(val.labels, val.probs, val.collections, len(run.data.classes))
    sources = per_source(val.labels, val.probs, val.sources, len(run.data.classes))
    row["val_worst_source"], row["val_worst_source_balanced_accuracy"] = worst_source(
        sources, row["val_balanced_accuracy"]
    )
    improved = state.stopper.step(row[cfg.train.monitor], epoch)
    step_scheduler(state.scheduler, row[cfg.train.monitor])
    on_rank0(acc, lambda: record_epoch(run, val, row, improved), f"saving epoch {epoch} in {run.out}")
    return row, improved


def record_epoch(run: Run, val, row: dict, improved: bool) -> None:
    """Rank 0: the epoch's files (best model with its operating points when it improved) and TensorBoard."""
    cfg, acc = run.cfg, run.accelerator
    card = model_card(cfg, run.data, run.segmenter)
    card = replace(card, precision=str(acc.mixed_precision), processes=acc.num_processes)
    if improved:  # thresholds frozen from this model's validation predictions, never from test
        card = replace(card, operating_points=choose(val.labels, val.probs, card.classes, cfg.eval.target_sensitivity))
    save_epoch(run.state, card, run.out, row, improved)
    if cfg.logging.tensorboard:
        acc.log(scalars(row), step=row["epoch"])


def announce(run: Run) -> None:
    cfg, acc = run.cfg, run.accelerator
    acc.print(
        f"training {cfg.model.name} on {run.data.samples('train')} images, {acc.num_processes} "
        f"process(es) on {acc.device}, {run.steps} steps/epoch of {cfg.train.batch_size}/device "
        f"({run.loaders['train'].plan} shuffle), mixed precision {acc.mixed_precision}"
    )


def fit(cfg: Config, accelerator: Accelerator) -> Run:
    """The whole training run; returns it (resolved config, manifest, run folder) for what comes after."""
    run = setup_run(cfg, accelerator)
    position = resume_position(run.cfg, run.state)
    if run.cfg.logging.tensorboard:
        accelerator.init_trackers("tb")
    announce(run)
    row: dict = {}
    stopper = run.state.stopper
    for epoch in range(position.epoch, run.cfg.train.epochs):
        if stopper.should_stop:
            break
        row, improved = run_epoch(run, epoch, position)
        partial = run.capped or run.loaders["train"].mixed
        report_epoch(accelerator, run.cfg, row, stopper, improved, run.data.samples("train"), partial)
    if stopper.should_stop:
        monitor = run.cfg.train.monitor
        accelerator.print(
            f"early stop: no {monitor} improvement for {stopper.patience} epochs; "
            f"best epoch {stopper.best_epoch} ({monitor} {stopper.best:.4f})"
        )
    # no accelerator.end_training() here: it destroys the process group, which the test report still needs
    return run


def to_yaml_dict(cfg: Config) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]
