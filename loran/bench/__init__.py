"""Benchmarks and checks as library code (thin command-line scripts live in scripts/).

- ``loran.bench.precision``: what bf16 autocast does to Sinter under each update precision policy.
- ``loran.bench.gpu``: the paper-width layer and decoder-block benchmarks and the report of ``make gpu-check``.
- ``loran.bench.host_time``: the ops one adapted layer's step dispatches (grouped by origin) and its host time, per path.
"""
