"""ACLSum (NAACL 2024) from the aclsum wheel: 100/50/100 ACL papers, one summary per aspect."""
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset, DatasetDict
from nltk.tokenize.treebank import TreebankWordDetokenizer

ASPECTS = ("challenge", "approach", "outcome")
SPLITS = {"train": "train", "validation": "val", "test": "test"}
_DETOKENIZER = TreebankWordDetokenizer()


def aclsum_dir() -> Path:
    """Folder of train/val/test.jsonl inside the installed aclsum package (its own loader needs `sienna`)."""
    spec = importlib.util.find_spec("aclsum")
    if spec is None:
        raise ImportError("ACLSum needs `pip install --no-deps aclsum==0.1.2`")
    return Path(spec.submodule_search_locations[0]) / "dataset"


def paper_row(paper: dict, sections: Sequence[str], detokenize: bool) -> dict[str, str]:
    """One paper: id, title, text (chosen sections), one column per aspect, summary (the three joined)."""
    sentences = [s for section in sections for s in paper["sentences"][section]]
    if detokenize:  # the sentences are PTB-tokenized ("( QA ) ,"); the summaries are plain text
        sentences = [_DETOKENIZER.detokenize(s.split()) for s in sentences]
    aspects = {a: paper["summary"][a].strip() for a in ASPECTS}
    return {"id": paper["id"], "title": paper["title"], "text": " ".join(sentences), **aspects,
            "summary": " ".join(aspects[a] for a in ASPECTS)}


def load_aclsum(sections: Sequence[str] = ("abstract", "introduction", "conclusion"), detokenize: bool = True,
                root: str | Path | None = None) -> DatasetDict:
    """The official ACLSum splits (val -> validation) in file order; no seed: the splits are fixed."""
    folder = Path(root) if root else aclsum_dir()
    out = {}
    for name, file in SPLITS.items():
        with open(folder / f"{file}.jsonl", encoding="utf-8") as f:
            out[name] = Dataset.from_list([paper_row(json.loads(line), sections, detokenize) for line in f if line.strip()])
    return DatasetDict(out)
