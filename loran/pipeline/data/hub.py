"""Datasets from the Hugging Face hub (SAMSum, 20 Newsgroups, ...) or local files, as train/validation/test."""
from typing import Any

import datasets
from datasets import DatasetDict

from loran.pipeline.data.splits import split_indices

SPLITS = ("train", "validation", "test")


def load_hub_dataset(path: str, name: str | None = None, split_map: dict[str, str] | None = None,
                     val_fraction: float = 0.1, stratify_by: str | None = None, seed: int = 0,
                     **load_kwargs: Any) -> DatasetDict:
    """datasets.load_dataset(path, name, **load_kwargs) with splits renamed by split_map (ours -> theirs);
    a missing validation split is carved from train with a seeded shuffle, stratified by `stratify_by`."""
    try:
        raw = datasets.load_dataset(path, name, **load_kwargs)
    except ValueError as err:  # datasets' words for a split file with no rows
        if "corresponds to no data" in str(err):
            raise ValueError(f"{path}: a split is empty ({err}); every split needs at least one example") from err
        raise
    source = {split: (split_map or {}).get(split, split) for split in SPLITS}
    out = {split: raw[src] for split, src in source.items() if src in raw}
    missing = [split for split in ("train", "test") if split not in out]
    if missing:
        raise ValueError(f"{path}: no split for {missing} (looked for {[source[s] for s in missing]}); "
                         f"available: {list(raw)}; pass split_map")
    if "validation" not in out:
        train = out["train"]
        groups = train[stratify_by] if stratify_by else [0] * len(train)
        parts = split_indices(groups, {"validation": val_fraction}, seed)
        out["train"], out["validation"] = train.select(parts["train"]), train.select(parts["validation"])
    return DatasetDict({split: out[split] for split in SPLITS})
