"""Batched greedy generation for evaluation: left-padded, length-sorted, KV-cached, new tokens only.

Within ``stop_generation_when(check)``, generate() asks check() before each batch and raises GenerationStopped when
it says so: a termination signal stops an evaluation between batches (loran/pipeline/run.py), not after all of them.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

_STOP: ContextVar[Callable[[], bool] | None] = ContextVar("loran_generation_stop", default=None)


class GenerationStopped(RuntimeError):
    """generate() stopped before a batch because the check of stop_generation_when said so; nothing is returned."""


@contextmanager
def stop_generation_when(check: Callable[[], bool]) -> Iterator[None]:
    """Within the block, generate() raises GenerationStopped before any batch for which check() is true."""
    token = _STOP.set(check)
    try:
        yield
    finally:
        _STOP.reset(token)


def _tokenize(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
    """Prompt strings -> ids with the tokenizer's defaults (special tokens as in training); id lists pass through."""
    if all(isinstance(p, str) for p in prompts):
        return tokenizer(list(prompts))["input_ids"]
    return [list(p) for p in prompts]


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 8,
    max_prompt_tokens: int | None = None,
    progress: bool = True,
) -> list[str]:
    """Greedy continuations of `prompts` (strings, or token-id lists used as given), stripped, in input order.

    Prompts are tokenized once, sorted by length (less padding), left-padded per batch, and decoded from the
    first generated token on; `max_prompt_tokens` keeps each prompt's last tokens (the instruction sits at the end).
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token: load it with loran.pipeline.base_models.load_causal_lm")
    ids = _tokenize(tokenizer, prompts)
    if max_prompt_tokens is not None:
        ids = [x[-max_prompt_tokens:] for x in ids]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)  # longest first: OOM shows at once
    outputs: list[str] = [""] * len(ids)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
            if (stop := _STOP.get()) is not None and stop():
                raise GenerationStopped(f"generation stopped before example {start} of {len(order)}")
            batch = order[start : start + batch_size]
            enc = tokenizer.pad(
                {"input_ids": [ids[i] for i in batch]}, padding=True, padding_side="left", return_tensors="pt"
            ).to(model.device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                use_cache=True,  # gradient checkpointing may have switched the config's cache off
                pad_token_id=tokenizer.pad_token_id,
            )
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, text in zip(batch, texts):
                outputs[i] = text.strip()
    finally:
        model.train(was_training)
    return outputs
