"""loran/pipeline/evaluation.py: evaluate scores the eval-mode outputs of a model left in train mode."""
import torch
from datasets import Dataset

from loran.pipeline.evaluation import evaluate
from loran.pipeline.metrics import classification

from test_generation import PROMPTS


def test_evaluate_scores_eval_mode_outputs(noisy_model):
    model, tokenizer = noisy_model
    labels = ["business", "entertainment", "politics", "sport"]
    data = Dataset.from_dict({"example_id": [f"p{i}" for i in range(len(PROMPTS))], "prompt": PROMPTS,
                              "target": labels, "input_ids": [tokenizer(p)["input_ids"] for p in PROMPTS]})
    metric = lambda p, t: classification(p, t, labels)  # noqa: E731
    torch.manual_seed(0)
    in_train = evaluate(model, tokenizer, data, metric, max_new_tokens=6, batch_size=4)
    in_eval = evaluate(model.eval(), tokenizer, data, metric, max_new_tokens=6, batch_size=4)
    assert in_train["examples"] == in_eval["examples"] and in_train["metrics"] == in_eval["metrics"]
    assert in_train["predictions"] == in_eval["predictions"]
    assert [e["target"] for e in in_train["examples"]] == labels
