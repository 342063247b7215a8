"""Evaluation metrics as fractions in [0, 1]: ROUGE for summarization, label parsing and accuracy for classification.

Each metric returns ``Scores``: the dataset-level values (a dict, the mean over examples) that also carry each
example's own scores in ``.per_example``, so that two runs can be compared example by example.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    """Raise unless predictions and references are non-empty and equally long."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need equally many predictions and references, got {len(predictions)} and {len(references)}")


class Scores(dict):
    """Dataset-level metric values (the mean of the per-example values) with ``per_example``: one dict per example."""

    def __init__(self, per_example: list[dict[str, Any]], keys: Sequence[str]) -> None:
        super().__init__({key: sum(e[key] for e in per_example) / len(per_example) for key in keys})
        self.per_example = per_example


def rouge(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> Scores:
    """Mean ROUGE-1/2/L/Lsum F-measure in [0, 1], with rouge-score's Porter stemming, as `evaluate`'s "rouge" computes.

    A reference may be a list of strings (several human summaries): each example scores its best reference.
    rougeLsum splits summaries on newlines only (put one sentence per line for summary-level LCS).
    Unlike `evaluate` (BootstrapAggregator's median of resampled means), this is the plain, deterministic mean.
    """
    _check_lengths(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)  # use_stemmer=True: HF summarization scripts
    per_example = []
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred) if isinstance(ref, str) else scorer.score_multi(list(ref), pred)
        per_example.append({key: scores[key].fmeasure for key in ROUGE_TYPES})
    return Scores(per_example, ROUGE_TYPES)


def _label_parser(labels: Sequence[str]) -> Callable[[str], str | None]:
    """A function mapping a text to the label it names first (see parse_label)."""
    by_lower = {label.lower(): label for label in labels}
    if len(by_lower) != len(labels):
        raise ValueError(f"labels must differ case-insensitively, got {list(labels)}")
    alternatives = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))  # longest first
    # (?<!\w)...(?!\w) rather than \b: also bounds labels that start or end with punctuation (e.g. "c++").
    pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    def parse(text: str) -> str | None:
        match = pattern.search(text)
        return by_lower[match.group(0).lower()] if match else None

    return parse


def parse_label(text: str, labels: Sequence[str]) -> str | None:
    """The label named first in `text` (case-insensitive, whole words: "sport" does not match "sports"), else None."""
    return _label_parser(labels)(text)


def classification(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]) -> Scores:
    """Accuracy and no-class rate in [0, 1] of generated texts, each read as its first-named label (parse_label).

    An output naming no label counts as wrong and adds to no_class_rate.
    """
    _check_lengths(predictions, references)
    unknown = sorted(set(references) - set(labels))
    if unknown:
        raise ValueError(f"references {unknown} are not in labels={list(labels)}")
    parse = _label_parser(labels)
    per_example = [{"accuracy": float(p == r), "no_class_rate": float(p is None), "label": p}
                   for p, r in zip(map(parse, predictions), references)]
    return Scores(per_example, ("accuracy", "no_class_rate"))


# The metric each task is judged by where one number must decide (choosing settings on validation, the study's
# confirmatory comparisons): accuracy for classification, ROUGE-L F for summarization (the paper's headline metric).
PRIMARY = {f"{__name__}.classification": "accuracy", f"{__name__}.rouge": "rougeL"}


def primary_metric(record: dict[str, Any]) -> str:
    """The primary metric of a run record, from its dataset's metric function."""
    target = record["identity"]["dataset"]["metric"]["_target_"]
    if target not in PRIMARY:
        raise ValueError(f"dataset.metric._target_={target!r} has no primary metric; known: {sorted(PRIMARY)}")
    return PRIMARY[target]
