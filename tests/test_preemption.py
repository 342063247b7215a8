"""loran/pipeline/preemption.py: SIGTERM during training saves a checkpoint at the step where training stopped (exit
143, no record), through train.py as a subprocess."""
import json
import re
import signal
import subprocess
import sys
import threading
import time

from conftest import REPO


# SIGTERM saves a checkpoint at the step where training stopped (no periodic checkpoint to fall back on).
TINY = ["model=tiny", "dataset=bbc_headlines", "dataset.n_train=400", "dataset.n_eval=4", "trainer.eval_batch_size=4",
        "zero_shot=false", "logger=none", "trainer.args.per_device_train_batch_size=2", "trainer.args.logging_steps=1",
        "trainer.args.max_steps=200", "trainer.args.save_steps=100000", "dataset.prompt.max_source_tokens=32"]


def test_sigterm_saves_a_checkpoint_at_the_step_it_stops(tmp_path):
    """Planted: `control.should_save = True` removed from PreemptionCallback.on_step_end -> fails (no checkpoint)."""
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *TINY, f"results_dir={tmp_path / 'results'}",
                             "experiment_name=term"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    loss_line = re.compile(r"'loss': ")
    deadline = time.time() + 300
    try:
        while sum(bool(loss_line.search(line)) for line in list(lines)) < 3:
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert time.time() < deadline, "no training steps logged in time"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode == 143, out[-3000:]
    steps = sum(bool(loss_line.search(line)) for line in lines)  # logging_steps=1: one loss line per step
    assert 3 <= steps < 200
    ckpts = list((tmp_path / "outputs/term").glob("*/checkpoints/checkpoint-*"))
    assert [p.name for p in ckpts] == [f"checkpoint-{steps}"], (ckpts, out[-2000:])
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    assert any(ckpts[0].glob("adapter_model.*")) and (ckpts[0] / "optimizer.pt").exists()
    assert not list((tmp_path / "results").rglob("record.json"))  # no record for a preempted cell
