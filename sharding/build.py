"""Raw dataset folder -> WebDataset shards per split + manifest.json.

Two streaming passes, so memory stays bounded whatever the dataset size:

1. **analyse**: every image is decoded and preprocessed in a worker, which
   returns only its pixel sha256, (optionally) a perceptual hash, its original
   size/mode and mask problems; no pixels are kept.
2. **write**: groups and splits are decided from those hashes; then each
   split's samples, in a seeded shuffled order, are preprocessed again in the
   workers and encoded there; the parent only appends the encoded bytes to the
   current tar.

Atomicity: the whole new set (shards and manifest) is built in a hidden
sibling folder `.<out>.build-<pid>/` and swapped in with two renames
(old set -> `.<out>.old-<pid>`, new set -> `<out>`). A reader sees the
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
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sharding.contract import CLASSES, DATASET_DIR, ENCODINGS, IMAGE_SIZE, SPLITS
from sharding.dedup import HASH_BITS, group, phash, pixel_sha256
from sharding.files import pid_alive
from sharding.manifest import MANIFEST_NAME, Manifest, ManifestError, SplitInfo, load_manifest, write_manifest
from sharding.preprocess import PreprocessError, load_image, load_mask, open_image
from sharding.source import Record, SourceError, scan
from sharding.split import FRACTIONS, assign, shuffled

#: Bump when a code change alters shard bytes, so old fingerprints stop matching.
BUILD_VERSION = 1
#: Below this many images per worker a process pool costs more than it saves.
MIN_PER_WORKER = 64
#: Relative aspect-ratio difference above which a mask does not belong to its image.
MASK_ASPECT_TOLERANCE = 0.02
#: Test hook: seconds to sleep after each shard is written (lets a test kill a build mid-way).
_DELAY_ENV = "RADSTREAM_SHARD_DELAY"


class BuildError(ValueError):
    """The build cannot proceed (bad options, unusable input, --strict skip); the message says why."""


@dataclass(frozen=True)
class BuildOptions:
    """Everything besides the inputs that determines the shard bytes."""

    encoding: str = "raw"
    include_masks: bool = False
    shard_size: int = 1000
    seed: int = 0
    near_dup_distance: int | None = None

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise BuildError(f"--encoding must be one of {list(ENCODINGS)}, got {self.encoding!r}")
        if self.shard_size < 1:
            raise BuildError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.near_dup_distance is not None and not 0 <= self.near_dup_distance <= HASH_BITS:
            raise BuildError(f"--near-dup-distance must be in 0..{HASH_BITS} bits, got {self.near_dup_distance}")


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


# --------------------------------------------------------------------------- workers


def _mask_problem(rec: Record, size: tuple[int, int]) -> str | None:
    """Why this record's mask cannot be used, or None."""
    if rec.mask_path is None:
        return "no mask file"
    try:
        mask = open_image(rec.mask_path)
    except PreprocessError as exc:
        return f"mask {_reason(exc)}"
    except OSError as exc:
        return f"mask unreadable: {_reason(exc)}"
    w, h = size
    ratio_img, ratio_mask = w / h, mask.width / mask.height
    if abs(ratio_mask / ratio_img - 1.0) > MASK_ASPECT_TOLERANCE:
        return f"mask is {mask.width}x{mask.height}, its image {w}x{h}: aspect ratios differ"
    return None


_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def _reason(exc: BaseException) -> str:
    """The message of an error, without object addresses (the manifest must be deterministic)."""
    return _ADDRESS.sub("the file", str(exc))


def _analyse(task: tuple[Record, bool, bool]) -> dict:
    rec, include_masks, want_phash = task
    try:
        pixels, info = load_image(rec.path)
    except PreprocessError as exc:
        return {"error": _reason(exc)}
    except OSError as exc:
        return {"error": f"cannot read file: {_reason(exc)}"}
    out = {"sha": pixel_sha256(pixels), "size": [info.width, info.height], "mode": info.mode}
    if want_phash:
        out["phash"] = phash(pixels)
    if include_masks:
        out["mask_issue"] = _mask_problem(rec, (info.width, info.height))
    return out


