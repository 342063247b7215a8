"""Did-you-mean hints for configuration keys: a mistyped or synonymous name -> the name the config has.

Light on purpose (Hydra and OmegaConf only): train.py loads it by file when Hydra rejects an override, so the hint
costs no torch import. ``closest`` serves the project's checks (loran/pipeline/checks.py); ``override_hints`` explains
Hydra's "Could not override 'a.b'. To append to your config use +a.b=..." for a key that is a typo, not a new key.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

# The names other libraries and papers give an argument, where no spelling is close enough for difflib
SYNONYMS = {"lora": "adapter", "rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "lr": "learning_rate",
            "steps": "max_steps", "batch_size": "per_device_train_batch_size", "epochs": "num_train_epochs"}


def closest(key: str, known) -> list[str]:
    """The known name a mistyped or synonymous `key` most likely meant, if any."""
    synonym = SYNONYMS.get(key)
    return [synonym] if synonym in known else difflib.get_close_matches(key, known, n=1)


def did_you_mean(hint: list[str]) -> str:
    return f"; did you mean {hint[0]!r}?" if hint else ""


def _leaves(node: DictConfig, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], str]:
    """Every key below `node` (Hydra's own node left out): its path -> its name. Interpolations are not resolved."""
    found = {}
    for key in node.keys():
        if key == "hydra":
            continue
        found[(*path, str(key))] = str(key)
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            found.update(_leaves(child, (*path, str(key))))
    return found


def meant(node: DictConfig, path: list[str], part: str, last: bool = True) -> list[str]:
    """The full key `part`, missing from `node` (at `path`), most likely meant: a name of `node` by spelling or synonym,
    else for a last part the one such name deeper down (adapter.rank -> adapter.peft.r); `path` when none is."""
    names = [str(k) for k in node.keys() if k != "hydra" and str(k) != part]
    near = closest(part, names)
    if near or not last:
        return [*path, *near[:1]]
    deeper = {p: name for p, name in _leaves(node).items() if p != (part,)}
    name = closest(part, set(deeper.values()))
    paths = [p for p, found in deeper.items() if name and found == name[0]]
    return [*path, *paths[0]] if len(paths) == 1 else path


def meant_hint(node: DictConfig, path: list[str], part: str, last: bool = True) -> str:
    """"; did you mean 'a.b.c'?" for ``meant``'s key, or "" when none is likely."""
    guess = meant(node, path, part, last)
    return did_you_mean([".".join(guess)] if guess != path else [])


def unknown_key(cfg: DictConfig, key: str) -> str | None:
    """Why dotted `key` is not in `cfg`: the first missing part, the key it most likely meant (``meant``), the names
    there; None if it is there (or below a value that is not a mapping, which Hydra reports well itself)."""
    node, path, parts = cfg, [], key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return None
        if part not in node:
            where = ".".join(path) or "the top level"
            known = sorted(str(k) for k in node.keys() if k != "hydra")
            hint = meant_hint(node, path, part, last=depth == len(parts) - 1)
            has = f"has {', '.join(known)}" if known else "has no keys"
            return f"{key}: {where} has no key {part!r}{hint} ({where} {has})"
        node, path = node._get_node(part), [*path, part]
    return None


def split_overrides(overrides: list[str], groups: set[str]) -> tuple[list[str], list[str]]:
    """A command's overrides as (its group choices, each sweep's first option; the keys it sets with `key=value`),
    leaving out `+`/`++`/`~` overrides and Hydra's own keys and groups. Raises Hydra's error for a malformed override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices, keys = [], []
    for o in OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("-")]):
        if o.is_add() or o.is_delete() or o.is_force_add() or o.key_or_group.startswith("hydra"):
            continue
        if "/" in o.key_or_group or o.key_or_group in groups:
            value = next(iter(o.sweep_string_iterator())) if o.is_sweep_override() else o.get_value_element_as_str()
            choices.append(f"{o.key_or_group}={value}")
        else:
            keys.append(o.key_or_group)
    return choices, keys


def override_hints(overrides: list[str], groups: set[str], compose: Callable[[list[str]], DictConfig]) -> list[str]:
    """One line per `key=value` override whose key the config lacks, the config composed (`compose`) with the
    command's group choices alone. Empty when the overrides do not parse or the choices do not compose: the hint only
    adds to Hydra's own message (which says what is malformed or which options a group has), never replaces it."""
    try:
        choices, keys = split_overrides(overrides, groups)
        cfg = compose(choices)
    except Exception:  # noqa: BLE001 - Hydra's own message already says what is wrong
        return []
    return list(dict.fromkeys(line for line in (unknown_key(cfg, key) for key in keys) if line))


def hints_for_command(overrides: list[str], config_dir: Path, config_name: str = "train") -> list[str]:
    """``override_hints`` for a command line that Hydra rejected, composing from `config_dir` anew."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir.resolve()), version_base="1.3"):
            groups = set(GlobalHydra.instance().config_loader().list_groups(""))
            return override_hints(overrides, groups, lambda choices: compose(config_name, overrides=choices))
    except Exception:  # noqa: BLE001 - no hint rather than a second error
        return []
    finally:
        GlobalHydra.instance().clear()
