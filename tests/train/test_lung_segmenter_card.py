"""Which lung segmenter a run's model card names (`train.trainer.lung_segmenter`)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sharding.segmenter import LungUNet, SegmenterSpec, save_segmenter
from train.config import Config, DataConfig


def _data(*built: str | None):
    return SimpleNamespace(manifests=[SimpleNamespace(build={"options": {"lung_model": b}}) for b in built])


def _cfg(lung_model: str = "") -> Config:
    return Config(data=DataConfig(lung_model=lung_model, crop="lungs"))


def test_the_card_names_the_configured_file_or_the_shards_segmenter_by_digest(tmp_path):
    from train.trainer import lung_segmenter

    torch.manual_seed(0)
    path = tmp_path / "lungs.safetensors"
    sha = save_segmenter(LungUNet(4, 3), SegmenterSpec(size=32, width=4, depth=3), path)
    assert lung_segmenter(_cfg(), _data(None)) == ({}, None)
    assert lung_segmenter(_cfg(), _data("ab" * 32)) == ({"sha256": "ab" * 32}, None)
    assert lung_segmenter(_cfg(str(path)), _data(None)) == ({"path": str(path.absolute()), "sha256": sha}, None)
    assert lung_segmenter(_cfg(str(path)), _data(sha, None))[1] is None
    ref, problem = lung_segmenter(_cfg(str(path)), _data("ab" * 32))
    assert problem.startswith(f"data.lung_model {path} (sha256 {sha[:12]}) is not the segmenter that predicted")
    assert "(abababababab): name that one" in problem
    ref, problem = lung_segmenter(_cfg(str(tmp_path / "gone.safetensors")), _data(None))
    assert ref == {} and problem.startswith("data.lung_model: lung model") and "does not exist" in problem
