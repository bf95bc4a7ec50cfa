"""Strata: the groups a collection's draws are balanced over (`data.balance`), and what each epoch drew of them.

`balance` none puts a collection's samples in one stratum ("all"); class, source or source_class group
them by their class, their source (the site in their json) or both ("source/class"). The mixing plan
(`pipeline.mix`) gives each stratum of a collection an equal share of its draws; an epoch's metrics
count the draws and distinct samples per collection and stratum from the run's coverage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.mix import Mix, composition

ALL = "all"
#: `data.balance`: what a collection's draws are balanced over.
BALANCE = ("none", "class", "source", "source_class")


def stratum_key(balance: str, cls: str, source: str) -> str:
    """The stratum a sample balances in: its class, its source, both, or "all" (no balancing)."""
    return {"none": ALL, "class": cls, "source": source, "source_class": f"{source}/{cls}"}[balance]


@dataclass(frozen=True)
class Strata:
    """Train samples by collection and stratum: what the mix balances and what each epoch's counts report."""

    names: list[str]  # stratum names, sorted
    collection: np.ndarray  # int64 [N]: each sample's collection
    stratum: np.ndarray  # int64 [N]: each sample's stratum (index into names; -1 when unreadable)
    mix: Mix

    @classmethod
    def unbalanced(cls, sizes: Sequence[int], weights: Sequence[float], epoch_samples: int | None) -> Strata:
        which = np.repeat(np.arange(len(sizes)), sizes)
        return cls([ALL], which, np.zeros(len(which), np.int64), Mix.unbalanced(sizes, weights, epoch_samples))

    def composition(self, counts: np.ndarray, names: Sequence[str]) -> dict:
        """{collection: {drawn, distinct, size, strata: {stratum: {drawn, distinct, size}}}} from how often each
        train sample was drawn (`counts`, int [N]): what an epoch's metrics line reports."""
        c, s = len(names), len(self.names)
        got = composition(counts, self.collection, self.stratum, c, s)
        size = composition(np.ones(len(self.collection), np.int64), self.collection, self.stratum, c, s)

        def cell(table: str, i: int, j: int | None = None) -> int:
            return int(got[table][i] if j is None else got[f"{table}_strata"][i, j])

        return {
            name: {
                "drawn": cell("drawn", i),
                "distinct": cell("distinct", i),
                "size": int(size["drawn"][i]),
                "strata": {
                    stratum: {
                        "drawn": cell("drawn", i, j),
                        "distinct": cell("distinct", i, j),
                        "size": int(size["drawn_strata"][i, j]),
                    }
                    for j, stratum in enumerate(self.names)
                    if size["drawn_strata"][i, j]
                },
            }
            for i, name in enumerate(names)
        }


def strata_of(
    balance: str,
    sizes: Sequence[int],
    weights: Sequence[float],
    epoch_samples: int | None,
    classes: Sequence[str],
    sources: Sequence[str],
    valid: np.ndarray | None,
) -> Strata:
    """Strata of N samples numbered collection by collection, from each one's class name and source;
    `valid` (readable sample indices, None: all) leaves unreadable samples out of every stratum."""
    keys = np.array([stratum_key(balance, c, s) for c, s in zip(classes, sources)], dtype=object)
    readable = keys if valid is None else keys[valid]
    names = sorted(set(readable.tolist()))
    lookup = {k: i for i, k in enumerate(names)}
    ids = np.array([lookup.get(k, -1) for k in keys.tolist()], np.int64)
    if valid is not None:
        ok = np.zeros(len(ids), bool)
        ok[valid] = True
        ids[~ok] = -1
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    parts = tuple(ids[offsets[i] : offsets[i + 1]] for i in range(len(sizes)))
    which = np.repeat(np.arange(len(sizes)), sizes)
    return Strata(names, which, ids, Mix(tuple(sizes), tuple(weights), parts, epoch_samples))


__all__ = ["ALL", "BALANCE", "Strata", "strata_of", "stratum_key"]