def _encode(task: tuple) -> dict:
    rec, split, expected_sha, orig, encoding, masks, mask_issue = task
    try:
        pixels, info = load_image(rec.path)
    except (PreprocessError, OSError) as exc:
        raise BuildError(f"{rec.rel} became unreadable during the build: {exc}") from None
    sha = pixel_sha256(pixels)
    if sha != expected_sha:
        raise BuildError(f"{rec.rel} changed during the build; run it again")
    meta = {
        "source": rec.rel,
        "class": rec.class_name,
        "orig_size": orig["size"],
        "orig_mode": orig["mode"],
        "sha256": sha,
        "split": split,
    }
    mask = None
    if masks:
        if mask_issue is None:
            try:
                mask = load_mask(rec.mask_path)
            except (PreprocessError, OSError) as exc:
                raise BuildError(f"mask of {rec.rel} became unreadable during the build: {exc}") from None
        else:
            mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        meta["mask_missing"] = mask_issue is not None
    from sharding.writer import encode_sample

    return encode_sample(rec.key, pixels, rec.label, meta, encoding, mask)


#: Called once per sample written; in a worker it bumps the shared counter the parent's bar reads.
_TICK: Callable[[], None] | None = None


def _worker_init(counter=None) -> None:
    # Workers are only ever children of a build: a Ctrl-C is handled by the parent.
    import signal

    global _TICK
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):  # die with the parent (kill -9): no orphan keeps writing
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if counter is not None:

        def tick() -> None:
            with counter.get_lock():
                counter.value += 1

        _TICK = tick


def _write_one(task: tuple[str, list[tuple], float]) -> object:
    """Preprocess, encode and write one whole shard (in a worker: no pixels cross processes)."""
    from sharding.writer import write_shard

    path, sample_tasks, delay = task

    def samples() -> Iterator[dict]:
        for t in sample_tasks:
            yield _encode(t)
            if _TICK is not None:
                _TICK()

    info = write_shard(path, samples())
    if delay:
        time.sleep(delay)
    return info


class _Mapper:
    """In-process for one worker, else a process pool (fork where available) of `workers`."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool = None
        self.counter = None
        if workers > 1:
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            ctx = mp.get_context(method)
            self.counter = ctx.Value("q", 0)
            self.pool = ctx.Pool(workers, initializer=_worker_init, initargs=(self.counter,))

    def imap(self, fn: Callable, tasks: list) -> Iterator:
        """Ordered results of fn over many small tasks (chunked)."""
        if self.pool is None:
            return map(fn, tasks)
        chunk = max(1, min(32, len(tasks) // (self.workers * 16) or 1))
        return self.pool.imap(fn, tasks, chunksize=chunk)

    def map_counted(self, fn: Callable, tasks: list, bar) -> list:
        """Ordered results of fn over a few big tasks, advancing `bar` by the samples the tasks tick."""
        global _TICK
        if self.pool is None:
            _TICK = lambda: bar.update(1)  # noqa: E731
            try:
                return [fn(t) for t in tasks]
            finally:
                _TICK = None
        with self.counter.get_lock():
            self.counter.value = 0
        pending = self.pool.map_async(fn, tasks, chunksize=1)
        while not pending.ready():
            pending.wait(0.25)
            bar.update(self.counter.value - bar.n)
        results = pending.get()
        bar.update(self.counter.value - bar.n)
        return results

    def close(self, ok: bool) -> None:
        if self.pool is not None:
            if ok:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()


# --------------------------------------------------------------------------- helpers


def fingerprint(root: Path, options: BuildOptions) -> str:
    """sha256 over every input file's relative path, size and mtime, and the options."""
    h = hashlib.sha256()
    h.update(json.dumps({"options": asdict(options), "build_version": BUILD_VERSION}, sort_keys=True).encode())
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
    lines = [f"  {s['path']}: {s['reason']}" for s in skipped] + [
        f"  {m['path']} (mask): {m['reason']}" for m in mask_issues
    ]
    shown = "\n".join(lines[:20]) + (f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else "")
    raise BuildError(f"--strict: {len(lines)} input(s) would be skipped:\n{shown}")


