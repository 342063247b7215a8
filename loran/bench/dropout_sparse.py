"""Why LoRAN's update is not folded into W0 when dropout is active: the exact sparse rewrite, timed on this CPU.

    .venv/bin/python scripts/bench_dropout_sparse.py                  # d = 576 (SmolLM2) and 2048, N = 512, p = 0.05, 0.2
    .venv/bin/python scripts/bench_dropout_sparse.py --sizes 2048 --dropouts 0.05

With dropout the layer is h = x W0^T + s xd F^T, xd = dropout(x) = x * m / (1 - p), F = f(B A). Only the dropped
entries of x differ between the base's input and the update's, so with u = x * (1 - m) (p of its entries non-zero)
and W = W0 + s F / (1 - p):

    forward   h     = (x * m) W^T + u W0^T                   one dense matmul + a sparse one
    backward  dL/dx = (g W) * m + (g W0) * (1 - m)           one dense matmul + a sampled one (only where m = 0)

against two dense matmuls each for the plain form: 3 N d_out d_in in all instead of 5 (plus the sparse work).
This script checks the identity (float64) and times the parts it would need from torch's CPU sparse kernels,
each against the dense matmul it replaces:
- forward: converting u to CSR, then CSR @ W0^T (W0^T made contiguous first: faster than the strided view);
- backward: torch.sparse.sampled_addmm (g W0 at the dropped entries) from a CSR mask.
The rewrite pays only if conversion + sparse product beat the dense matmul. results/bench.md has the numbers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch


from loran.bench.adapter import float_list, header, int_list


def _ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def identity_error(d: int, tokens: int, p: float, seed: int = 0) -> float:
    """Largest |h_rewrite - h| / max|h| in float64, for a random layer and dropout mask."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=gen, dtype=torch.float64)
    w0 = torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5
    f = torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5  # any F: the identity is linear in it
    m = (torch.rand(tokens, d, generator=gen, dtype=torch.float64) >= p).to(x.dtype)
    s = 2.0
    h = x @ w0.T + s * (x * m / (1 - p)) @ f.T
    h_rewrite = (x * m) @ (w0 + s * f / (1 - p)).T + (x * (1 - m)) @ w0.T
    return ((h_rewrite - h).abs().max() / h.abs().max()).item()


def cell(d: int, tokens: int, p: float, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, d, generator=gen)
    g = torch.randn(tokens, d, generator=gen)
    w0 = torch.randn(d, d, generator=gen) / d**0.5
    dropped = torch.rand(tokens, d, generator=gen) < p
    u = torch.where(dropped, x, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        u_csr = u.to_sparse_csr()
        w0_t = w0.T.contiguous()
        mask_csr = dropped.to(x.dtype).to_sparse_csr()
        sparse_err = (u_csr @ w0_t - u @ w0.T).abs().max().item()
        sampled_err = (torch.sparse.sampled_addmm(mask_csr, g, w0, beta=0.0).to_dense() - (g @ w0) * dropped)
        row = {
            "d": d, "N": tokens, "p": p, "nnz_share": u_csr._nnz() / u.numel(),
            "dense_fwd_ms": _ms(lambda: x @ w0.T, repeats),
            "to_csr_ms": _ms(lambda: u.to_sparse_csr(), repeats),
            "transpose_ms": _ms(lambda: w0.T.contiguous(), repeats),
            "csr_mm_ms": _ms(lambda: u_csr @ w0_t, repeats),
            "dense_bwd_ms": _ms(lambda: g @ w0, repeats),
            "sampled_ms": _ms(lambda: torch.sparse.sampled_addmm(mask_csr, g, w0, beta=0.0), repeats),
            "max_err": max(sparse_err, sampled_err.abs().max().item()),
            "identity_rel_err": identity_error(d, tokens, p),
        }
    row["fwd_sparse_ms"] = row["to_csr_ms"] + row["transpose_ms"] + row["csr_mm_ms"]
    return row


def table(rows: list[dict]) -> str:
    out = ["| d | N | p | dense x W0^T ms | to CSR + W0^T copy + CSR @ W0^T ms | sparse / dense | dense g W0 ms "
           "| sampled_addmm ms | sampled / dense | identity rel. error (fp64) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['d']} | {r['N']} | {r['p']:g} | {r['dense_fwd_ms']:.2f} "
                   f"| {r['to_csr_ms']:.2f} + {r['transpose_ms']:.2f} + {r['csr_mm_ms']:.2f} "
                   f"| {r['fwd_sparse_ms'] / r['dense_fwd_ms']:.2f} | {r['dense_bwd_ms']:.2f} | {r['sampled_ms']:.2f} "
                   f"| {r['sampled_ms'] / r['dense_bwd_ms']:.2f} | {r['identity_rel_err']:.1e} |")
    return "\n".join(out)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int_list, default=[576, 2048], help="d (square layer), comma-separated")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--dropouts", type=float_list, default=[0.05, 0.2], help="0.05: configs/adapter; 0.2: the paper")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    header("bench_dropout_sparse", argv, "wall")
    rows = [cell(d, args.tokens, pr, args.repeats) for d in args.sizes for pr in args.dropouts]
    for r in rows:
        if r["max_err"] > 1e-3 * r["d"] ** 0.5:
            raise RuntimeError(f"sparse kernels disagree with the dense product at d={r['d']}: {r['max_err']:.2e}")
    print(table(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
