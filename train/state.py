"""`TrainState`: everything a checkpoint saves and restores, as one object.

A checkpoint is written at the end of every epoch and, with
`train.checkpoint_every_steps`, inside an epoch too. A mid-epoch checkpoint also
carries the train loader's position (`ShardLoader.state_dict`) and the epoch's
partial sums (`EpochProgress`), so `train.resume=auto` continues at the next
global batch and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from pipeline.loader import ShardLoader
from train.checkpoint import check_compatible
from train.loop import EarlyStopping, EpochProgress


@dataclass
class Position:
    """Where a (resumed) run starts: the epoch, its first step, and the sums carried into it."""

    epoch: int = 0
    step: int = 0
    carried: EpochProgress | None = None


@dataclass
class TrainState:
    """The model, optimizer, schedule, scaler, early stopping and train loader of a run."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    stopper: EarlyStopping
    loader: ShardLoader
    accelerator: Accelerator
    identity: dict  # what a checkpoint must share with this run (model, classes, size, batch, seed)
    config_yaml: str

    def weights(self) -> dict[str, torch.Tensor]:
        """The model's state dict, without DDP or torch.compile wrappers."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False).state_dict()

    def state_dict(self, epoch: int, progress: EpochProgress | None = None) -> dict:
        """A checkpoint: after epoch `epoch`, or inside it when `progress` is given."""
        scaler = self.accelerator.scaler
        return {
            "model": self.weights(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "scaler": scaler.state_dict() if scaler is not None else {},
            "early_stopping": self.stopper.state_dict(),
            "identity": self.identity,
            "config": self.config_yaml,
            "epoch": epoch,
            "mid_epoch": progress is not None,
            "loader": self.loader.state_dict(),
            "progress": progress.state_dict() if progress is not None else None,
        }

    def load_state_dict(self, state: dict, path: str | Path) -> Position:
        """Restore a checkpoint (refusing another model's); return where the run continues."""
        check_compatible(state.get("identity", {}), self.identity, path)
        self.accelerator.unwrap_model(self.model, keep_torch_compile=False).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.stopper.load_state_dict(state["early_stopping"])
        if state.get("mid_epoch"):
            self.loader.load_state_dict(state["loader"])
            return Position(state["epoch"], self.loader.start_step, EpochProgress.from_state_dict(state["progress"]))
        return Position(state["epoch"] + 1)
