"""The `ray` executor: the build's two passes as Ray Core tasks, on this machine or a cluster.

Without an address it starts a private local Ray instance with `workers` CPUs (never joining a cluster
already running here) and stops it at the end; with one (`auto`, `HOST:PORT`) it joins that cluster and
leaves it running. A process that has already called `ray.init` (a notebook) is used as it is.
The tasks run the same functions as the local pool, so they write the same bytes, given
the same code and libraries on every node: `check_nodes` compares each node's
`runtime_facts` with the driver's before any work and refuses a node that differs.

Nodes that join after the check (an autoscaler) are not checked: start the cluster at its full size.

Faults: Ray retries a task whose worker or node dies (`RETRIES` times). A retried shard
task rewrites its whole shard under a temporary name and renames it into place, so the
retry gives the same bytes; a dead attempt's temporary file is swept by the driver
before the swap (`outdir.sweep_partials`). An error raised by the task's own code (a
`SampleError`) is not retried and reaches the driver as itself, message unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from sharding.executor import RAY_INSTALL, ExecutorError, runtime_facts

#: Retries of a task whose worker process or node died (Ray's own default is 3 as well; stated, not inherited).
RETRIES = 3
#: Records per pass-1 task: an image takes milliseconds, a Ray task about one; 32 keeps scheduling under a few %.
CHUNK = 32
#: Seconds a failed build waits for its cancelled tasks to end before it removes their staging folder.
CANCEL_WAIT_S = 10.0
#: Seconds a node has to answer the code check (a node that cannot start a worker would hang the build).
NODE_CHECK_S = 120.0
#: Pass-1 tasks in flight per CPU: keeps every worker busy while bounding the driver's queue on millions of inputs.
IN_FLIGHT_PER_CPU = 4


def import_ray():
    """The `ray` module, or an ExecutorError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ExecutorError(f"--executor ray needs Ray, which is not installed ({exc}): {RAY_INSTALL}") from None
    return ray


def _run_chunk(fn: Callable, chunk: list) -> list:
    return [fn(item) for item in chunk]


def _run_one(fn: Callable, task) -> object:
    return fn(task)


class RayExecutor:
    """Ordered maps over Ray tasks; see the module docstring."""

    def __init__(self, workers: int, address: str | None = None, segmenter: bool = False) -> None:
        ray = self._ray = import_ray()
        self._owned = not ray.is_initialized()
        if self._owned:
            options = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
            try:
                if address is None:
                    ray.init(address="local", num_cpus=workers, **options)  # never someone else's cluster
                else:
                    ray.init(address=address, **options)
            except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:  # RayError: auth
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise ExecutorError(
                    f"cannot start or join {where}: {str(exc).strip().splitlines()[0]}; "
                    "check `ray status` on the head node and that RAY_AUTH_TOKEN is the cluster's, or leave out "
                    "--ray-address to start a local instance"
                ) from None
        self.workers = max(1, int(ray.cluster_resources().get("CPU", workers)))
        self._chunk = ray.remote(max_retries=RETRIES, num_cpus=1)(_run_chunk)
        self._one = ray.remote(max_retries=RETRIES, num_cpus=1)(_run_one)
        self._pending: set = set()
        try:
            check_nodes(ray, segmenter)
        except BaseException:
            self.close(False)
            raise

    def _get(self, ref):
        """One task's result; its own exception as itself; a task lost for good as an ExecutorError."""
        ray = self._ray
        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, Exception) and not isinstance(cause, ray.exceptions.RayError):
                raise cause from None
            raise ExecutorError(f"a Ray task failed: {str(exc).strip().splitlines()[0]}") from None
        except ray.exceptions.RayError as exc:  # worker or node gone after every retry, object lost, ...
            raise ExecutorError(
                f"a Ray task was lost after {RETRIES} retries ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0]}); nothing was replaced, run the build again"
            ) from None
        self._pending.discard(ref)
        return result

    def _submit(self, remote, fn, arg):
        ref = remote.remote(fn, arg)
        self._pending.add(ref)
        return ref

    def imap(self, fn: Callable, tasks: list) -> Iterator:
        """Results of fn over many small tasks, in order, in chunks of CHUNK with a bounded number in flight."""
        chunks = iter([tasks[i : i + CHUNK] for i in range(0, len(tasks), CHUNK)])
        fn_ref = self._ray.put(fn)
        window: deque = deque()
        for chunk in chunks:
            window.append(self._submit(self._chunk, fn_ref, chunk))
            if len(window) >= self.workers * IN_FLIGHT_PER_CPU:
                break
        while window:
            results = self._get(window.popleft())
            chunk = next(chunks, None)
            if chunk is not None:
                window.append(self._submit(self._chunk, fn_ref, chunk))
            yield from results

    def map_counted(self, fn: Callable, tasks: list, bar, sizes: Sequence[int]) -> list:
        """One task per shard, all submitted at once; `bar` advances by a shard's samples when it is written."""
        ray = self._ray
        fn_ref = ray.put(fn)
        refs = [self._submit(self._one, fn_ref, task) for task in tasks]
        size_of = dict(zip(refs, sizes))
        waiting = list(refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1, timeout=0.25)
            for ref in done:
                self._get(ref)  # raises the task's error as soon as it is known
                bar.update(size_of[ref])
        return [self._get(ref) for ref in refs]

    def close(self, ok: bool) -> None:
        """Cancel what still runs (after a failure, before the driver removes the staging folder); stop an owned Ray."""
        ray = self._ray
        pending = list(self._pending)
        for ref in pending:
            with contextlib.suppress(Exception):  # already finished or gone: nothing to cancel
                ray.cancel(ref, force=True)
        if pending:  # a cancel is asynchronous: let the writers die before the staging folder goes
            with contextlib.suppress(Exception):
                ray.wait(pending, num_returns=len(pending), timeout=CANCEL_WAIT_S)
        self._pending.clear()
        if self._owned and ray.is_initialized():
            ray.shutdown()


def _node_facts(segmenter: bool) -> dict:
    return runtime_facts(segmenter)


def check_nodes(ray, segmenter: bool = False) -> None:
    """Refuse to build when a node would write other bytes: its code or byte libraries differ from the driver's."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    mine = runtime_facts(segmenter)
    remote = ray.remote(num_cpus=0, max_retries=RETRIES)(_node_facts)
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    refs = {
        n["NodeManagerAddress"] + " " + n["NodeID"][:8]: remote.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(segmenter)
        for n in nodes
    }
    for node, ref in refs.items():
        try:
            theirs = ray.get(ref, timeout=NODE_CHECK_S)
        except ray.exceptions.RayError as exc:  # GetTimeoutError included
            raise ExecutorError(
                f"Ray node {node} cannot run radstream's build ({str(exc).strip().splitlines()[0]}): install "
                "radstream and its dependencies, the same versions, on every node"
            ) from None
        differ = {k: (mine[k], theirs.get(k)) for k in mine if theirs.get(k) != mine[k]}
        if differ:
            shown = ", ".join(f"{k} {a} here, {b} there" for k, (a, b) in differ.items())
            raise ExecutorError(
                f"Ray node {node} would write different shard bytes: {shown}; install the same radstream and "
                "libraries on every node (pip install -e . from the same commit)"
            )


__all__ = ["CHUNK", "RETRIES", "RayExecutor", "check_nodes", "import_ray"]
