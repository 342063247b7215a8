"""Fine-tuning with transformers' Trainer: arguments, adapter wrapping, divergence stop, checkpoint discovery."""
from __future__ import annotations

import json
import logging
import math
import os
import zipfile
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig
from peft import get_peft_model, prepare_model_for_kbit_training
from safetensors import safe_open
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from loran.pipeline.data import CausalLMCollator
from loran.pipeline.tracking import log_wandb

log = logging.getLogger(__name__)


def training_args(cfg: DictConfig, out_dir: Path) -> TrainingArguments:
    """TrainingArguments from cfg.trainer.args; checkpoints go to out_dir/checkpoints.

    NaN and inf losses are logged as they are (transformers would replace them by the window's mean), so a
    diverging run shows in its loss history and is stopped by DivergenceStop. W&B is left out of report_to:
    transformers' own WandbCallback is unguarded (a failing wandb.log would fail the cell, and without a run it calls
    an unbounded wandb.init); WandbLog logs to the run that loran.pipeline.tracking started instead.
    """
    report_to = [name for name in cfg.logger.report_to if name != "wandb"] or ["none"]
    return instantiate(cfg.trainer.args, output_dir=str(Path(out_dir) / "checkpoints"), report_to=report_to,
                       run_name=cfg.cell, logging_nan_inf_filter=False, _convert_="all")


def wrap_model(model, peft_config):
    """Prepare a quantised base for training (fp32 norms) and add the adapter. Gradient checkpointing is left as the
    loader set it (model.load.gradient_checkpointing, non-reentrant, so no input grads are needed)."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, peft_config)


def build_trainer(args: TrainingArguments, model, peft_config, tokenizer, train_data, wandb_run=None) -> Trainer:
    """A Trainer for the cell, with the divergence stop installed (trainer.divergence) and, given the cell's W&B run
    (loran.pipeline.tracking.start_wandb), its logs sent there (WandbLog)."""
    model = wrap_model(model, peft_config)
    trainer = Trainer(model=model, args=args, train_dataset=train_data,
                      data_collator=CausalLMCollator(pad_token_id=tokenizer.pad_token_id))
    trainer.divergence = DivergenceStop()
    trainer.add_callback(trainer.divergence)
    if wandb_run is not None:
        trainer.add_callback(WandbLog(wandb_run))
    return trainer


def train_or_load(trainer: Trainer, resume: str | None) -> None:
    """trainer.train(resume_from_checkpoint=resume), except that a checkpoint of the last step is loaded, not trained
    from: transformers would train a step past max_steps when that step is not at an epoch's end (as when a signal
    stopped the final evaluation and the same command redoes it)."""
    state = TrainerState.load_from_json(str(Path(resume) / TRAINER_STATE_NAME)) if resume else None
    if state is None or not 0 < state.max_steps <= state.global_step:
        trainer.train(resume_from_checkpoint=resume)
        return
    log.info("checkpoint %s is the last step (%d): loading it, nothing is left to train", resume, state.global_step)
    trainer._load_from_checkpoint(resume)  # what trainer.train loads first
    trainer.state = state


class WandbLog(TrainerCallback):
    """Sends each log of the Trainer (loss, grad_norm, learning_rate, ...) to the cell's W&B run as train/<key> at
    the global step, through tracking.log_wandb, which never raises."""

    def __init__(self, run) -> None:
        self.run = run

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            log_wandb(self.run, {f"train/{key}": value for key, value in logs.items()}, step=state.global_step)


class DivergenceStop(TrainerCallback):
    """Stops training at the first logged non-finite loss or gradient norm; `found` then holds the step and values.

    The logged loss is the mean over the logging window, so a NaN at any step shows at the window's end.
    """

    def __init__(self) -> None:
        self.found: dict[str, Any] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = {k: logs[k] for k in ("loss", "grad_norm") if k in (logs or {})}
        if self.found is None and any(not math.isfinite(float(v)) for v in values.values()):
            self.found = {"step": state.global_step, **values}
            log.error("training diverged at step %d: %s; stopping", state.global_step, values)
            control.should_training_stop = True
            control.should_save = False  # a checkpoint of NaN weights would only be resumed into the same NaN
        return control


def loss_history(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per logged step: the loss and the gradient norm, non-finite values kept as they are."""
    return [{"step": e["step"], "loss": e["loss"], "grad_norm": e.get("grad_norm")}
            for e in log_history if "loss" in e]


# --- checkpoints ---------------------------------------------------------------------------------------------
REQUIRED = ("trainer_state.json", "optimizer.pt", "scheduler.pt")  # what resume_from_checkpoint reads


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed (a missing or truncated file), or None when every file in it is whole."""
    for name in REQUIRED:
        if not (folder / name).is_file():
            return f"{name} is missing"
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        return "it holds no weights"
    for path in sorted(folder.iterdir()):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():  # reads every tensor: a truncated file fails here
                        f.get_slice(key)[:]
            elif path.suffix in {".pt", ".pth", ".bin"}:
                with zipfile.ZipFile(path) as z:  # torch.save's format; testzip checks every member's CRC
                    if z.testzip() is not None:
                        return f"{path.name} is corrupted"
        except Exception as err:  # noqa: BLE001 - any failure to read means "not resumable"
            return f"{path.name} cannot be read ({type(err).__name__}: {err})"
    return None


def last_checkpoint(out_dir: Path) -> str | None:
    """The newest complete checkpoint-N of this cell; newer incomplete ones are renamed *.incomplete, with a warning."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    candidates = sorted((p for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                         if p.is_dir() and p.name.split("-")[-1].isdigit()),
                        key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for ckpt in candidates:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return str(ckpt)
        aside = ckpt.with_name(ckpt.name + ".incomplete")
        log.warning("checkpoint %s is not resumable (%s); moved to %s, trying an older one", ckpt, problem, aside.name)
        ckpt.rename(aside)
    return None


def claim_out_dir(out_dir: Path, cell: str, config_hash: str) -> None:
    """Mark out_dir as this configuration's; ValueError when another configuration's checkpoints are there.

    The default folders are named by the cell (and so by its hash); this guards a hand-set hydra.run.dir.
    """
    owner = Path(out_dir) / "cell.json"
    if owner.exists():
        theirs = _read_owner(owner)
        if theirs.get("config_hash") != config_hash:
            raise ValueError(f"{out_dir} holds the checkpoints of cell {theirs.get('cell')}, not of {cell}; "
                             "resuming them would mix two configurations. Choose another hydra.run.dir or delete it.")
        return
    owner.parent.mkdir(parents=True, exist_ok=True)
    partial = owner.with_name(f".{owner.name}.tmp")  # written whole, then renamed: a crash leaves no half file
    partial.write_text(json.dumps({"cell": cell, "config_hash": config_hash}) + "\n")
    os.replace(partial, owner)


def _read_owner(owner: Path) -> dict[str, Any]:
    """The {"cell", "config_hash"} of a checkpoint folder's cell.json; ValueError naming the file if unreadable."""
    try:
        theirs = json.loads(owner.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        problem = f"is not valid JSON ({err})"
    else:
        if isinstance(theirs, dict) and isinstance(theirs.get("config_hash"), str):
            return theirs
        problem = 'is not {"cell": ..., "config_hash": ...}'
    raise ValueError(f"{owner} {problem}; it names the configuration whose checkpoints {owner.parent} holds. Move it "
                     "away and run the same command again: the folder is then claimed by this cell and its "
                     "checkpoints resumed (right for the default folder, outputs/<experiment>/<cell>, whose name "
                     "holds the configuration's hash); else delete the folder too, to train from scratch")
