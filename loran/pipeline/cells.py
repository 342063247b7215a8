"""A cell is its configuration: a readable name plus a short hash of every value that can change the result.

    cell = <dataset>.<model>.<adapter>-<activation>.seed<seed>.<hash>       (configs/train.yaml)

``identity(cfg)`` is the resolved config without the keys in NOT_RESULT (where to write and log, resume/skip
switches, checkpoint cadence, progress bars: the fields loran/pipeline/schema.py marks result=False) and with the
seed left symbolic, so that the identities of a grid's seeds are equal. ``config_hash(cfg)`` hashes (identity,
seed). Two commands that differ in any result-relevant value therefore never share a record, a CSV row, a checkpoint
folder or a W&B run, and identical ones always do. ``register_resolver()`` makes it the OmegaConf resolver
``${loran.config_hash:}``.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from loran.pipeline.schema import TrainConfig, fields_of, register_schema


def not_result_keys(schema: type = TrainConfig, prefix: str = "") -> tuple[str, ...]:
    """The dotted keys the schema marks as not changing a result (result=False fields, and the not_result keys of an
    open node), found by walking its dataclasses."""
    keys: list[str] = []
    for f, nested in fields_of(schema):
        key = f"{prefix}{f.name}"
        if f.metadata.get("result") is False:
            keys.append(key)
            continue
        keys += [f"{key}.{inner}" for inner in f.metadata.get("not_result", ())]
        if nested is not None:
            keys += not_result_keys(nested, f"{key}.")
    return tuple(keys)


# Keys that cannot change a result (dotted paths from the root of the task config): Hydra's own node (launcher and
# output folders), which the schema does not hold, and the schema's result=False keys (loran/pipeline/schema.py).
NOT_RESULT = ("hydra", *not_result_keys(TrainConfig))
SEED_PLACEHOLDER = "<seed>"
HASH_CHARS = 8                        # 32 bits: a collision in a 10,000-cell study has odds of about 1e-2 %
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The result-relevant resolved config, with the seed (and every value interpolated from it) as "<seed>"."""
    # an untyped copy: the schema's typed nodes (loran/pipeline/schema.py) refuse deletion
    node = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with read_write(node), open_dict(node):
        for key in NOT_RESULT:
            parent, _, leaf = key.rpartition(".")
            container = OmegaConf.select(node, parent) if parent else node
            if isinstance(container, DictConfig) and leaf in container.keys():  # `in container` would resolve it
                del container[leaf]
        if "seed" in node:
            node.seed = SEED_PLACEHOLDER
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)


def hash_of(ident: dict[str, Any], seed: Any) -> str:
    """The short stable hash of an identity and a seed."""
    text = json.dumps({"identity": ident, "seed": seed}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


def config_hash(cfg: DictConfig) -> str:
    """The hash of cfg's identity and seed (see the module docstring)."""
    return hash_of(identity(cfg), OmegaConf.select(cfg, "seed"))


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {"a.b.c": value} (how identities are compared and shown)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def check_name(field: str, value: Any) -> None:
    """A folder name made from the config must be one plain path component: no '..', separators or blanks."""
    if not isinstance(value, str) or not NAME.match(value) or value in {".", ".."}:
        raise ValueError(f"{field}={value!r} must be a plain folder name: letters, digits and . _ + = - only, "
                         "starting with a letter or digit (no '/', '..', spaces or absolute paths)")


RESOLVER = "loran.config_hash"


def _resolver(*, _root_: DictConfig) -> str:
    return config_hash(_root_)


def register_resolver() -> None:
    """Register what composing configs/train.yaml needs (idempotent): the schema in Hydra's ConfigStore
    (loran/pipeline/schema.py) and the resolver ``${loran.config_hash:}`` with OmegaConf. The entry points that compose
    call it, never an import (train.py has its own lazy twin, so that --help does not import this package)."""
    register_schema()
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, _resolver)
