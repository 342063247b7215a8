"""Execute notebooks/table2.ipynb in place (outputs saved) and write its figures to results/figures/.

    python scripts/run_notebook.py                      # LORAN_EXPERIMENT=table2_mini by default
    LORAN_EXPERIMENT=table2 python scripts/run_notebook.py
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
