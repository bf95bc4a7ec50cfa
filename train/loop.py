"""One training epoch, one evaluation pass, early stopping.

Multi-rank rules kept here:
- every rank runs exactly `steps` training steps (the loader guarantees full
  batches; `steps` comes from the manifest, never from a stream's length);
- evaluation uses the unwrapped model (no collective per batch: ranks may
  hold different batch counts) and gathers predictions once at the end, so
  every rank computes the same metrics and takes the same decisions.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm import tqdm

from pipeline.batch import Batch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across runs and platforms."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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
class EpochResult:
    loss: float
    accuracy: float
    images: int  # across all ranks
    seconds: float
    data_wait_s: float  # rank 0's time blocked on the loader
    rank_steps: list[int]  # steps taken by each rank (must all be equal)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def data_wait_frac(self) -> float:
        return self.data_wait_s / self.seconds if self.seconds > 0 else 0.0


def _timed(batches: Iterable[Batch], device: torch.device, waits: list[float]):
    """Yield device batches, adding the time spent waiting for each to `waits[0]`."""
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


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[Batch],
    augment: Callable,
    loss_fn: Callable,
    accelerator: Accelerator,
    epoch: int,
    steps: int,
    seed: int,
    grad_accum: int = 1,
    log: Callable[[dict, int], None] | None = None,
    log_every: int = 20,
    progress: bool = True,
) -> EpochResult:
    """Exactly `steps` optimisation micro-steps on this rank; metrics reduced across ranks."""
    model.train()
    rank = accelerator.process_index
    # Each epoch's randomness is a function of (seed, epoch, rank): a resumed run
    # replays exactly what an uninterrupted run would have done.
    torch.manual_seed(derive_seed(seed, epoch, rank, 0))
    generator = torch.Generator(device=accelerator.device).manual_seed(derive_seed(seed, epoch, rank, 1))
    loss_sum = torch.zeros((), device=accelerator.device)
    correct = torch.zeros((), device=accelerator.device, dtype=torch.long)
    seen = 0
    waits = [0.0]
    bar = tqdm(total=steps, desc=f"epoch {epoch}", unit="step", leave=False,
               disable=not (progress and accelerator.is_main_process))
    start = time.perf_counter()
    step = -1
    # islice, not a break: a capped epoch must not pull (and count) one batch past the cap
    for step, batch in enumerate(itertools.islice(_timed(loader, accelerator.device, waits), steps)):
        images, _ = augment(batch.images, batch.masks, generator=generator)
        sync = (step + 1) % grad_accum == 0 or step + 1 == steps
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            with accelerator.autocast():
                logits = model(images)
                loss = loss_fn(logits.float(), batch.labels)
            accelerator.backward(loss / grad_accum)
        if sync:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach() * len(batch)
        correct += (logits.detach().argmax(1) == batch.labels).sum()
        seen += len(batch)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            rate = seen * accelerator.num_processes / elapsed
            # .item() syncs the device: only every log_every steps.
            current = (loss_sum / max(seen, 1)).item()
            bar.set_postfix(loss=f"{current:.4f}", img_s=f"{rate:.0f}", wait=f"{100 * waits[0] / elapsed:.1f}%")
            if log is not None:
                log({"train/step_loss": current, "train/img_per_s": rate, "train/data_wait_frac": waits[0] / elapsed},
                    epoch * steps + step + 1)
        bar.update(1)
    bar.close()
    if step + 1 < steps:
        raise RuntimeError(f"rank {rank}: the training loader ended after {step + 1} of {steps} batches")
    seconds = time.perf_counter() - start
    totals = accelerator.reduce(
        torch.stack([loss_sum.float(), correct.float(), torch.tensor(float(seen), device=accelerator.device)]),
        reduction="sum",
    )
    loss_total, correct_total, seen_total = totals.tolist()
    rank_steps = accelerator.gather(torch.tensor([step + 1], device=accelerator.device)).tolist()
    return EpochResult(loss_total / seen_total, correct_total / seen_total, int(seen_total), seconds, waits[0],
                       rank_steps)


@dataclass
class Predictions:
    """Predictions over a whole split, gathered from every rank (each sample once)."""

    keys: list[str]
    labels: np.ndarray  # int64 [N]
    probs: np.ndarray  # float32 [N, C]
    loss: float  # mean cross-entropy


@torch.no_grad()
def predict_split(
    model: torch.nn.Module,
    loader: Iterable[Batch],
    augment: Callable,
    accelerator: Accelerator,
    progress: bool = False,
    desc: str = "eval",
) -> Predictions:
    """Forward every batch of this rank's share, then gather all ranks' results once."""
    net = accelerator.unwrap_model(model, keep_torch_compile=False)
    net.eval()
    keys: list[str] = []
    labels: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    waits = [0.0]
    for batch in tqdm(_timed(loader, accelerator.device, waits), desc=desc, leave=False,
                      disable=not (progress and accelerator.is_main_process)):
        images, _ = augment(batch.images, batch.masks)
        with accelerator.autocast():
            logits = net(images)
        probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        labels.append(batch.labels.cpu().numpy())
        keys.extend(batch.keys)
    local = (keys, np.concatenate(labels) if labels else np.zeros(0, np.int64),
             np.concatenate(probs) if probs else np.zeros((0, 0), np.float32))
    parts = gather_object([local]) if accelerator.num_processes > 1 else [local]
    all_keys = [k for part in parts for k in part[0]]
    if len(set(all_keys)) != len(all_keys):
        raise RuntimeError("evaluation saw a sample twice across ranks: the eval stream is not exact-once")
    all_labels = np.concatenate([p[1] for p in parts if len(p[1])]).astype(np.int64)
    all_probs = np.concatenate([p[2] for p in parts if len(p[2])]).astype(np.float32)
    loss = float(F.nll_loss(torch.log(torch.as_tensor(all_probs).clamp_min(1e-12)), torch.as_tensor(all_labels)))
    model.train()
    return Predictions(all_keys, all_labels, all_probs, loss)
