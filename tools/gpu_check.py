"""One command for a fresh GPU machine: `make gpu-check` (`python -m tools.gpu_check [--dry-run]`).

Stages, each a subprocess whose failure is recorded while the next one runs
(the exit code is 1 if any failed):

    phantom         full-size phantom (21,165 films) with every core        python -m sharding phantom
    shards          raw shards                                              python -m sharding build
    pipeline_bench  host input pipeline with 1, 4 and 8 workers             python -m tools.bench_pipeline
    train_bench_*   training throughput at 299 px, channels_last, bf16      python -m tools.bench_train
                    and fp16 with compile off, bf16 with compile on
    train           two real epochs, bf16 (configs/gpu_check.yaml)          accelerate launch train/main.py
    gpu_tests       the GPU-only tests                                      pytest -m gpu tests/gpu

Every figure goes to `<out>/gpu_check.json` (rewritten after each stage, so an
interrupted run keeps what it measured) and a summary to `<out>/gpu_check.md`;
each stage's output to `<out>/logs/<stage>.log`. Data prep is skipped when the
phantom and shards are already there (both commands are no-ops then).
Budget: under 8 minutes on one H100 with 16 cores, enforced: past `--deadline-s`
(480 s) the running stage is stopped and the rest are recorded as not run. Before
any stage, every package the stages import is checked (one line naming the missing
ones and the pip command, exit 2). Where `torch.compile` cannot run (no Triton for
the GPU, a Python that Dynamo does not support) the compile stage is recorded as
skipped with the reason, not as a failure.

`--dry-run` runs the same plan on the CPU at toy sizes (a few films per class,
32 px, batch 8, precision `no` for bf16 and fp16, no compile, one epoch), in
about a minute: tests/tools/test_gpu_check.py runs it, so the script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tools.gpu_check_summary import markdown, write

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 480
#: What the stages import, by import name -> pip name.
DEPENDENCIES = {
    "torch": "torch",
    "torchvision": "torchvision",
    "timm": "timm",
    "accelerate": "accelerate",
    "webdataset": "webdataset",
    "kornia": "kornia",
    "numpy": "numpy",
    "PIL": "pillow",
    "omegaconf": "omegaconf",
    "safetensors": "safetensors",
    "filelock": "filelock",
    "braceexpand": "braceexpand",
    "torchmetrics": "torchmetrics",
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "pytorch_grad_cam": "grad-cam",
    "pytest": "pytest",
    "hypothesis": "hypothesis",
}


@dataclass(frozen=True)
class Sizes:
    """How big each stage runs: the GPU plan or the CPU dry run."""

    phantom: tuple[str, ...] = ("--full-size",)
    shard_size: int = 1000
    image_size: int = 299
    batch_size: int = 256
    bench_workers: tuple[int, ...] = (1, 4, 8)
    bench_batches: int = 40
    steps: int = 50
    warmup: int = 10
    train_benches: tuple[tuple[str, bool], ...] = (("bf16", False), ("fp16", False), ("bf16", True))
    epochs: int = 2
    cpu: bool = False  # the dry run: CPU processes, precision no
    train_overrides: tuple[str, ...] = ()
    augment_seconds: float = 2.0
    timeout_s: int = 300


DRY = Sizes(
    phantom=("--per-class", "8"),
    shard_size=16,
    image_size=32,
    batch_size=8,
    bench_workers=(1,),
    bench_batches=4,
    steps=3,
    warmup=1,
    train_benches=(("no", False),),
    epochs=1,
    cpu=True,
    train_overrides=(
        "data.image_size=32",
        "data.num_workers=1",
        "train.batch_size=8",
        "train.mixed_precision='no'",  # quoted: YAML reads a bare no as false
        "eval.batch_size=16",
        "eval.gradcam_per_class=1",
        "eval.bootstrap_resamples=20",
    ),
    augment_seconds=0.2,
    timeout_s=120,
)


@dataclass(frozen=True)
class Stage:
    name: str
    argv: list[str]
    figures: Callable[[], dict]  # read after a clean exit: what the stage measured
    timeout_s: int
    ok_codes: tuple[int, ...] = (0,)


@dataclass
class Paths:
    work: Path  # raw films and shards
    out: Path  # figures, logs, the training run
    raw: Path = field(init=False)
    shards: Path = field(init=False)

    def __post_init__(self) -> None:
        self.raw, self.shards = self.work / "raw", self.work / "shards"


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def data_stages(sz: Sizes, p: Paths, cpus: int) -> list[Stage]:
    py = sys.executable
    phantom = [py, "-m", "sharding", "phantom", "--out", str(p.raw), *sz.phantom, "--seed", "0", "--quiet"]
    build = [py, "-m", "sharding", "build", "--raw", str(p.raw), "--out", str(p.shards), "--quiet"]
    build += ["--shard-size", str(sz.shard_size)]
    return [
        Stage("phantom", phantom + ["--workers", str(cpus)], lambda: phantom_figures(p.raw), sz.timeout_s),
        Stage("shards", build + ["--workers", str(cpus)], lambda: shard_figures(p.shards), sz.timeout_s),
    ]


def bench_stages(sz: Sizes, p: Paths) -> list[Stage]:
    py, out = sys.executable, p.out
    pipeline = [py, "-m", "tools.bench_pipeline", "--shards", str(p.shards), "--raw", str(p.raw), "--no-peers"]
    pipeline += ["--workers", *map(str, sz.bench_workers), "--batch-size", str(sz.batch_size)]
    pipeline += ["--batches", str(sz.bench_batches), "--augment-seconds", str(sz.augment_seconds)]
    pipeline += ["--json", str(out / "pipeline_bench.json")]
    stages = [Stage("pipeline_bench", pipeline, lambda: _json(out / "pipeline_bench.json"), sz.timeout_s)]
    for i, (precision, compiled) in enumerate(sz.train_benches):
        name = f"train_bench_{precision}" + ("_compile" if compiled else "")
        argv = [py, "-m", "tools.bench_train", "--shards", str(p.shards), "--image-size", str(sz.image_size)]
        argv += ["--batch-size", str(sz.batch_size), "--precision", precision, "--channels-last"]
        argv += ["--workers", str(max(sz.bench_workers)), "--steps", str(sz.steps), "--warmup", str(sz.warmup)]
        argv += ["--augment-seconds", str(sz.augment_seconds), "--json", str(out / f"{name}.json")]
        # the original feed (per-image PIL, ~1k img/s) once: it is the same with any precision or compile
        argv += (["--raw", str(p.raw)] if i == 0 else []) + (["--compile"] if compiled else [])
        stages.append(Stage(name, argv, lambda n=name: _json(out / f"{n}.json"), sz.timeout_s))
    return stages


def run_stages_after_data(sz: Sizes, p: Paths) -> list[Stage]:
    py, run_dir = sys.executable, p.out / "train"
    launch = [py, "-m", "accelerate.commands.launch", *(["--cpu"] if sz.cpu else []), "--num_processes", "1"]
    launch += ["--num_machines", "1", "--mixed_precision", "no" if sz.cpu else "bf16", "--dynamo_backend", "no"]
    train = launch + ["train/main.py", "--config", "configs/gpu_check.yaml", f"data.shards={p.shards}"]
    train += [f"train.output_dir={run_dir}", f"train.epochs={sz.epochs}", *sz.train_overrides]
    xml = p.out / "gpu_tests.xml"
    tests = [py, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    # on a CPU the GPU module skips itself at collection: `-m gpu` then collects nothing, pytest's exit 5
    no_gpu = (5,) if sz.cpu else ()
    return [
        Stage("train", train, lambda: train_figures(run_dir), sz.timeout_s),
        Stage("gpu_tests", tests, lambda: junit_figures(xml), sz.timeout_s, (0, *no_gpu)),
    ]


def plan(sz: Sizes, p: Paths, cpus: int) -> list[Stage]:
    return data_stages(sz, p, cpus) + bench_stages(sz, p) + run_stages_after_data(sz, p)


# --- what each stage measured ---------------------------------------------------------------------------


def phantom_figures(raw: Path) -> dict:
    return {"films": sum(1 for _ in raw.glob("*/*/images/*.png"))}


def shard_figures(shards: Path) -> dict:
    from sharding.manifest import load_manifest

    m = load_manifest(shards)
    splits = ("train", "val", "test")
    return {
        "samples": {s: m.split(s).samples for s in splits},
        "shards": sum(len(m.split(s).shards) for s in splits),
        "encoding": m.encoding,
        "image_size": m.image_size,
    }


def train_figures(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keep = ("epoch", "img_per_s", "data_wait_frac", "epoch_s", "train_loss", "val_loss", "val_accuracy")
    return {
        "epochs": [{k: r[k] for k in keep} for r in rows],
        "best_model": (run_dir / "models" / "best_model.pth").is_file(),
        "report": (run_dir / "report.json").is_file(),
    }


def junit_figures(xml: Path) -> dict:
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["skip_reasons"] = sorted({s.get("message", "") for s in suite.iter("skipped")})
    return counts


# --- running the plan -----------------------------------------------------------------------------------


def missing_dependencies(names: dict[str, str] = DEPENDENCIES) -> list[str]:
    """The pip names of the packages in `names` (import name -> pip name) that do not import here."""
    missing = []
    for module, pip_name in names.items():
        try:
            __import__(module)
        except Exception:  # noqa: BLE001 - any failure to import is a missing (or broken) package
            missing.append(pip_name)
    return missing


def compile_unavailable() -> str | None:
    """Why `torch.compile` cannot run here (None when it can): Dynamo unsupported, or no Triton for CUDA."""
    import torch

    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support Python {platform.python_version()} with torch {torch.__version__}"
    if torch.cuda.is_available():
        try:
            import triton  # noqa: F401 - inductor's GPU code generator
        except ImportError:
            return "torch.compile needs Triton for CUDA (pip install triton, or a torch wheel that bundles it)"
    return None


def skipped(stage: Stage, why: str, ok: bool) -> dict:
    """The record of a stage that did not run."""
    return {"ok": ok, "skipped": why, "rc": None, "seconds": 0.0, "figures": {}, "error": None if ok else why} | {
        "command": shlex.join(stage.argv),
        "log": None,
    }


def run_stage(stage: Stage, env: dict[str, str], logs: Path, timeout_s: float | None = None) -> dict:
    """Run one stage in its own process group (a timeout kills its workers too); never raises.

    `timeout_s` (what the overall deadline leaves) shortens the stage's own limit."""
    limit = stage.timeout_s if timeout_s is None else min(stage.timeout_s, timeout_s)
    log_path = logs / f"{stage.name}.log"
    began = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            stage.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )
        try:
            rc: int | None = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    result = {"ok": False, "rc": rc, "seconds": round(time.perf_counter() - began, 1), "figures": {}, "error": None}
    result.update(command=shlex.join(stage.argv), log=str(log_path))
    if rc not in stage.ok_codes:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        why = f"timed out after {limit:.0f} s" if rc is None else f"exit {rc}"
        result["error"] = f"{why}: " + " | ".join(tail)
        return result
    try:
        result["figures"] = stage.figures()
    except Exception as exc:  # noqa: BLE001 - a stage without its figures is a failed stage, not a crash
        result["error"] = f"figures unreadable: {type(exc).__name__}: {exc}"
        return result
    result["ok"] = True
    return result


