"""Fine-tuning with transformers' Trainer: adapter wrapping, kbit preparation, checkpoint discovery."""
from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from loran.data import CausalLMCollator


def wrap_model(model, peft_config, gradient_checkpointing: bool):
    """Prepare a quantised base for training (fp32 norms, input grads) and add the adapter."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return get_peft_model(model, peft_config)


def build_trainer(cfg: DictConfig, model, peft_config, tokenizer, train_data, out_dir: Path) -> Trainer:
    """A Trainer for the cell: TrainingArguments from cfg.trainer.args, checkpoints under out_dir."""
    args = instantiate(cfg.trainer.args, output_dir=str(out_dir / "checkpoints"),
                       report_to=list(cfg.logger.report_to), run_name=cfg.cell,
                       _convert_="all")
    model = wrap_model(model, peft_config, bool(args.activation_checkpointing))
    return Trainer(model=model, args=args, train_dataset=train_data,
                   data_collator=CausalLMCollator(pad_token_id=tokenizer.pad_token_id))


def last_checkpoint(out_dir: Path) -> str | None:
    """The newest checkpoint-N folder of this cell, if training was interrupted after saving one."""
    folder = Path(out_dir) / "checkpoints"
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None
