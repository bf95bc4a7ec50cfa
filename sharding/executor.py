"""What runs the two passes of a build: an executor, `local` (`sharding.pool`) or `ray` (`sharding.ray_executor`).

The driver (`sharding.build`) keeps everything global and small: the scan, duplicate
groups, the split, the shard plan and the manifest. An executor only maps the
per-sample function of pass 1 (`analyse_one`) and the per-shard function of pass 2
(`write_shard_task`), returning results in task order. The bytes of a shard depend on
its task alone, so any executor that runs the same code and libraries writes the same
shards; `runtime_facts` is what "the same" means, and the Ray executor checks it on
every node before it starts.
"""

from __future__ import annotations

import hashlib
import platform
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

EXECUTORS = ("local", "ray")
#: The libraries whose versions can change a shard's bytes (decoding, resampling, encoding; tar is the stdlib's).
BYTE_LIBRARIES = ("numpy", "pillow", "pydicom")
#: And those that compute predicted masks (`--lung-model`).
SEGMENTER_LIBRARIES = ("torch", "safetensors")
RAY_INSTALL = "pip install -e '.[ray]' (or pip install 'ray>=2.40')"


class ExecutorError(RuntimeError):
    """The executor could not start or lost work it cannot redo; the message says what and the fix."""


class Executor(Protocol):
    """Ordered maps of the build's per-sample and per-shard functions."""

    workers: int

    def imap(self, fn: Callable, tasks: list) -> Iterator:
        """Results of fn over many small tasks, in task order."""

    def map_counted(self, fn: Callable, tasks: list, bar, sizes: Sequence[int]) -> list:
        """Results of fn over a few big tasks, in task order; `bar` advances by the samples written."""

    def close(self, ok: bool) -> None:
        """Release the workers; after a failure, stop the work still running first."""


def library_versions(names: Sequence[str] = BYTE_LIBRARIES) -> dict[str, str | None]:
    """The installed version of each library (None when missing)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def code_digest() -> str:
    """sha256 over this `sharding` package's Python sources (relative paths and bytes)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def runtime_facts(segmenter: bool = False) -> dict:
    """What a shard's bytes depend on besides its task: the code, Python, the machine, zlib (Python's and
    Pillow's, which compresses png members) and the byte libraries; with a `segmenter`, also torch, safetensors
    and the CPU kernels torch picks (a predicted mask's pixels near the threshold depend on them)."""
    from PIL import features

    facts = {
        "sharding code": code_digest()[:16],
        "python": platform.python_version(),
        "machine": platform.machine(),
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
        "pillow zlib": features.version("zlib"),
        **library_versions(),
    }
    if segmenter:
        import torch  # only for --lung-model: a build without it never imports torch

        facts.update(library_versions(SEGMENTER_LIBRARIES))
        facts["torch cpu kernels"] = torch.backends.cpu.get_cpu_capability()
    return facts
