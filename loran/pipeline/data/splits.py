"""Seeded, stratified splitting and subsetting shared by every loader."""
from collections.abc import Hashable, Sequence

import numpy as np
from datasets import Dataset


def split_indices(groups: Sequence[Hashable], fractions: dict[str, float], seed: int) -> dict[str, list[int]]:
    """Split range(len(groups)) into the named fractions plus "train" (the rest), stratified by group."""
    if sum(fractions.values()) >= 1 or min(fractions.values(), default=0) < 0:
        raise ValueError(f"split fractions must be >= 0 and sum below 1, got {fractions}")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {"train": [], **{name: [] for name in fractions}}
    members: dict[Hashable, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    for group in sorted(members, key=str):  # fixed group order: the rng stream does not depend on dict order
        idx = rng.permutation(members[group]).tolist()
        start = 0
        for name, fraction in fractions.items():
            stop = start + round(len(idx) * fraction)
            parts[name] += idx[start:stop]
            start = stop
        parts["train"] += idx[start:]
    return {name: rng.permutation(np.asarray(idx, dtype=np.int64)).tolist() for name, idx in parts.items()}


def subset(dataset: Dataset, n: int | None, seed: int) -> Dataset:
    """First n rows after a seeded shuffle (all rows when n is None); nested: subset(n) is a prefix of subset(m>n)."""
    shuffled = dataset.shuffle(seed=seed)
    return shuffled if n is None else shuffled.select(range(min(n, len(shuffled))))
