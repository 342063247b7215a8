"""The Table 2 notebook executes on records the test writes and draws its four figures."""
import importlib.util
import math
from pathlib import Path

import nbformat

from loran.pipeline.tables import load_rows

REPO = Path(__file__).resolve().parents[1]
ROWS = load_rows(REPO / "configs" / "row")
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


def _study_record(runs, activation, params, r, seed, correct, alpha=16):
    # the share of update energy beyond rank r: amp^2 / 2 where omega |z| >> 1, amp^2 x a constant below (the notebook)
    energy = params.get("amp", 0) ** 2 * (0.5 if params.get("omega", 0) > 1e3 else 0.04)
    identity = {"activation": {"name": activation, "params": params}, "adapter": {"peft": {"r": r, "lora_alpha": alpha}},
                "seed": "<seed>"}
    cell = f"{activation}{sorted(params.items())}.r{r}.a{alpha}.seed{seed}"
    rec = {"status": "ok", "cell": cell, "identity": identity, "n_eval": len(correct), "eval_split": "test",
           "choices": {"seed": seed}, "metrics": {"accuracy": float(sum(correct) / len(correct))},
           "trainable_params": 1000 * r, "update_spectrum": {"energy_beyond_r": energy},
           "predictions": [{"id": f"n{i}", "prediction": str(c), "accuracy": float(c)} for i, c in enumerate(correct)]}
    (runs / cell).mkdir(parents=True)
    (runs / cell / "record.json").write_text(__import__("json").dumps(rec))


def test_study_notebook_draws_the_heatmaps_the_rank_figure_and_the_tuned_study(tmp_path, monkeypatch):
    """The study notebook on records the test writes: a 2 x 2 screening grid, two methods at two ranks, and the tuned
    study's validation grid and confirmation."""
    import numpy as np
    base = _study_results(tmp_path, monkeypatch)
    out = tmp_path / "executed.ipynb"
    run_notebook.main(REPO / "notebooks/study.ipynb", out)
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    assert "screen: 10 successful runs" in text and "test: 10 successful runs" in text
    assert "| activation=sinter, amp=0.5, omega=10000.0 | 2 | 8,000 | " in text   # 5 of 50 flipped, both seeds
    assert "| 10000 | 0.05 | 0.00125 | 0.500 |" in text and "| 100 | 0.5 | 0.01 | 0.040 |" in text  # energy / amp²
    # head to head at r = 8: Sine-LoRA against LoRA at lora_alpha 200, equal on the first 25 examples only
    sine, scaled = np.array(base[::-1]), np.array(base[::-1][:25] + base[25:])
    head = [line for line in text.splitlines() if line.startswith("| 8 | activation=identity, lora_alpha=200 | activation=sine")]
    assert len(head) == 1 and f"| {100 * (scaled - sine).mean():+.2f} [" in head[0], text
    assert f"| 2 | {100 * (scaled != sine).mean():.2f} |" in head[0]
    # the tuned study: validation means per learning rate (the 100-step length cell left out), then the confirmation
    assert "| bbc_news | loran-identity | 0.0003: 50.00 (2), 0.001: 60.00 (2), 0.003: 55.00 (2) |" in text, text
    assert "| bbc_news | loran-sinter (amp=0.5, omega=10000.0) | 0.0003: 40.00 (2), 0.003: 70.00 (2) |" in text
    assert "| bbc_headlines | loran-identity | 0.0003: 50.00 (2)" in text and "(1)" not in text.split("learning rate: mean")[1]
    confirmation = text.split("# ttest: 12 successful runs")[1]
    assert confirmation.count("| control |") == 2 and "p (Holm)" in confirmation
    (tuned,) = [line for line in confirmation.splitlines() if line.startswith("| bbc_news |") and "amp=0.5" in line]
    assert "| 0.003 | 2 | 2 | accuracy | 65.00 | +5.00 [" in tuned
    (row,) = [line for line in confirmation.splitlines() if line.startswith("| bbc_news |") and "amp=5e-05" in line]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[2:7] == ["0.001", "-", "2", "accuracy", "60.00"] and cells[9] and not cells[10]   # p, no Holm value
    figures = sorted(p.name for p in (tmp_path / "results/figures").glob("*.png"))
    assert figures == ["screen_heatmaps.png", "test_accuracy_vs_parameters.png", "ttest_vs_lora.png",
                       "tval_learning_rates.png"]


