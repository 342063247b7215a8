"""Data: loaders that return train/validation/test DatasetDicts, and the prompt/tokenization pipeline.

Each loader is one function named by `_target_` in a configs/dataset YAML; every dataset then goes through
the same PromptSpec -> validate_columns -> train_dataset / eval_dataset code.
"""
from loran.pipeline.data.aclsum import load_aclsum
from loran.pipeline.data.bbc import load_bbc_news
from loran.pipeline.data.hub import load_hub_dataset
from loran.pipeline.data.prompting import (
    CausalLMCollator,
    PromptSpec,
    eval_dataset,
    fit_prompts,
    prompt_ids,
    to_prompt_target,
    tokenize_example,
    train_dataset,
    validate_columns,
)
from loran.pipeline.data.splits import split_indices, subset

__all__ = [
    "CausalLMCollator", "PromptSpec", "eval_dataset", "fit_prompts", "load_aclsum",
    "load_bbc_news", "load_hub_dataset", "prompt_ids", "split_indices", "subset", "to_prompt_target",
    "tokenize_example", "train_dataset", "validate_columns",
]
