"""Evaluation by generation: greedy outputs for each prompt, scored by the dataset's metric."""
from __future__ import annotations

from typing import Any, Callable

from datasets import Dataset

from loran.pipeline.generation import generate
from loran.pipeline.metrics import Scores


def evaluate(model, tokenizer, data: Dataset, metric: Callable[..., Scores], max_new_tokens: int,
             batch_size: int) -> dict[str, Any]:
    """{"metrics": the dataset-level values, "examples": the first few with their prompt's end, "predictions": per
    example (in data's order) its id, target, prediction and scores}."""
    outputs = generate(model, tokenizer, data["input_ids"], max_new_tokens=max_new_tokens, batch_size=batch_size)
    scores = metric(outputs, data["target"])
    predictions = [{"id": i, "target": t, "prediction": y, **s}
                   for i, t, y, s in zip(data["example_id"], data["target"], outputs, scores.per_example)]
    examples = [{"prompt_end": p[-120:], "target": t, "prediction": y}
                for p, t, y in zip(data["prompt"][:5], data["target"], outputs)]
    return {"metrics": dict(scores), "examples": examples, "predictions": predictions}
