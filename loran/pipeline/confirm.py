"""The tuned study's confirmation (protocol: results/study_report.md, "The tuned study"): per task, every method
against LoRA (the identity) on the task's primary metric, paired by seed and example (loran.pipeline.study.study_rows,
the crossed bootstrap), Holm-corrected over the confirmatory family (every tuned method x task; the released Sinter
row, amp 5e-5, is secondary and left out of it), with each method's learning rate and the number of configurations
validation tried for it. ROUGE-1/2 differences are reported, not tested. The table is built only from the complete
confirmation (``gaps``): each task's planned number of seeds, on the seeds after the validation grid's; a diverged
test run is in it, every example scored 0 (``scored``).
"""
from __future__ import annotations

import json
import statistics
from typing import Any

from loran.pipeline.cells import flatten
from loran.pipeline.metrics import primary_metric
from loran.pipeline.study import _pct, configurations, study_rows, with_holm
from loran.pipeline.tables import recent_timed
from loran.pipeline.tuning import LR_KEY, confirmation_seeds

CONTROL = {"activation.name": "identity"}
SECONDARY = {"rougeL": ("rouge1", "rouge2")}
UNTUNED = {"activation.name": "sinter", "activation.params.amp": 5e-5}  # the released setting: a row, not a method


def method_key(flat: dict[str, Any]) -> str:
    """A method across splits: its identity without the learning rate and the evaluated split."""
    return json.dumps({k: v for k, v in flat.items() if k not in (LR_KEY, "dataset.eval_split")}, sort_keys=True)


def run_key(record: dict[str, Any]) -> tuple:
    """A test run's place in the protocol: (task, method, learning rate, seed); the released Sinter row's method is
    "released"."""
    flat = flatten(record["identity"])
    method = "released" if is_untuned(flat) else method_key(flat)
    return flat["dataset.name"], method, flat.get(LR_KEY), int(record["choices"]["seed"])


def is_untuned(flat: dict[str, Any]) -> bool:
    return all(flat.get(k) == v for k, v in UNTUNED.items())


def is_control(flat: dict[str, Any]) -> bool:
    return all(flat.get(k) == v for k, v in CONTROL.items())


def wanted_runs(choices: list[dict[str, Any]], seeds: dict[str, int]) -> dict[tuple, str]:
    """The runs the protocol asks for, ``run_key`` -> a readable name: per task, each method of `choices` at its chosen
    learning rate and the released Sinter row at the control's, on its seeds[task] confirmation seeds (2, 3, ...)."""
    wanted = {}
    for c in choices:
        if c["chosen"] is None:
            raise ValueError(f"{c['task']}, {c['label']}: no learning rate was chosen on validation")
        rows = [(method_key(c["method"]), c["label"])]
        if is_control(c["method"]):
            rows.append(("released", "released Sinter (amp 5e-5)"))
        for method, name in rows:
            for seed in confirmation_seeds(seeds[c["task"]]):
                wanted[(c["task"], method, c["chosen"], seed)] = f"{c['task']} {name} lr {c['chosen']:g} seed {seed}"
    return wanted


def progress(records: list[dict[str, Any]], ended: list[dict[str, Any]], choices: list[dict[str, Any]],
             seeds: dict[str, int], recent: int = 5) -> list[str]:
    """How far the confirmation is: per task, the runs done (a diverged run is done: it is a result) of those asked for
    (``wanted_runs``), and the hours left at the median wall time of its last `recent` test runs
    (``tables.recent_timed``); then the total."""
    wanted = wanted_runs(choices, seeds)
    done = {run_key(r) for r in records} | {run_key(r) for r in ended if r["status"] == "diverged"}
    lines, left, hours = [], 0, 0.0
    for task in dict.fromkeys(key[0] for key in wanted):
        asked = [key for key in wanted if key[0] == task]
        missing = [key for key in asked if key not in done]
        timed = recent_timed([r for r in records if r["identity"]["dataset"]["name"] == task], recent)
        line = f"{task}: {len(asked) - len(missing)} of {len(asked)} test runs ({seeds[task]} seeds)"
        if missing and timed:
            minutes = statistics.median(r["wall_time_s"] for r in timed) / 60
            hours += len(missing) * minutes / 60
            line += f"; about {len(missing) * minutes / 60:.1f} h left at {minutes:.1f} min a run (the median of its " \
                    f"last {len(timed)})"
        elif missing:
            line += "; no test run timed yet"
        lines.append(line)
        left += len(missing)
    return lines + [f"in all: {left} test runs missing" + (f", about {hours:.1f} h" if hours else "")]


def gaps(records: list[dict[str, Any]], ended: list[dict[str, Any]], choices: list[dict[str, Any]],
         seeds: dict[str, int]) -> list[str]:
    """What keeps the test records from being the protocol's confirmation, one line each (none: complete). Asked for,
    per task: each method of `choices` at its chosen learning rate and the released Sinter row at the control's, on its
    seeds[task] confirmation seeds (``tuning.confirmation_seeds``: 2, 3, ...). A run asked for with no record among
    `records` is missing (or failed, when `ended` holds it); a successful record of anything else is not in the protocol
    (it would join the Holm family), nor is one evaluated on another split than test. `records` are the confirmation's
    results (``scored``: a diverged run is one)."""
    wanted = wanted_runs(choices, seeds)
    have = {run_key(r) for r in records}
    status = {run_key(r): r["status"] for r in ended}
    out = [name + (f" ({status[key]})" if key in status else "") for key, name in wanted.items() if key not in have]
    out += [f"{r['cell']} is not in the protocol" for r in records if run_key(r) not in wanted]
    return out + [f"{r['cell']} is not on the test split" for r in records
                  if flatten(r["identity"]).get("dataset.eval_split") != "test"]


