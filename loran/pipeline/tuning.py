"""Choosing on validation by rules fixed before the results (results/study_report.md, "The tuned study").

Three choices, each a plain function of run records (and one extension of the grid):
  - the training length: the shortest length whose metric is within `delta` of the best length's, on the control's
    curve (``choose_length``): the point where the control's validation metric has stopped improving;
  - a method's setting (its learning rate): the value with the best mean over seeds (``choose_settings``); ties
    (means equal to TIE_DIGITS significant digits) go to the value listed first (the smaller learning rate). A
    method is every record's identity without the tuned key, so each method is tuned over exactly the grid it was
    run on, and the count of configurations tried per method is reported next to its choice; where a method's best
    is strictly at the grid's edge, every method is run at one more value beyond it (``owed_extensions``);
  - the confirmation's seeds per task: the fewest (5 at least, 10 at most) at which every confirmatory comparison's
    planned MDE, from the variance components of its validation differences, meets the task's target, and 5 where
    even 10 would miss it (``planned_seeds``); they are the seeds after the validation grid's (``confirmation_seeds``).
"""
from __future__ import annotations

import itertools
import json
import statistics
from typing import Any, Callable

from loran.pipeline.cells import flatten
from loran.pipeline.metrics import primary_metric
from loran.pipeline.paired import planned_mde

LENGTH_KEY = "trainer.args.max_steps"
LR_KEY = "trainer.args.learning_rate"
TIE_DIGITS = 12   # means equal to 12 significant digits are a tie (float sums differ in the 16th)
VALIDATION_SEEDS = (0, 1)   # the validation grid's seeds: a learning rate is chosen on their mean


def value_of(record: dict[str, Any], key: str) -> Any:
    """A dotted key of the record's identity (``"<seed>"`` for the seed)."""
    flat = flatten(record["identity"])
    if key not in flat:
        raise ValueError(f"record {record.get('cell')} has no {key} in its identity")
    return flat[key]


def choose_length(curve: dict[int, float], delta: float) -> int:
    """The shortest length whose metric is at least max(curve) - delta ({length: metric} of the control)."""
    if not curve:
        raise ValueError("no length measured: run the control's length curve first")
    best = max(curve.values())
    return min(length for length, value in curve.items() if value >= best - delta)


def length_curve(records: list[dict[str, Any]], dataset: str, control: dict[str, str], seed: int = 0,
                 lengths: tuple[int, ...] | None = None) -> dict[int, float]:
    """{max_steps: primary metric} of the control's records on `dataset` for `seed` (all of `lengths` required)."""
    curve: dict[int, float] = {}
    for record in records:
        flat = flatten(record["identity"])
        if (flat.get("dataset.name") != dataset or int(record["choices"]["seed"]) != seed
                or any(str(flat.get(k)) != v for k, v in control.items())):
            continue
        length = int(flat[LENGTH_KEY])
        if length in curve:
            raise ValueError(f"two control records at {LENGTH_KEY}={length} on {dataset}, seed {seed}: "
                             "the control must match one configuration")
        curve[length] = float(record["metrics"][primary_metric(record)])
    missing = sorted(set(lengths or ()) - set(curve))
    if missing:
        raise ValueError(f"the control has no finished run at {LENGTH_KEY}={missing} on {dataset} (seed {seed}); "
                         f"found {sorted(curve)}")
    return curve


def method_of(record: dict[str, Any], tuned: str = LR_KEY) -> str:
    """The record's method: its identity without the tuned key (and with the seed symbolic), as a JSON key."""
    flat = flatten(record["identity"])
    flat.pop(tuned, None)
    return json.dumps(flat, sort_keys=True)


def method_label(method: dict[str, Any]) -> str:
    """A method's short name from its flattened identity (``method_of``): adapter, activation and the activation's
    parameters ("loran-sinter (amp=0.05, omega=10000.0)"; "dora" alone: it takes no activation)."""
    adapter, activation = method["adapter.name"], method.get("adapter.peft.activation")
    if activation is None:
        return adapter
    params = {k.rsplit(".", 1)[-1]: v for k, v in method.items() if k.startswith("activation.params.")}
    shown = ", ".join(f"{k}={v}" for k, v in params.items() if activation != "identity")
    return f"{adapter}-{activation}" + (f" ({shown})" if shown else "")


