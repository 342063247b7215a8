"""Checks that stop a bad cell before any training, with a message naming the field and what is allowed."""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn


class ConfigError(ValueError):
    """A configuration value that cannot work; raised before training, with nothing written to results/."""


def _positive(value) -> bool:
    return value is None or value > 0


def _fraction(value) -> bool:
    return 0 <= value < 1


# field -> (allowed types, extra condition, description). Checked before anything is loaded.
TYPED_FIELDS: dict[str, tuple[tuple, object, str]] = {
    "seed": ((int,), None, "an integer"),
    "dataset.n_train": ((int, type(None)), _positive, "a positive integer or null (= the whole split)"),
    "dataset.n_eval": ((int, type(None)), _positive, "a positive integer or null (= the whole split)"),
    "adapter.peft.r": ((int,), _positive, "a positive integer"),
    "adapter.peft.lora_alpha": ((int, float), _positive, "a positive number"),
    "adapter.peft.lora_dropout": ((int, float), _fraction, "a number in [0, 1)"),
    "trainer.eval_batch_size": ((int,), _positive, "a positive integer"),
    "trainer.args.per_device_train_batch_size": ((int,), _positive, "a positive integer"),
    "trainer.args.learning_rate": ((int, float), _positive, "a positive number"),
}


def check_types(cfg: DictConfig) -> None:
    """Each field of TYPED_FIELDS that is present has the right type and range."""
    for key, (types, condition, description) in TYPED_FIELDS.items():
        value = OmegaConf.select(cfg, key, default="<absent>")
        if value == "<absent>":
            continue
        if isinstance(value, bool) or not isinstance(value, types) or (condition and not condition(value)):
            raise ConfigError(f"{key}={value!r} ({type(value).__name__}) must be {description}")


def check_activation_choice(cfg: DictConfig) -> None:
    """adapter=qlora takes no activation: an explicit one would silently be ignored, so it is refused."""
    if not cfg.adapter.takes_activation and cfg.activation.name != "none":
        raise ConfigError(
            f"adapter={cfg.adapter.name} takes no activation, but activation={cfg.activation.name} was chosen. "
            f"QLoRA is plain LoRA on the quantised base; for a non-linear update use adapter=loran "
            f"activation={cfg.activation.name}, or drop the activation override."
        )


def check_target_modules(model: nn.Module, targets: list[str] | str, model_name: str) -> None:
    """Every target module name matches at least one linear layer of `model`."""
    if isinstance(targets, str):  # a regex: PEFT reports a mismatch itself
        return
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if _is_linear(module)}
    missing = sorted(set(targets) - names)
    if missing:
        raise ConfigError(
            f"model.target_modules={list(targets)}: {missing} not found in model {model_name}; "
            f"its linear layers are {sorted(names)}"
        )


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ in {"Conv1D", "Linear4bit", "Linear8bitLt"}


def as_config_error(error: Exception, where: str) -> ConfigError:
    """Wrap a ValueError/TypeError raised while building `where` from the config."""
    return ConfigError(f"{where}: {error}")


def to_plain(node: Any) -> Any:
    """An OmegaConf node as plain Python containers (resolved)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
