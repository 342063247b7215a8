"""The Table 2 notebook executes on records the test writes and draws its four figures."""
import math

import nbformat

from loran.pipeline.tables import ROWS

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("run_notebook", REPO / "scripts/run_notebook.py")
run_notebook = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_notebook)


def test_notebook_runs_on_small_records(tmp_path, monkeypatch, write_fake_record):
    runs = tmp_path / "results/runs/grid"
    for i, (row, _) in enumerate(ROWS):
        adapter, activation = row.split("-")[:2]
        for seed in range(3):
            sv = [1.0 / (k + 1) for k in range(4)] + [1e-6 * i] * 12
            extra = {"loss_history": [{"step": s, "loss": 3 - s / 10 + seed / 100} for s in range(1, 6)],
                     "update_spectrum": {"module": "m", "r": 4, "singular_values": sv, "numerical_rank": 4 + 12 * (i > 0),
                                         "energy_beyond_r": sum(v * v for v in sv[4:]) / sum(v * v for v in sv)}}
            write_fake_record(runs, adapter, activation, "bbc_news", seed,
                              {"accuracy": 0.8 + 0.01 * i + 0.005 * seed, "no_class_rate": 0.0}, row=row, **extra)
            write_fake_record(runs, adapter, activation, "bbc_headlines", seed,
                              {"rouge1": 0.3 + 0.01 * math.sin(i + seed), "rouge2": 0.1, "rougeL": 0.28}, row=row,
                              **extra)
    monkeypatch.setenv("LORAN_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("LORAN_EXPERIMENT", "grid")
    out = tmp_path / "executed.ipynb"
    run_notebook.main(run_notebook.NOTEBOOK, out)
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert f"{len(ROWS) * 6} successful runs" in "".join(o.get("text", "") for o in outputs)
    figures = sorted(p.name for p in (tmp_path / "results/figures").glob("*.png"))
    assert figures == ["grid_delta_vs_qlora.png", "grid_loss.png", "grid_metrics.png", "grid_update_spectrum.png"]