def machine() -> dict:
    import torch

    versions = {}
    for mod in ("torch", "torchvision", "timm", "accelerate", "kornia", "webdataset", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing package is a fact to report
            versions[mod] = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def stage_env(dry_run: bool) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    if dry_run:  # the CPU plan on any machine, one thread per process on a small box
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return env


def check_gpu_tests_ran(result: dict, dry_run: bool) -> None:
    """On a GPU, skipped GPU tests (CUDA broken in the test process) are a failure; on the CPU, the one skip."""
    figures = result["figures"]
    if not result["ok"]:
        return
    if dry_run and figures.get("skipped", 0) < 1:
        result["ok"], result["error"] = False, "the GPU tests did not skip themselves on the CPU"
    elif not dry_run and (figures.get("passed", 0) == 0 or figures.get("skipped", 0)):
        result["ok"], result["error"] = False, f"GPU tests skipped: {figures.get('skip_reasons')}"


def run(args: argparse.Namespace) -> dict:
    sz, paths = (DRY if args.dry_run else Sizes()), Paths(Path(args.work), Path(args.out))
    (paths.out / "logs").mkdir(parents=True, exist_ok=True)
    shutil.rmtree(paths.out / "train", ignore_errors=True)  # each check trains afresh (a run folder is never reused)
    stages = plan(sz, paths, os.cpu_count() or 1)
    results: dict = {"dry_run": args.dry_run, "machine": machine(), "sizes": asdict(sz), "stages": {}}
    results["deadline_s"] = args.deadline_s
    results["plan"] = [s.name for s in stages]
    began, env = time.perf_counter(), stage_env(args.dry_run)
    no_compile = compile_unavailable()
    for stage in stages:
        left = args.deadline_s - (time.perf_counter() - began)
        if left <= 0:
            result = skipped(stage, f"not run: the overall deadline of {args.deadline_s:.0f} s had passed", ok=False)
        elif no_compile and "--compile" in stage.argv:
            result = skipped(stage, f"skipped: {no_compile}", ok=True)
        else:
            print(f"gpu-check: {stage.name} ...", flush=True)
            result = run_stage(stage, env, paths.out / "logs", left)
            if stage.name == "gpu_tests":
                check_gpu_tests_ran(result, args.dry_run)
        results["stages"][stage.name] = result
        state = result.get("skipped") or f"{'ok' if result['ok'] else 'FAILED'} in {result['seconds']} s"
        print(f"gpu-check: {stage.name} {state}", flush=True)
        results["seconds"] = round(time.perf_counter() - began, 1)
        results["ok"] = all(r["ok"] for r in results["stages"].values())
        write(results, paths.out)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the same plan at toy sizes on the CPU (about a minute)")
    p.add_argument("--work", default="data/gpu_check", help="phantom films and shards (kept for a re-run)")
    p.add_argument("--out", default="runs/gpu_check", help="gpu_check.{json,md}, logs/, the training run")
    p.add_argument("--deadline-s", type=float, default=DEADLINE_S, help="stop the whole check after this many s")
    args = p.parse_args(argv)
    missing = missing_dependencies(DEPENDENCIES)
    if missing:
        print(
            f"gpu-check: missing packages: {', '.join(missing)}; install them first: "
            f"{Path(sys.executable).name} -m pip install {' '.join(missing)} (or pip install -e '.[dev]' here)",
            file=sys.stderr,
        )
        return 2
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; on a CPU run `python -m tools.gpu_check --dry-run`", file=sys.stderr)
        return 2
    results = run(args)
    print(markdown(results))
    print(f"gpu-check: figures in {Path(args.out) / 'gpu_check.json'}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
