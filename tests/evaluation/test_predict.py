"""Prediction on files/folders (shared preprocessing) and export parity."""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.predict import Predictor, collect_files, export_model
from pipeline.augment import DeviceAugment
from sharding.preprocess import load_image
from train.card import ModelCard, save_model_card
from train.config import Config
from train.model import build_model

CLASSES = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    models = tmp_path_factory.mktemp("run") / "models"
    cfg = Config()
    cfg.data.image_size = 64
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=4)
    card = ModelCard(
        model="resnet18",
        classes=tuple(CLASSES),
        image_size=64,
        stored_size=299,
        epoch=0,
        config=json.loads(json.dumps(asdict(cfg))),
    )
    save_model_card(models, model.state_dict(), card)
    return models / "best_model.pth"


@pytest.fixture()
def image_folder(tmp_path, phantom_raw):
    folder = tmp_path / "in"
    folder.mkdir()
    src = phantom_raw / "COVID" / "images" / "COVID-1.png"
    Image.open(src).save(folder / "gray.png")
    Image.open(src).convert("RGB").resize((512, 512)).save(folder / "rgb_big.jpg", quality=95)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return folder


def test_predictor_applies_training_preprocessing(model_file, phantom_raw):
    predictor = Predictor.load(model_file, "cpu")
    image, _ = load_image(phantom_raw / "COVID" / "images" / "COVID-1.png")
    x = predictor.prepare([image])
    assert x.shape == (1, 1, 64, 64) and x.dtype == torch.float32
    probs = predictor.predict([image, image])
    assert probs.shape == (2, 4)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs[0], probs[1], rtol=1e-5)
    # exactly the evaluation transform of training: DeviceAugment(train=False) at the card's size
    expected, _ = DeviceAugment(train=False, image_size=64)(torch.from_numpy(image[None, None]))
    assert torch.equal(x, expected)


@pytest.mark.slow
def test_cli_on_folder_with_corrupt_file(model_file, image_folder, tmp_path, python_exe, subprocess_env, repo_root):
    out_json, out_csv = tmp_path / "p.json", tmp_path / "p.csv"
    run = subprocess.run(
        [
            python_exe,
            "-m",
            "evaluation.predict",
            "--model",
            str(model_file),
            str(image_folder),
            "--json",
            str(out_json),
            "--csv",
            str(out_csv),
            "--device",
            "cpu",
            "--gradcam",
            str(tmp_path / "cams"),
        ],
        env=subprocess_env,
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    data = json.loads(out_json.read_text())
    assert sorted(p["file"].split("/")[-1] for p in data["predictions"]) == ["gray.png", "rgb_big.jpg"]
    assert [s["file"].split("/")[-1] for s in data["skipped"]] == ["broken.png"]
    assert "not a decodable image" in data["skipped"][0]["reason"]
    assert "broken.png" in run.stderr
    for row in data["predictions"]:
        assert row["prediction"] in CLASSES and abs(sum(row[c] for c in CLASSES) - 1) < 1e-4
    assert out_csv.read_text().splitlines()[0] == "file,prediction," + ",".join(CLASSES)
    assert len(list((tmp_path / "cams").glob("*_gradcam.png"))) == 2
    # gray and the resized RGB copy of the same film are prepared alike: near-identical probabilities
    probs = {p["file"].split("/")[-1]: [p[c] for c in CLASSES] for p in data["predictions"]}
    np.testing.assert_allclose(probs["gray.png"], probs["rgb_big.jpg"], atol=0.05)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch(model_file, tmp_path, fmt):
    predictor = Predictor.load(model_file, "cpu")
    diff = export_model(predictor, fmt, tmp_path / f"m.{fmt}")
    assert diff < 1e-4
    assert (tmp_path / f"m.{fmt}").stat().st_size > 1_000_000


def test_collect_files_filters_suffixes(image_folder):
    (image_folder / "notes.txt").write_text("x")
    assert sorted(p.name for p in collect_files([str(image_folder)])) == ["broken.png", "gray.png", "rgb_big.jpg"]


@pytest.mark.slow
def test_missing_model_is_a_clear_error(tmp_path, python_exe, subprocess_env, repo_root):
    run = subprocess.run(
        [python_exe, "-m", "evaluation.predict", "--model", str(tmp_path / "none.pth"), str(tmp_path)],
        env=subprocess_env,
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "no model file" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
def test_operating_point_needs_points_in_the_card(model_file, image_folder, python_exe, subprocess_env, repo_root):
    run = subprocess.run(
        [
            python_exe,
            "-m",
            "evaluation.predict",
            "--model",
            str(model_file),
            str(image_folder),
            "--device",
            "cpu",
            "--operating-point",
            "youden",
        ],
        capture_output=True,
        text=True,
        env=subprocess_env,
        cwd=repo_root,
        timeout=300,
    )
    assert run.returncode == 2 and "has no operating points" in run.stderr and "Traceback" not in run.stderr
