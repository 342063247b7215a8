"""How long the command line takes to answer: `train.py --help` and one shell-completion query, median of 5 runs.

    python scripts/time_cli.py
"""
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALLS = {"python train.py --help": (["--help"], {}),
         "TAB after `python train.py adapter=`": (["-sc", "query=bash"],
                                                  {"COMP_LINE": "python train.py adapter=", "COMP_POINT": "24"})}


def main() -> None:
    for name, (args, env) in CALLS.items():
        times = []
        for _ in range(5):
            start = time.perf_counter()
            subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, check=True,
                           env={**os.environ, **env})
            times.append(time.perf_counter() - start)
        print(f"{name}: median {statistics.median(times):.2f} s (min {min(times):.2f}, max {max(times):.2f})")


if __name__ == "__main__":
    main()
