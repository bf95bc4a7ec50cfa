"""Loader states: what a mid-epoch resume must share with the run it continues, and the refusals.

A state (`ShardLoader.state_dict()`) holds the epoch and the global batches done, plus everything the
epoch's order depends on: the split's shards, seed, global batch, drop_last and plan; the rank and
worker layout on the stream plan (its order depends on them); and with several collections, the mix
(names, weights, balance, epoch length) and each collection's cursor. A state that differs in any of
these is refused with every difference named, never resumed into another order.
"""

from __future__ import annotations

STATE_VERSION = 1

#: The keys a state must share with the loader that resumes it (besides the stream layout and the mix).
COMPARED = ("version", "split", "seed", "global_batch", "drop_last", "shards", "plan")


class LoaderError(ValueError):
    """A loader cannot be built as asked (arguments, an empty split); the message says why."""


class LoaderStateError(LoaderError):
    """A loader state (mid-epoch resume) belongs to another shard set, seed, batch or layout."""


def check_resumable(state: dict, mine: dict, steps_per_epoch: int) -> None:
    """Raise LoaderStateError unless a loader whose own state is `mine` can continue `state`."""
    keys = list(COMPARED) + ["layout"] * (mine["plan"] == "stream") + ["mix"] * ("mix" in mine or "mix" in state)
    diffs = [
        f"{k}: state has {state.get(k)!r}, this loader has {mine.get(k)!r}" for k in keys if state.get(k) != mine.get(k)
    ]
    if diffs:
        hint = (
            " (streamed shards: resume with the same ranks and data workers, or set a cache_dir for the "
            "worker-independent global shuffle)"
            if "layout" in " ".join(diffs)
            else ""
        )
        raise LoaderStateError("cannot resume this loader from that state: " + "; ".join(diffs) + hint)
    if not 0 <= int(state["step"]) <= steps_per_epoch:
        raise LoaderStateError(f"state step {state['step']} is outside 0..{steps_per_epoch}")


__all__ = ["COMPARED", "STATE_VERSION", "LoaderError", "LoaderStateError", "check_resumable"]
