"""The lung segmenter on the phantom with sites: `make lungs-demo` (`python -m tools.lungs_demo`).

1. The robust demo's two collections (`tools.robust_demo.prepare`): five styled sources with drawn masks,
   and an unseen hospital with every class.
2. `python -m train.lungs fit` on the styled collection's drawn masks, then its Dice and IoU with 95 %
   intervals on that collection's val and test splits and on every film of the unseen hospital
   (`python -m train.lungs evaluate`: the same function the build runs, against the drawn masks).
3. The unseen hospital again without its masks, sharded with `--lung-model`; a model trained with the robust
   recipe (configs/robust.yaml: lung crop and intensity transforms) is tested there with the drawn masks and
   with the predicted ones: balanced accuracy with intervals, side by side. Close figures mean the lung crop
   works on a collection that ships no masks.

Everything runs through the real commands. On 2 CPU cores the default sizes take about 9 minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from tools.robust_demo import SITE, prepare, robust_keys, run

SEGMENTER_SPLITS = {"internal val": "val", "internal test": "test", f"unseen site ({SITE})": "all"}


def fit_segmenter(styled: Path, out: Path, args) -> Path:
    seg = out / "lungs"
    fit = [sys.executable, "-m", "train.lungs", "fit", "--shards", str(styled), "--out", str(seg)]
    run(fit + ["--size", str(args.lung_size), "--epochs", str(args.lung_epochs)], out / "lungs_fit.log")
    return seg / "lungs.safetensors"


def segmenter_rows(model: Path, styled: Path, site: Path, out: Path) -> list[dict]:
    rows = []
    for name, split in SEGMENTER_SPLITS.items():
        shards = site if split == "all" else styled
        target = out / f"lungs_{split}.json"
        evaluate = [sys.executable, "-m", "train.lungs", "evaluate", "--model", str(model), "--shards", str(shards)]
        run(evaluate + ["--splits", split, "--json", str(target)], out / f"lungs_evaluate_{split}.log")
        rows.append({"set": name, **json.loads(target.read_text())["splits"][split]})
    return rows


def maskless_site(out: Path, model: Path) -> Path:
    """The unseen hospital's films without their masks, sharded with the segmenter's."""
    raw = out / "data" / "site_maskless"
    shutil.rmtree(raw, ignore_errors=True)
    shutil.copytree(out / "data" / "site", raw)
    for masks in raw.glob("*/*/masks"):
        shutil.rmtree(masks)
    built = out / "shards" / "site_maskless"
    build = [sys.executable, "-m", "sharding", "build", "--raw", str(raw), "--out", str(built), "--workers", "2"]
    run(build + ["--lung-model", str(model), "--shard-size", "200", "--quiet"], out / "build_site_maskless.log")
    return built


def crop_rows(styled: Path, site: Path, predicted: Path, model: Path, out: Path, args) -> list[dict]:
    """The robust recipe's unseen-site balanced accuracy with drawn and with predicted masks."""
    run_dir = out / "runs" / "robust"
    shutil.rmtree(run_dir, ignore_errors=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "train/main.py"]
    keys = robust_keys()["robust (all of configs/robust.yaml)"]
    size = [f"data.image_size={args.image_size}", f"train.epochs={args.epochs}", "eval.gradcam_per_class=2"]
    cfg = ["--config", "configs/demo.yaml", f"data.shards={styled}", f"train.output_dir={run_dir}", *size, *keys]
    run(launch + cfg + [f"data.lung_model={model}", "logging.progress=false"], out / "train_robust.log")
    rows = []
    for name, shards in (("drawn", site), ("predicted by the segmenter", predicted)):
        slug = "drawn" if name == "drawn" else "predicted"
        ext = [sys.executable, "-m", "evaluation", "--run", str(run_dir), "--shards", str(shards), "--split", "all"]
        run(ext + ["--name", slug], out / f"external_{slug}.log")
        r = json.loads((run_dir / "external" / slug / "report.json").read_text())
        share = (r.get("lung_share") or {}).get("all") or {}
        rows.append(
            {
                "masks": name,
                "balanced_accuracy": r["balanced_accuracy"],
                "ci95": r["ci95"]["balanced_accuracy"],
                "films": r["samples"],
                "lung_share": share.get("mean"),
            }
        )
    return rows


def _ci(value: float | None, ci: list | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" + ("" if not ci else f" ({ci[0]:.{digits}f}–{ci[1]:.{digits}f})")


def table(seg_rows: list[dict], crop: list[dict]) -> str:
    lines = [
        "| films | scored | Dice (95 % CI) | IoU (95 % CI) |",
        "| --- | ---: | ---: | ---: |",
        *(
            f"| {r['set']} | {r['films']} | {_ci(r['dice']['mean'], r['dice']['ci95'])} | "
            f"{_ci(r['iou']['mean'], r['iou']['ci95'])} |"
            for r in seg_rows
        ),
        "",
        "| robust recipe at the unseen site, lung masks | films | balanced accuracy (95 % CI) | Grad-CAM lung share |",
        "| --- | ---: | ---: | ---: |",
        *(
            f"| {r['masks']} | {r['films']} | {_ci(r['balanced_accuracy'], r['ci95'], 2)} | "
            f"{_ci(r['lung_share'], None, 2)} |"
            for r in crop
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.lungs_demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/lungs_demo"))
    p.add_argument("--per-class", type=int, default=200, help="training collection films per class")
    p.add_argument("--site-per-class", type=int, default=100, help="unseen-site films per class")
    p.add_argument("--lung-size", type=int, default=96, help="the segmenter's input side")
    p.add_argument("--lung-epochs", type=int, default=10)
    p.add_argument("--image-size", type=int, default=96, help="the classifier's input side")
    p.add_argument("--epochs", type=int, default=10, help="the classifier's epochs")
    args = p.parse_args(argv)
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    styled, site = prepare(out, args)
    model = fit_segmenter(styled, out, args)
    seg_rows = segmenter_rows(model, styled, site, out)
    print("lungs_demo: segmenter scored", flush=True)
    crop = crop_rows(styled, site, maskless_site(out, model), model, out, args)
    text = table(seg_rows, crop)
    (out / "lungs.json").write_text(json.dumps({"segmenter": seg_rows, "crop": crop}, indent=2) + "\n")
    (out / "lungs.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
