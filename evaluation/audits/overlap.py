"""Is an external test set really external? Its films checked against the films the model was developed on.

Public chest X-ray collections are stitched from one another (the COVID-19
Radiography Database's Lung_Opacity class *is* RSNA's films; its pediatric
films are another Kaggle set), so a set used as "external" often holds films
the model was trained on, and its result is then partly a training result.
Every external film is compared with every training and validation film (the
validation films chose the model and its thresholds): identical preprocessed
pixels (the sha256 in each sample's json) and near copies (a 256-bit DCT hash
of the stored pixels within `distance` bits: the same film re-exported,
resized or re-windowed; crops, flips and burned-in edits are not detected).
The reference films must be the ones the model was trained on: their train
split's digest is checked against the model card's. The report gives the
copies (and whether their label differs there) and the results without them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from evaluation.statistics.metrics import classification_report
from evaluation.statistics.registry import SUMMARY_NAMES
from pipeline.collection import open_collections
from pipeline.fast_tar import tar_members
from pipeline.provenance import UNKNOWN, from_meta
from pipeline.read import ShardRef
from sharding.contract import META
from sharding.dedup import near_pairs_between, phash
from sharding.grid import image_grid
from sharding.manifest import ManifestError
from sharding.verify import decode_member
from train.config import Config
from train.predictions import Predictions

#: The report keys repeated for the films that copy no reference film.
HEADLINE = ("samples", "classes_evaluated", *SUMMARY_NAMES, "ci95")
#: The splits an external film is checked against: what trained the model and what chose it.
REFERENCE_SPLITS = ("train", "val")
#: Copies listed in report.md and shown in copies.png (report.json has all), and that figure's layout.
COPIES_SHOWN = 10
COPY_TILE, COPY_LABEL = 160, 110


@dataclass(frozen=True)
class FilmHashes:
    """Keys of a set of films with their class, pixel sha256, perceptual hash and shard, in the same order."""

    keys: list[str]
    classes: list[str]
    sha256: list[str]
    phash: list[int]
    shards: list = field(default_factory=list)  # the shard (ShardRef or URL) each film was read from
    sources: list[str] = field(default_factory=list)  # each film's source (site), from its json


def _ref(shard: ShardRef | str) -> ShardRef:
    return shard if isinstance(shard, ShardRef) else ShardRef(str(shard))


def _samples(stream) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: payload}) per sample: a sample's members are consecutive in a shard."""
    key, members = None, {}
    for k, ext, payload in tar_members(stream):
        if k != key and key is not None:
            yield key, members
            members = {}
        key = k
        members[ext] = payload
    if key is not None:
        yield key, members


def film_hashes(shards: Sequence[ShardRef | str], cache_dir: str | None = None, perceptual: bool = True) -> FilmHashes:
    """One read of each shard: each film's class, source, pixel sha256 and (`perceptual`) its perceptual hash,
    from its json. Only films whose json lacks the hash (shards built before build version 3) have their image
    decoded to compute it; without `perceptual` `phash` stays empty.

    Shards are opened with their manifest sha256 (ShardRef), the loader's cache key: one cached copy each.
    """
    keys, facts, near, where = [], [], [], []
    for ref in map(_ref, shards):
        with ref.open(cache_dir) as stream:
            for key, members in _samples(stream):
                meta = json.loads(bytes(members[META])) if META in members else {}
                image = next((ext for ext in members if ext.startswith("image.")), None)
                if image is None:
                    continue
                keys.append(ref.film_key(key))
                facts.append(meta)
                where.append(ref)
                if perceptual:
                    stored = from_meta(meta).phash
                    near.append(stored if stored is not None else phash(decode_member(image, bytes(members[image]))[0]))
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return FilmHashes(
        [keys[i] for i in order],
        [facts[i].get("class") or "" for i in order],
        [facts[i].get("sha256") or "" for i in order],
        [near[i] for i in order] if perceptual else [],
        [where[i] for i in order],
        [facts[i].get("source") or UNKNOWN for i in order],
    )


def predicted_films(preds: Predictions, classes: Sequence[str], splits: Sequence[list[ShardRef]]) -> FilmHashes | None:
    """The evaluated films as the prediction pass read them (their json came with their pixels): no shard is
    read again. `splits` are the shards of each evaluated split, in the order the predictions concatenate them.
    None when a film's json has no pHash (shards built before build version 3): read them with `film_hashes`.
    """
    if any(p.phash is None for p in preds.provenance) or (preds.indices < 0).any():
        return None
    shard_of: list[ShardRef] = []
    start = 0
    for refs in splits:
        ends = np.cumsum([r.samples for r in refs])
        n = int(ends[-1]) if len(ends) else 0
        shard_of += [refs[int(j)] for j in np.searchsorted(ends, preds.indices[start : start + n], side="right")]
        start += n
    if start != len(preds.keys):
        raise RuntimeError(f"{len(preds.keys)} predictions for {start} films in the evaluated splits")
    order = sorted(range(len(preds.keys)), key=preds.keys.__getitem__)
    return FilmHashes(
        [preds.keys[i] for i in order],
        [classes[int(preds.labels[i])] for i in order],
        [preds.provenance[i].sha256 for i in order],
        [preds.provenance[i].phash for i in order],
        [shard_of[i] for i in order],
        [preds.provenance[i].source for i in order],
    )


def film_images(films: FilmHashes, keys: Sequence[str], cache_dir: str | None = None) -> dict[str, np.ndarray]:
    """{key: uint8 [H, W]} of the wanted films, reading only the shards that hold them."""
    shard_of = {k: _ref(ref) for k, ref in zip(films.keys, films.shards)}
    wanted = set(keys)
    out: dict[str, np.ndarray] = {}
    for ref in sorted({shard_of[k] for k in wanted}, key=lambda r: r.url):
        mine = {ref.shard_key(k): k for k in wanted if shard_of[k] == ref}  # the key inside the shard -> the film's
        with ref.open(cache_dir) as stream:
            for key, ext, payload in tar_members(stream):
                if key in mine and ext.startswith("image."):
                    out[mine[key]] = decode_member(ext, bytes(payload))[0]
    return out


