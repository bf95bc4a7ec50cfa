"""How ranks agree: rank 0 decides and does the file work; every rank learns the outcome at once.

Only rank 0 writes (config, metrics, models, checkpoints, report), so every question
about those files (is there a checkpoint to resume? a best model to evaluate?) has
one answer: rank 0's, broadcast. Asked on every rank, a node with its own local disk
answers differently and the replicas diverge (one resumes, one starts afresh) until a
collective hangs. Likewise rank-0-only work that fails must end every rank with its
cause at once, not leave them waiting in the next collective for `train.timeout_s`
(or, on NCCL, until the watchdog aborts the process without a message).
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from train.checkpoint import atomic_write

T = TypeVar("T")

#: Written by rank 0 into the run folder at start; every rank must read back the same value.
TOKEN_FILE = ".radstream-run-token"


class PeerFailedError(RuntimeError):
    """Rank 0's part of a step failed; the other ranks stop with its cause instead of waiting."""


class FolderNotSharedError(RuntimeError):
    """The ranks do not see one run folder (node-local disks): a setup error, reported on every rank."""


def rank0_decides(accelerator: Accelerator, decide: Callable[[], T]) -> T:
    """`decide()` run on rank 0 alone, its result (or its exception) on every rank."""
    box: list = [None]
    if accelerator.is_main_process:
        try:
            box[0] = ("ok", decide())
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            box[0] = ("error", exc)
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def every_rank_ok(accelerator: Accelerator, problem: str | None, error: type[Exception]) -> None:
    """Share each rank's `problem` (None: fine); every rank raises `error` with the first one found.

    A check whose answer depends on the node (free shared memory, a local path) must
    stop every rank together: a rank that stopped alone leaves the others in a collective.
    """
    problems = [(accelerator.process_index, problem)]
    if accelerator.num_processes > 1:
        problems = gather_object(problems)
    found = [(rank, p) for rank, p in problems if p]
    if found:
        rank, first = found[0]
        raise error(first if rank == accelerator.process_index else f"on rank {rank}: {first}")


def on_rank0(accelerator: Accelerator, work: Callable[[], None], what: str) -> None:
    """Run `work` on rank 0 and share how it went: a failure ends every rank now, each with the cause.

    Rank 0 re-raises its own exception (the entry script reports it as usual); the
    others raise PeerFailedError naming `what` failed and why. This also stands in for
    the barrier that would otherwise follow rank 0's work.
    """
    box: list = [None]
    if accelerator.is_main_process:
        try:
            work()
        except BaseException as exc:
            if accelerator.num_processes > 1:
                broadcast_object_list([f"{type(exc).__name__}: {_first_line(exc)}"], from_process=0)
            raise
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    if box[0] is not None:
        raise PeerFailedError(f"rank 0 failed while {what} ({box[0]}); this rank stops with it")


def _first_line(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    return (str(text).strip().splitlines() or [type(exc).__name__])[0][:300] + where


def check_shared_folder(accelerator: Accelerator, out: Path) -> None:
    """Every rank must see rank 0's run folder: rank 0 writes a random token there, every rank reads it back.

    Each node otherwise resumes from, and evaluates, whatever its own disk holds. Raises on
    every rank, naming the hosts that see another folder, when any rank does not.
    """
    token = secrets.token_hex(16)
    if accelerator.is_main_process:
        atomic_write(out / TOKEN_FILE, lambda tmp: tmp.write_text(token))
    box = [token]
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    try:
        seen = (out / TOKEN_FILE).read_text() == box[0]
    except OSError:
        seen = False
    views = [(accelerator.process_index, socket.gethostname(), seen)]
    if accelerator.num_processes > 1:
        views = gather_object(views)
    if accelerator.is_main_process:  # every rank has read it (the gather waited for them)
        (out / TOKEN_FILE).unlink(missing_ok=True)
    blind = [f"rank {rank} on {host}" for rank, host, ok in views if not ok]
    if blind:
        raise FolderNotSharedError(
            f"train.output_dir={out} is not the same folder on every rank: {', '.join(blind)} cannot read what "
            "rank 0 wrote there. train.output_dir must be on a filesystem shared by all nodes (NFS, EFS, "
            "Filestore, Lustre), at the same path on each"
        )


__all__ = [
    "FolderNotSharedError",
    "PeerFailedError",
    "TOKEN_FILE",
    "check_shared_folder",
    "every_rank_ok",
    "on_rank0",
    "rank0_decides",
]
