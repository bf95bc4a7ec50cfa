"""Predict chest X-ray classes for image files or folders with a trained model.

    python -m evaluation.predict --model runs/demo/models/best_model.pth IMAGE_OR_DIR ... \
        [--csv out.csv] [--json out.json] [--gradcam DIR] [--export onnx|torchscript --export-path F]

Images of any mode and size go through exactly the sharding preprocessing
(sharding.preprocess) and the evaluation normalisation (pipeline.augment):
the same code, not a copy. Unreadable files are reported and skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from evaluation.statistics import operating
from pipeline.augment import DeviceAugment
from sharding.preprocess import PreprocessError, load_image
from sharding.segmenter import Segmenter, SegmenterError, load_segmenter
from train.card import load_trained_model
from train.checkpoint import CheckpointError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom"}


@dataclass
class Predictor:
    """A loaded model plus the exact preprocessing it was trained with."""

    model: torch.nn.Module
    classes: list[str]
    augment: DeviceAugment
    device: torch.device
    stored_size: int
    operating_points: dict | None = None  # per class thresholds frozen on validation (best_model.json)
    segmenter: Segmenter | None = None  # the card's: the lung masks of a lung-cropped or lung-masked model

    @classmethod
    def load(cls, model_path: str | Path, device: str | None = None, lung_model: str | None = None) -> Predictor:
        """`lung_model`: where the segmenter the card names is now, if it moved (its sha256 must match)."""
        trained = load_trained_model(model_path, device)
        card = trained.card
        segmenter = None
        if trained.cfg.data.mask_lungs or trained.cfg.data.crop == "lungs":
            segmenter = _card_segmenter(card.segmenter, trained.cfg.data.mask_lungs, lung_model)
        return cls(
            trained.net,
            list(card.classes),
            trained.augment,
            trained.device,
            card.stored_size,
            card.operating_points,
            segmenter,
        )

    def prepare(self, images: list[np.ndarray]) -> torch.Tensor:
        films = np.stack(images)[:, None]
        masks = None if self.segmenter is None else torch.from_numpy(self.segmenter.predict(films)).to(self.device)
        return self.augment(torch.from_numpy(films).to(self.device), masks)[0]

    @torch.no_grad()
    def predict(self, images: list[np.ndarray]) -> np.ndarray:
        """Probabilities float [N, C] for preprocessed uint8 [H, W] images."""
        return torch.softmax(self.model(self.prepare(images)).float(), dim=1).cpu().numpy()


def _card_segmenter(ref: dict, mask_lungs: bool, given: str | None) -> Segmenter:
    """The segmenter for a lung-reading model: the card's (at `given` if it moved, same sha256), or `given` when
    the card names none (a model trained on drawn masks); CheckpointError with the fix otherwise."""
    how = "lung-masked" if mask_lungs else "lung-cropped (data.crop=lungs)"
    path = given or ref.get("path")
    if not path:
        named = f" names the segmenter {ref['sha256'][:12]} by its digest only and" if ref.get("sha256") else ""
        raise CheckpointError(
            f"this model was trained on {how} films: prediction needs each film's lung mask, which files do not "
            f"carry, and its card{named} gives no segmenter file; pass --lung-model PATH (python -m train.lungs "
            "fit), train with data.lung_model=PATH, or evaluate shards built with --include-masks or --lung-model "
            "(python -m evaluation --run RUN --shards S --split all)"
        )
    try:
        return load_segmenter(path, ref.get("sha256"))
    except SegmenterError as exc:
        raise CheckpointError(f"{exc} (--lung-model PATH: where the card's segmenter is now)") from None


def collect_files(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)
    return files


def export_model(predictor: Predictor, fmt: str, path: Path, atol: float = 1e-4) -> float:
    """Export to ONNX or TorchScript; returns the max |difference| to PyTorch on sample inputs."""
    if predictor.segmenter is not None:
        raise CheckpointError(
            "this model reads films through their lung masks (data.crop=lungs or data.mask_lungs): an exported "
            "network alone would be fed whole films; serve it with python -m evaluation.predict, which runs "
            "the segmenter and the crop"
        )
    size = predictor.augment.image_size or predictor.stored_size
    model = predictor.model.to("cpu").eval()
    sample = torch.randn(3, 1, size, size)
    with torch.no_grad():
        expected = model(sample).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        import onnxruntime as ort

        torch.onnx.export(
            model,
            (sample,),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": sample.numpy()})[
            0
        ]
    else:
        traced = torch.jit.trace(model, sample)
        traced.save(str(path))
        got = torch.jit.load(str(path)).eval()(sample).detach().numpy()
    diff = float(np.abs(got - expected).max())
    if diff > atol:
        raise RuntimeError(f"exported {fmt} model differs from PyTorch by {diff:.2e} (> {atol})")
    predictor.model.to(predictor.device)
    return diff


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluation.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="best_model.pth (with best_model.json beside it)")
    parser.add_argument("inputs", nargs="*", help="image files or folders")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: best available)")
    parser.add_argument("--csv", default=None, help="write predictions as CSV")
    parser.add_argument("--json", default=None, help="write predictions as JSON")
    parser.add_argument("--gradcam", default=None, help="folder for Grad-CAM overlay PNGs")
    parser.add_argument(
        "--lung-model",
        default=None,
        help="a lung-reading model's segmenter: where the card's is now (same sha256), or one for a card naming none",
    )
    parser.add_argument("--export", choices=("onnx", "torchscript"), default=None)
    parser.add_argument("--export-path", default=None, help="default: beside the model, .onnx / .pt")
    parser.add_argument(
        "--operating-point",
        choices=("youden", "sensitivity"),
        default=None,
        help="also flag each class whose probability reaches its threshold frozen on validation (Youden's J, or "
        "the eval.target_sensitivity point); argmax alone otherwise",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        predictor = Predictor.load(args.model, args.device, args.lung_model)
    except (CheckpointError, OSError, KeyError) as exc:
        print(f"error: cannot load model {args.model}: {exc}", file=sys.stderr)
        return 2
    point = {"youden": "youden", "sensitivity": "target_sensitivity", None: None}[args.operating_point]
    if point and not predictor.operating_points:
        print(
            f"error: {args.model} has no operating points (a model trained before they were stored, or "
            "without validation positives); retrain, or predict without --operating-point",
            file=sys.stderr,
        )
        return 2
    if args.export:
        target = Path(args.export_path or Path(args.model).with_suffix(".onnx" if args.export == "onnx" else ".pt"))
        try:
            diff = export_model(predictor, args.export, target)
        except CheckpointError as exc:
            print(f"error: cannot export {args.model}: {exc}", file=sys.stderr)
            return 2
        print(f"exported {args.export} to {target} (max |diff| vs PyTorch {diff:.2e})")
    files = collect_files(args.inputs)
    if not files and not args.export:
        print("error: no image files given (pass files or folders of .png/.jpg)", file=sys.stderr)
        return 2
    rows, failures = [], []
    for start in range(0, len(files), args.batch_size):
        chunk, images = [], []
        for path in files[start : start + args.batch_size]:
            try:
                images.append(load_image(path, predictor.stored_size)[0])
                chunk.append(path)
            except (PreprocessError, OSError) as exc:
                failures.append((path, str(exc)))
        if not images:
            continue
        probs = predictor.predict(images)
        if args.gradcam:
            save_gradcams(predictor, images, chunk, Path(args.gradcam))
        flagged = operating.flags(probs, predictor.classes, predictor.operating_points, point) if point else None
        for i, (path, p) in enumerate(zip(chunk, probs)):
            row = {
                "file": str(path),
                "prediction": predictor.classes[int(p.argmax())],
                **{name: float(v) for name, v in zip(predictor.classes, p)},
            }
            if flagged is not None:
                row["flagged"] = ";".join(flagged[i])
            rows.append(row)
    print_table(rows, predictor.classes)
    for path, reason in failures:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            columns = ["file", "prediction", *predictor.classes] + (["flagged"] if point else [])
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"predictions": rows, "skipped": [{"file": str(p), "reason": r} for p, r in failures]}, indent=2)
        )
    return 0 if rows or args.export else 1


def print_table(rows: list[dict], classes: list[str]) -> None:
    width = max([len("file")] + [len(r["file"]) for r in rows])
    print(f"{'file':<{width}}  {'prediction':<16}" + "".join(f"{c:>17}" for c in classes))
    for r in rows:
        print(f"{r['file']:<{width}}  {r['prediction']:<16}" + "".join(f"{r[c]:>17.4f}" for c in classes))


def save_gradcams(predictor: Predictor, images: list[np.ndarray], paths: list[Path], out: Path) -> None:
    from PIL import Image

    from evaluation.explain.gradcam import gradcam, overlay

    out.mkdir(parents=True, exist_ok=True)
    x = predictor.prepare(images)
    cams = gradcam(predictor.model, x)
    if predictor.augment.crop != "none":  # overlay the films as the model saw them, cropped
        seen = (x.float() * predictor.augment.std + predictor.augment.mean).clamp(0, 1) * 255
        images = list(seen[:, 0].round().to(torch.uint8).cpu().numpy())
    for image, cam, path in zip(images, cams, paths):
        small = np.asarray(Image.fromarray(image).resize(cam.shape[::-1], Image.Resampling.BILINEAR))
        Image.fromarray(overlay(small, cam)).save(out / f"{path.stem}_gradcam.png")


if __name__ == "__main__":
    sys.exit(main())