def copies_grid(copies: dict[str, dict], films: FilmHashes, reference: FilmHashes, cache_dir: str | None = None):
    """The first COPIES_SHOWN copies (report order) beside the films they copy: a PIL image, or None."""
    rows = copies_rows(copies, films, reference, cache_dir)
    return image_grid(rows, tile=COPY_TILE, label_width=COPY_LABEL) if rows else None


def copies_rows(
    copies: dict[str, dict], films: FilmHashes, reference: FilmHashes, cache_dir: str | None = None
) -> list[tuple[str, list[np.ndarray]]]:
    """The copies figure's rows: ("n. exact" or "n. near B bits", [the copy, the film it copies])."""
    shown = list(sorted(copies.items()))[:COPIES_SHOWN]
    left = film_images(films, [k for k, _ in shown], cache_dir)
    right = film_images(reference, [c["reference_key"] for _, c in shown], cache_dir)
    return [
        (
            f"{i}. {c['kind']}" + (f" {c['bits']} bits" if c["kind"] == "near" else ""),
            [left[k], right[c["reference_key"]]],
        )
        for i, (k, c) in enumerate(shown, 1)
    ]


def find_copies(films: FilmHashes, reference: FilmHashes, distance: int | None) -> dict[str, dict]:
    """{film key: {reference_key, kind: exact|near, bits, class, reference_class}} for each film that copies a
    reference film (the closest one).

    `distance`: pHash bits within which a film is a near copy (`eval.overlap_distance`); None: exact copies only.
    """
    by_sha = {s: i for i, s in enumerate(reference.sha256) if s}
    found: dict[int, tuple[int, str, int]] = {}  # film index -> (reference index, kind, bits)
    for i, sha in enumerate(films.sha256):
        if sha and sha in by_sha:
            found[i] = (by_sha[sha], "exact", 0)
    if distance is not None:
        for i, j, bits in near_pairs_between(films.phash, reference.phash, distance):
            if i not in found or found[i][1] == "near" and bits < found[i][2]:
                found[i] = (j, "near", bits)
    return {
        films.keys[i]: {
            "reference_key": reference.keys[j],
            "kind": kind,
            "bits": bits,
            "class": films.classes[i],
            "reference_class": reference.classes[j],
        }
        for i, (j, kind, bits) in sorted(found.items())
    }


def overlap_summary(copies: dict[str, dict], films: int, reference: FilmHashes, splits, distance: int | None) -> dict:
    """The report's `training_overlap` entry (without the results on the remaining films)."""
    kinds = [c["kind"] for c in copies.values()]
    return {
        "checked": True,
        "films": films,
        "reference_splits": list(splits),
        "reference_films": len(reference.keys),
        "near_distance": distance,
        "exact": kinds.count("exact"),
        "near": kinds.count("near"),
        "different_label": sum(c["class"] != c["reference_class"] for c in copies.values()),
        "copies": dict(sorted(copies.items())),
    }


def not_copied(keys: Sequence[str], copies: dict[str, dict]) -> np.ndarray:
    """Boolean mask over `keys`: True for the films that copy no reference film."""
    return np.array([k not in copies for k in keys], dtype=bool)


def reference_films(
    cfg: Config, shards, train_digest: str, exclude: Sequence[str] = ()
) -> tuple[FilmHashes, tuple[str, ...]]:
    """The training and validation films of the collections at `shards` (a path, or a run's list; less the
    `exclude`d splits: the one evaluated), once their train split is known to be the model's.

    Raises ManifestError (missing, or not the model's shards), OSError, or ValueError (a damaged shard).
    """
    data = open_collections(shards, cfg.data.classes)
    if train_digest and data.digest("train") != train_digest:
        raise ManifestError(
            f"the shards at {shards} are not the ones the model was trained on (their train split differs from "
            "best_model.json's train_digest)"
        )
    splits = tuple(s for s in REFERENCE_SPLITS if s not in exclude and data.samples(s))
    refs = [r for s in splits for r in data.split_shards(s, cfg.data.verify_checksums)]
    return film_hashes(refs, cfg.data.cache_dir), splits


def training_overlap(
    cfg: Config,
    shards,
    train_digest: str,
    films: FilmHashes,
    preds: Predictions,
    classes: list[str],
    exclude: Sequence[str] = (),
) -> tuple[dict, object]:
    """The evaluated `films` (read once by the caller) that copy training or validation films (the `exclude`d
    splits aside), the results without them, and the copies beside their originals (a PIL image, None without
    copies); rank 0."""
    try:
        reference, splits = reference_films(cfg, shards, train_digest, exclude)
    except (ManifestError, OSError, ValueError) as exc:
        reason = f"the training films at {shards} could not be used ({exc}); if they moved, pass --train-shards PATH"
        return {"checked": False, "reason": reason}, None
    copies = find_copies(films, reference, cfg.eval.overlap_distance)
    out = overlap_summary(copies, len(films.keys), reference, splits, cfg.eval.overlap_distance)
    keep = not_copied(preds.keys, copies)
    if copies and keep.any():
        rest = classification_report(
            preds.labels[keep], preds.probs[keep], classes, bootstrap=cfg.eval.bootstrap_resamples, seed=cfg.train.seed
        )
        out["without_copies"] = {k: rest[k] for k in HEADLINE}
    return out, copies_grid(copies, films, reference, cfg.data.cache_dir)
