"""The train config's schema: one dataclass per config group, stored in Hydra's ConfigStore as ``train_schema``.

configs/train.yaml's defaults list starts with ``train_schema``, so every group's YAML merges into a typed field:
an unknown key or a value of the wrong type fails while Hydra composes, naming the field's full key. The YAML files
hold the values; this file holds what the keys are, their types, their closed choices, and per field:

  result=False   the field cannot change a result (where to write and log, resume/skip switches): the cell's
                 identity (loran/pipeline/cells.py) leaves it out. Every other field is part of the identity.
  not_result     the same for keys inside an open node (trainer.args is TrainingArguments' own keyword arguments).
  rule           a range the type cannot say (seed in [0, 2**32), n_train positive or null), checked by
                 loran.pipeline.checks.check_rules with the message "<key>=<value> (<type>) must be <description>".
  rules          rules for keys inside an open node, or the import path of such a table kept by its owner
                 (LoRA's sizes: loran.config.LORA_FIELDS).

Nodes that are ``_target_`` calls (model.load, dataset.loader/prompt/metric, adapter.peft, trainer.args) stay open
(Dict[str, Any]): they take whatever the target takes (checks.check_targets checks them against its signature).
This module imports no part of the library, so that train.py can register it without importing torch.
Registration happens in ``register_schema()`` (train.py, tests/conftest.py's cfg_of, scripts that compose), never
at import.
"""
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

from omegaconf import MISSING

SCHEMA = "train_schema"


@dataclass(frozen=True)
class Rule:
    """A value's allowed types and range; description completes "<key>=<value> (<type>) must be ..."."""

    types: tuple
    check: Optional[Callable[[Any], bool]]
    description: Union[str, Callable[[], str]]  # a callable: a description that needs a heavy import


ANY, BOOL, INT, NUMBER, OPTIONAL_INT = (object,), (bool,), (int,), (int, float), (int, type(None))
POSITIVE_OR_NULL = Rule(OPTIONAL_INT, lambda v: v is None or v > 0, "a positive integer or null (= the whole split)")
POSITIVE_INT = Rule(INT, lambda v: v > 0, "a positive integer")
POSITIVE_NUMBER = Rule(NUMBER, lambda v: math.isfinite(v) and v > 0, "a positive number")


def setting(default: Any = MISSING, *, result: bool = True, rule: Optional[Rule] = None,
            rules: Any = None, not_result: tuple = (), factory: Optional[Callable] = None) -> Any:
    """A dataclass field with the metadata above (default MISSING: the group's YAML sets the value)."""
    meta = {"result": result, "rule": rule, "rules": rules, "not_result": not_result}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _open() -> Any:
    return setting(factory=dict)


class Split(str, Enum):
    """The split evaluated (and n_eval drawn from): validation to choose settings, test to report. A str, printed and
    formatted as its value (enum.StrEnum, without needing Python 3.11)."""

    test = "test"
    validation = "validation"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def _one_of(path: str) -> Rule:
    """A closed choice whose options are a mapping's keys in a heavy module (imported only when checked)."""
    def options() -> list:
        from hydra.utils import get_object

        return sorted(get_object(path))

    return Rule((str,), lambda value: value in options(), lambda: f"one of {options()}")


@dataclass
class ModelConfig:
    name: str = MISSING
    target_modules: Any = setting(rule=Rule(ANY, lambda v: (isinstance(v, str) and bool(v.strip())) or (
        isinstance(v, list) and len(v) > 0 and all(isinstance(t, str) and t for t in v)),
        "a non-empty list of module names (for example [q_proj, v_proj]) or a regular expression string"))
    load: Dict[str, Any] = setting(factory=dict, rules={
        "quantization": _one_of("loran.pipeline.base_models.QUANTIZATIONS"),
        "dtype": _one_of("loran.pipeline.base_models.DTYPES")})


