"""What a build checks and opens before any work: the executor (local pool or Ray) and the segmenter file.

Each refusal is a `BuildError` whose message names the problem and the fix, raised before the (long) scan.
"""

from __future__ import annotations

from pathlib import Path

from sharding.executor import EXECUTORS, Executor, ExecutorError
from sharding.pool import Mapper


class BuildError(ValueError):
    """The build cannot proceed (bad options, unusable input, --strict skip); the message says why."""


def lung_model_ref(path: str | Path | None) -> tuple[str, str] | None:
    """(absolute path, sha256) of a radstream segmenter file, refused up front when it is not one."""
    if path is None:
        return None
    from sharding.segmenter import SegmenterError, segmenter_ref  # imports torch: only when asked for

    try:
        ref = segmenter_ref(path)
    except SegmenterError as exc:
        raise BuildError(str(exc)) from None
    return ref["path"], ref["sha256"]


def check_executor(kind: str, address: str | None) -> None:
    """Refuse an unknown executor, an address without Ray, or Ray missing: before the (long) scan."""
    if kind not in EXECUTORS:
        raise BuildError(f"--executor must be one of {list(EXECUTORS)}, got {kind!r}")
    if kind == "local" and address is not None:
        raise BuildError("--ray-address needs --executor ray")
    if kind == "ray":
        from sharding.ray_executor import import_ray

        try:
            import_ray()
        except ExecutorError as exc:
            raise BuildError(str(exc)) from None


def open_executor(kind: str, workers: int, address: str | None = None, segmenter: bool = False) -> Executor:
    """The executor `kind` with `workers` processes (`address`: a Ray cluster to join, ray only)."""
    check_executor(kind, address)
    if kind == "local":
        return Mapper(workers, fresh=segmenter)
    from sharding.ray_executor import RayExecutor  # imports ray: only when asked for

    try:
        return RayExecutor(workers, address, segmenter)
    except ExecutorError as exc:  # no cluster at the address, a node with other code
        raise BuildError(str(exc)) from None


__all__ = ["BuildError", "check_executor", "lung_model_ref", "open_executor"]
