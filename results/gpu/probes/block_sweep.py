"""Prepared for the next lent GPU (not yet run on one): does LoRAN's host time fall with fewer, larger blocks?

On the H200 (2026-11-29) the autocast policy's LoRAN layer cost ~4 ms of host time per step against ~1 ms for QLoRA,
with 0.82 ms of kernels. The autograd Function walks W's rows in blocks of BLOCK_ELEMENTS (2**22) and calls the
compiled kernels once per chunk of COMPILED_CHUNK_ELEMENTS (2**22): at d = 4096 that is 4 blocks, so 4 guarded
compiled calls per kernel per pass. Both sizes were tuned on a 2-core CPU (results/bench.md). This probe times
loran.bench.gpu.layer_bench (the gpu-check's layer part) with the two sizes raised to 2**24 and 2**26 (one block at
d = 4096; 3 and 1 for Llama-2's 11008 x 4096 MLP) and with compilation off, for both precision policies, and prints
each time ratio and peak-memory ratio against QLoRA.

    PYTHONPATH=/tmp/site:$PWD python3 results/gpu/probes/block_sweep.py              # on the device (~2 min)
    python results/gpu/probes/block_sweep.py --device cpu --d 256 --r 8 --tokens 64  # smoke run anywhere
"""
import argparse

import loran.autograd as autograd
from loran.bench.gpu import layer_bench

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="cuda")
parser.add_argument("--d", type=int, default=4096)
parser.add_argument("--r", type=int, default=64)
parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
args = parser.parse_args()

for compile_mode in ("auto", "never"):
    autograd.COMPILE = compile_mode  # read at each call (KERNELS.use_compiled), as the sizes below
    for log2 in (22, 24, 26):
        autograd.BLOCK_ELEMENTS = autograd.COMPILED_CHUNK_ELEMENTS = 2**log2
        for tokens in args.tokens:
            for policy in ("float32", "autocast"):
                fig = layer_bench(d=args.d, r=args.r, tokens=tokens, policy=policy, device=args.device)
                print(f"compile {compile_mode:5s} block 2^{log2} tokens {tokens:6d} policy {policy:8s} "
                      f"qlora {fig['qlora_ms']:8.3f} ms loran {fig['loran_ms']:8.3f} ms "
                      f"time {fig['time_ratio']:.2f}x memory {fig['memory_ratio']}x", flush=True)