@dataclass
class DatasetConfig:
    name: str = MISSING
    loader: Dict[str, Any] = _open()
    prompt: Dict[str, Any] = setting(factory=dict, rules={
        "max_source_tokens": Rule(INT, lambda v: v > 0, "a positive integer (the prompt's token budget)"),
        "max_target_tokens": Rule(INT, lambda v: v > 0, "a positive integer (the target's tokens, eos included)")})
    metric: Dict[str, Any] = _open()
    n_train: Optional[int] = setting(rule=POSITIVE_OR_NULL)
    n_eval: Optional[int] = setting(rule=POSITIVE_OR_NULL)
    eval_split: Split = MISSING


# LoRA's sizes, shared by every adapter (qlora, loran, dora), so the arms compared cannot drift apart; an adapter's
# YAML adds its own keys (its _target_, LoRAN's activation, DoRA's use_dora) and an experiment may override these.
LORA_SIZES = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "${model.target_modules}",
              "task_type": "CAUSAL_LM"}


@dataclass
class AdapterConfig:
    name: str = MISSING
    takes_activation: bool = MISSING
    peft: Dict[str, Any] = setting(factory=lambda: dict(LORA_SIZES), rules="loran.config.LORA_FIELDS")


@dataclass
class ActivationConfig:
    name: str = MISSING
    params: Dict[str, Any] = _open()
    start: str = setting(rule=_one_of("loran.activations.START_MODES"))  # "base" (centred f) or "official"


STEPS = Rule(INT, lambda v: v == -1 or v > 0, "a positive integer, or -1 to train num_train_epochs")


@dataclass
class TrainerConfig:
    eval_batch_size: int = setting(rule=POSITIVE_INT)
    resume: bool = setting(result=False)  # resuming reproduces the result (tested)
    args: Dict[str, Any] = setting(
        factory=dict,
        rules={"per_device_train_batch_size": POSITIVE_INT, "gradient_accumulation_steps": POSITIVE_INT,
               "max_steps": STEPS, "num_train_epochs": POSITIVE_NUMBER, "learning_rate": POSITIVE_NUMBER},
        # where to write and log, and the checkpoint cadence (checkpoints exist to resume, which is exact)
        not_result=("output_dir", "run_name", "report_to", "logging_steps", "save_strategy", "save_steps",
                    "save_total_limit", "disable_tqdm"))


@dataclass
class LoggerConfig:
    report_to: List[str] = MISSING
    project: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    init_timeout: float = setting(30.0, rule=Rule(NUMBER, lambda v: math.isfinite(v) and v > 0,
                                                  "a positive number of seconds"))


@dataclass
class RowConfig:
    """How Table 2 shows a row (configs/row): its adapter and activation are in the identity already."""

    name: str = MISSING
    label: str = MISSING
    order: int = MISSING


@dataclass
class TrainConfig:
    # derived from the identity itself; first, so that resolving the config in place (`train.py --cfg job --resolve`)
    # hashes it before any ${seed} below is replaced by its value (loran/pipeline/cells.py: the seed stays symbolic)
    cell: str = setting(result=False)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    activation: ActivationConfig = field(default_factory=ActivationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = setting(result=False, factory=LoggerConfig)  # W&B on/off, project, group, tags
    row: Optional[RowConfig] = setting(None, result=False)
    seed: int = setting(rule=Rule(INT, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"))
    experiment_name: str = setting(result=False)  # where the record, the CSV and the W&B group go
    results_dir: str = setting(result=False)
    skip_existing: bool = setting(result=False)  # whether a finished (or diverged) cell is run again
    zero_shot: bool = MISSING  # also score the base model before training


def fields_of(schema: type) -> Iterator[tuple[dataclasses.Field, Optional[type]]]:
    """(field, the dataclass it holds, or None) for each field of a schema dataclass (Optional[...] unwrapped)."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        inner = typing.get_args(hint) if typing.get_origin(hint) is Union else (hint,)
        yield f, next((t for t in inner if dataclasses.is_dataclass(t)), None)


def register_schema() -> None:
    """Store TrainConfig as ``train_schema`` in Hydra's ConfigStore (storing it again replaces it with itself)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA, node=TrainConfig)
