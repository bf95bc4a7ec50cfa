"""Files that are whole or absent: atomic writes and cleanup after killed writers.

Every file radstream writes (shards, manifest, checkpoints, reports) goes to
`.<name>.tmp-<pid>` in the target folder, is fsynced and renamed over the
target, so a reader never sees half a file and a killed writer leaves only a
temporary that `clean_stale_temporaries` recognises by its dead pid.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` then fsync and rename tmp over `path`."""
    atomic_write_all({path: write})


def atomic_write_all(writes: dict[Path, Callable[[Path], None]]) -> None:
    """`atomic_write` for files that belong together: every temporary is written and
    fsynced before the first rename, so a killed writer leaves the old set whole and
    the window in which the set is mixed shrinks from the writing time to a few renames.
    """
    temps = {}
    try:
        for path, write in writes.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            temps[path] = tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            write(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (signal 0 probes without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(folder: Path) -> list[Path]:
    """Remove `.<name>.tmp-<pid>` files left by a writer that was killed (its pid is gone); returns them.

    A live writer's temporary (another run writing into the same folder) is left alone.
    """
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.glob(".*.tmp-*"):
        try:
            pid = int(path.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid == os.getpid() or pid_alive(pid):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
