"""Raw rows -> plain-text prompts and targets -> causal-LM token ids, driven by a PromptSpec from YAML.

Prompts are plain text, not the chat template: the paper fine-tunes base models (LLaMA), LoRA training
teaches the format either way, and one format for every model keeps train and eval prompts identical.
Layout of one training example (right-padded by CausalLMCollator):

    input_ids = tokenizer(prompt) + tokenizer(target_prefix + target, no specials)[:max_target_tokens-1] + [eos]
    labels    = [-100] * len(prompt ids) + the target ids + [eos]

A prompt is template.format(input=..., labels=", ".join(labels)) and has at most max_source_tokens
tokens: an input that does not fit is cut at the end of a word, so the template's text after {input}
(the cue, e.g. "Headline:") always survives. The ids of a prompt are tokenizer(prompt).input_ids, so
generation code that tokenizes the same prompt string gets the same ids as training.
"""
import hashlib
import numbers
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, DatasetDict

_INPUT = "\x00INPUT\x00"  # placeholder that no template or tokenizer merge can produce
_CHARS_PER_TOKEN = 6  # characters of head tokenized per token of budget; English BPE averages about 4.5


@dataclass
class PromptSpec:
    """Which columns feed the prompt and the target, the template, class names and token budgets."""

    input_field: str
    target_field: str
    prompt_template: str
    labels: Sequence[str] | None = None  # class names (classification); int targets index into them
    max_source_tokens: int = 512
    max_target_tokens: int = 64  # counts the eos, so generation needs max_new_tokens = max_target_tokens
    target_prefix: str = " "  # "Headline:" + " Ad sales" tokenizes as the joint string would

    def __post_init__(self) -> None:
        self.labels = None if self.labels is None else [str(x) for x in self.labels]  # ListConfig -> list
        fields = [f for _, f, _, _ in string.Formatter().parse(self.prompt_template) if f is not None]
        if fields.count("input") != 1 or set(fields) - {"input", "labels"}:
            raise ValueError(f"prompt_template needs {{input}} once and no fields but {{labels}}, got {fields}")
        if "labels" in fields and not self.labels:
            raise ValueError("prompt_template uses {labels} but labels is empty")
        if self.max_source_tokens < 1:
            raise ValueError(f"max_source_tokens must be >= 1 (the prompt's tokens), got {self.max_source_tokens}")
        if self.max_target_tokens < 1:
            raise ValueError(f"max_target_tokens must be >= 1 (it counts the eos), got {self.max_target_tokens}")


def template_parts(spec: PromptSpec) -> tuple[str, str]:
    """The template's text before and after {input}, with {labels} filled in."""
    filled = spec.prompt_template.format(input=_INPUT, labels=", ".join(spec.labels or []))
    prefix, suffix = filled.split(_INPUT)
    return prefix, suffix


def target_text(value: Any, spec: PromptSpec) -> str:
    """The target string: int targets map through spec.labels; class names must be in spec.labels."""
    if spec.labels is not None and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if not 0 <= value < len(spec.labels):
            raise ValueError(f"label id {value} out of range for {len(spec.labels)} labels")
        return spec.labels[value]
    if spec.labels is not None and str(value) not in spec.labels:
        raise ValueError(f"label {value!r} not in labels {spec.labels}")
    return str(value)


def _is_label(value: Any, spec: PromptSpec) -> bool:
    """Whether target_text accepts the value."""
    try:
        target_text(value, spec)
    except ValueError:
        return False
    return True


def to_prompt_target(row: dict[str, Any], spec: PromptSpec) -> dict[str, str]:
    """The untruncated prompt and the target string of one raw row."""
    prefix, suffix = template_parts(spec)
    return {"prompt": prefix + str(row[spec.input_field]) + suffix, "target": target_text(row[spec.target_field], spec)}


def validate_columns(data: DatasetDict, spec: PromptSpec, splits: Sequence[str] = ("train", "validation", "test")) -> None:
    """Raise ValueError for a missing split, an empty split, a missing field or an unknown label."""
    for split in splits:
        if split not in data:
            raise ValueError(f"split {split!r} missing; available splits: {list(data)}")
        ds = data[split]
        for field in (spec.input_field, spec.target_field):
            if field not in ds.column_names:
                raise ValueError(f"field {field!r} not in split {split!r}; available columns: {ds.column_names}")
        if len(ds) == 0:
            raise ValueError(f"split {split!r} is empty")
        if spec.labels is not None:
            bad = sorted((v for v in ds.unique(spec.target_field) if not _is_label(v, spec)), key=str)
            if bad:
                raise ValueError(f"split {split!r}, field {spec.target_field!r}: values {bad} are not labels "
                                 f"(ids 0..{len(spec.labels) - 1} or names {spec.labels})")


