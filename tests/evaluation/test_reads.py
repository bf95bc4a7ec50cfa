"""An evaluation reads each shard once: the films' provenance comes with the prediction pass.

Counted on a real local HTTP server without a cache, so every read is a GET: the
external films are read once (the predictions; their sources, sha256 and pHash
come with them) and the model's training and validation films once (the overlap
check's reference, metadata only). Before, the evaluated shards were read twice.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from pipeline.read import split_digest
from sharding.manifest import load_manifest

from helpers.http import serve


def finished_run(root: Path, shards: str, train_digest: str) -> Path:
    """A run folder with an untrained model (random init) and its card: what `python -m evaluation` needs."""
    from train.card import ModelCard, save_model_card
    from train.config import load_config, to_yaml
    from train.model import build_model

    cfg = load_config(
        None,
        [f"data.shards={shards}", "data.image_size=32", "data.num_workers=0", "eval.gradcam_per_class=0"]
        + ["eval.bootstrap_resamples=50"],
    )
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(cfg))
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=4)
    card = ModelCard(
        model=cfg.model.name,
        classes=("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"),
        image_size=32,
        stored_size=299,
        epoch=0,
        config=json.loads(json.dumps(asdict(cfg))),
        train_digest=train_digest,
    )
    save_model_card(run / "models", model.state_dict(), card)
    return run


@pytest.mark.slow
def test_an_external_evaluation_reads_each_shard_once(tmp_path, phantom_shards):
    """Films from another hospital (another phantom: no copies, so no copies figure reads pixels again)."""
    import shutil

    from evaluation.run import evaluate_external
    from sharding.build import build_shards
    from sharding.phantom import PhantomSpec, generate

    served = tmp_path / "served"
    shutil.copytree(phantom_shards, served / "own")
    raw = generate(tmp_path / "other_raw", PhantomSpec(counts=(6, 0, 9, 0), seed=3))
    other = build_shards(raw, served / "other", classes=["Normal", "COVID"], shard_size=4, progress=False)
    own = load_manifest(served / "own")
    with serve(served) as (base, counts):
        run = finished_run(tmp_path, f"{base}own/", split_digest(own, "train"))
        report = evaluate_external(run, f"{base}other/", split="all", name="other")
    assert report is not None and report["training_overlap"]["checked"]
    assert report["training_overlap"]["exact"] == report["training_overlap"]["near"] == 0
    assert report["training_overlap"]["reference_films"] == own.split("train").samples + own.split("val").samples
    assert report["samples"] == sum(other.split(s).samples for s in other.splits) > 0
    assert "per_source" in report and sum(v["support"] for v in report["per_source"].values()) == report["samples"]
    reads = {path: n for path, n in counts.items() if path.endswith(".tar")}
    want = {f"/other/{s.name}": 1 for split in other.splits for s in other.split(split).shards}
    want |= {f"/own/{s.name}": 1 for split in ("train", "val") for s in own.split(split).shards}
    assert reads == want
