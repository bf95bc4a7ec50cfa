"""Shard-build throughput of each executor on the same films, in one run: `python -m tools.bench_build`.

Three ways to run `python -m sharding build` over the same inputs, each a real command (imports included):

- `local`: the process pool (`--workers W`), the default;
- `ray (own instance)`: `--executor ray --workers W`, which starts a private local Ray and stops it;
- `ray (running cluster)`: `--executor ray --ray-address` of a one-node cluster of W CPUs started once here,
  as on a cluster that is already up.

The three alternate within each of `--repeats` rounds, and each keeps its fastest round (the machine's noise
is one-sided). Figures: wall seconds and img/s of the whole command, the two passes' seconds as the build
reports them, and each against `local`. Every output set is checked byte for byte against `local`'s.

    python -m tools.bench_build --films 2000 --workers 2 --repeats 3 [--raw R] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools.ray_cluster import RayCluster, ray_env

#: A build that takes longer than this is stuck (the benchmark still stops its cluster).
BUILD_TIMEOUT_S = 3600
PASSES = re.compile(r"analyse ([0-9.]+)s, write ([0-9.]+)s")


def digest(folder: Path) -> str:
    """One sha256 over every file's name and bytes."""
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        h.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def run_build(raw: Path, out: Path, workers: int, shard_size: int, env: dict, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "sharding", "build", "--raw", str(raw), "--out", str(out), "--force", "--quiet"]
    cmd += ["--workers", str(workers), "--shard-size", str(shard_size), *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"bench_build: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    passes = PASSES.search(done.stdout)
    return {"wall_s": wall, "passes_s": float(passes[1]) + float(passes[2]) if passes else float("nan")}


def phantom(films: int, folder: Path, env: dict) -> Path:
    per_class = max(1, films // 4)
    cmd = [sys.executable, "-m", "sharding", "phantom", "--out", str(folder), "--per-class", str(per_class)]
    subprocess.run(cmd + ["--seed", "0", "--quiet", "--workers", "2"], env=env, check=True, capture_output=True)
    return folder


def measure(raw: Path, work: Path, args, env: dict, cluster: RayCluster) -> list[dict]:
    executors = {
        "local": [],
        "ray (own instance)": ["--executor", "ray"],
        "ray (running cluster)": ["--executor", "ray", "--ray-address", cluster.address],
    }
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, extra in executors.items():
            out = work / name.split()[0] / name.replace(" ", "_").strip("()")
            out.parent.mkdir(parents=True, exist_ok=True)
            result = run_build(raw, out, args.workers, args.shard_size, env, extra)
            result["digest"] = digest(out)
            if name not in best or result["wall_s"] < best[name]["wall_s"]:
                best[name] = result
    films = json.loads((work / "local" / "local" / "manifest.json").read_text())["counts"]["written"]
    rows = []
    for name, r in best.items():
        rows.append(
            {
                "executor": name,
                "films": films,
                "wall_s": round(r["wall_s"], 2),
                "img_per_s": round(films / r["wall_s"], 1),
                "passes_s": round(r["passes_s"], 2),
                "vs_local_wall": round(best["local"]["wall_s"] / r["wall_s"], 3),
                "vs_local_passes": round(best["local"]["passes_s"] / r["passes_s"], 3),
                "identical": r["digest"] == best["local"]["digest"],
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    head = (
        f"{'executor':24} {'films':>6} {'wall s':>7} {'img/s':>7} {'passes s':>9} {'x local':>8} {'x local':>8}  same"
    )
    sub = f"{'':24} {'':>6} {'':>7} {'':>7} {'':>9} {'(wall)':>8} {'(passes)':>8}  bytes"
    lines = [head, sub]
    for r in rows:
        lines.append(
            f"{r['executor']:24} {r['films']:>6} {r['wall_s']:>7.2f} {r['img_per_s']:>7.1f} {r['passes_s']:>9.2f} "
            f"{r['vs_local_wall']:>8.2f} {r['vs_local_passes']:>8.2f}  {'yes' if r['identical'] else 'NO'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_build", description=__doc__.splitlines()[0])
    p.add_argument("--raw", type=Path, default=None, help="inputs to build (default: a phantom of --films films)")
    p.add_argument("--films", type=int, default=2000, help="phantom size when --raw is not given")
    p.add_argument("--workers", type=int, default=2, help="processes (local) and CPUs (ray)")
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3, help="rounds; each executor keeps its fastest")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated benchmark still stops its cluster
    env = ray_env(dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    with tempfile.TemporaryDirectory(prefix="bench_build") as tmp:
        work = Path(tmp)
        raw = args.raw.absolute() if args.raw else phantom(args.films, work / "raw", env)
        cluster = RayCluster(env, nodes=1, cpus=args.workers)
        try:
            rows = measure(raw, work, args, env, cluster)
        finally:
            cluster.stop()
    print(table(rows))
    print(f"({os.cpu_count()} CPUs here; best of {args.repeats} rounds, the executors alternating in each)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
