"""Comparing two configurations example by example: a paired two-way bootstrap over seeds and examples, and the
minimal detectable effect at 80 % power.

Two configurations A and B are run on the same seeds and scored on the same evaluation examples, so their
difference forms a matrix d[s, i] = score_A(seed s, example i) - score_B(seed s, example i). Its mean is the
effect. Seeds (training randomness) and examples (the test sample) are two crossed sources of variation, so
the interval resamples both: seeds with replacement and, independently, examples with replacement (the
"pigeonhole" bootstrap for crossed designs, Owen 2007), and takes the 2.5 / 97.5 % percentiles. This needs no
distributional assumption (accuracy is 0/1 per example) and keeps every pairing. Why not a mixed model: with
3-5 seeds its variance components are as uncertain as the bootstrap's, and it assumes normal effects; the
method-of-moments components below are used only to plan (how many seeds and examples reach a target).

Minimal detectable effect (two-sided alpha = 0.05, power 0.8): MDE = (z_0.975 + z_0.8) * SE = 2.80 * SE, with SE
the bootstrap standard deviation of the mean difference. For planning, ``planned_mde(S, N)`` says what the bootstrap
will report with S seeds and N examples, from the two-way ANOVA components of d (``components``): resampling seeds
and examples independently counts the residual about three times and the seed component (S - 1) / S times (Owen
2007), so its expected variance is (S-1)/S^2 (v_seed + v_res/N) + (N-1)/N^2 (v_example + v_res/S) + (S-1)(N-1)/(S N)^2
v_res, not the sampling variance v_seed/S + v_example/N + v_res/(S N) (which under-predicted the first round's
reported MDEs by 15-35 %). With one seed the seed component cannot be seen, and the interval covers examples only.

p-value (two-sided, from the same bootstrap): p = 2 min(P*(d* <= 0), P*(d* >= 0)), counted as (k + 1) / (B + 1), so
that p < 0.05 exactly when the 95 % percentile interval excludes 0 (up to the +1). A family of comparisons is
corrected with Holm's step-down method (``holm``), which controls the family-wise error rate without assuming
independence between the comparisons.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

Z_975, Z_80 = 1.959964, 0.841621
MDE_FACTOR = Z_975 + Z_80  # 2.80


def difference_matrix(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]]) -> tuple[np.ndarray, list, list]:
    """d[s, i] over the seeds both have and the examples every one of those runs scored: ({seed: {id: score}} x 2)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("the two configurations share no seed: nothing to pair")
    ids = sorted(set.intersection(*(set(a[s]) & set(b[s]) for s in seeds)))
    if not ids:
        raise ValueError("the two configurations share no evaluated example: were they scored on the same split?")
    d = np.array([[a[s][i] - b[s][i] for i in ids] for s in seeds], dtype=np.float64)
    return d, seeds, ids


def components(d: np.ndarray) -> dict[str, float]:
    """Method-of-moments variance components of d (seeds x examples, no replication): seed, example, residual."""
    n_s, n_i = d.shape
    m = d.mean()
    row, col = d.mean(axis=1), d.mean(axis=0)
    resid = d - row[:, None] - col[None, :] + m
    ms_res = (resid**2).sum() / ((n_s - 1) * (n_i - 1)) if n_s > 1 and n_i > 1 else float((d - m).var())
    ms_seed = n_i * row.var(ddof=1) if n_s > 1 else 0.0
    ms_ex = n_s * col.var(ddof=1) if n_i > 1 else 0.0
    return {"seed": max(0.0, (ms_seed - ms_res) / n_i), "example": max(0.0, (ms_ex - ms_res) / n_s),
            "residual": float(ms_res)}


