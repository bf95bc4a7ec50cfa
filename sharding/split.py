"""Leakage-safe, stratified, seeded train/val/test assignment.

Per class the targets are train = round(0.8 n), and the remaining 20 % split
1:1 into val and test (val takes the odd one), so every split is within one
sample of 80/10/10 per class. Duplicate groups are assigned as a whole: groups
are visited largest first (in a seeded order among equal sizes) and each goes
to the split where it least increases the squared distance of the per-class
counts from their targets; the many singletons then fill the targets exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sharding import seeds
from sharding.contract import CLASSES, SPLITS

FRACTIONS = (0.8, 0.1, 0.1)


def targets(n: int) -> tuple[int, int, int]:
    """(train, val, test) sample counts for a class of `n` samples."""
    train = int(np.floor(FRACTIONS[0] * n + 0.5))
    rest = n - train
    test = rest // 2
    return train, rest - test, test


def assign(labels: Sequence[int], groups: Sequence[int], seed: int, n_classes: int = len(CLASSES)) -> list[str]:
    """Split name for each item; items sharing a group id share a split."""
    labels = list(labels)
    n = len(labels)
    if len(groups) != n:
        raise ValueError("labels and groups must have the same length")
    per_class = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes) if n else np.zeros(n_classes, int)
    target = np.array([targets(int(c)) for c in per_class], dtype=np.int64).T  # [split, class]
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    order = sorted(members)  # group ids, deterministic before the seeded shuffle
    rng = seeds.rng(seed, seeds.SPLIT_GROUPS)
    perm = rng.permutation(len(order))
    shuffled = [order[k] for k in perm]
    shuffled.sort(key=lambda g: -len(members[g]))  # stable: largest groups first, seeded among equals
    current = np.zeros_like(target)
    split_of = [""] * n
    for g in shuffled:
        vec = np.bincount([labels[i] for i in members[g]], minlength=n_classes)
        cost = ((current + vec[None, :] - target) ** 2).sum(1) - ((current - target) ** 2).sum(1)
        best = int(np.argmin(cost))  # ties: train, then val, then test
        current[best] += vec
        for i in members[g]:
            split_of[i] = SPLITS[best]
    return split_of


def shuffled(keys: Sequence[str], seed: int, split: str) -> list[int]:
    """A seeded permutation (indices into `keys` sorted) for the write order of one split."""
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    rng = seeds.rng(seed, SPLITS.index(split), seeds.WRITE_ORDER)
    return [order[k] for k in rng.permutation(len(order))]


def compose_groups(groups: Sequence[int], keys: Sequence[str | None]) -> list[int]:
    """Group ids uniting `groups` (duplicates) with items sharing a key (a patient, a source); None keys stay.

    Union-find over both relations, relabelled by first appearance, so the result is
    deterministic and a group id is still one of its members' original ids' order.
    """
    parent = list(range(len(groups)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, object], int] = {}
    for i, (g, k) in enumerate(zip(groups, keys)):
        for tag in (("g", g),) + ((("k", k),) if k is not None else ()):
            if tag in first:
                a, b = find(first[tag]), find(i)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                first[tag] = i
    ids: dict[int, int] = {}
    return [ids.setdefault(find(i), len(ids)) for i in range(len(groups))]


def split_report(found, good: Sequence[int], split_of: Sequence[str], metas: Sequence[dict], split_by: str) -> dict:
    """How the split was grouped and how far each class is from its 80/10/10 target (0 or 1 = exact)."""
    labels = [found.records[i].label for i in good]
    n_classes = len(found.classes)
    deviation = 0
    for c in range(n_classes):
        members = [s for lab, s in zip(labels, split_of) if lab == c]
        want = targets(len(members))
        got = [members.count(name) for name in SPLITS]
        deviation = max(deviation, *(abs(a - b) for a, b in zip(got, want)))
    if split_by == "source":
        level = "source"
    else:
        level = "patient" if any(m.get("patient_id") for m in metas) else "sample"
    return {"by": level, "max_class_deviation": int(deviation)}


def duplicate_report(records: list, good: list[int], gids: list[int], kinds: dict, split_of: list[str]) -> list[dict]:
    """The manifest's duplicate groups: members (sorted by key), their files, labels and split."""
    members: dict[int, list[int]] = {}
    for j, g in enumerate(gids):
        members.setdefault(g, []).append(j)
    groups = []
    for g, kind in kinds.items():
        ms = sorted(members[g], key=lambda j: records[good[j]].key)
        names = [records[good[j]].class_name for j in ms]
        groups.append(
            {
                "kind": kind,
                "members": [records[good[j]].key for j in ms],
                "sources": [records[good[j]].rel for j in ms],
                "labels": names,
                "mixed_labels": len(set(names)) > 1,
                "split": split_of[ms[0]],
            }
        )
    return sorted(groups, key=lambda d: d["members"][0])
