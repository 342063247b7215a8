"""Evaluation by generation: greedy outputs for each prompt, scored by the dataset's metric."""
from __future__ import annotations

from typing import Any, Callable

from datasets import Dataset

from loran.generation import generate


def evaluate(model, tokenizer, data: Dataset, metric: Callable[..., dict[str, float]], max_new_tokens: int,
             batch_size: int) -> dict[str, Any]:
    """{"metrics": metric(predictions, targets), "examples": [{prompt tail, target, prediction}, ...]}."""
    predictions = generate(model, tokenizer, data["input_ids"], max_new_tokens=max_new_tokens, batch_size=batch_size)
    examples = [{"prompt_end": p[-120:], "target": t, "prediction": y}
                for p, t, y in zip(data["prompt"], data["target"], predictions)]
    return {"metrics": metric(predictions, data["target"]), "examples": examples}
