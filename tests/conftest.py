"""Shared test set-up: no network, caches in a temporary folder, deterministic CPU threads."""
import os
import tempfile

# Set before transformers/datasets are imported anywhere: they read these at import time.
_CACHE = tempfile.mkdtemp(prefix="loran-test-hf-")
os.environ.setdefault("HF_HOME", _CACHE)
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(_CACHE, "datasets"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
