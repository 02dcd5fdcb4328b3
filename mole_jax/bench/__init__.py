"""Benchmarks: `mole-jax bench train|convert|decode`. Variants are measured side by side in one run, on the same
machine, and reported as ratios; never as timed tests.

    tools.py           the measuring tools every benchmark shares (timing, matmul peak, peak RSS, table, JSON)
    train.py           bench_train: train-step time of Dense and MoLE with and without dedup
    convert.py         bench_convert: conversion FLOP/s and memory, row-read latency, storage schemes
    convert_worker.py  one conversion in a fresh process (python -m mole_jax.bench.convert_worker JOB_JSON)
    decode.py          bench_decode: decode ms/step and bytes moved, the paper's Figure 3

Each benchmark is imported when first asked for, so that one benchmark (or the convert worker) does not import
what only another measures.
"""

import importlib

_HOMES = {"bench_train": "mole_jax.bench.train", "bench_convert": "mole_jax.bench.convert",
          "bench_decode": "mole_jax.bench.decode"}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