def scored(records: list[dict[str, Any]], ended: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The confirmation's results: the successful test records, and each diverged one as the result it is (amendment
    of 2026-12-07, results/study_report.md): the run delivered no usable model, so every test example scores 0 on the
    task's primary metric (and ROUGE-1/2), and the run keeps its place in its comparison and in the Holm family;
    rerunning it until it does not diverge would choose among outcomes. Also the diverged cells, to name under the
    table. A failed run (an error, not a result) is not scored: it stays missing (``gaps``)."""
    examples = {}
    for r in records:
        examples.setdefault(r["identity"]["dataset"]["name"], [p["id"] for p in r["predictions"]])
    out, diverged = list(records), []
    for r in ended:
        if r["status"] != "diverged":
            continue
        task = r["identity"]["dataset"]["name"]
        if task not in examples:
            raise ValueError(f"{r['cell']} diverged, and no successful {task} run names the test examples to score")
        metric = primary_metric(r)
        zeros = {m: 0.0 for m in (metric, *SECONDARY.get(metric, ()))}
        out.append({**r, "metrics": zeros, "n_eval": len(examples[task]), "eval_split": "test", "update_spectrum": None,
                    "predictions": [{"id": i, "prediction": "", **zeros} for i in examples[task]]})
        diverged.append(r["cell"])
    return out, diverged


def versions_note(records: list[dict[str, Any]], validation: list[dict[str, Any]]) -> str:
    """One line for under the table: whether every successful test and validation record ran on the same library
    versions (the records' "versions"), else each set of versions with how many records of each split ran on it."""
    seen: dict[str, dict[str, int]] = {}
    for split, group in (("test", records), ("validation", validation)):
        for r in group:
            key = ", ".join(f"{k} {v}" for k, v in sorted((r.get("versions") or {}).items())) or "not recorded"
            counts = seen.setdefault(key, {})
            counts[split] = counts.get(split, 0) + 1
    if len(seen) == 1:
        return f"Library versions: the same in every successful test and validation run ({next(iter(seen))})."
    return "Library versions differ between runs: " + "; ".join(
        f"{key} ({', '.join(f'{n} {split}' for split, n in counts.items())})" for key, counts in seen.items()) + "."


def rows_of(records: list[dict[str, Any]], choices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per task and configuration, with the paired comparison and what validation tried."""
    tried = {method_key({**c["method"], "dataset.name": c["task"]}): c["tried"] for c in choices}
    out = []
    for task in sorted({r["identity"]["dataset"]["name"] for r in records}):
        mine = [r for r in records if r["identity"]["dataset"]["name"] == task]
        metric = primary_metric(mine[0])
        secondary = {m: {row["configuration"]: row for row in study_rows(mine, m, CONTROL)}
                     for m in SECONDARY.get(metric, ())}
        flats = {g["label"]: g["flat"] for g in configurations(mine)}
        for row in study_rows(mine, metric, CONTROL):
            flat = flats[row["configuration"]]
            out.append({"task": task, "metric": metric, **row, "learning_rate": flat.get(LR_KEY),
                        "tried": tried.get(method_key(flat)),
                        "confirmatory": not row["control"] and not is_untuned(flat),
                        **{f"delta_{m}": by[row["configuration"]].get("delta") for m, by in secondary.items()}})
    return with_holm(out, family=lambda row: row["confirmatory"])


def to_markdown(rows: list[dict[str, Any]], title: str) -> str:
    """The confirmation's table: one line per task and configuration, values in percent."""
    head = ("| task | configuration | lr | tried | seeds | metric | mean | vs LoRA [95% CI] | MDE | p | p (Holm) | "
            "texts differ | ROUGE-1 / -2 vs LoRA |")
    lines = [f"# {title}", "", "Each configuration against LoRA on the same task, paired by seed and example (crossed "
             "bootstrap); MDE at 80 % power; p two-sided from the bootstrap, Holm over the confirmatory family (the "
             f"{sum(r['confirmatory'] for r in rows)} rows with a Holm value). tried = configurations tried on "
             "validation for that method (its learning rates, and Sine-LoRA's omegas in the first study). Values "
             "in percent.", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        vs = "control" if r["control"] else f"{_pct(r['delta'], True)} [{_pct(r['ci_low'], True)}, " \
             f"{_pct(r['ci_high'], True)}]"
        rouge = " / ".join(_pct(r.get(f"delta_{m}"), True) for m in ("rouge1", "rouge2")) if "delta_rouge1" in r else ""
        cells = [r["task"], r["configuration"], f"{r['learning_rate']:g}", "-" if r["tried"] is None else
                 str(r["tried"]), str(len(r["seeds"])), r["metric"], _pct(r[r["metric"]]), vs, _pct(r.get("mde")),
                 f"{r['p_value']:.3f}" if "p_value" in r else "", f"{r['p_holm']:.3f}" if "p_holm" in r else "",
                 _pct(r.get("texts_differ")), rouge]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
