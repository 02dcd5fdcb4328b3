"""When a device tier's speculation pays: mole-host with a 10% tier, speculating always after an all-hit step (the
policy before session 8), never, or while the running estimate of success is at least
decoder.SPECULATE_MIN_SUCCESS (the default), each in alternating turns with Dense, every step fed held-out text as
`bench decode` does.

    python results/latency/speculation_profile.py [--preset-size small] [--json results/latency/speculation_small.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import jax
import numpy as np

from mole_jax import decoder
from mole_jax.bench.decode import (SAMPLE_TOP_K, Turns, _configs, _held_out_text, _random_table, _tier_rows,
                                   time_against_dense)
from mole_jax.bench.tools import machine, median
from mole_jax.decode import LanguageModel
from mole_jax.decoder import random_state
from mole_jax.model import init_params
from mole_jax.row_sources import tier_ids
from mole_jax.sampling import make_sampler

PROMPT, STEPS, CHUNK, WARMUP = 512, 150, 10, 3
VARIANTS = {"mole-host": None, "tier-always": 0.0, "tier-policy": decoder.SPECULATE_MIN_SUCCESS, "tier-never": None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset-size", default="small")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    cache_len = PROMPT + WARMUP + CHUNK + 1
    cfgs = _configs(a.preset_size, "float32", cache_len)
    mole, V = cfgs["mole"], cfgs["mole"].vocab_size
    turns = Turns(STEPS, CHUNK, WARMUP, PROMPT, cache_len, jax.device_put(make_sampler(1.0, SAMPLE_TOP_K, 1.0, V)),
                  _held_out_text(V)[1])
    tier_K = tier_ids(_held_out_text(V)[0], _tier_rows(V, None), V)
    dense = LanguageModel(cfgs["dense"], init_params(cfgs["dense"], seed=0))
    rows, default = [], decoder.SPECULATE_MIN_SUCCESS
    with tempfile.TemporaryDirectory() as tmp:
        table = _random_table(Path(tmp) / "lut", mole, "float16")
        for name, min_success in VARIANTS.items():
            decoder.SPECULATE_MIN_SUCCESS = default if min_success is None else min_success
            model = LanguageModel(mole, init_params(mole, seed=2, with_experts=False), table=table, placement="host",
                                  tier_K=None if name == "mole-host" else tier_K, speculate=name != "tier-never")
            for B in a.batch_sizes:
                template = random_state(mole, B, PROMPT, cache_len, seed=B)
                redone0 = model.decoder.redone
                times, _ = time_against_dense(name, model, dense, template, turns)
                rows.append({"variant": name, "batch_size": B, "min_success": min_success,
                             "ms_per_step": median(times[name]) * 1e3,
                             "vs_dense": median(times[name]) / median(times["dense"]),
                             "steps_redone": model.decoder.redone - redone0,
                             "speculation_success": model.decoder.speculation_success if name != "mole-host" else None})
                print(rows[-1], flush=True)
    decoder.SPECULATE_MIN_SUCCESS = default
    out = {"benchmark": "speculation_profile", "machine": machine(), "preset_size": a.preset_size,
           "command": f"python results/latency/speculation_profile.py --preset-size {a.preset_size} --batch-sizes "
                      + " ".join(map(str, a.batch_sizes)),
           "settings": {"prompt_len": PROMPT, "steps": STEPS, "chunk": CHUNK, "warmup": WARMUP,
                        "tier_rows": int(len(tier_K)), "tokens": "sampled, then fed held-out text (bench decode)"},
           "rows": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    for B in a.batch_sizes:
        print(f"batch {B}: " + ", ".join(f"{r['variant']} {r['vs_dense']:.3f} ({r['steps_redone']} redone)"
                                         for r in rows if r["batch_size"] == B))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
