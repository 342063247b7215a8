"""Run one cell of the LoRAN grid (see configs/train.yaml); `-m` sweeps several.

    python train.py                                  # embedded default: SmolLM2-135M on BBC News, LoRAN-Sinter
    python train.py adapter=qlora
    python train.py -m adapter=loran activation=sigmoid,relu,tanh,sinter seed=0,1,2
"""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from loran.checks import ConfigError
from loran.run import run_cell

log = logging.getLogger("train")


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        record = run_cell(cfg)
    except ConfigError as err:
        log.error("configuration error: %s", err)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweeper runs the other cells, then reports this one as failed
        print(f"\nconfiguration error: {err}", file=sys.stderr)
        sys.exit(2)
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in record["metrics"].items())
    zero = ", ".join(f"{k}={v:.4f}" for k, v in (record.get("zero_shot") or {}).items())
    print(f"\n{record['cell']}: {metrics}" + (f"  (zero-shot: {zero})" if zero else ""))
    print(f"wall time {record['wall_time_s']:.0f} s; record: {record.get('record_path', '')}")


if __name__ == "__main__":
    main()
