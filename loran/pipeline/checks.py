"""Checks that stop a bad cell before anything is loaded, with a message naming the field and what is allowed.

``check_config(cfg)`` runs them all; it reads no model and no data and writes nothing. Types and closed choices
are the schema's (loran/pipeline/schema.py), enforced while Hydra composes; check_schema applies what the schema says
beyond that (keys that `+key=value` added, range rules); the other checks are rules that span fields or need the
target's signature, the file system or the adapter's own validation. ``train.py`` also runs
it through ``CheckBeforeRun`` before Hydra creates the run's output folder, so a bad name never makes a folder.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, InstantiationException
from hydra.experimental.callback import Callback
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from loran.pipeline.cells import check_name
from loran.pipeline.hints import closest, did_you_mean, meant_hint, override_hints
from loran.pipeline.schema import ANY, Rule, TrainConfig, fields_of


class ConfigError(ValueError):
    """A configuration value that cannot work; raised before training, with nothing written to results/."""


# Hydra's own node: in the config a Hydra callback sees (CheckBeforeRun), not part of the schema.
HYDRA_NODE = "hydra"


# Settings with one switch: a key that would switch the same thing a second time -> the switch.
ONE_SWITCH: dict[str, str] = {
    f"trainer.args.{key}": "model.load.gradient_checkpointing"
    for key in ("activation_checkpointing", "activation_checkpointing_kwargs", "gradient_checkpointing",
                "gradient_checkpointing_kwargs")
}


def _select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default="<absent>", throw_on_resolution_failure=True)


def _absent(value: Any) -> bool:
    return isinstance(value, str) and value == "<absent>"


def _rules_of(spec: Any) -> dict[str, Rule]:
    """A field's `rules`: a mapping, or the import path of one kept by its owner as {name: (check, description)}."""
    if isinstance(spec, str):
        return {name: Rule(ANY, check, description) for name, (check, description) in get_object(spec).items()}
    return dict(spec or {})


def _apply(key: str, value: Any, rule: Rule) -> None:
    value = to_plain(value)
    wrong_type = (isinstance(value, bool) and bool not in rule.types) or not isinstance(value, rule.types)
    if wrong_type or (rule.check and not rule.check(value)):
        description = rule.description() if callable(rule.description) else rule.description
        raise ConfigError(f"{key}={value!r} ({type(value).__name__}) must be {description}")


def check_schema(cfg: DictConfig, schema: type = TrainConfig, path: str = "") -> None:
    """What the schema (loran/pipeline/schema.py) says beyond the types Hydra enforced while composing: no typed node
    has a key the schema lacks (Hydra lets `+key=value` add one), and every range rule holds, inside open nodes too."""
    node = cfg if not path else _select(cfg, path)
    known = {f.name for f in dataclasses.fields(schema)}
    for key in node.keys():
        if key not in known and not (not path and key == HYDRA_NODE):
            where = f"{path}.{key}" if path else key
            hint = meant_hint(node, path.split(".") if path else [], str(key))
            raise ConfigError(f"{where}: unknown key (nothing reads it){hint}; "
                              f"{path or 'the top level'} has {sorted(known)}")
    for f, nested in fields_of(schema):
        key = f"{path}.{f.name}" if path else f.name
        value = _select(cfg, key)
        if _absent(value):
            continue
        if f.metadata.get("rule"):
            _apply(key, value, f.metadata["rule"])
        for name, rule in _rules_of(f.metadata.get("rules")).items():
            inner = _select(cfg, f"{key}.{name}")
            if not _absent(inner):
                _apply(f"{key}.{name}", inner, rule)
        if nested is not None and isinstance(value, DictConfig):
            check_schema(cfg, nested, key)


def _target_nodes(node: Any, path: str = ""):
    """(path, node) for every dict node with a `_target_`, depth first."""
    if isinstance(node, DictConfig):
        if "_target_" in node.keys():
            yield path, node
        for key in node.keys():
            if path == "" and key == "hydra":
                continue
            child = node._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)):
                yield from _target_nodes(child, f"{path}.{key}" if path else str(key))


