"""Is an external test set really external? Its films checked against the films the model trained on.

Public chest X-ray collections are stitched from one another (the COVID-19
Radiography Database's Lung_Opacity class *is* RSNA's films; its pediatric
films are another Kaggle set), so a set used as "external" often holds films
the model was trained on, and its result is then partly a training result.
Every external film is compared with every training film: identical
preprocessed pixels (the sha256 in each sample's json) and near copies (a
256-bit DCT hash of the stored pixels within `distance` bits: the same film
re-exported, resized or re-windowed). The report gives the copies and the
results on the films that are not copies.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.fast_tar import tar_members
from pipeline.urls import open_url
from sharding.contract import META
from sharding.dedup import near_pairs_between, phash
from sharding.manifest import ManifestError
from sharding.verify import decode_member
from train.config import Config
from train.loop import Predictions
from train.metrics import classification_report
from train.presets import build_split_loader

#: The report keys repeated for the films that copy no training film.
HEADLINE = ("samples", "classes_evaluated", "accuracy", "balanced_accuracy", "macro_f1", "ci95")


@dataclass(frozen=True)
class FilmHashes:
    """Keys of a set of films with their pixel sha256 and perceptual hash, in the same order."""

    keys: list[str]
    sha256: list[str]
    phash: list[int]


def film_hashes(urls: Sequence[str], cache_dir: str | None = None) -> FilmHashes:
    """One read of each shard: the json's pixel sha256 and the stored image's perceptual hash, per film."""
    sha: dict[str, str] = {}
    near: dict[str, int] = {}
    for url in urls:
        with open_url(url, cache_dir=cache_dir) as stream:
            for key, ext, payload in tar_members(stream):
                if ext == META:
                    sha[key] = json.loads(bytes(payload)).get("sha256") or ""
                elif ext.startswith("image."):
                    near[key] = phash(decode_member(ext, bytes(payload))[0])
    keys = sorted(near)
    return FilmHashes(keys, [sha.get(k, "") for k in keys], [near[k] for k in keys])


def find_copies(films: FilmHashes, train: FilmHashes, distance: int | None) -> dict[str, dict]:
    """{film key: {train_key, kind: exact|near, bits}} for each film that copies a training film (the closest).

    `distance`: pHash bits within which a film is a near copy (`eval.overlap_distance`); None: exact copies only.
    """
    by_sha = {s: k for k, s in zip(train.keys, train.sha256) if s}
    out: dict[str, dict] = {}
    for key, sha in zip(films.keys, films.sha256):
        if sha and sha in by_sha:
            out[key] = {"train_key": by_sha[sha], "kind": "exact", "bits": 0}
    if distance is None:
        return out
    for i, j, bits in near_pairs_between(films.phash, train.phash, distance):
        key = films.keys[i]
        if key not in out or out[key]["kind"] == "near" and bits < out[key]["bits"]:
            out[key] = {"train_key": train.keys[j], "kind": "near", "bits": bits}
    return out


def overlap_summary(copies: dict[str, dict], films: int, train_films: int, distance: int | None) -> dict:
    """The report's `training_overlap` entry (without the results on the remaining films)."""
    kinds = [c["kind"] for c in copies.values()]
    return {
        "checked": True,
        "films": films,
        "train_films": train_films,
        "near_distance": distance,
        "exact": kinds.count("exact"),
        "near": kinds.count("near"),
        "copies": dict(sorted(copies.items())),
    }


def not_copied(keys: Sequence[str], copies: dict[str, dict]) -> np.ndarray:
    """Boolean mask over `keys`: True for the films that copy no training film."""
    return np.array([k not in copies for k in keys], dtype=bool)


def training_overlap(cfg: Config, train_shards: str, urls: list[str], preds: Predictions, classes: list[str]) -> dict:
    """The external films that copy training films, and the results without them (rank 0)."""
    try:
        train_urls = build_split_loader(cfg, "train", shards=train_shards, train=False).urls
        train = film_hashes(train_urls, cfg.data.cache_dir)
    except (ManifestError, OSError, ValueError) as exc:
        return {
            "checked": False,
            "reason": f"the training films at {train_shards} cannot be read ({exc}); "
            "pass --train-shards PATH to check the external films against them",
        }
    films = film_hashes(urls, cfg.data.cache_dir)
    copies = find_copies(films, train, cfg.eval.overlap_distance)
    out = overlap_summary(copies, len(films.keys), len(train.keys), cfg.eval.overlap_distance)
    keep = not_copied(preds.keys, copies)
    if copies and keep.any():
        rest = classification_report(
            preds.labels[keep], preds.probs[keep], classes, bootstrap=cfg.eval.bootstrap_resamples, seed=cfg.train.seed
        )
        out["without_copies"] = {k: rest[k] for k in HEADLINE}
    return out
