"""Raw dataset folder -> WebDataset shards per split + manifest.json.

Two streaming passes, so memory stays bounded whatever the dataset size:

1. **analyse**: every image is decoded and preprocessed in a worker, which
   returns only its pixel sha256, (optionally) a perceptual hash, its original
   size/mode and mask problems; no pixels are kept.
2. **write**: groups and splits are decided from those hashes; then each
   split's samples, in a seeded shuffled order, are preprocessed again in the
   workers and encoded there; the parent only appends the encoded bytes to the
   current tar.

`run_build` goes through named phases: scan -> (no-op check) -> `analyse` ->
`plan` (groups, duplicate report, shard plan) -> `write` -> `assemble_manifest`
-> `outdir.swap_into_place`.

Atomicity (`sharding.outdir`): the whole new set (shards and manifest) is built
in a hidden sibling folder and swapped in with two renames. A reader sees the
previous complete set, nothing, or the new complete set; never a mix. Leftovers
of a killed build are cleaned (or, if the kill hit between the two renames,
the previous set is restored) by the next build.

Determinism: the manifest holds no timestamps or absolute paths and tar
members have fixed metadata, so the same inputs and options give the same
bytes; the inputs' fingerprint (paths, sizes, mtimes) plus the options is
stored in `manifest.build`, and a rebuild with the same fingerprint does
nothing unless forced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from sharding import outdir
from sharding.contract import DATASET_DIR, ENCODINGS, IMAGE_SIZE, SPLITS
from sharding.dedup import HASH_BITS, group
from sharding.encode import NO_MASK, SampleError, SampleTask, ShardTask, analyse_one, sample_meta, write_shard_task
from sharding.executor import SEGMENTER_LIBRARIES, Executor, ExecutorError, library_versions
from sharding.manifest import Manifest, SplitInfo, write_manifest
from sharding.pool import progress_bar
from sharding.preflight import BuildError, check_executor, lung_model_ref, open_executor
from sharding.source import Scan, SourceError, scan
from sharding.split import FRACTIONS, assign, compose_groups, duplicate_report, shuffled, split_report

#: Bump when a code change alters shard bytes, so old fingerprints stop matching.
#: 2: classes from the data, sample json `path` (was `source`) + `source` (site) + `patient_id`.
#: 3: sample json `phash` (the stored pixels' 256-bit DCT hash, 64 hex digits), so the overlap check decodes nothing.
BUILD_VERSION = 3
SPLIT_BY = ("patient", "source")
#: Below this many images per worker a process pool costs more than it saves.
MIN_PER_WORKER = 64


@dataclass(frozen=True)
class BuildOptions:
    """Everything besides the inputs that determines the shard bytes."""

    encoding: str = "raw"
    include_masks: bool = False
    shard_size: int = 1000
    seed: int = 0
    near_dup_distance: int | None = None
    split_by: str = "patient"  # "patient": a patient's films share a split (when ids are known); "source"
    classes: tuple[str, ...] | None = None  # a fixed class order or subset (None: from the data)
    lung_model: str | None = None  # sha256 of the segmenter that predicts the masks films lack (--lung-model)

    def __post_init__(self) -> None:
        if self.split_by not in SPLIT_BY:
            raise BuildError(f"--split-by must be one of {list(SPLIT_BY)}, got {self.split_by!r}")
        if self.encoding not in ENCODINGS:
            raise BuildError(f"--encoding must be one of {list(ENCODINGS)}, got {self.encoding!r}")
        if self.shard_size < 1:
            raise BuildError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.near_dup_distance is not None and not 0 <= self.near_dup_distance <= HASH_BITS:
            raise BuildError(f"--near-dup-distance must be in 0..{HASH_BITS} bits, got {self.near_dup_distance}")

    def as_dict(self) -> dict:
        """The options as the manifest and the fingerprint hold them: without a segmenter, as they always were."""
        out = asdict(self)
        return out if self.lung_model else {k: v for k, v in out.items() if k != "lung_model"}

    def unfilled(self, mask_issues: list[dict]) -> list[dict]:
        """The mask problems a build leaves: a segmenter fills the films that come without a mask, no others."""
        return [m for m in mask_issues if not (self.lung_model and m["reason"] == NO_MASK)]


@dataclass(frozen=True)
class BuildReport:
    """What a build did: the manifest in place, whether it was a no-op, and timings."""

    manifest: Manifest
    out: Path
    noop: bool
    elapsed: float
    images_per_s: float = 0.0
    analyse_s: float = 0.0
    write_s: float = 0.0


# --------------------------------------------------------------------------- helpers


def fingerprint(root: Path, options: BuildOptions, labels: str | Path | None = None) -> str:
    """sha256 over every input file's relative path, size and mtime, the options and the label CSV's bytes."""
    h = hashlib.sha256()
    if labels is not None:
        h.update(Path(labels).read_bytes())
    h.update(json.dumps({"options": options.as_dict(), "build_version": BUILD_VERSION}, sort_keys=True).encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            st = path.stat()
            h.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _check_strict(skipped: list[dict], mask_issues: list[dict]) -> None:
    """--strict: BuildError listing every input the build skips (or keeps with a mask problem)."""
    if not (skipped or mask_issues):
        return
    lines = [f"  {s['path']}: {s['reason']}" for s in skipped]
    lines += [f"  {m['path']} (mask): {m['reason']}" for m in mask_issues]
    shown = "\n".join(lines[:20]) + (f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else "")
    raise BuildError(f"--strict: {len(lines)} input(s) would be skipped:\n{shown}")


# --------------------------------------------------------------------------- phases


@dataclass
class Analysis:
    """Pass 1 over every input: the usable records, what was skipped and why, mask problems."""

    facts: list[dict]  # per record: sha, size, mode (+ phash, mask_issue), or error
    good: list[int]  # indices of usable records
    skipped: list[dict]
    mask_issues: list[dict]
    seconds: float


@dataclass
class BuildPlan:
    """Groups, splits and the shard plan: everything decided before a byte is written."""

    split_of: list[str]  # per usable record
    duplicate_groups: list[dict]
    shards: list[ShardTask] = field(default_factory=list)
    split: dict = field(default_factory=dict)  # level (sample, patient, source) and the largest deviation


def analyse(found: Scan, options: BuildOptions, mapper: Executor, progress: bool) -> Analysis:
    """Pass 1: decode and hash every input in the workers; sort out the unusable ones."""
    start = time.perf_counter()
    records = found.records
    fn = partial(analyse_one, include_masks=options.include_masks, want_phash=options.near_dup_distance is not None)
    facts: list[dict] = []
    with progress_bar(len(records), "analyse", progress) as bar:
        for fact in mapper.imap(fn, records):
            facts.append(fact)
            bar.update(1)
    skipped = list(found.skipped)
    good: list[int] = []
    for i, fact in enumerate(facts):
        if "error" in fact:
            skipped.append({"path": records[i].rel, "reason": fact["error"]})
        else:
            good.append(i)
    skipped.sort(key=lambda s: s["path"])
    mask_issues = [
        {"key": records[i].key, "path": records[i].rel, "reason": facts[i]["mask_issue"]}
        for i in good
        if options.include_masks and facts[i].get("mask_issue")
    ]
    return Analysis(facts, good, skipped, mask_issues, time.perf_counter() - start)


def plan(
    found: Scan,
    analysis: Analysis,
    options: BuildOptions,
    tmp: Path,
    delay_s: float = 0.0,
    lung: tuple[str, str] | None = None,
) -> BuildPlan:
    """Duplicate groups -> leakage-safe splits -> a seeded write order -> shards of `shard_size`.

    `delay_s`: a pause after each shard is written (fault tests kill a build mid-way in it). `lung`: the
    segmenter (path, sha256) that predicts the masks films lack."""
    records, facts, good = found.records, analysis.facts, analysis.good
    phashes = [facts[i]["phash"] for i in good] if options.near_dup_distance is not None else None
    dups, kinds = group([facts[i]["sha"] for i in good], phashes, options.near_dup_distance)
    metas = [sample_meta(records[i], facts[i]) for i in good]
    by = "source" if options.split_by == "source" else "patient_id"
    gids = compose_groups(dups, [m.get(by) for m in metas])  # a patient's (or a source's) films, with duplicates
    split_of = assign([records[i].label for i in good], gids, options.seed, n_classes=len(found.classes))
    result = BuildPlan(split_of, duplicate_report(records, good, dups, kinds, split_of))
    result.split = split_report(found, good, split_of, metas, options.split_by)
    issue_of = {m["key"]: m["reason"] for m in analysis.mask_issues}
    for split in SPLITS:
        idx = [j for j in range(len(good)) if split_of[j] == split]
        order = [idx[k] for k in shuffled([records[good[j]].key for j in idx], options.seed, split)]
        for s, lo in enumerate(range(0, len(order), options.shard_size)):
            tasks = tuple(
                SampleTask(
                    records[good[j]],
                    split,
                    facts[good[j]]["sha"],
                    facts[good[j]]["size"],
                    facts[good[j]]["mode"],
                    options.encoding,
                    options.include_masks,
                    issue_of.get(records[good[j]].key),
                    metas[j],
                )
                for j in order[lo : lo + options.shard_size]
            )
            result.shards.append(
                ShardTask(str(tmp / f"{split}-{s:06d}.tar"), split, tasks, len(found.classes), delay_s, lung)
            )
    return result


def write(build_plan: BuildPlan, mapper: Executor, progress: bool) -> tuple[dict[str, list], float]:
    """Pass 2: each shard preprocessed, encoded and written by a worker; (shard infos per split, seconds)."""
    start = time.perf_counter()
    infos: dict[str, list] = {s: [] for s in SPLITS}
    total = sum(len(t.samples) for t in build_plan.shards)
    with progress_bar(total, "write", progress) as bar:
        sizes = [len(t.samples) for t in build_plan.shards]
        for task, info in zip(build_plan.shards, mapper.map_counted(write_shard_task, build_plan.shards, bar, sizes)):
            outdir.check_written(Path(task.path), info.bytes)  # on a cluster: proof that --out is shared
            infos[task.split].append(info)
    return infos, time.perf_counter() - start


def assemble_manifest(
    found: Scan, analysis: Analysis, build_plan: BuildPlan, infos: dict[str, list], options: BuildOptions, fp: str
) -> Manifest:
    """The manifest of the written shards, with counts that must reconcile with the inputs."""
    splits = {}
    n_classes = len(found.classes)
    for split in SPLITS:
        counts = [0] * n_classes
        for info in infos[split]:
            counts = [a + b for a, b in zip(counts, info.class_counts)]
        sources: dict[str, list[int]] = {}
        for task in build_plan.shards:
            if task.split == split:
                for t in task.samples:
                    sources.setdefault((t.meta or {}).get("source") or "unknown", [0] * n_classes)[t.record.label] += 1
        splits[split] = SplitInfo(
            shards=tuple(infos[split]), class_counts=tuple(counts), sources=dict(sorted(sources.items()))
        )
    dups = build_plan.duplicate_groups
    counts = {
        "scanned": found.scanned,
        "written": sum(s.samples for s in splits.values()),
        "skipped": len(analysis.skipped),
        "mask_issues": len(analysis.mask_issues),
        **(
            {"masks_predicted": len(analysis.mask_issues) - len(options.unfilled(analysis.mask_issues))}
            if options.lung_model
            else {}
        ),
        "duplicate_groups": len(dups),
        "duplicate_images": sum(len(d["members"]) for d in dups),
        "mixed_label_groups": sum(d["mixed_labels"] for d in dups),
        "bytes": sum(s.bytes for sp in splits.values() for s in sp.shards),
    }
    if counts["scanned"] != counts["written"] + counts["skipped"]:  # pragma: no cover - a bug, not input
        raise AssertionError(f"counts do not reconcile: {counts}")
    build = {
        "fingerprint": fp,
        "options": options.as_dict(),
        "dataset": found.root.name if found.root.name else DATASET_DIR,
        "input": found.kind,
        "split": build_plan.split,
        "notes": list(found.notes),
        "build_version": BUILD_VERSION,
        "versions": library_versions(
            ("numpy", "pillow", "webdataset") + (SEGMENTER_LIBRARIES if options.lung_model else ())
        ),
        "split_fractions": list(FRACTIONS),
        "near_dup_hash": "phash256-dct" if options.near_dup_distance is not None else None,
    }
    return Manifest(
        classes=found.classes,
        image_size=IMAGE_SIZE,
        encoding=options.encoding,
        masks=options.include_masks,
        seed=options.seed,
        splits=splits,
        build=build,
        skipped=tuple(analysis.skipped),
        duplicate_groups=tuple(dups),
        mask_issues=tuple(analysis.mask_issues),
        counts=counts,
    )


def _unchanged(out: Path, fp: str, strict: bool) -> Manifest | None:
    """The set in `out` when a build would write the same bytes (it must still pass --strict)."""
    existing = outdir.unchanged(out, fp)
    if existing is not None and strict:  # strict is not part of the fingerprint
        filler = BuildOptions(lung_model=existing.build["options"].get("lung_model"))  # what it was built with
        _check_strict(list(existing.skipped), filler.unfilled(list(existing.mask_issues)))
    return existing


def _workers(requested: int | None, records: int) -> int:
    n = (os.cpu_count() or 1) if requested is None else int(requested)
    if n < 1:
        raise BuildError(f"--workers must be >= 1, got {requested}")
    return max(1, min(n, records // MIN_PER_WORKER))


# --------------------------------------------------------------------------- build


def run_build(
    raw: str | Path,
    out: str | Path,
    *,
    labels: str | Path | None = None,
    classes: list[str] | None = None,
    split_by: str = "patient",
    encoding: str = "raw",
    include_masks: bool = False,
    shard_size: int = 1000,
    workers: int | None = None,
    seed: int = 0,
    near_dup_distance: int | None = None,
    strict: bool = False,
    force: bool = False,
    progress: bool = True,
    shard_delay_s: float = 0.0,
    executor: str = "local",
    ray_address: str | None = None,
    lung_model: str | Path | None = None,
) -> BuildReport:
    """Build (or confirm unchanged) the shard set in `out`; see the module docstring.

    `executor`: what runs the passes (`sharding.executor`: "local" or "ray", the same bytes either way);
    `ray_address`: a Ray cluster to join. `shard_delay_s` pauses after each shard (no effect on the bytes):
    fault tests kill a build in it. `lung_model`: a segmenter file (`python -m train.lungs fit`) that predicts
    the masks films lack; it implies `include_masks`, and each predicted mask's json names its sha256."""
    start = time.perf_counter()
    lung = lung_model_ref(lung_model)
    masks = bool(include_masks) or lung is not None
    classes_ = tuple(classes) if classes else None
    options = BuildOptions(
        encoding, masks, int(shard_size), int(seed), near_dup_distance, split_by, classes_, lung and lung[1]
    )
    # absolute, not resolved: workers elsewhere (Ray nodes) need whole paths; a symlinked root keeps its name
    out, raw = Path(out).absolute(), Path(raw).absolute()
    labels = None if labels is None else Path(labels).absolute()
    check_executor(executor, ray_address)
    try:
        found = scan(raw, labels, list(options.classes) if options.classes else None)
        outdir.recover(out)
        outdir.check_out(out)
    except (SourceError, outdir.OutputFolderError) as exc:
        raise BuildError(str(exc)) from None
    fp = fingerprint(found.root, options, labels)
    existing = None if force else _unchanged(out, fp, strict)
    if existing is not None:
        return BuildReport(existing, out, True, time.perf_counter() - start)
    # Imported before the pool forks, so workers inherit it instead of importing it each.
    import sharding.writer  # noqa: F401

    mapper = open_executor(executor, _workers(workers, len(found.records)), ray_address, lung is not None)
    ok, tmp = False, None
    try:
        analysis = analyse(found, options, mapper, progress)
        if strict:
            _check_strict(analysis.skipped, options.unfilled(analysis.mask_issues))
        if not analysis.good:
            raise BuildError(f"no usable images under {found.root}: all {found.scanned} inputs were skipped")
        tmp = outdir.staging(out)
        build_plan = plan(found, analysis, options, tmp, shard_delay_s, lung)
        infos, write_s = write(build_plan, mapper, progress)
        outdir.sweep_partials(tmp)  # a retried task's dead first attempt can leave its temporary file
        manifest = assemble_manifest(found, analysis, build_plan, infos, options, fp)
        write_manifest(manifest, tmp)
        outdir.fsync_dir(tmp)
        outdir.swap_into_place(tmp, out)
        ok = True
    except (SampleError, ExecutorError, outdir.OutputFolderError) as exc:  # an input changed, work lost: one line
        raise BuildError(str(exc)) from None
    finally:
        mapper.close(ok)
        if not ok and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - start
    written = manifest.counts["written"]
    return BuildReport(manifest, out, False, elapsed, written / max(elapsed, 1e-9), analysis.seconds, write_s)


def build_shards(raw: str | Path, out: str | Path, **options) -> Manifest:
    """`run_build` (same keyword options) returning only the manifest now in place.

    A no-op (returning the existing manifest) when the inputs and options are
    unchanged, unless `force`. Raises BuildError for unusable input or options.
    """
    return run_build(raw, out, **options).manifest


__all__ = ["BuildError", "BuildOptions", "BuildReport", "build_shards", "fingerprint", "run_build"]
