"""Run one cell of the LoRAN grid (see configs/train.yaml); `-m` sweeps several.

    python train.py                                  # embedded default: SmolLM2-135M on BBC News, LoRAN-Sinter
    python train.py experiment=smoke                 # the whole pipeline in about a minute (a few steps, few examples)
    python train.py adapter=qlora
    python train.py -m row=qlora,loran_sinter dataset=bbc_news,bbc_headlines seed=0,1,2
    torchrun --nproc_per_node 2 train.py ...          # data parallel; rank 0 evaluates and writes the results

Exit codes, one per kind of failure: 0 done (or already done); 1 the run failed (its record says why; a full disk is one
line naming the path); 2 configuration error, from Hydra (an unknown group option or key, a malformed override, a value
of the wrong type for the schema, loran/pipeline/schema.py; a mistyped key is named with the key the config has,
loran/pipeline/hints.py) or from the project's checks (nothing was loaded or written; a -m sweep checks every cell
before its first runs); 3 training diverged (record written, no table row), or did before
(the cell is not run again: skip_existing=false runs it); 4 another process is running this cell; 128 + signal (143
SIGTERM, 130 Ctrl-C) stopped after saving a checkpoint (run the same command again to resume). The heavy stack (torch,
transformers, PEFT) is imported inside the task, so `--help` and shell completion answer at Hydra's speed.
"""
import importlib.util
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

CONFIG_ERROR = 2
log = logging.getLogger("train")
_task_started = False  # False while Hydra composes the config: a failure then is a configuration error


def _config_hash(*, _root_: DictConfig) -> str:
    """${loran.config_hash:} (configs/train.yaml's cell name): loran.pipeline.cells.config_hash, imported when first
    resolved, so that --help and shell completion import nothing of the library."""
    from loran.pipeline.cells import config_hash

    return config_hash(_root_)


if not OmegaConf.has_resolver("loran.config_hash"):
    OmegaConf.register_new_resolver("loran.config_hash", _config_hash)


def _light(name: str):
    """Module loran.pipeline.<name>, loaded from its file: `import loran.pipeline.<name>` would first import the `loran`
    package (torch, PEFT). It is put in sys.modules under its own name, so a later import of it finds this module."""
    name = f"loran.pipeline.{name}"
    if name not in sys.modules:
        path = Path(__file__).parent / (name.replace(".", "/") + ".py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_light("schema").register_schema()   # configs/train.yaml's defaults list starts with the schema


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from loran.pipeline.checks import ConfigError
    from loran.pipeline.preemption import Preempted
    from loran.pipeline.records import CellBusy
    from loran.pipeline.run import Diverged, NoSpace, run_cell

    stops = {ConfigError: (CONFIG_ERROR, "configuration error"), Diverged: (3, "diverged"), CellBusy: (4, "busy"),
             Preempted: (None, "preempted"), NoSpace: (1, "no space left")}
    try:
        record = run_cell(cfg)
    except tuple(stops) as err:
        log.error("%s: %s", type(err).__name__, err)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweeper runs the other cells, then reports this one as failed
        code, label = stops[type(err)]
        print(f"\n{label}: {err}", file=sys.stderr)
        sys.exit(code if code is not None else err.exit_code)
    if record.get("metrics") is None:  # a non-zero rank under torchrun
        return
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in record["metrics"].items())
    zero = ", ".join(f"{k}={v:.4f}" for k, v in (record.get("zero_shot") or {}).items())
    print(f"\n{record['cell']}: {metrics}" + (f"  (zero-shot: {zero})" if zero else ""))
    print(f"wall time {record['wall_time_s']:.0f} s; record: {record.get('record_path', '')}")


if __name__ == "__main__":
    try:
        main()
    except SystemExit as stop:
        # Hydra reports its own config errors (unknown option or key, bad override) with exit code 1, before the task
        # runs; they are configuration errors like the project's own. Its message for a mistyped key suggests adding it
        # (`+key=value`): say which key the config has instead.
        if stop.code == 1 and not _task_started:
            for hint in _light("hints").hints_for_command(sys.argv[1:], Path(__file__).parent / "configs"):
                print(hint, file=sys.stderr)
        sys.exit(CONFIG_ERROR if stop.code == 1 and not _task_started else stop.code)
