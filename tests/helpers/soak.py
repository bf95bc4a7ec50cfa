"""Soak test: a long CPU training run watched for memory growth, fd leaks and uneven epochs.

    python -m sharding phantom --out data/soak --full-size --workers 2
    python -m sharding build --raw data/soak --out shards/soak --workers 2
    PYTHONPATH=tests python -m helpers.soak --shards shards/soak --out runs/soak --epochs 10 --json runs/soak.json

It launches one real `accelerate launch --cpu train/main.py` process, and each
`--poll` seconds samples the training process's resident memory (RSS, from /proc)
and open file descriptors; an epoch's window closes when its line lands in
`metrics.jsonl`. It then checks:

- the RSS floor of every epoch (minimum over its polls) after `--baseline-epoch` is
  within `--max-growth` (default 5 %) of the baseline epoch's (the first epochs fill
  allocator pools and page caches, so they are not the baseline); a leak raises the
  floor, a transient peak (a checkpoint being serialised) does not; peaks are reported;
- the most open fds seen in each epoch after the baseline grows by at most 2 over the
  baseline epoch's (loader workers' pipes and a file being written come and go; a leak of
  one fd per epoch shows after a few epochs); the fewest is reported only;
- every epoch took the same number of steps on every rank.

Prints a table a person can paste, writes JSON a script can check, exits 0 when
all checks hold, 1 otherwise. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from helpers.procs import fd_count, find_trainer, rss_bytes, start_group

ROOT = Path(__file__).resolve().parents[2]


def soak(
    shards: str,
    out: str,
    *,
    epochs: int = 10,
    image_size: int = 32,
    batch_size: int = 32,
    num_workers: int = 1,
    max_steps: int | None = None,
    max_growth: float = 0.05,
    baseline_epoch: int = 2,
    poll: float = 0.5,
    extra: list[str] | None = None,
    env: dict | None = None,
    timeout: float = 6 * 3600,
) -> dict:
    out_dir = Path(out)
    metrics = out_dir / "metrics.jsonl"
    if out_dir.exists():
        shutil.rmtree(out_dir)  # each soak trains afresh (a fresh run refuses a folder that holds another run)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "train/main.py",
        "--config",
        "configs/demo.yaml",
        f"data.shards={shards}",
        f"train.output_dir={out}",
        f"train.epochs={epochs}",
        f"data.image_size={image_size}",
        f"train.batch_size={batch_size}",
        f"data.num_workers={num_workers}",
        f"train.patience={epochs + 1}",
        "eval.test_at_end=false",
        "logging.progress=false",
    ]
    if max_steps:
        cmd.append(f"train.max_steps_per_epoch={max_steps}")
    cmd += extra or []
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = str(ROOT) + os.pathsep + child_env.get("PYTHONPATH", "")
    child_env.setdefault("CUDA_VISIBLE_DEVICES", "")
    start = time.monotonic()
    proc = start_group(cmd, child_env, ROOT)
    samples: list[dict] = []
    try:
        trainer = find_trainer(proc.pid)
        window: dict[str, list[int]] = {"rss": [], "fds": []}
        seen = 0
        while True:
            rss, fds = rss_bytes(trainer), fd_count(trainer)
            if rss and fds >= 0:
                window["rss"].append(rss)
                window["fds"].append(fds)
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            while len(lines) > seen:  # an epoch just ended: close its window
                row = json.loads(lines[seen])
                rs, fs = window["rss"] or [0], window["fds"] or [-1]
                samples.append(
                    {
                        "epoch": row["epoch"],
                        "rss_mib": rss / 2**20,
                        "rss_floor_mib": min(rs) / 2**20,
                        "peak_rss_mib": max(rs) / 2**20,
                        "fds": fds,
                        "fds_min": min(fs),
                        "fds_max": max(fs),
                        "polls": len(window["rss"]),
                        "steps": row["rank_steps"],
                        "epoch_s": row.get("epoch_s"),
                        "img_per_s": row.get("img_per_s"),
                    }
                )
                window = {"rss": [], "fds": []}
                seen += 1
            if proc.poll() is not None:
                break
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"soak did not finish within {timeout:.0f} s")
            time.sleep(poll)
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    result = {
        "epochs": samples,
        "returncode": proc.returncode,
        "elapsed_s": time.monotonic() - start,
        "command": " ".join(cmd),
        "stderr_tail": stderr[-2000:],
    }
    return check(result, epochs=epochs, max_growth=max_growth, baseline_epoch=baseline_epoch)


def check(result: dict, *, epochs: int, max_growth: float = 0.05, baseline_epoch: int = 2) -> dict:
    """Add `problems`, `ok`, `rss_growth`, `peak_rss_growth` to a soak result (see the module docstring)."""
    samples = result["epochs"]
    problems = result["problems"] = []
    if result["returncode"] != 0:
        problems.append(f"training exited {result['returncode']}: {result.get('stderr_tail', '')}")
    if len(samples) != epochs:
        problems.append(f"{len(samples)} epochs recorded, expected {epochs}")
    after = [s for s in samples if s["epoch"] >= baseline_epoch]
    if after:
        # Floor RSS per epoch (the minimum of all polls in it): what stays resident. A leak raises it
        # epoch after epoch; transient peaks (a checkpoint being serialised) do not. Peaks are reported.
        base = after[0]
        growth = max(s["rss_floor_mib"] for s in after) / base["rss_floor_mib"] - 1
        peak_growth = max(s["peak_rss_mib"] for s in after) / base["peak_rss_mib"] - 1
        result["rss_growth"], result["peak_rss_growth"] = growth, peak_growth
        if growth >= max_growth:
            problems.append(
                f"RSS floor grew {100 * growth:.1f}% after epoch {baseline_epoch} (limit {100 * max_growth:.0f}%)"
            )
        # Most open fds per epoch: every loader's worker pipes and shared memory are open at some poll.
        # (The fewest depends on whether a poll lands between two loaders, so it is only reported.)
        most = [s["fds_max"] for s in after]
        if max(most) > base["fds_max"] + 2:
            problems.append(f"open fds grew after epoch {baseline_epoch}: most per epoch {most}")
    steps = {tuple(s["steps"]) for s in samples}
    if len(steps) != 1 or any(len(set(s)) != 1 for s in steps):
        problems.append(f"steps per epoch differ: {sorted(steps)}")
    result["ok"] = not problems
    return result


def table(result: dict) -> str:
    rows = [
        "| epoch | RSS floor (MiB) | RSS peak (MiB) | open fds min-max | steps/rank | epoch s | img/s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in result["epochs"]:
        rows.append(
            f"| {s['epoch']} | {s['rss_floor_mib']:.0f} | {s['peak_rss_mib']:.0f} | "
            f"{s['fds_min']}-{s['fds_max']} | {s['steps'][0]} | {s['epoch_s'] or 0:.1f} | "
            f"{s['img_per_s'] or 0:.0f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shards", default=None, help="shard folder (required unless --recheck)")
    p.add_argument("--out", default="runs/soak")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch (default: full passes)")
    p.add_argument("--max-growth", type=float, default=0.05)
    p.add_argument("--baseline-epoch", type=int, default=2)
    p.add_argument("--poll", type=float, default=0.5, help="seconds between RSS/fd samples")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("overrides", nargs="*", help="extra train/main.py key=value overrides")
    p.add_argument("--recheck", default=None, metavar="JSON", help="re-run the checks on a saved result")
    args = p.parse_args(argv)
    if args.recheck:
        result = check(
            json.loads(Path(args.recheck).read_text()),
            epochs=args.epochs,
            max_growth=args.max_growth,
            baseline_epoch=args.baseline_epoch,
        )
    else:
        result = soak(
            args.shards,
            args.out,
            epochs=args.epochs,
            image_size=args.image_size,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            max_steps=args.max_steps,
            max_growth=args.max_growth,
            baseline_epoch=args.baseline_epoch,
            poll=args.poll,
            extra=args.overrides,
        )
    print(table(result))
    print(
        f"soak: {len(result['epochs'])} epochs in {result['elapsed_s']:.0f}s, RSS growth after epoch "
        f"{args.baseline_epoch}: {100 * result.get('rss_growth', float('nan')):+.1f}% (floor), "
        f"{100 * result.get('peak_rss_growth', float('nan')):+.1f}% (peak)"
    )
    for problem in result["problems"]:
        print(f"FAIL {problem}", file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    print("soak: OK" if result["ok"] else "soak: FAILED")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
