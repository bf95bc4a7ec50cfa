"""One training epoch and early stopping (the prediction pass over a split is `train.predictions`).

Multi-rank rules kept here:
- every rank runs exactly `steps` training steps (the loader guarantees full
  batches; `steps` comes from the manifest, never from a stream's length);
- validation gathers predictions once at the end (`train.predictions`), so
  every rank computes the same metrics and takes the same decisions.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from accelerate import Accelerator
from tqdm import tqdm

from pipeline.batch import Batch
from sharding import seeds


@dataclass
class EarlyStopping:
    """Stop after `patience` epochs without improvement of the monitored value."""

    patience: int
    mode: str = "min"  # "min" for losses, "max" for scores
    min_delta: float = 0.0
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0

    def step(self, value: float, epoch: int) -> bool:
        """Record an epoch's value; True when it is a new best."""
        better = (
            self.best is None
            or (self.mode == "min" and value < self.best - self.min_delta)
            or (self.mode == "max" and value > self.best + self.min_delta)
        )
        if better:
            self.best, self.best_epoch, self.bad_epochs = float(value), epoch, 0
        else:
            self.bad_epochs += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class EpochProgress:
    """The sums of a partly trained epoch, over all ranks: what a mid-epoch checkpoint carries.

    `coverage` counts how often each train sample (by its split index) went into a
    step; a resumed run starts from these sums on rank 0 (zeros elsewhere), so the
    epoch's final reduce equals an uninterrupted run's.
    """

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    coverage: torch.Tensor | None = None  # int32 [N]

    def state_dict(self) -> dict:
        return {
            "loss_sum": self.loss_sum,
            "correct": self.correct,
            "seen": self.seen,
            "coverage": None if self.coverage is None else self.coverage.cpu(),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> EpochProgress:
        return cls(float(state["loss_sum"]), int(state["correct"]), int(state["seen"]), state.get("coverage"))


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    images: int  # across all ranks, this epoch (carried steps of a resumed epoch included)
    seconds: float
    data_wait_s: float  # rank 0's time blocked on the loader
    rank_steps: list[int]  # steps taken by each rank in this process (must all be equal)
    samples_seen: int = 0  # distinct train samples that went into a step, all ranks
    samples_repeated: int = 0  # steps' samples beyond the first sight of each
    coverage: np.ndarray | None = None  # int64 [N]: how often each train sample went into a step, all ranks

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def data_wait_frac(self) -> float:
        return self.data_wait_s / self.seconds if self.seconds > 0 else 0.0


@dataclass
class EpochSpec:
    """What one call of `train_one_epoch` runs."""

    epoch: int
    steps: int  # steps in the whole epoch (capped by train.max_steps_per_epoch)
    seed: int
    start_step: int = 0  # > 0 when resuming mid-epoch
    num_samples: int = 0  # train split size, for the coverage count (0: no count)
    grad_accum: int = 1
    log_every: int = 20
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: none)