def choose_settings(records: list[dict[str, Any]], tuned: str = LR_KEY, seeds: tuple[int, ...] = VALIDATION_SEEDS,
                    diverged: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Per method: the mean primary metric per value of `tuned` over `seeds`, the chosen value, what was tried.

    A value is eligible only when every one of `seeds` finished there: a run in `diverged` (records whose training
    stopped on a non-finite loss) or a missing one makes it ineligible. Returns one dict per method: {"method": its
    flattened identity without `tuned`, "metric", "means": {value: mean}, "runs": {value: seeds finished},
    "diverged": {value: seeds diverged}, "chosen", "tried": the values run, diverged ones included, "edge": "lowest"
    or "highest" where the chosen value is the grid's smallest or largest (the grid may not bracket the method's best
    value: ``owed_extensions``), else None}.
    """
    methods: dict[str, dict[str, Any]] = {}
    for record in records:
        key = method_of(record, tuned)
        entry = methods.setdefault(key, {"method": json.loads(key), "metric": primary_metric(record), "by_value": {}})
        value = value_of(record, tuned)
        entry["by_value"].setdefault(value, {})[int(record["choices"]["seed"])] = float(
            record["metrics"][entry["metric"]])
    ended: dict[str, dict[Any, list[int]]] = {}
    for record in diverged:
        ended.setdefault(method_of(record, tuned), {}).setdefault(value_of(record, tuned), []).append(
            int(record["choices"]["seed"]))
    out = []
    for key, entry in methods.items():
        by_value = entry.pop("by_value")
        values = sorted(set(by_value) | set(ended.get(key, {})))
        means = {v: statistics.fmean(by_value[v][s] for s in seeds) for v in values
                 if all(s in by_value.get(v, {}) for s in seeds)}
        # ties by value, not by the last bit: two seeds' accuracies 200/209 + 203/209 and 201/202 sum to the same count
        # but to floats one ulp apart, so means are compared at TIE_DIGITS significant digits
        chosen = max(means, key=lambda v: (float(f"{means[v]:.{TIE_DIGITS}g}"), -values.index(v))) if means else None
        out.append({**entry, "means": means, "runs": {v: sorted(by_value.get(v, {})) for v in values},
                    "diverged": {v: sorted(s) for v, s in ended.get(key, {}).items()}, "chosen": chosen,
                    "tried": len(values), "edge": grid_edge(values, chosen)})
    return out


def grid_edge(values: list[Any], chosen: Any) -> str | None:
    """"lowest" or "highest" where `chosen` is the smallest or largest of the (sorted) `values` tried, else None."""
    if chosen is None or len(values) < 2:
        return None
    return {values[0]: "lowest", values[-1]: "highest"}.get(chosen)


def owed_extensions(entries: list[dict[str, Any]], extension: dict[str, Any]) -> list[Any]:
    """The values beyond the grid's edges that ``choose_settings``'s `entries` call for, sorted: `extension[edge]` for
    each entry whose chosen value is at the grid's edge ("highest" or "lowest", ``grid_edge``) with a mean above every
    other value's at TIE_DIGITS: a best tied with another value calls for nothing (the tie rule chose among equals),
    and a best that is the only eligible value calls for its edge's extension (the method ran nowhere better)."""
    def rounded(mean):
        return float(f"{mean:.{TIE_DIGITS}g}")

    owed = {extension[e["edge"]] for e in entries if e["edge"] and all(
        rounded(e["means"][e["chosen"]]) > rounded(mean) for value, mean in e["means"].items() if value != e["chosen"])}
    return sorted(owed)


def grid_gaps(records: list[dict[str, Any]], axes: dict[str, Callable[[dict[str, Any]], Any]],
              fixed: dict[str, tuple] | None = None) -> list[dict[str, Any]]:
    """The runs a complete grid still lacks: each combination of the axes' values ({axis: value}) that no record
    holds, in the order the records first hold each value. An axis's values are those the records hold, or `fixed`'s
    where given (the seeds a protocol asks for).
    Pass the diverged records with the finished ones: a run that ended is not missing."""
    fixed = fixed or {}
    found = [tuple(axis(r) for axis in axes.values()) for r in records]
    values = [fixed.get(name) or list(dict.fromkeys(run[i] for run in found)) for i, name in enumerate(axes)]
    return [dict(zip(axes, combo)) for combo in itertools.product(*values) if combo not in set(found)]


def confirmation_seeds(count: int) -> list[int]:
    """The confirmation's `count` seeds: those after the validation grid's (2, 3, ...). A test run at a validation
    seed would repeat the very training whose luck helped choose its learning rate; fresh seeds measure the method as
    tuned, not the draws that won the tuning (amendment of 2026-12-07, results/study_report.md)."""
    first = max(VALIDATION_SEEDS) + 1
    return list(range(first, first + count))


def planned_seeds(parts: list[dict[str, float]], examples: int, target: float, first: int = 5, most: int = 10) -> int:
    """The fewest seeds from `first` to `most` at which every comparison's planned MDE (``paired.planned_mde`` of its
    variance components `parts`) on `examples` examples is at most `target`; `first` when even `most` misses it: more
    seeds would narrow a target they cannot reach at up to twice the cost (amendment of 2026-12-07, late,
    results/study_report.md; the missed target is reported as missed)."""
    for seeds in range(first, most + 1):
        if all(planned_mde(p, seeds, examples) <= target for p in parts):
            return seeds
    return first
