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
import os
import sys
from datetime import timedelta
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch train/main.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from pipeline.fast_tar import ShardFormatError
from pipeline.loader import LoaderError
from pipeline.read import NoReadableSamplesError
from sharding.manifest import ManifestError
from train.checkpoint import BEST_PTH, CheckpointError
from train.config import Config, ConfigError, load_config
from train.ranks import FolderNotSharedError, PeerFailedError, rank0_decides
from train.trainer import Run, RunError, fit


def choose_precision(requested: str, capability: tuple[int, int] | None) -> tuple[str, str | None]:
    """(precision to train with, a notice or None): bf16 only where the GPU computes it natively.

    `torch.cuda.is_bf16_supported()` says yes on pre-Ampere GPUs (V100, T4: compute
    capability 7.x) because it counts emulation; there bf16 convolutions run without
    tensor cores, several times slower than fp16. `capability` None means no CUDA.
    """
    if requested == "bf16" and capability is not None and capability < (8, 0):
        major, minor = capability
        return "fp16", (
            f"notice: this GPU (compute capability {major}.{minor}) has no native bf16; training in fp16 "
            "with loss scaling instead (bf16 needs 8.0+: A100, H100, L4, RTX 30xx and newer)"
        )
    return requested, None


def build_accelerator(cfg: Config) -> tuple[Accelerator, str | None]:
    """Accelerator from the launcher's environment plus the config's precision and timeout (and a notice).

    Without CUDA, `cpu=True` is what makes accelerate form a gloo process group:
    otherwise `accelerate launch --multi_gpu --num_processes 2` on a CPU machine
    starts two unrelated single processes.
    """
    kwargs = {
        "kwargs_handlers": [InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.timeout_s))],
        "cpu": not torch.cuda.is_available(),
    }
    # the launcher's --mixed_precision arrives as ACCELERATE_MIXED_PRECISION; the config's wins
    requested = cfg.train.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    precision, notice = choose_precision(requested, capability)
    if cfg.train.mixed_precision or precision != requested:
        kwargs["mixed_precision"] = precision
    if cfg.logging.tensorboard:
        kwargs.update(log_with="tensorboard", project_dir=cfg.train.output_dir)
    return Accelerator(**kwargs), notice


def report_on_test(run: Run) -> None:
    """Evaluate the best model on the test split and write the run's report (rank 0 writes).

    The entry script runs training, then evaluation: `train` itself never imports `evaluation`.
    """
    from evaluation.run import evaluate_run  # plots and Grad-CAM load only when a report is written

    acc = run.accelerator
    if run.data.samples("test") == 0:
        acc.print("test split is empty: no test report (build from more images to get one)")
    elif rank0_decides(acc, (run.out / "models" / BEST_PTH).exists):
        evaluate_run(run.out, split="test", accelerator=acc, cfg=run.cfg)


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
    accelerator, notice = build_accelerator(cfg)
    if notice:
        accelerator.print(notice)
    try:
        run = fit(cfg, accelerator)
        if cfg.eval.test_at_end:
            report_on_test(run)
        # last, after the report: it finishes the trackers and destroys the process group the report gathers over
        accelerator.end_training()
    except PeerFailedError as exc:
        print(f"error (rank {accelerator.process_index}): {exc}", file=sys.stderr)
        return 3
    except (RunError, ManifestError, CheckpointError, ConfigError, LoaderError, FolderNotSharedError) as exc:
        print(f"error (rank {accelerator.process_index}): {exc}", file=sys.stderr)
        return 2
    except (ShardFormatError, NoReadableSamplesError) as exc:  # from a loader worker: the original's last line
        print(
            f"error (rank {accelerator.process_index}): {str(exc).strip().splitlines()[-1]}; `python -m sharding "
            "verify` names every damaged shard, and a rebuild with --force restores them",
            file=sys.stderr,
        )
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