def device_batches(batches: Iterable[Batch], device: torch.device, waits: list[float]):
    """Yield device batches, adding the time blocked on the loader and the copy call to `waits[0]`.

    The copy is `non_blocking`: from pinned memory (the loaders pin on CUDA) it is
    queued behind the running step instead of waiting for it.
    """
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        batch = batch.to(device, non_blocking=True)
        waits[0] += time.perf_counter() - start
        yield batch


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    augment: Callable,
    loss_fn: Callable,
    accelerator: Accelerator,
    *,
    generator: torch.Generator | None = None,
    grad_accum: int = 1,
    sync: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step on a device batch: augmentation, forward and loss under autocast, backward, optimizer at `sync`.

    Returns (loss, logits) on the device: nothing here reads a value back, so the
    host queues the next step while the device runs this one. `sync=False` is a
    gradient-accumulation step (no DDP all-reduce, no optimizer step).
    """
    images, _ = augment(batch.images, batch.masks, generator=generator)
    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
        with accelerator.autocast():
            logits = model(images)
            loss = loss_fn(logits.float(), batch.labels)
        accelerator.backward(loss / grad_accum)
    if sync:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss, logits


class _Sums:
    """Per-rank running sums on the device (no host sync per step)."""

    def __init__(self, device: torch.device, num_samples: int, carried: EpochProgress | None):
        carried = carried or EpochProgress()
        self.loss = torch.tensor(carried.loss_sum, device=device, dtype=torch.float32)
        self.correct = torch.tensor(carried.correct, device=device, dtype=torch.int64)
        self.seen = torch.tensor(carried.seen, device=device, dtype=torch.int64)
        self.coverage = torch.zeros(num_samples, dtype=torch.int32, device=device)
        if carried.coverage is not None and num_samples:
            self.coverage += carried.coverage.to(device=device, dtype=torch.int32)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, batch: Batch) -> None:
        self.loss += loss.detach().float() * len(batch)
        self.correct += (logits.detach().argmax(1) == batch.labels).sum()
        self.seen += len(batch)
        if len(self.coverage) and batch.indices is not None:
            self.coverage.index_add_(0, batch.indices, torch.ones_like(batch.indices, dtype=torch.int32))

    def reduced(self, accelerator: Accelerator) -> EpochProgress:
        """The sums over all ranks (a collective: every rank calls it at the same step)."""
        totals = accelerator.reduce(
            torch.stack([self.loss.double(), self.correct.double(), self.seen.double()]), reduction="sum"
        ).tolist()
        coverage = accelerator.reduce(self.coverage, reduction="sum") if len(self.coverage) else None
        return EpochProgress(totals[0], int(totals[1]), int(totals[2]), coverage)


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[Batch],
    augment: Callable,
    loss_fn: Callable,
    accelerator: Accelerator,
    spec: EpochSpec,
    carried: EpochProgress | None = None,
    on_checkpoint: Callable[[int, EpochProgress], None] | None = None,
    log: Callable[[dict, int], None] | None = None,
    progress: bool = True,
) -> EpochResult:
    """Steps `spec.start_step..spec.steps` on this rank; metrics reduced across ranks.

    `carried`: a resumed epoch's sums (rank 0 passes them, other ranks None).
    `on_checkpoint(steps_done, sums)` runs every `spec.checkpoint_every` steps at a
    gradient-sync boundary, on every rank (the sums are reduced, a collective).
    The host waits for the device only at the logging interval and at checkpoints.
    """
    model.train()
    rank, steps, start = accelerator.process_index, spec.steps, spec.start_step
    generator = torch.Generator(device=accelerator.device)
    sums = _Sums(accelerator.device, spec.num_samples, carried if accelerator.is_main_process else None)
    waits = [0.0]
    bar = tqdm(
        total=steps,
        initial=start,
        desc=f"epoch {spec.epoch}",
        unit="step",
        leave=False,
        disable=not (progress and accelerator.is_main_process),
    )
    began = time.perf_counter()
    step, made = start - 1, 0
    # islice, not a break: a capped epoch must not pull (and count) one batch past the cap
    batches = itertools.islice(device_batches(loader, accelerator.device, waits), steps - start)
    for step, batch in enumerate(batches, start):
        # Each step's randomness is a function of (seed, epoch, rank, step): a run resumed at any
        # step replays exactly what an uninterrupted run would have done.
        torch.manual_seed(seeds.derive(spec.seed, spec.epoch, rank, step, seeds.STEP_TORCH))
        generator.manual_seed(seeds.derive(spec.seed, spec.epoch, rank, step, seeds.STEP_AUGMENT))
        sync = (step + 1) % spec.grad_accum == 0 or step + 1 == steps
        loss, logits = train_step(
            model,
            optimizer,
            batch,
            augment,
            loss_fn,
            accelerator,
            generator=generator,
            grad_accum=spec.grad_accum,
            sync=sync,
        )
        sums.add(loss, logits, batch)
        made += 1
        if (step + 1) % spec.log_every == 0 or step + 1 == steps:
            images = made * len(batch) * accelerator.num_processes
            _log_step(sums, images, waits[0], began, bar, log, spec.epoch * steps + step + 1)
        if on_checkpoint is not None and _checkpoint_due(spec, step, sync):
            on_checkpoint(step + 1, sums.reduced(accelerator))
        bar.update(1)
    bar.close()
    if step + 1 < steps:
        raise RuntimeError(f"rank {rank}: the training loader ended after {step + 1} of {steps} batches")
    return _epoch_result(sums, accelerator, made, time.perf_counter() - began, waits[0])


def _checkpoint_due(spec: EpochSpec, step: int, sync: bool) -> bool:
    """A mid-epoch checkpoint after `step`: every `checkpoint_every` steps, at a gradient-sync boundary."""
    done = step + 1
    return bool(spec.checkpoint_every) and sync and done < spec.steps and done % spec.checkpoint_every == 0


def _epoch_result(sums: _Sums, accelerator: Accelerator, made: int, seconds: float, wait_s: float) -> EpochResult:
    """The epoch's figures over all ranks (collectives: every rank calls it once, after its last step)."""
    total = sums.reduced(accelerator)
    rank_steps = accelerator.gather(torch.tensor([made], device=accelerator.device)).tolist()
    seen, repeated, coverage = 0, 0, None
    if total.coverage is not None:
        coverage = total.coverage.cpu().numpy().astype(np.int64)
        seen = int((coverage > 0).sum())
        repeated = int(coverage.sum()) - seen
    avg = max(total.seen, 1)
    return EpochResult(
        total.loss_sum / avg, total.correct / avg, total.seen, seconds, wait_s, rank_steps, seen, repeated, coverage
    )


def _log_step(sums: _Sums, images: int, wait_s: float, began: float, bar, log, global_step: int) -> None:
    """Progress bar and TensorBoard: the only host sync of the step loop, every log_every steps."""
    elapsed = time.perf_counter() - began
    rate = images / elapsed if elapsed > 0 else 0.0
    current = (sums.loss / sums.seen.clamp_min(1)).item()
    bar.set_postfix(loss=f"{current:.4f}", img_s=f"{rate:.0f}", wait=f"{100 * wait_s / max(elapsed, 1e-9):.1f}%")
    if log is not None:
        log(
            {"train/step_loss": current, "train/img_per_s": rate, "train/data_wait_frac": wait_s / max(elapsed, 1e-9)},
            global_step,
        )