def check_targets(cfg: DictConfig) -> None:
    """Every key of a `_target_` node is an argument the target accepts (else the call fails after loading)."""
    for path, node in _target_nodes(cfg):
        try:
            target = get_object(node._target_)
        except Exception as err:
            raise ConfigError(f"{path}._target_={node._target_!r} cannot be imported: {err}") from err
        params = inspect.signature(target).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        for key in node.keys():
            if not str(key).startswith("_") and key not in params:
                hint = closest(str(key), params)
                raise ConfigError(f"{path}.{key}: {node._target_} takes no argument {key!r}{did_you_mean(hint)}")


def check_one_switch(cfg: DictConfig) -> None:
    """A setting with one switch is not switched a second time elsewhere (the two could disagree)."""
    for key, switch in ONE_SWITCH.items():
        value = _select(cfg, key)
        if not (isinstance(value, str) and value == "<absent>"):
            raise ConfigError(f"{key}={to_plain(value)!r}: this is switched by {switch} only (the model's loader "
                              f"applies it); set that instead")


# Why an adapter with takes_activation: false has no activation (the refusal says it for the adapter chosen).
NO_ACTIVATION_BECAUSE: dict[str, str] = {
    "qlora": "QLoRA is plain LoRA on the quantised base (its update is B A, f = identity)",
    "dora": "DoRA is PEFT's LoRA with a learned magnitude per output (use_dora); its update is B A, and PEFT's "
            "LoraConfig has no activation to apply",
}


def check_activation_choice(cfg: DictConfig) -> None:
    """An adapter that takes no activation (qlora, dora) refuses an explicit one, which would silently be ignored."""
    if not cfg.adapter.takes_activation and cfg.activation.name != "none":
        name = cfg.adapter.name
        because = NO_ACTIVATION_BECAUSE.get(name, f"configs/adapter/{name}.yaml says takes_activation: false")
        raise ConfigError(
            f"adapter={name} takes no activation, but activation={cfg.activation.name} was chosen. "
            f"{because}; for a non-linear update use adapter=loran activation={cfg.activation.name}, or drop the "
            f"activation override."
        )


def cause(err: Exception) -> str:
    """The message of the error a Hydra instantiation wrapped (or of `err` itself)."""
    return str(err.__cause__) if isinstance(err, InstantiationException) and err.__cause__ else str(err)


def build_peft_config(cfg: DictConfig):
    """The adapter's PEFT config (LoraConfig or LoranConfig), which checks its own values (the activation and its
    parameters: loran.activations; the PEFT options: loran.config); a bad value becomes a ConfigError."""
    try:
        return instantiate(cfg.adapter.peft, target_modules=to_plain(cfg.model.target_modules), _convert_="all")
    except (ValueError, TypeError, InstantiationException) as err:
        raise ConfigError(f"adapter={cfg.adapter.name}, activation={cfg.activation.name}: {cause(err)}") from err


NAME_MAX = 255  # bytes per file or folder name on ext4, XFS, Btrfs, tmpfs, NFS (os.pathconf's PC_NAME_MAX)
# The longest file name made from each name, as (bytes added, example): the file systems' limit applies to these.
NAME_SUFFIXES: dict[str, tuple[int, str]] = {
    # records._atomic_write's temporary file for <results_dir>/runs/<experiment_name>_cells.csv
    "experiment_name": (len("._cells.csv.") + 8 + len(".tmp"), "._cells.csv.XXXXXXXX.tmp"),
    "cell": (len(".lock"), ".lock"),  # <results_dir>/runs/<experiment>/<cell>.lock
}


def check_name_length(field: str, value: str) -> None:
    """A name (and the files named after it) fits the file system's limit of NAME_MAX bytes per path component."""
    extra, example = NAME_SUFFIXES.get(field, (0, ""))
    size = len(str(value).encode())
    if size + extra > NAME_MAX:
        shown = f"{value[:40]}...{value[-12:]}" if len(value) > 60 else value
        raise ConfigError(f"{field}={shown!r} is {size} bytes long; at most {NAME_MAX - extra} fit, since a file or "
                          f"folder name may have {NAME_MAX} bytes and the longest one made from it adds {extra} "
                          f"({field}{example}); choose a shorter {field}")