def _recover(out: Path) -> None:
    """Clean leftovers of killed builds next to `out`; restore a set caught between the two renames."""
    parent = out.parent
    if not parent.is_dir():
        return
    for kind in ("old", "build"):
        for path in sorted(parent.glob(f".{out.name}.{kind}-*")):
            try:
                pid = int(path.name.rsplit("-", 1)[1])
            except ValueError:
                continue
            if pid != os.getpid() and pid_alive(pid):
                continue  # another build is running right now
            if kind == "old" and not out.exists() and (path / MANIFEST_NAME).is_file():
                os.rename(path, out)
            else:
                shutil.rmtree(path, ignore_errors=True)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).exists():
        raise BuildError(
            f"--out {out} is a non-empty folder without {MANIFEST_NAME}; refusing to replace what is not "
            "a shard set: choose an empty or new folder"
        )


def _existing_matches(out: Path, fp: str) -> Manifest | None:
    try:
        manifest = load_manifest(out)
    except ManifestError:
        return None
    if manifest.build.get("fingerprint") != fp:
        return None
    for split in manifest.splits.values():
        for shard in split.shards:
            path = out / shard.name
            if not path.is_file() or path.stat().st_size != shard.bytes:
                return None
    return manifest


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("numpy", "pillow", "webdataset"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr, smoothing=0.1, dynamic_ncols=True
    )


# --------------------------------------------------------------------------- build


