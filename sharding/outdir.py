"""The output folder of a build: leftovers of killed builds, refusal checks, the no-op test, the atomic swap.

The new set is written into a hidden sibling `.<out>.build-<pid>/` and swapped in
with two renames (old set -> `.<out>.old-<pid>`, new set -> `<out>`): a reader sees
the previous complete set, nothing, or the new complete set, never a mix.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sharding.files import pid_alive
from sharding.manifest import MANIFEST_NAME, Manifest, ManifestError, load_manifest


class OutputFolderError(ValueError):
    """`--out` cannot take a shard set; the message says why."""


def recover(out: Path) -> None:
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


def check_out(out: Path) -> None:
    """Refuse an `--out` that is a file, or a non-empty folder that is not a shard set."""
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).exists():
        raise OutputFolderError(
            f"--out {out} is a non-empty folder without {MANIFEST_NAME}; refusing to replace what is not "
            "a shard set: choose an empty or new folder"
        )


def unchanged(out: Path, fingerprint: str) -> Manifest | None:
    """The manifest in `out` if it was built from the same inputs and options and its shards are whole."""
    try:
        manifest = load_manifest(out)
    except ManifestError:
        return None
    if manifest.build.get("fingerprint") != fingerprint:
        return None
    for split in manifest.splits.values():
        for shard in split.shards:
            path = out / shard.name
            if not path.is_file() or path.stat().st_size != shard.bytes:
                return None
    return manifest


def staging(out: Path) -> Path:
    """This build's hidden sibling folder (emptied)."""
    tmp = out.parent / f".{out.name}.build-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def check_written(path: Path, size: int) -> None:
    """The shard a worker reports written is here, whole (a cluster whose nodes do not share --out fails this)."""
    found = path.stat().st_size if path.is_file() else None
    if found != size:
        raise OutputFolderError(
            f"shard {path.name} was written by a worker ({size} bytes) but the driver sees "
            f"{'no such file' if found is None else f'{found} bytes'} in {path.parent}: every worker must write "
            "--out's folder on one filesystem the driver shares (the same path on every node); nothing was replaced"
        )


def sweep_partials(tmp: Path) -> None:
    """Drop the temporary files of shard writes that died (`writer.write_shard` names them `.<shard>.tmp-<pid>`)."""
    for path in tmp.glob(".*.tmp-*"):
        path.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
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


def swap_into_place(tmp: Path, out: Path) -> None:
    """old -> .old-<pid>, new -> out, drop old (see the module docstring)."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        os.rename(tmp, out)
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
        fsync_dir(out.parent)