def check_names(cfg: DictConfig) -> None:
    """experiment_name and the cell name are single folder names, so nothing is written outside its folder, and they
    fit the file system's name length (else Hydra's folder or a record fails after the run started)."""
    for field in ("experiment_name", "dataset.name", "model.name", "adapter.name", "activation.name", "cell"):
        try:
            check_name(field, _select(cfg, field))
        except ValueError as err:
            raise ConfigError(str(err)) from err
    for field in ("experiment_name", "cell"):  # the cell's name holds the group names: their length counts there
        check_name_length(field, _select(cfg, field))


def check_writable(cfg: DictConfig) -> None:
    """results_dir (and the outputs folder) can be written: found now, not after hours of training."""
    for field, folder in (("results_dir", Path(cfg.results_dir)), ("outputs folder", Path("outputs"))):
        existing = folder.absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{field}={str(folder)!r}: {existing} is not a writable folder")


def check_config(cfg: DictConfig) -> None:
    """Every check that needs neither the model nor the data, cheapest first."""
    check_schema(cfg)
    check_one_switch(cfg)
    check_names(cfg)
    check_targets(cfg)
    check_activation_choice(cfg)
    build_peft_config(cfg)  # the adapter's own checks, so a single run stops before Hydra makes its folder
    check_writable(cfg)


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


def to_plain(node: Any) -> Any:
    """An OmegaConf node as plain Python containers (resolved)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


class CheckBeforeRun(Callback):
    """Hydra callback (configs/train.yaml): check a single run's config before Hydra makes its output folder, and
    every cell of a sweep before any cell runs or is submitted (a bad value in a grid's list stops it at once, one
    line per bad cell, not after hours of the good cells before it)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(check_config, config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(lambda cfg: (check_name("experiment_name", cfg.experiment_name),
                                 check_name_length("experiment_name", cfg.experiment_name)), config)
        cells, problems = list(sweep_cells(config)), []
        shared = Counter(o for overrides, _ in cells for o in overrides)
        swept = {o for o, n in shared.items() if n < len(cells)}   # the values that tell the cells apart
        for number, (overrides, compose) in enumerate(cells):
            try:
                check_config(compose())
            except (ConfigError, ValueError, HydraException, OmegaConfBaseException) as err:
                shown = " ".join(o for o in overrides if o in swept)
                problems.append(f"  cell #{number} ({shown}): {cause(err)}")
        if problems:
            loader = GlobalHydra.instance().config_loader()
            hints = override_hints(list(config.hydra.overrides.task), set(loader.list_groups("")),
                                   lambda choices: loader.load_sweep_config(config, choices))
            print(f"configuration error in {len(problems)} of the sweep's cells; none was run:", *problems, *hints,
                  sep="\n", file=sys.stderr)
            sys.exit(2)

    @staticmethod
    def _check(check: Callable[[DictConfig], None], config: DictConfig) -> None:
        try:
            check(config)
        except (ConfigError, ValueError) as err:
            print(f"configuration error: {err}", file=sys.stderr)
            sys.exit(2)  # Hydra reports its own errors with exit code 1; a bad config is 2 everywhere


def sweep_cells(config: DictConfig) -> Iterator[tuple[list[str], Callable[[], DictConfig]]]:
    """A sweep's jobs as Hydra's basic sweeper makes them (the experiment's hydra.sweeper.params, then the command's
    overrides; hydra/_internal/core_plugins/basic_sweeper.py), each with a function that composes its config. None
    for another sweeper (an optimiser's search space is not a list of cells: its jobs are checked as they run)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if OmegaConf.select(config, "hydra.sweeper._target_") != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
        return
    loader = GlobalHydra.instance().config_loader()
    params = [f"{key}={value}" for key, value in (OmegaConf.select(config, "hydra.sweeper.params") or {}).items()]
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(params + list(config.hydra.overrides.task))
    for batch in BasicSweeper.split_arguments(parsed, OmegaConf.select(config, "hydra.sweeper.max_batch_size")):
        for job in batch:
            yield list(job), lambda job=job: loader.load_sweep_config(config, list(job))
