"""Execute a notebook in place (outputs saved; default notebooks/table2.ipynb); it writes its figures to results/figures/.

    python scripts/run_notebook.py                      # LORAN_EXPERIMENT=table2_mini by default
    LORAN_EXPERIMENT=table2 python scripts/run_notebook.py
    python scripts/run_notebook.py notebooks/study.ipynb   # the study's heatmaps and accuracy-vs-parameters figure
"""
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "table2.ipynb"


def main(path: Path = NOTEBOOK, out: Path | None = None) -> None:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, out or path)


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:]))
