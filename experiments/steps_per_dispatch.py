"""How many decode steps one dispatch should run (decoder.DEFAULT_STEPS_PER_DISPATCH): Dense and MoLE with its
table in host memory read by the step, at K = 1, 2, 4, ... steps per dispatch, timed as `mole-jax bench decode`
times them (random weights, a KV cache filled to --prompt-len, each step sampling and fed held-out text on the
device), every K of a model in turns within one round, rounds repeated.

    python experiments/steps_per_dispatch.py --preset-size small --json results/latency/steps_per_dispatch_small.json

Prints ms/step per (model, batch size, K) and each K's time over K = 1's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import jax

from mole_jax.bench.decode import SAMPLE_TOP_K, _configs, _held_out_text, _random_table, time_turn
from mole_jax.bench.tools import machine, median, write_json
from mole_jax.decode import LanguageModel
from mole_jax.decoder import random_state
from mole_jax.model import init_params
from mole_jax.sampling import make_sampler


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset-size", default="small", choices=["tiny", "small", "160m"])
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--ks", default="1,2,4,8,16,32")
    p.add_argument("--steps", type=int, default=64, help="timed steps per (model, batch size, K) and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    t_start = time.time()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    steps = -(-args.steps // max(ks)) * max(ks)  # whole chunks at every K
    cache_len = args.prompt_len + 2 * steps + 1
    cfgs = _configs(args.preset_size, "float32" if jax.default_backend() == "cpu" else "bfloat16", cache_len)
    sampler = jax.device_put(make_sampler(1.0, SAMPLE_TOP_K, 1.0, cfgs["mole"].vocab_size))
    text_N = _held_out_text(cfgs["mole"].vocab_size)[1]
    times: dict[tuple, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        table = _random_table(Path(tmp) / "lut", cfgs["mole"], "float16")
        builders = {"dense": lambda K: LanguageModel(cfgs["dense"], init_params(cfgs["dense"], seed=0),
                                                     steps_per_dispatch=K),
                    "mole-host": lambda K: LanguageModel(cfgs["mole"], init_params(cfgs["mole"], seed=2,
                                                                                    with_experts=False),
                                                         table=table, placement="host", steps_per_dispatch=K)}
        for name, build in builders.items():
            models = {K: build(K) for K in ks}
            for B in batch_sizes:
                template = random_state(cfgs["mole"], B, args.prompt_len, cache_len, seed=B)
                for r in range(args.rounds):
                    for K in (ks if r % 2 == 0 else ks[::-1]):  # who goes first alternates
                        t, _ = time_turn(models[K], template, steps, steps, sampler=sampler, seed=r, text_N=text_N)
                        times.setdefault((name, B, K), []).extend(t)
                for K in ks:
                    ms = median(times[name, B, K]) * 1e3
                    print(f"{name:<10} batch {B:>3} K {K:>3}: {ms:8.3f} ms/step "
                          f"({ms / (median(times[name, B, ks[0]]) * 1e3):.3f} x K={ks[0]})", flush=True)
                del template
            del models
    rows = [{"model": name, "batch_size": B, "steps_per_dispatch": K, "ms_per_step": median(t) * 1e3,
             "vs_first_k": median(t) / median(times[name, B, ks[0]])} for (name, B, K), t in times.items()]
    ratio = {f"{B}": {f"{K}": median(times["mole-host", B, K]) / median(times["dense", B, K]) for K in ks}
             for B in batch_sizes}
    print("mole-host / dense ms at each K: " + "; ".join(
        f"batch {B}: " + ", ".join(f"K={K} {v:.3f}" for K, v in r.items()) for B, r in ratio.items()))
    payload = {"benchmark": "steps_per_dispatch", "machine": machine(), "rows": rows,
               "mole_host_over_dense": ratio, "wall_s": time.time() - t_start,
               "command": "python experiments/steps_per_dispatch.py " + " ".join(sys.argv[1:] if argv is None
                                                                                  else argv),
               "settings": {"preset_size": args.preset_size, "batch_sizes": batch_sizes, "ks": ks, "steps": steps,
                            "rounds": args.rounds, "prompt_len": args.prompt_len,
                            "tokens": "sampled (temperature 1, top-k 64), fed held-out text on the device",
                            "timing": "warm: each turn after one untimed turn of the same length"}}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