def planned_se(parts: dict[str, float], seeds: int, examples: int) -> float:
    """The standard error ``compare`` reports, expected, for `seeds` x `examples` differences with variance components
    `parts`: the pigeonhole bootstrap's variance (module docstring); exact for the matrix whose components these are
    (when none was clipped at 0)."""
    s, n = seeds, examples
    seed, example, residual = parts["seed"], parts["example"], parts["residual"]
    return math.sqrt((s - 1) / s**2 * (seed + residual / n) + (n - 1) / n**2 * (example + residual / s)
                     + (s - 1) * (n - 1) / (s * n) ** 2 * residual)


def planned_mde(parts: dict[str, float], seeds: int, examples: int) -> float:
    """The minimal detectable effect (80 % power, two-sided 5 %) with `seeds` seeds and `examples` examples."""
    return MDE_FACTOR * planned_se(parts, seeds, examples)


@dataclass
class Comparison:
    """A - B: the mean difference, its 95 % bootstrap interval, SE, MDE and what it was computed from."""

    delta: float
    ci_low: float
    ci_high: float
    se: float
    mde: float
    seeds: list
    n_examples: int
    discordant: float          # share of (seed, example) pairs whose scores differ at all
    components: dict[str, float]
    p_value: float             # two-sided, from the bootstrap (see the module docstring)

    @property
    def significant(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0


def compare(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]], n_boot: int = 2000,
            seed: int = 0) -> Comparison:
    """A - B paired by seed and example, with the two-way bootstrap (see the module docstring)."""
    d, seeds, ids = difference_matrix(a, b)
    n_s, n_i = d.shape
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for k in range(n_boot):
        rows = rng.integers(0, n_s, n_s)
        cols = rng.integers(0, n_i, n_i)
        boots[k] = d[rows][:, cols].mean()
    low, high = np.percentile(boots, [2.5, 97.5])
    se = float(boots.std(ddof=1))
    tail = min((boots <= 0).sum(), (boots >= 0).sum())
    return Comparison(delta=float(d.mean()), ci_low=float(low), ci_high=float(high), se=se, mde=MDE_FACTOR * se,
                      seeds=seeds, n_examples=n_i, discordant=float((d != 0).mean()), components=components(d),
                      p_value=min(1.0, 2 * (tail + 1) / (n_boot + 1)))


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values, in the order given: the i-th smallest p times (m - i + 1), made monotone, capped at 1."""
    m = len(p_values)
    adjusted, running = [0.0] * m, 0.0
    for rank, index in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def level(a: dict[int, dict[str, float]], n_boot: int = 2000, seed: int = 0) -> Comparison:
    """One configuration's own mean with the same two-way bootstrap: its difference to a model scoring 0 everywhere."""
    return compare(a, {s: dict.fromkeys(scores, 0.0) for s, scores in a.items()}, n_boot=n_boot, seed=seed)


class NoPredictions(ValueError):
    """A record kept no per-example scores (it was written before records kept them): it cannot be paired."""


def scores_by_seed(records: list[dict[str, Any]], metric: str) -> dict[int, dict[str, float]]:
    """{seed: {example id: score}} from records that kept their predictions (one record per seed)."""
    out: dict[int, dict[str, float]] = {}
    for record in records:
        seed = int(record["choices"]["seed"])
        if seed in out:
            raise ValueError(f"two records for seed {seed} ({record['cell']}): compare one configuration at a time")
        if not record.get("predictions"):
            raise NoPredictions(f"record {record['cell']} kept no per-example predictions (written before records "
                                "kept them): rerun its cell to compare it example by example")
        out[seed] = {p["id"]: float(p[metric]) for p in record["predictions"]}
    return out


def changed_predictions(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    """The share of (seed, example) pairs where the two configurations generated different text."""
    by_seed = {int(r["choices"]["seed"]): {p["id"]: p["prediction"] for p in r["predictions"]} for r in b}
    pairs = differ = 0
    for record in a:
        other = by_seed.get(int(record["choices"]["seed"]))
        if other is None:
            continue
        for p in record["predictions"]:
            if p["id"] in other:
                pairs += 1
                differ += p["prediction"] != other[p["id"]]
    if not pairs:
        raise ValueError("no (seed, example) pair in common")
    return differ / pairs