def _cut_points(texts: list[str], budget: int, tokenizer: Any) -> list[int]:
    """Character index after the first `budget` tokens of each text, not inside a word (len(text) if shorter)."""
    heads = [t[: budget * _CHARS_PER_TOKEN] for t in texts]  # tokenize a bounded head, not a whole paper
    offsets = tokenizer(heads, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
    short = [i for i, (t, h, o) in enumerate(zip(texts, heads, offsets)) if len(o) <= budget and len(h) < len(t)]
    if short:  # rare: a head of budget * 6 characters with fewer than `budget` tokens; use the whole text
        full = tokenizer([texts[i] for i in short], add_special_tokens=False, return_offsets_mapping=True)
        for i, o in zip(short, full.offset_mapping):
            offsets[i] = o
    return [_word_boundary(t, o[budget - 1][1]) if len(o) > budget else len(t) for t, o in zip(texts, offsets)]


def _word_boundary(text: str, cut: int) -> int:
    """Move a cut back to the end of the last whole word (words over 40 characters may still be split)."""
    if not (text[cut - 1].isspace() or text[cut].isspace()):
        start = max(cut - 40, 0)
        cut = max(text.rfind(" ", start, cut), text.rfind("\n", start, cut), 0) or cut
    return len(text[:cut].rstrip())


def fit_prompts(inputs: Sequence[str], spec: PromptSpec, tokenizer: Any) -> tuple[list[str], list[list[int]]]:
    """Prompts of at most max_source_tokens tokens and their ids; long inputs are cut, the cue is kept."""
    prefix, suffix = template_parts(spec)
    frame = len(tokenizer(prefix + "a" + suffix).input_ids) - 1  # "a": a word joined to the template, as input is
    if frame >= spec.max_source_tokens:
        raise ValueError(f"the template alone takes {frame} tokens >= max_source_tokens={spec.max_source_tokens}")
    texts = [str(x) for x in inputs]
    if not texts:
        return [], []
    keep = [spec.max_source_tokens - frame] * len(texts)  # input tokens kept; shrinks if the joint merge is longer
    prompts: list[str] = [""] * len(texts)
    ids: list[list[int]] = [[]] * len(texts)
    todo = list(range(len(texts)))
    while todo:
        for budget in sorted({keep[i] for i in todo}):
            group = [i for i in todo if keep[i] == budget]
            cuts = _cut_points([texts[i] for i in group], budget, tokenizer) if budget > 0 else [0] * len(group)
            for i, cut in zip(group, cuts):
                prompts[i] = prefix + texts[i][:cut] + suffix
        encoded = tokenizer([prompts[i] for i in todo]).input_ids
        still = []
        for i, x in zip(todo, encoded):
            ids[i] = x
            if len(x) > spec.max_source_tokens:
                if keep[i] <= 0:
                    raise ValueError(f"the template alone takes {len(x)} tokens > max_source_tokens")
                keep[i] -= len(x) - spec.max_source_tokens
                still.append(i)
        todo = still
    return prompts, ids


def example_ids(batch: dict[str, list], spec: PromptSpec) -> list[str]:
    """Stable ids: the dataset's own "id" column, else a hash of the input text (the same whatever the order)."""
    if "id" in batch:
        return [str(x) for x in batch["id"]]
    return [hashlib.sha1(str(text).encode()).hexdigest()[:16] for text in batch[spec.input_field]]


def eval_batch(batch: dict[str, list], spec: PromptSpec, tokenizer: Any) -> dict[str, list]:
    """Batched map: example id, fitted prompt string, target string and prompt ids (input_ids) for generation."""
    prompts, ids = fit_prompts(batch[spec.input_field], spec, tokenizer)
    targets = [target_text(v, spec) for v in batch[spec.target_field]]
    return {"example_id": example_ids(batch, spec), "prompt": prompts, "target": targets, "input_ids": ids}


def train_batch(batch: dict[str, list], spec: PromptSpec, tokenizer: Any) -> dict[str, list]:
    """Batched map: input_ids = prompt + target + eos, labels = -100 on the prompt."""
    out = eval_batch(batch, spec, tokenizer)
    targets = tokenizer([spec.target_prefix + t for t in out["target"]], add_special_tokens=False).input_ids
    targets = [t[: spec.max_target_tokens - 1] + [tokenizer.eos_token_id] for t in targets]
    return {"input_ids": [p + t for p, t in zip(out["input_ids"], targets)],
            "labels": [[-100] * len(p) + t for p, t in zip(out["input_ids"], targets)]}


def tokenize_example(row: dict[str, Any], spec: PromptSpec, tokenizer: Any) -> dict[str, list[int]]:
    """One raw row -> input_ids and labels (see train_batch)."""
    out = train_batch({k: [v] for k, v in row.items()}, spec, tokenizer)
    return {k: v[0] for k, v in out.items()}


def prompt_ids(row: dict[str, Any], spec: PromptSpec, tokenizer: Any) -> list[int]:
    """The prompt ids of one raw row, exactly as in training."""
    return fit_prompts([row[spec.input_field]], spec, tokenizer)[1][0]


def train_dataset(ds: Dataset, spec: PromptSpec, tokenizer: Any, batch_size: int = 1000) -> Dataset:
    """Raw split -> columns input_ids, labels (batched, fast tokenizer)."""
    return ds.map(train_batch, batched=True, batch_size=batch_size, remove_columns=ds.column_names,
                  fn_kwargs={"spec": spec, "tokenizer": tokenizer}, load_from_cache_file=False, desc="tokenize")


def eval_dataset(ds: Dataset, spec: PromptSpec, tokenizer: Any, batch_size: int = 1000) -> Dataset:
    """Raw split -> columns example_id, prompt, target, input_ids (prompt only; left-pad these for generation)."""
    return ds.map(eval_batch, batched=True, batch_size=batch_size, remove_columns=ds.column_names,
                  fn_kwargs={"spec": spec, "tokenizer": tokenizer}, load_from_cache_file=False, desc="prompts")


@dataclass
class CausalLMCollator:
    """Right-pads input_ids (pad id), labels (-100) and builds attention_mask; padding found by length, not id."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """List of {input_ids, labels} -> batch tensors of shape (batch, longest)."""
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.as_tensor(f["input_ids"])
            labels[i, :n] = torch.as_tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
