"""Optimizer, learning-rate schedule and loss from the config."""

from __future__ import annotations

import math

import torch

from train.config import OptimConfig


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int, monitor_mode: str):
    """An epoch-stepped schedule, or None.

    Not passed to `accelerator.prepare`: accelerate's scheduler wrapper steps
    once per process per call, which is right for per-step schedules only.
    """
    if cfg.scheduler == "cosine":

        def factor(epoch: int) -> float:
            if epoch < cfg.warmup_epochs:
                return (epoch + 1) / (cfg.warmup_epochs + 1)
            progress = (epoch - cfg.warmup_epochs) / max(1, epochs - cfg.warmup_epochs)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=monitor_mode, factor=cfg.gamma, patience=2)
    return None


def class_weights(train_counts: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1 (a class with no sample gets 0)."""
    counts = torch.tensor(train_counts, dtype=torch.float32)
    weights = torch.where(counts > 0, counts.sum() / (len(counts) * counts.clamp_min(1)), torch.zeros_like(counts))
    return weights / weights[counts > 0].mean()


def build_loss(cfg: OptimConfig, train_counts, device) -> torch.nn.Module:
    weight = class_weights(train_counts).to(device) if cfg.class_weights else None
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
