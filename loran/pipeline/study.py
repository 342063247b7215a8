"""A study's table: every configuration of an experiment against its control, paired by seed and example.

Records are grouped by configuration (their identity without the seed, loran/pipeline/cells.py); each group is labelled
by the values that vary between groups (e.g. ``amp=0.05, omega=100``). The control is the group matching
``control`` (default: ``activation.name=identity``, i.e. LoRA on the same base). For every other group the
table gives the mean metric, the paired difference to the control with its 95 % interval and minimal
detectable effect (loran/pipeline/paired.py), the share of examples whose score differs and of generated texts that
differ, and the update's energy beyond rank r (loran/pipeline/spectrum.py), averaged over seeds.
"""
from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loran.pipeline.cells import flatten
from loran.pipeline.paired import changed_predictions, compare, holm, level, planned_mde, scores_by_seed


def configurations(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """[{"label", "values", "records"}], one per distinct identity, labelled by the keys that vary between them."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(json.dumps(record["identity"], sort_keys=True), []).append(record)
    flats = {key: flatten(json.loads(key)) for key in groups}
    keys = sorted({k for f in flats.values() for k in f})
    varying = [k for k in keys if len({json.dumps(f.get(k)) for f in flats.values()}) > 1]
    # keys that only echo another varying key (adapter.peft.activation and activation.name) are shown once
    varying = [k for k in varying if not k.startswith("adapter.peft.activation")]
    options = [k for k in varying if _is_option(k)]
    overridden = {o.split("=", 1)[0].lstrip("+~") for r in records for o in r.get("overrides", [])}

    def set_by_options(k: str) -> bool:   # e.g. adapter._target_: one value per adapter option
        values_by_option: dict[str, set[str]] = {}
        for f in flats.values():
            values_by_option.setdefault(json.dumps([f.get(o) for o in options]), set()).add(json.dumps(f.get(k)))
        return all(len(values) == 1 for values in values_by_option.values())

    # a group's option (adapter=dora) is shown, and every key that varies otherwise; a key that only follows the
    # options (DoRA's use_dora, Sine-LoRA's g) is left out unless a command line set it. The shown keys determine
    # every varying key, so no two configurations share a label.
    shown = options + [k for k in varying if k not in options and (k in overridden or not set_by_options(k))]
    out = []
    for key, members in groups.items():
        values = {k: flats[key][k] for k in shown if k in flats[key]}
        label = ", ".join(f"{_short(k)}={v}" for k, v in values.items()) or "(one configuration)"
        order = tuple(_number_first(str(flats[key].get(k, ""))) for k in shown)
        out.append({"label": label, "values": values, "order": order, "flat": flats[key],
                    "records": sorted(members, key=lambda r: r["choices"]["seed"])})
    return sorted(out, key=lambda g: g["order"])


def _is_option(key: str) -> bool:
    """A config group's chosen option: `<group>.name` (adapter.name, activation.name)."""
    return key.count(".") == 1 and key.endswith(".name")


def _short(key: str) -> str:
    """Label name of a key: the group for an option (activation=sinter), else the last part (omega=100)."""
    return key.split(".", 1)[0] if _is_option(key) else key.rsplit(".", 1)[-1]


def matches(group: dict[str, Any], control: dict[str, str]) -> bool:
    """True when every key=value of `control` holds in the group's identity."""
    return all(str(group["flat"].get(k)) == v for k, v in control.items())


def study_rows(records: list[dict[str, Any]], metric: str, control: dict[str, str], n_boot: int = 2000,
               plan: tuple[int, int] | None = None, pair_by: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """One row per configuration, each control followed by the configurations compared with it.

    Without `pair_by` one configuration must match `control`. With `pair_by` (e.g. ``("adapter.peft.r",)``) each
    configuration is compared with the control that has its values of those keys (LoRA at the same rank), and a
    configuration whose control has not run yet gets no comparison. `plan` = (seeds, examples) adds the MDE such a
    run would have.
    """
    groups = configurations(records)
    controls = [g for g in groups if matches(g, control)]
    is_control = {id(g) for g in controls}
    scores = {id(g): scores_by_seed(g["records"], metric) for g in groups}
    if not pair_by and len(controls) != 1:
        raise ValueError(f"control {control} matches {len(controls)} configurations, not one: "
                         f"{[g['label'] for g in controls] or [g['label'] for g in groups]}")

    def paired_values(group: dict[str, Any]) -> dict[str, str]:
        return {k: str(group["flat"].get(k)) for k in pair_by}

    def control_of(group: dict[str, Any]) -> dict[str, Any] | None:
        found = [c for c in controls if paired_values(c) == paired_values(group)]
        if len(found) > 1:
            raise ValueError(f"control {control} at {paired_values(group)} matches {len(found)} configurations: "
                             f"{[c['label'] for c in found]}")
        return found[0] if found else None

    def order(group: dict[str, Any]) -> tuple:
        values = paired_values(group)
        return tuple(_number_first(values[k]) for k in pair_by) + (id(group) not in is_control, group["order"])

    rows = []
    for group in sorted(groups, key=order):
        runs, base = group["records"], control_of(group)
        own = level(scores[id(group)], n_boot=n_boot)
        row = {"configuration": group["label"], "values": group["values"], "control": id(group) in is_control,
               "seeds": [r["choices"]["seed"] for r in runs],
               "n_eval": runs[0].get("n_eval"), "eval_split": runs[0].get("eval_split"),
               "trainable_params": runs[0].get("trainable_params"),
               metric: statistics.fmean(r["metrics"][metric] for r in runs),
               f"{metric}_low": own.ci_low, f"{metric}_high": own.ci_high,
               "energy_beyond_r": statistics.fmean(r["update_spectrum"]["energy_beyond_r"] for r in runs
                                                   if r.get("update_spectrum")) if any(
                   r.get("update_spectrum") for r in runs) else None}
        if base is not None and group is not base:
            result = compare(scores[id(group)], scores[id(base)], n_boot=n_boot)
            row.update(versus=base["label"], delta=result.delta, ci_low=result.ci_low, ci_high=result.ci_high,
                       mde=result.mde, significant=result.significant, p_value=result.p_value,
                       scores_differ=result.discordant,
                       texts_differ=changed_predictions(runs, base["records"]), pairs=len(result.seeds))
            if plan:
                row["planned_mde"] = planned_mde(result.components, *plan)
        rows.append(row)
    return rows


def with_holm(rows: list[dict[str, Any]], family: Callable[[dict[str, Any]], bool] = lambda row: "p_value" in row
              ) -> list[dict[str, Any]]:
    """The rows, each member of the family given ``p_holm``: its p-value Holm-adjusted over the family (by default
    every comparison of the table, the family a reader scans; the first round's tables are exploratory, so the
    correction shows what survives it)."""
    compared = [r for r in rows if family(r)]
    for row, adjusted in zip(compared, holm([r["p_value"] for r in compared])):
        row["p_holm"] = adjusted
    return rows


def seed_nulls(records: list[dict[str, Any]], metric: str, n_boot: int = 2000) -> list[dict[str, Any]]:
    """The null of a single-seed comparison: for each configuration run with several seeds, every later seed against
    its first, paired by example exactly as a configuration is compared with its control at one seed."""
    rows = []
    for group in configurations(records):
        runs = group["records"]
        first = runs[0]
        for other in runs[1:]:
            result = compare({0: scores_by_seed([other], metric)[other["choices"]["seed"]]},
                             {0: scores_by_seed([first], metric)[first["choices"]["seed"]]}, n_boot=n_boot)
            rows.append({"configuration": group["label"], "seeds": [first["choices"]["seed"], other["choices"]["seed"]],
                         "delta": result.delta, "ci_low": result.ci_low, "ci_high": result.ci_high, "mde": result.mde,
                         "significant": result.significant, "scores_differ": result.discordant,
                         "texts_differ": changed_predictions([{**other, "choices": first["choices"]}], [first])})
    return rows


def nulls_markdown(rows: list[dict[str, Any]]) -> str:
    """The seed-to-seed nulls as a markdown section (empty without any)."""
    if not rows:
        return ""
    lines = ["", "## Seed-to-seed null", "", "The same configuration trained with two seeds, compared example by "
             "example as a single-seed comparison is: what a single-seed difference looks like when nothing but the "
             "seed changed.", "", "| configuration | seeds | difference [95% CI] | MDE | scores differ | texts differ |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['configuration']} | {r['seeds'][1]} - {r['seeds'][0]} | {_pct(r['delta'], True)} "
                     f"[{_pct(r['ci_low'], True)}, {_pct(r['ci_high'], True)}]{'*' if r['significant'] else ''} | "
                     f"{_pct(r['mde'])} | {_pct(r['scores_differ'])} | {_pct(r['texts_differ'])} |")
    return "\n".join(lines) + "\n"


def _number_first(value: str) -> tuple:
    """Sort key: numbers by value, before other strings."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def to_markdown(rows: list[dict[str, Any]], metric: str, title: str, n_configurations: int) -> str:
    """The study table in percent; the note says how many configurations the experiment holds."""
    plan = any("planned_mde" in r for r in rows)
    corrected = sum("p_holm" in r for r in rows)
    head = (f"| configuration | seeds | trainable | {metric} | vs control [95% CI] | MDE | "
            + ("p | p (Holm) | " if corrected else "") + "scores differ | texts differ | energy beyond r |"
            + (" planned MDE |" if plan else ""))
    lines = [f"# {title}", "",
             f"{n_configurations} configurations in this experiment (every one is listed). Differences are paired "
             "by seed and example: two-way bootstrap over seeds and examples, 95% percentile interval (* = excludes "
             "0); MDE = minimal detectable effect at 80% power (2.80 x bootstrap SE). Values in percent; energy "
             "beyond r is the share of the middle adapted layer's update energy beyond rank r; trainable = trainable "
             "parameters. Each configuration is compared with the control listed above it."
             + (f" p: two-sided, from the bootstrap; p (Holm): adjusted over the {corrected} comparisons of this "
                "table." if corrected else ""), "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        vs = "control" if r["control"] else "no control yet" if "delta" not in r else (
            f"{_pct(r['delta'], True)} [{_pct(r['ci_low'], True)}, {_pct(r['ci_high'], True)}]"
            + ("*" if r["significant"] else ""))
        energy = "-" if r["energy_beyond_r"] is None else f"{r['energy_beyond_r']:.2e}"
        trainable = "-" if r.get("trainable_params") is None else f"{r['trainable_params']:,}"
        cells = [r["configuration"], str(len(r["seeds"])), trainable, _pct(r[metric]), vs, _pct(r.get("mde"))]
        if corrected:
            cells += [f"{r['p_value']:.3f}" if "p_value" in r else "-", f"{r['p_holm']:.3f}" if "p_holm" in r else "-"]
        cells += [_pct(r.get("scores_differ")), _pct(r.get("texts_differ")), energy]
        if plan:
            cells.append(_pct(r.get("planned_mde")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    """The rows as CSV (lists as JSON)."""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
