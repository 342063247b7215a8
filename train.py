"""Run one cell of the LoRAN grid (see configs/train.yaml); `-m` sweeps several.

    python train.py                                  # embedded default: SmolLM2-135M on BBC News, LoRAN-Sinter
    python train.py adapter=qlora
    python train.py -m row=qlora,loran_sinter dataset=bbc_news,bbc_headlines seed=0,1,2
    torchrun --nproc_per_node 2 train.py ...          # data parallel; rank 0 evaluates and writes the results

Exit codes: 0 done (or already done); 1 the run failed (its record says why); 2 configuration error
(nothing was loaded or written); 3 training diverged (record written, no table row); 4 another process is
running this cell; 128 + signal (143 SIGTERM, 130 Ctrl-C) stopped after saving a checkpoint (run the same
command again to resume).
"""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from loran.pipeline.checks import ConfigError
from loran.pipeline.preemption import Preempted
from loran.pipeline.records import CellBusy
from loran.pipeline.run import Diverged, run_cell

log = logging.getLogger("train")
STOPS = {ConfigError: (2, "configuration error"), Diverged: (3, "diverged"), CellBusy: (4, "busy"),
         Preempted: (None, "preempted")}


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        record = run_cell(cfg)
    except tuple(STOPS) as err:
        log.error("%s: %s", type(err).__name__, err)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweeper runs the other cells, then reports this one as failed
        code, label = STOPS[type(err)]
        print(f"\n{label}: {err}", file=sys.stderr)
        sys.exit(code if code is not None else err.exit_code)
    if "metrics" not in record:  # a non-zero rank under torchrun
        return
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in record["metrics"].items())
    zero = ", ".join(f"{k}={v:.4f}" for k, v in (record.get("zero_shot") or {}).items())
    print(f"\n{record['cell']}: {metrics}" + (f"  (zero-shot: {zero})" if zero else ""))
    print(f"wall time {record['wall_time_s']:.0f} s; record: {record.get('record_path', '')}")


if __name__ == "__main__":
    main()
