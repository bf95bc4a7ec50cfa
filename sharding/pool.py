"""The `local` executor: the build's worker processes (a pool, or in-process for one worker) and their progress.

Workers are only ever children of a build: they ignore Ctrl-C (the parent handles
it) and, on Linux, die with the parent (a `kill -9` leaves no orphan writing).
Progress crosses processes through one shared counter, handed to each worker by
the pool initializer (the only way to give pool workers a shared object) and
ticked once per sample written.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from collections.abc import Callable, Iterator, Sequence

#: This process's progress counter: set by the pool initializer in a worker, by `Mapper` while it runs in-process.
_PROGRESS = None


def _worker_init(counter) -> None:
    import signal

    global _PROGRESS
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    _PROGRESS = counter


def tick() -> None:
    """One more sample written (called by the per-shard task, in whichever process runs it)."""
    if _PROGRESS is not None:
        with _PROGRESS.get_lock():
            _PROGRESS.value += 1


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr, smoothing=0.1, dynamic_ncols=True
    )


class Mapper:
    """In-process for one worker, else a process pool (fork where available) of `workers`.

    `fresh=True` starts the workers from a clean process (forkserver, else spawn) instead of forking this one:
    for work that runs torch (`--lung-model`), since a child forked from a process whose torch (OpenMP) thread
    pool is up can hang in its first parallel region (tested)."""

    def __init__(self, workers: int, fresh: bool = False) -> None:
        self.workers = workers
        methods = mp.get_all_start_methods()
        if fresh:
            method = "forkserver" if "forkserver" in methods else "spawn"
        else:
            method = "fork" if "fork" in methods else "spawn"
        ctx = mp.get_context(method)
        self.counter = ctx.Value("q", 0)
        self.pool = ctx.Pool(workers, initializer=_worker_init, initargs=(self.counter,)) if workers > 1 else None

    def imap(self, fn: Callable, tasks: list) -> Iterator:
        """Ordered results of fn over many small tasks (chunked)."""
        if self.pool is None:
            return map(fn, tasks)
        chunk = max(1, min(32, len(tasks) // (self.workers * 16) or 1))
        return self.pool.imap(fn, tasks, chunksize=chunk)

    def map_counted(self, fn: Callable, tasks: list, bar, sizes: Sequence[int] = ()) -> list:
        """Ordered results of fn over a few big tasks, advancing `bar` by the samples the tasks tick.

        `sizes` (samples per task) is not needed: the shared counter advances per sample."""
        with self.counter.get_lock():
            self.counter.value = 0
        if self.pool is None:
            _worker_init_in_process(self.counter)
            try:
                results = []
                for task in tasks:
                    results.append(fn(task))
                    bar.update(self.counter.value - bar.n)
                return results
            finally:
                _worker_init_in_process(None)
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


def _worker_init_in_process(counter) -> None:
    """The in-process mapper's counter (no signal changes: this is the parent)."""
    global _PROGRESS
    _PROGRESS = counter