def run_build(
    raw: str | Path,
    out: str | Path,
    *,
    encoding: str = "raw",
    include_masks: bool = False,
    shard_size: int = 1000,
    workers: int | None = None,
    seed: int = 0,
    near_dup_distance: int | None = None,
    strict: bool = False,
    force: bool = False,
    progress: bool = True,
) -> BuildReport:
    """Build (or confirm unchanged) the shard set in `out`; see the module docstring."""
    start = time.perf_counter()
    options = BuildOptions(encoding, bool(include_masks), int(shard_size), int(seed), near_dup_distance)
    out = Path(out)
    try:
        found = scan(raw)
    except SourceError as exc:
        raise BuildError(str(exc)) from None
    _recover(out)
    _check_out(out)
    fp = fingerprint(found.root, options)
    if not force:
        existing = _existing_matches(out, fp)
        if existing is not None:
            if strict:  # strict is not part of the fingerprint: an unchanged set must still pass it
                _check_strict(list(existing.skipped), list(existing.mask_issues))
            return BuildReport(existing, out, True, time.perf_counter() - start)

    # The writer imports webdataset (and with it torch): only once we know we will write,
    # and before the pool forks, so workers inherit it instead of importing it each.
    import sharding.writer  # noqa: F401

    records = found.records
    n_workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if n_workers < 1:
        raise BuildError(f"--workers must be >= 1, got {workers}")
    n_workers = max(1, min(n_workers, len(records) // MIN_PER_WORKER))

    mapper = _Mapper(n_workers)
    ok = False
    tmp = out.parent / f".{out.name}.build-{os.getpid()}"
    try:
        # ---- pass 1: hashes, no pixels kept
        t0 = time.perf_counter()
        want_phash = near_dup_distance is not None
        tasks = [(r, options.include_masks, want_phash) for r in records]
        facts: list[dict] = []
        with _bar(len(tasks), "analyse", progress) as bar:
            for fact in mapper.imap(_analyse, tasks):
                facts.append(fact)
                bar.update(1)
        analyse_s = time.perf_counter() - t0

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
        if strict:
            _check_strict(skipped, mask_issues)
        if not good:
            raise BuildError(f"no usable images under {found.root}: all {found.scanned} inputs were skipped")

        # ---- groups and splits
        shas = [facts[i]["sha"] for i in good]
        phashes = [facts[i]["phash"] for i in good] if want_phash else None
        gids, kinds = group(shas, phashes, near_dup_distance)
        labels = [records[i].label for i in good]
        split_of = assign(labels, gids, seed)
        members: dict[int, list[int]] = {}
        for j, g in enumerate(gids):
            members.setdefault(g, []).append(j)
        dup_groups = []
        for g, kind in kinds.items():
            ms = sorted(members[g], key=lambda j: records[good[j]].key)
            names = [records[good[j]].class_name for j in ms]
            dup_groups.append(
                {
                    "kind": kind,
                    "members": [records[good[j]].key for j in ms],
                    "sources": [records[good[j]].rel for j in ms],
                    "labels": names,
                    "mixed_labels": len(set(names)) > 1,
                    "split": split_of[ms[0]],
                }
            )
        dup_groups.sort(key=lambda d: d["members"][0])
        issue_of = {m["key"]: m["reason"] for m in mask_issues}

        # ---- pass 2: write shards into the temporary folder
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        plan: list[tuple[str, list[int]]] = []  # (shard name, indices into good)
        for split in SPLITS:
            idx = [j for j in range(len(good)) if split_of[j] == split]
            order = [idx[k] for k in shuffled([records[good[j]].key for j in idx], seed, split)]
            for s, lo in enumerate(range(0, len(order), shard_size)):
                plan.append((f"{split}-{s:06d}.tar", order[lo : lo + shard_size]))
        delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
        shard_tasks = []
        for name, idx in plan:
            split = name.split("-", 1)[0]
            sample_tasks = [
                (
                    records[good[j]],
                    split,
                    facts[good[j]]["sha"],
                    facts[good[j]],
                    encoding,
                    options.include_masks,
                    issue_of.get(records[good[j]].key),
                )
                for j in idx
            ]
            shard_tasks.append((str(tmp / name), sample_tasks, delay))
        t1 = time.perf_counter()
        shard_infos: dict[str, list] = {s: [] for s in SPLITS}
        with _bar(len(good), "write", progress) as bar:
            for (name, _), info in zip(plan, mapper.map_counted(_write_one, shard_tasks, bar)):
                shard_infos[name.split("-", 1)[0]].append(info)
        write_s = time.perf_counter() - t1

        splits = {}
        for split in SPLITS:
            counts = [0] * len(CLASSES)
            for info in shard_infos[split]:
                counts = [a + b for a, b in zip(counts, info.class_counts)]
            splits[split] = SplitInfo(shards=tuple(shard_infos[split]), class_counts=tuple(counts))
        written = sum(s.samples for s in splits.values())
        counts = {
            "scanned": found.scanned,
            "written": written,
            "skipped": len(skipped),
            "mask_issues": len(mask_issues),
            "duplicate_groups": len(dup_groups),
            "duplicate_images": sum(len(d["members"]) for d in dup_groups),
            "mixed_label_groups": sum(d["mixed_labels"] for d in dup_groups),
            "bytes": sum(s.bytes for sp in splits.values() for s in sp.shards),
        }
        if counts["scanned"] != counts["written"] + counts["skipped"]:  # pragma: no cover - a bug, not input
            raise AssertionError(f"counts do not reconcile: {counts}")
        manifest = Manifest(
            classes=CLASSES,
            image_size=IMAGE_SIZE,
            encoding=encoding,
            masks=options.include_masks,
            seed=seed,
            splits=splits,
            build={
                "fingerprint": fp,
                "options": asdict(options),
                "source": found.root.name if found.root.name else DATASET_DIR,
                "build_version": BUILD_VERSION,
                "versions": _versions(),
                "split_fractions": list(FRACTIONS),
                "near_dup_hash": "phash256-dct" if want_phash else None,
            },
            skipped=tuple(skipped),
            duplicate_groups=tuple(dup_groups),
            mask_issues=tuple(mask_issues),
            counts=counts,
        )
        write_manifest(manifest, tmp)
        _fsync_dir(tmp)

        # ---- swap into place: old -> .old-<pid>, new -> out, drop old
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out, old)
            os.rename(tmp, out)
            _fsync_dir(out.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
            _fsync_dir(out.parent)
        ok = True
    finally:
        mapper.close(ok)
        if not ok:
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - start
    return BuildReport(manifest, out, False, elapsed, written / max(elapsed, 1e-9), analyse_s, write_s)


def build_shards(raw: str | Path, out: str | Path, **options) -> Manifest:
    """`run_build` (same keyword options) returning only the manifest now in place.

    A no-op (returning the existing manifest) when the inputs and options are
    unchanged, unless `force`. Raises BuildError for unusable input or options.
    """
    return run_build(raw, out, **options).manifest


__all__ = ["BuildError", "BuildOptions", "BuildReport", "build_shards", "fingerprint", "run_build"]
