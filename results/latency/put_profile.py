"""What a step's put costs, and what the small-put path buys a mole-host step (`row_sources.SMALL_PUT_MAX_BYTES`):
A: microseconds per put of one step's rows and index (batch 1 and 8 of the `small` table's float16 rows) with
   `jax.device_put` and through the jitted identity;
B: ms/step of Dense, mole-host with `jax.device_put` for its rows (SMALL_PUT_MAX_BYTES = 0, the path before) and
   mole-host with the small-put path, in turns (round robin, 10 steps a turn after 3 untimed), every step fed
   held-out text as `bench decode` does.

    python results/latency/put_profile.py [--json results/latency/put_small.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from mole_jax import row_sources
from mole_jax.bench.decode import SAMPLE_TOP_K, _configs, _held_out_text, _random_table, time_turn
from mole_jax.bench.tools import machine, median
from mole_jax.decode import LanguageModel
from mole_jax.decoder import random_state
from mole_jax.model import init_params
from mole_jax.sampling import make_sampler

PROMPT, WARMUP, CHUNK, ROUNDS = 512, 3, 10, 20


def put_us(transfers: row_sources.Transfers, tree, n: int = 2000) -> float:
    jax.block_until_ready(transfers.put(tree))
    t0 = time.perf_counter()
    for _ in range(n):
        out = transfers.put(tree)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    small_max = row_sources.SMALL_PUT_MAX_BYTES
    cfgs = _configs("small", "float32", PROMPT + WARMUP + CHUNK + 1)
    mole, V = cfgs["mole"], cfgs["mole"].vocab_size
    out = {"benchmark": "put_profile", "machine": machine(), "command": "python results/latency/put_profile.py",
           "put_us": {}, "step_ms": {}}
    transfers = row_sources.Transfers()
    for B in (1, 8):
        tree = ({"payload": np.zeros((B, mole.num_layers, mole.num_experts, mole.d_model), np.float16)},
                np.zeros((B, 1), np.int32))
        row_sources.SMALL_PUT_MAX_BYTES = 0
        before = put_us(transfers, tree)
        row_sources.SMALL_PUT_MAX_BYTES = small_max
        out["put_us"][B] = {"device_put": before, "small_put": put_us(transfers, tree)}
        print(f"put of batch {B}'s rows and index: {out['put_us'][B]}")
    sampler = jax.device_put(make_sampler(1.0, SAMPLE_TOP_K, 1.0, V))
    text = _held_out_text(V)[1]
    with tempfile.TemporaryDirectory() as tmp:
        table = _random_table(Path(tmp) / "lut", mole, "float16")
        models = {"dense": (LanguageModel(cfgs["dense"], init_params(cfgs["dense"], seed=0)), small_max),
                  "mole-host device_put": (LanguageModel(mole, init_params(mole, seed=2, with_experts=False),
                                                         table=table, placement="host"), 0),
                  "mole-host small put": (LanguageModel(mole, init_params(mole, seed=2, with_experts=False),
                                                        table=table, placement="host"), small_max)}
        for B in (1, 8):
            template = random_state(mole, B, PROMPT, PROMPT + WARMUP + CHUNK + 1, seed=B)
            secs = {k: [] for k in models}
            for r in range(ROUNDS):
                for name, (model, put_max) in models.items():
                    row_sources.SMALL_PUT_MAX_BYTES = put_max
                    secs[name] += time_turn(model, template, CHUNK, WARMUP, sampler=sampler, seed=r, text_N=text)[0]
            row_sources.SMALL_PUT_MAX_BYTES = small_max
            ms = {k: median(v) * 1e3 for k, v in secs.items()}
            out["step_ms"][B] = {**ms, **{f"{k} / dense": v / ms["dense"] for k, v in ms.items() if k != "dense"}}
            print(f"batch {B}: {out['step_ms'][B]}")
    out["settings"] = {"prompt_len": PROMPT, "rounds": ROUNDS, "chunk": CHUNK, "warmup": WARMUP,
                       "steps_per_model": ROUNDS * CHUNK, "small_put_max_bytes": small_max}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
