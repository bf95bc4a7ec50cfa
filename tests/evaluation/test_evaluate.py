"""Report writing, figures, lung share and run comparison, on hand-made predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.explain.gradcam import lung_share, summarize_shares
from evaluation.report.document import compare_runs
from evaluation.run import main as evaluate_main
from evaluation.run import write_report
from train.predictions import Predictions

CLASSES = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]


def test_lung_share_by_hand():
    cams = np.zeros((2, 4, 4))
    cams[0, :2, :] = 1.0  # all mass in the top half
    cams[1] = 1.0  # uniform
    masks = np.zeros((2, 4, 4))
    masks[:, :2, :2] = 1  # top-left quarter
    np.testing.assert_allclose(lung_share(cams, masks), [0.5, 0.25])
    assert np.isnan(lung_share(np.zeros((1, 4, 4)), masks[:1]))[0]
    summary = summarize_shares(np.array([0.5, 0.25, np.nan]), np.array([0, 0, 1]), CLASSES)
    assert summary["COVID"]["mean"] == pytest.approx(0.375) and summary["COVID"]["n"] == 2
    assert summary["Lung_Opacity"]["n"] == 0 and summary["Lung_Opacity"]["mean"] is None
    assert summary["all"]["p10"] == pytest.approx(0.275)


def _predictions(n=40, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    logits = rng.normal(size=(n, 4))
    logits[np.arange(n), labels] += 2.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return Predictions([f"k{i}" for i in range(n)], labels, probs.astype(np.float32), 0.5)


def test_write_report_files_and_numbers(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "epoch": e,
                    "train_loss": 1 / (e + 1),
                    "val_loss": 1.2 / (e + 1),
                    "train_accuracy": 0.5 + e / 10,
                    "val_accuracy": 0.45 + e / 10,
                    "val_macro_f1": 0.4 + e / 10,
                }
            )
            + "\n"
            for e in range(3)
        )
    )
    preds = _predictions()
    report = write_report(tmp_path, "test", preds, CLASSES, {"model_epoch": 2})
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["accuracy"] == pytest.approx(float((preds.probs.argmax(1) == preds.labels).mean()))
    assert [saved["per_class"][c]["support"] for c in CLASSES] == [10, 10, 10, 10]
    for key in ("accuracy", "macro_f1", "balanced_accuracy", "per_class"):
        assert key in saved
    for c in CLASSES:
        assert {"support", "sensitivity", "specificity", "precision", "f1", "roc_auc"} <= set(saved["per_class"][c])
    md = (tmp_path / "report.md").read_text()
    assert "| Viral Pneumonia |" in md and "specificity" in md
    for fig in ("confusion_matrix.png", "roc.png", "reliability.png", "training_curves.png"):
        with Image.open(tmp_path / fig) as img:
            img.load()
            assert img.size[0] > 300 and img.size[1] > 200
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 40 and json.loads(lines[0])["key"] == "k0"
    assert report["figures"]["roc"] == "roc.png"


def test_compare_runs_table(tmp_path, capsys):
    runs = []
    for name, share in (("clean", 0.8), ("markers", 0.4)):
        run = tmp_path / name
        run.mkdir()
        lung = {c: {"mean": share, "p10": share / 2, "n": 3} for c in CLASSES + ["all"]}
        (run / "report.json").write_text(
            json.dumps(
                {"classes": CLASSES, "accuracy": 0.9, "macro_f1": 0.88, "balanced_accuracy": 0.9, "lung_share": lung}
            )
        )
        runs.append(run)
    table = compare_runs(runs)
    assert "| lung share all | 0.800 | 0.400 |" in table
    assert evaluate_main(["--compare", str(runs[0]), str(runs[1])]) == 0
    assert "| accuracy | 0.900 | 0.900 |" in capsys.readouterr().out
    assert evaluate_main(["--compare", str(tmp_path / "nope")]) == 2


def test_report_has_every_claim_section_and_fills_the_limitations(tmp_path, phantom_shards):
    from evaluation.audits.facts import data_facts
    from evaluation.audits.probes import probe_result
    from pipeline.collection import open_collections
    from sharding.manifest import load_manifest

    preds = _predictions()
    blind = np.zeros_like(preds.probs)
    blind[:, 2] = 1.0
    extra = {
        "model_epoch": 2,
        "data": data_facts(open_collections(str(phantom_shards))),
        "training": {
            "model": "resnet18",
            "weights": "weights from imagenet.safetensors",
            "in_chans": 1,
            "image_size": 64,
            "stored_size": 299,
            "optimizer": "adam",
            "lr": 0.001,
            "scheduler": "cosine",
            "batch_size": 8,
            "precision": "no",
            "seed": 42,
            "epochs_planned": 9,
            "epochs_run": 4,
            "early_stopped": True,
            "patience": 2,
            "best_epoch": 1,
            "monitor": "val_loss",
            "monitor_value": 0.5,
        },
        "single_source_classes": ["Lung_Opacity"],
        "probes": {
            "lungs_blanked": probe_result(preds.labels, preds.probs, 200, 0),
            "lungs_only": probe_result(preds.labels, blind, 200, 0),
        },
        "probe_verdict": "Shortcut: test",
        "failures": {"COVID": [{"key": "k4", "predicted": "Normal", "confidence": 0.9, "source": "x"}]},
    }
    from train.validation import choose

    points = choose(preds.labels, preds.probs, CLASSES)
    report = write_report(tmp_path, "test", preds, CLASSES, extra, points=points)
    md = (tmp_path / "report.md").read_text()
    headings = ["## 1. Data", "## 2. Model and training", "## 3. Results", "### Operating points"]
    headings += ["## 4. Explanations and shortcut probes", "### Failure gallery", "## 5. External test"]
    headings += ["## 6. Limitations"]
    positions = [md.index(h) for h in headings]  # every section, in CLAIM's order
    assert positions == sorted(positions)
    manifest = load_manifest(phantom_shards)
    counts = [manifest.split(s).class_counts[0] for s in ("train", "val", "test")]
    assert f"| COVID | {counts[0]} | {counts[1]} | {counts[2]} |" in md
    assert "resnet18 (weights from imagenet.safetensors, 1 input channel)" in md
    assert "stopped early after 4 of 9 epochs (patience 2)" in md and "epoch 1, chosen by val_loss" in md
    # a blind model (one class for every film, 10 films a class): Wilson over 40 films for both
    assert "| lungs only (everything else blanked) | 0.25 (0.14–0.40) | 0.25 | 0.25 (0.14–0.40) |" in md
    assert "| COVID | k4 | Normal | 0.900 | x |" in md
    limits = report["limitations"]
    assert any("Lung_Opacity: every training film came from one source" in s for s in limits)
    assert any("pediatric collection" in s for s in limits)
    assert any("Few test films for COVID (10)" in s for s in limits)
    assert any("No patient identifiers" in s for s in limits) == (report["data"]["split_level"] == "sample")
    assert any("No external test" in s for s in limits)
    assert any("shortcut probe fires" in s for s in limits) == report["probes"]["lungs_blanked"]["shortcut"]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert set(saved["probes"]) == {"lungs_blanked", "lungs_only"} and "ci95" in saved["probes"]["lungs_only"]


def test_external_class_mapping_by_name():
    from evaluation.run import ExternalShardsError, class_lut

    assert class_lut(CLASSES, ["Normal", "COVID"], "x").tolist() == [2, 0]
    with pytest.raises(ExternalShardsError, match=r"\['Tuberculosis'\].*--classes"):
        class_lut(CLASSES, ["Normal", "Tuberculosis"], "x")


def test_failures_are_the_most_confident_wrong_predictions_per_class():
    from evaluation.explain.gallery import confident_failures

    probs = np.array([[0.1, 0.9, 0, 0], [0.3, 0.7, 0, 0], [0.9, 0.1, 0, 0], [0.05, 0.95, 0, 0], [0, 0, 1, 0]])
    preds = Predictions(["a", "b", "c", "d", "e"], np.array([0, 0, 0, 0, 2]), probs.astype(np.float32), 0.0)
    out = confident_failures(preds, CLASSES, 2, {"d": "site"})
    assert [f["key"] for f in out["COVID"]] == ["d", "a"]  # c is right; b is wrong but less confident
    assert out["COVID"][0] == {"key": "d", "predicted": "Lung_Opacity", "confidence": 0.95, "source": "site"}
    assert out["Normal"] == [] and "Lung_Opacity" not in out  # no films of a class: no entry


def test_the_gradcam_pass_leaves_the_weights_and_batchnorm_statistics_alone():
    import torch

    from evaluation.explain.gallery import explain_split
    from pipeline.augment import DeviceAugment
    from pipeline.batch import Batch
    from train.card import TrainedModel
    from train.config import Config, ModelConfig
    from train.model import build_model

    torch.manual_seed(0)
    net = build_model(ModelConfig(), num_classes=4).train()  # predict_split hands it over in train mode
    before = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    batches = [
        Batch(torch.randint(0, 256, (4, 1, 32, 32), generator=g, dtype=torch.uint8), torch.arange(4), list("abcd"))
    ]
    trained = TrainedModel(net, None, Config(), DeviceAugment(train=False), torch.device("cpu"))
    explain_split(trained, batches, CLASSES, 1)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "running statistics changed"


def test_initial_weights_read_like_build_model():
    from evaluation.audits.facts import initial_weights

    assert initial_weights("False") == initial_weights(" false") == initial_weights("") == "random init"
    assert initial_weights("TRUE") == "ImageNet weights from the timm hub"
    assert initial_weights("/models/rad.safetensors") == "weights from rad.safetensors"


def test_a_moved_copy_of_the_training_shards_is_known_by_the_cards_train_digest(tmp_path, phantom_shards):
    import shutil

    from evaluation.run import same_shard_set
    from pipeline.read import split_digest
    from sharding.manifest import load_manifest

    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    (run / "config.yaml").write_text(f"data:\n  shards: {tmp_path / 'gone'}\n")  # the original folder moved away
    digest = split_digest(load_manifest(phantom_shards), "train")
    (run / "models" / "best_model.json").write_text(json.dumps({"train_digest": digest}))
    moved = shutil.copytree(phantom_shards, tmp_path / "moved")
    assert same_shard_set(str(moved), run)
    (run / "models" / "best_model.json").write_text(json.dumps({"train_digest": "0" * 16}))
    assert not same_shard_set(str(moved), run)


@pytest.mark.parametrize(("old", "new"), [("train.evaluate", "evaluation"), ("train.predict", "evaluation.predict")])
def test_the_old_commands_still_work_and_say_where_they_moved(old, new, subprocess_env, repo_root):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", old, "--help"], env=subprocess_env, cwd=repo_root, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert f"`python -m {old}` moved to `python -m {new}`" in done.stderr
    assert done.stdout.startswith(f"usage: python -m {new} ")


def test_the_report_schema_refuses_unknown_missing_and_mistyped_keys_and_its_docs_are_current():
    from evaluation.report import schema

    good = {f.name: None for f in schema.fields(schema.Report)}
    good.update(
        samples=3, classes=["a"], classes_evaluated=["a"], accuracy=1.0, balanced_accuracy=1.0, macro_f1=1,
        macro_roc_auc=None, ci95={}, bootstrap={}, ece=0.0, per_class={}, confusion_matrix=[],
        confusion_matrix_normalized=[], operating_points={}, split="test", limitations=[], figures={},
    )  # fmt: skip
    assert schema.validate(good) is good
    bad = dict(good, samples="3", accuracy=True, gradcam_grid=object())
    del bad["ece"]
    with pytest.raises(schema.ReportSchemaError) as err:
        schema.validate(bad)
    for problem in ("unknown key 'gradcam_grid'", "missing 'ece'", "'samples' is str", "'accuracy' is bool"):
        assert problem in str(err.value)
    docs = (Path(__file__).resolve().parents[2] / "docs" / "evaluation.md").read_text()
    assert schema.markdown() in docs, "docs/evaluation.md is stale: python -m evaluation.report.schema"


@pytest.mark.parametrize(
    ("split", "external", "suffix"),
    [("test", False, ""), ("val", False, "_val"), ("all", True, ""), ("test", True, "")],
)
def test_one_rule_names_the_report_files(split, external, suffix):
    from evaluation.report.schema import report_suffix

    assert report_suffix(split, external) == suffix
