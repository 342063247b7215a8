"""Scale-out paths in their smallest real form: SLURM launcher config, submitit local sweep with a failing
cell, torchrun with two gloo processes, and SIGTERM -> checkpoint -> resume."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from loran.pipeline.cells import register_resolver
from loran.pipeline.tables import build, load_records, load_rows

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = ["model=tiny", "dataset=bbc_headlines", "dataset.n_eval=4", "trainer.eval_batch_size=4", "zero_shot=false",
        "logger=none", "trainer.args.per_device_train_batch_size=2", "trainer.args.logging_steps=1"]


def record_of(results: Path, experiment: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "runs" / experiment).glob("*/record.json"))]


def csv_rows(results: Path, experiment: str) -> list[str]:
    path = results / "runs" / f"{experiment}_cells.csv"
    return path.read_text().splitlines()[1:] if path.exists() else []


def slurm_sbatch(tmp_path, monkeypatch, local_yaml: str, env: dict[str, str]) -> tuple[dict, str]:
    """The launcher's parameters and the sbatch file submitit would submit, from configs/hydra/launcher/slurm.yaml
    with `local_yaml` as configs/local/slurm.yaml and `env` set (no SLURM here: nothing is submitted)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    local = tmp_path / "extra/local"
    local.mkdir(parents=True)
    (local / "slurm.yaml").write_text(local_yaml)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    register_resolver()
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}/sweep",
                                          f"hydra.searchpath=[file://{tmp_path}/extra]"], return_hydra_config=True)
    # the process-wide HydraConfig is put back after the test (later tests read it as "outside a Hydra app")
    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)
    HydraConfig.instance().set_config(cfg)
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    params = dict(launcher.params)
    shown = dict(params)

    # The same parameter mapping as hydra-submitit-launcher's launch(), then submitit's own sbatch text.
    executor = submitit.AutoExecutor(folder=tmp_path / "sub", cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return shown, executor._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")


def test_slurm_launcher_composes_into_an_sbatch_script(tmp_path, monkeypatch):
    params, sbatch = slurm_sbatch(tmp_path, monkeypatch, "account: proj42\nsetup: ['source .venv/bin/activate']\n",
                                  {"LORAN_SLURM_PARTITION": "a100", "LORAN_SLURM_GPUS": "4"})
    assert (params["partition"], params["account"], params["gpus_per_node"]) == ("a100", "proj42", 4)
    assert params["signal_delay_s"] == 120 and params["max_num_timeout"] >= 1 and params["timeout_min"] == 720
    for line in ("#SBATCH --partition=a100", "#SBATCH --account=proj42", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --signal=USR2@120", "#SBATCH --time=720", "source .venv/bin/activate"):
        assert line in sbatch, line


def test_the_slurm_example_a_user_copies_reaches_the_sbatch_script(tmp_path, monkeypatch):
    """configs/local/slurm.example.yaml, copied as the README says, sets every sbatch line it names."""
    for key in [k for k in os.environ if k.startswith("LORAN_SLURM_")]:
        monkeypatch.delenv(key)
    _, sbatch = slurm_sbatch(tmp_path, monkeypatch, (REPO / "configs/local/slurm.example.yaml").read_text(), {})
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=my-project", "#SBATCH --qos=normal",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB", "#SBATCH --time=720",
                 "source ~/.bashrc", "cd ~/loran && source .venv/bin/activate"):
        assert line in sbatch, line


def test_submitit_local_sweep_runs_every_cell_and_records_the_failed_one(tmp_path):
    """4 good cells and 1 that fails at run time (a broken model config), as parallel submitit processes."""
    extra = tmp_path / "extra/row"
    extra.mkdir(parents=True)
    (extra / "broken.yaml").write_text(  # the Sigmoid row, with a model that cannot be built
        "# @package _global_\ndefaults:\n  - override /adapter: loran\n  - override /activation: sigmoid\n"
        "model:\n  load:\n    hidden_size: 63\n")
    results = tmp_path / "results"
    args = ["-m", *TINY, "hydra/launcher=local", f"hydra.searchpath=[file://{tmp_path}/extra]",
            "row=qlora,loran_sinter,loran_tanh,loran_relu,broken", "dataset.n_train=8",
            "trainer.args.max_steps=2", f"results_dir={results}", "experiment_name=sweep"]
    proc = subprocess.run([PY, str(REPO / "train.py"), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode != 0  # the sweep reports the failed cell at the end...
    records = record_of(results, "sweep")
    ok = sorted(r["choices"]["activation"] for r in records if r["status"] == "ok")
    assert ok == ["none", "relu", "sinter", "tanh"]  # ...after every other cell finished
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == 1 and "hidden size (63) is not a multiple" in failed[0]["error"]
    assert len(csv_rows(results, "sweep")) == 4
    table = build(load_records(results / "runs/sweep"), load_rows(REPO / "configs" / "row"))
    assert all(e["mean"] is None for e in table if e["row"] == "loran-sigmoid")


def test_torchrun_two_gloo_processes_train_and_rank0_writes_once(tmp_path):
    results = tmp_path / "results"
    args = [*TINY, "dataset.n_train=64", "trainer.args.max_steps=12", "trainer.args.learning_rate=0.01",
            f"results_dir={results}", "experiment_name=ddp"]
    proc = subprocess.run([str(Path(PY).parent / "torchrun"), "--nproc_per_node", "2", str(REPO / "train.py"), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = record_of(results, "ddp")
    assert record["world_size"] == 2 and record["distributed_backend"] == "gloo"
    assert len(csv_rows(results, "ddp")) == 1
    losses = [e["loss"] for e in record["loss_history"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # the loss falls


# covered fast by test_sigterm_saves_a_checkpoint_at_the_step_it_stops in test_preemption.py (SIGTERM: a checkpoint at
# its step, exit 143, no record) and test_a_truncated_newest_checkpoint_falls_back_to_the_previous_complete_one in
# test_run.py (a run resumed mid-training, dropout on, ends with the uninterrupted run's loss)
@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes_to_the_uninterrupted_result(tmp_path):
    """Exact equality is expected: CPU kernels are deterministic here, the Trainer restores the optimizer,
    scheduler, RNG states and the data order from the checkpoint. Tolerance 1e-6 absorbs summation order only."""
    base = [PY, str(REPO / "train.py"), *TINY, "dataset.n_train=40", "trainer.args.max_steps=10",
            "trainer.args.save_steps=2", "adapter.peft.lora_dropout=0.1"]  # dropout: the RNG state must resume too

    def run(experiment, **kwargs):
        return subprocess.Popen([*base, f"results_dir={tmp_path / experiment}", f"experiment_name={experiment}"],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)

    interrupted = run("cut")
    deadline = time.time() + 300
    while not list((tmp_path / "outputs/cut").glob("bbc_headlines.tiny.loran-sinter.seed0.*/checkpoints/checkpoint-4")):
        assert time.time() < deadline and interrupted.poll() is None
        time.sleep(0.2)
    interrupted.send_signal(signal.SIGTERM)
    out, _ = interrupted.communicate(timeout=300)
    assert interrupted.returncode == 143, out[-2000:]
    assert "received SIGTERM: saving a checkpoint" in out and not record_of(tmp_path / "cut", "cut")

    resumed = run("cut")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-2000:]
    assert re.search(r"resuming bbc_headlines\.tiny\.loran-sinter\.seed0\.[0-9a-f]{8} from checkpoint", out)

    straight = run("straight")
    straight.communicate(timeout=300)
    (a,) = record_of(tmp_path / "cut", "cut")
    (b,) = record_of(tmp_path / "straight", "straight")
    assert a["resumed_from"] and not b["resumed_from"]
    assert [e["step"] for e in a["loss_history"]] == list(range(1, 11))
    for x, y in zip(a["loss_history"], b["loss_history"]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-6)
    assert a["metrics"] == pytest.approx(b["metrics"], abs=1e-6)
