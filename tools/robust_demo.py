"""The unseen-site ablation on the phantom with sites: `make robust-demo` (`python -m tools.robust_demo`).

1. A training collection whose five sources each acquire in their own style, correlated with the class as
   in the DB (`sharding phantom --site-styles`), and an unseen hospital with every class in a style of its
   own (`--site hospital-x.example`); both sharded with their lung masks.
2. One training run per recipe (configs/demo.yaml at a reduced size, plus the recipe's keys): the seed
   recipe, each component of configs/robust.yaml alone (lung crop; the acquisition intensity transforms;
   zoom and shift), and all of configs/robust.yaml's components together.
3. Each run's test report (internal) and an external test on the unseen hospital (`python -m evaluation
   --shards`), and the table: balanced accuracy with 95 % intervals, the gap, and the share of the seed
   recipe's gap each recipe closes at the unseen site, (its unseen - seed unseen) / (seed internal - seed
   unseen).

Everything runs through the real commands, so the figures are the product's. On 2 CPU cores the default
sizes take about 14 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tools.acquisition_costs import TYPICAL
from train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SITE = "hospital-x.example"
#: configs/robust.yaml's keys, grouped into the ablation's components.
INTENSITY = ("gamma", "contrast", "brightness", "blur", "noise", "resample")
GEOMETRY = ("zoom", "shift")


def robust_keys(path: Path = ROOT / "configs" / "robust.yaml") -> dict[str, list[str]]:
    """The ablation's recipes as key=value overrides: each component alone (configs/robust.yaml's settings, or a
    typical one for a component it leaves out, named so), then configs/robust.yaml's components together."""
    cfg = load_config(path)
    acq, data = cfg.acquisition, cfg.data
    crop = [f"data.crop={data.crop}", f"data.crop_margin={data.crop_margin}"] if data.crop != "none" else []
    parts = {
        "lung crop": crop,
        "acquisition (intensity)": [f"acquisition.{k}={getattr(acq, k)}" for k in INTENSITY if getattr(acq, k)],
        "zoom and shift": [f"acquisition.{k}={getattr(acq, k)}" for k in GEOMETRY if getattr(acq, k)],
    }
    typical = {
        "lung crop": ["data.crop=lungs", "data.crop_margin=0.1"],
        "acquisition (intensity)": [f"acquisition.{k}={TYPICAL[k]}" for k in INTENSITY],
        "zoom and shift": [f"acquisition.{k}={TYPICAL[k]}" for k in GEOMETRY],
    }
    recipes = {"seed recipe": []}
    for name, keys in parts.items():
        recipes[name if keys else f"{name} (not in robust.yaml)"] = keys or typical[name]
    recipes["robust (all of configs/robust.yaml)"] = [k for keys in parts.values() for k in keys]
    return recipes


def run(cmd: list[str], log: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)))
    with open(log, "w") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"robust_demo: {' '.join(cmd[:6])} ... failed (exit {done.returncode}); see {log}")


def prepare(out: Path, args) -> tuple[Path, Path]:
    """The training collection and the unseen hospital, phantom then shards (skipped when already built)."""
    py = [sys.executable, "-m", "sharding"]
    sets = {
        "styled": ["--per-class", str(args.per_class), "--seed", "0", "--site-styles"],
        "site": ["--per-class", str(args.site_per_class), "--seed", "7", "--site", SITE],
    }
    shards = {}
    for name, extra in sets.items():
        raw, built = out / "data" / name, out / "shards" / name
        run(py + ["phantom", "--out", str(raw), "--workers", "2", "--quiet", *extra], out / f"phantom_{name}.log")
        build = ["build", "--raw", str(raw), "--out", str(built), "--include-masks", "--shard-size", "200"]
        run(py + build + ["--workers", "2", "--quiet"], out / f"build_{name}.log")
        shards[name] = built
    return shards["styled"], shards["site"]


def train_and_test(name: str, keys: list[str], styled: Path, site: Path, out: Path, args) -> dict:
    """One recipe's run: training (then its test report) and the external test at the unseen site."""
    slug = "".join(c if c.isalnum() else "_" for c in name.split(" (")[0])
    run_dir = out / "runs" / slug
    shutil.rmtree(run_dir, ignore_errors=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "train/main.py"]
    size = [f"data.image_size={args.image_size}", f"train.epochs={args.epochs}", "eval.gradcam_per_class=0"]
    cfg = ["--config", "configs/demo.yaml", f"data.shards={styled}", f"train.output_dir={run_dir}", *size, *keys]
    run(launch + cfg + ["logging.progress=false"], out / f"train_{slug}.log")
    ext = [sys.executable, "-m", "evaluation", "--run", str(run_dir), "--shards", str(site), "--split", "all"]
    run(ext + ["--name", "unseen_site"], out / f"external_{slug}.log")
    internal = json.loads((run_dir / "report.json").read_text())
    external = json.loads((run_dir / "external" / "unseen_site" / "report.json").read_text())
    return {
        "recipe": name,
        "keys": keys,
        "internal": _ba(internal),
        "unseen_site": _ba(external),
        "internal_films": internal["samples"],
        "unseen_films": external["samples"],
    }


def _ba(report: dict) -> dict:
    return {"value": report["balanced_accuracy"], "ci95": report["ci95"]["balanced_accuracy"]}


def closes(rows: list[dict]) -> list[dict]:
    """Each row's share of the seed recipe's gap (internal - unseen) closed at the unseen site."""
    seed = rows[0]
    gap = seed["internal"]["value"] - seed["unseen_site"]["value"]
    for r in rows:
        r["gap"] = r["internal"]["value"] - r["unseen_site"]["value"]
        r["closes"] = (r["unseen_site"]["value"] - seed["unseen_site"]["value"]) / gap if gap > 0 else None
    return rows


def table(rows: list[dict]) -> str:
    def ba(x: dict) -> str:
        lo, hi = x["ci95"]
        return f"{x['value']:.2f} ({lo:.2f}–{hi:.2f})"

    lines = [
        "| recipe | internal test | unseen site | gap | seed's gap closed |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        share = "—" if r["closes"] is None or r is rows[0] else f"{100 * r['closes']:.0f} %"
        lines.append(f"| {r['recipe']} | {ba(r['internal'])} | {ba(r['unseen_site'])} | {r['gap']:+.2f} | {share} |")
    films = f"{rows[0]['internal_films']} internal test films, {rows[0]['unseen_films']} unseen-site films"
    return "\n".join(lines) + f"\n\nBalanced accuracy, 95 % bootstrap intervals; {films}."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.robust_demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/robust_demo"))
    p.add_argument("--per-class", type=int, default=200, help="training collection films per class")
    p.add_argument("--site-per-class", type=int, default=100, help="unseen-site films per class")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--only", nargs="*", default=None, help="run these recipes only (by name prefix)")
    args = p.parse_args(argv)
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    styled, site = prepare(out, args)
    recipes = robust_keys()
    if args.only:
        recipes = {k: v for k, v in recipes.items() if k == "seed recipe" or any(k.startswith(o) for o in args.only)}
    rows = []
    for name, keys in recipes.items():
        rows.append(train_and_test(name, keys, styled, site, out, args))
        r = rows[-1]
        print(
            f"robust_demo: {name}: internal {r['internal']['value']:.2f}, unseen {r['unseen_site']['value']:.2f}",
            flush=True,
        )
    rows = closes(rows)
    text = table(rows)
    (out / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "ablation.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