def _study_results(tmp_path, monkeypatch):
    """The records the study notebook reads, and the environment that points it at them."""
    import numpy as np
    rng = np.random.default_rng(0)
    base = [int(v) for v in rng.integers(0, 2, 50)]
    for seed in (0, 1):
        _study_record(tmp_path / "results/runs/screen", "identity", {}, 8, seed, base)
        for amp in (0.05, 0.5):
            for omega in (100.0, 1e4):
                flipped = [1 - c if i < 10 * amp * (omega > 1e3) else c for i, c in enumerate(base)]
                _study_record(tmp_path / "results/runs/screen", "sinter", {"amp": amp, "omega": omega}, 8, seed, flipped)
        for r in (1, 8):
            _study_record(tmp_path / "results/runs/test", "identity", {}, r, seed, base)
            _study_record(tmp_path / "results/runs/test", "sine", {"omega": 300.0}, r, seed, base[::-1])
        _study_record(tmp_path / "results/runs/test", "identity", {}, 8, seed, base[::-1][:25] + base[25:], alpha=200)
    _tuned_study(tmp_path / "results", rng)
    monkeypatch.setenv("LORAN_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("LORAN_SCREEN", "screen")
    monkeypatch.setenv("LORAN_TEST", "test")
    monkeypatch.setenv("LORAN_TUNED_VAL", "tval")
    monkeypatch.setenv("LORAN_TUNED_TEST", "ttest")
    return base


def test_the_study_notebook_shows_no_confirmation_table_until_the_confirmation_is_whole(tmp_path, monkeypatch):
    _study_results(tmp_path, monkeypatch)
    (one,) = [p for p in (tmp_path / "results/runs/ttest").glob("*/record.json")
              if "bbc_news" in p.parent.name and "identity" in p.parent.name and "seed3" in p.parent.name]
    one.unlink()
    out = tmp_path / "executed.ipynb"
    run_notebook.main(REPO / "notebooks/study.ipynb", out)
    nb = nbformat.read(out, as_version=4)
    text = "".join(str(o.get("data", {}).get("text/markdown", "")) for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)
    assert "The confirmation is not complete: 1 run to go (bbc_news activation=identity lr 0.001 seed 3). Its table " \
           "waits for all of them." in text
    assert "# ttest" not in text and not (tmp_path / "results/figures/ttest_vs_lora.png").exists()


def _tuned_study(results, rng):
    """The tuned study's records, composed from its configs: on validation LoRA at 3 learning rates and Sinter amp 0.5
    at 2, seeds 0 and 1, per task (bbc_news at 400 steps, headlines at 200) and LoRA's 100-step length cell; on test
    LoRA and Sinter at their chosen rates and the released Sinter at LoRA's, seeds 2 and 3 (the confirmation's two
    seeds); the validation choices and seeds files."""
    import json

    import numpy as np

    from loran.pipeline.cells import flatten, identity
    from loran.pipeline.metrics import primary_metric

    from conftest import cfg_of

    def write(experiment, overrides, seed, value):
        cfg = cfg_of(f"experiment={experiment}", f"seed={seed}", *overrides)
        metric = primary_metric({"identity": identity(cfg)})
        scores = [float(i < round(100 * value)) for i in range(100)]
        rng.shuffle(scores)
        rec = {"status": "ok", "cell": cfg.cell, "identity": identity(cfg), "choices": {"seed": seed},
               "metrics": {metric: float(np.mean(scores)), "rouge1": 0.3, "rouge2": 0.1}, "n_eval": 100,
               "eval_split": "validation" if experiment == "study_tuned_val" else "test", "trainable_params": 1,
               "predictions": [{"id": f"a{i}", "prediction": str(v), metric: v, "rouge1": 0.3, "rouge2": 0.1}
                               for i, v in enumerate(scores)]}
        folder = results / "runs" / ("tval" if experiment == "study_tuned_val" else "ttest") / cfg.cell
        folder.mkdir(parents=True)
        (folder / "record.json").write_text(json.dumps(rec))
        return cfg

    lora, sinter = ("activation=identity",), ("activation=sinter", "activation.params.amp=0.5")
    released = ("activation=sinter", "activation.params.amp=5e-5", "activation.params.omega=1e4")
    choices = []
    for task, steps in (("bbc_news", 400), ("bbc_headlines", 200)):
        data = (f"dataset={task}", f"trainer.args.max_steps={steps}")
        write("study_tuned_val", (*lora, f"dataset={task}", "trainer.args.max_steps=100",
                                  "trainer.args.learning_rate=1e-3"), 0, 0.9)
        for seed in (0, 1):
            for lr, value in (("3e-4", 0.5), ("1e-3", 0.6), ("3e-3", 0.55)):
                write("study_tuned_val", (*lora, *data, f"trainer.args.learning_rate={lr}"), seed, value)
            for lr, value in (("3e-4", 0.4), ("3e-3", 0.7)):
                write("study_tuned_val", (*sinter, *data, f"trainer.args.learning_rate={lr}"), seed, value)
            test_seed = seed + 2   # the confirmation's seeds follow the validation grid's
            write("study_tuned_test", (*lora, *data, "trainer.args.learning_rate=1e-3"), test_seed, 0.6)
            write("study_tuned_test", (*sinter, *data, "trainer.args.learning_rate=3e-3"), test_seed, 0.65)
            write("study_tuned_test", (*released, *data, "trainer.args.learning_rate=1e-3"), test_seed, 0.6)
        for method, tried, chosen in ((lora, 3, 1e-3), (sinter, 2, 3e-3)):
            flat = flatten(identity(cfg_of("experiment=study_tuned_val", *data, *method)))
            choices.append({"task": task, "tried": tried, "chosen": chosen, "label": " ".join(method),
                            "method": {k: v for k, v in flat.items() if k != "trainer.args.learning_rate"}})
    (results / "tval_choices.json").write_text(json.dumps(choices))
    (results / "tval_seeds.json").write_text(json.dumps([{"task": t, "seeds": 2} for t in ("bbc_news", "bbc_headlines")]))
