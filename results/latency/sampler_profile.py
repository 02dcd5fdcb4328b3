"""Generation with sampling, before and after LanguageModel.generate took the lax.top_k candidates (issue 12,
item 6): whole decode steps through the public API, side by side in one run.

    python results/latency/sampler_profile.py [--preset-size small] [--json results/latency/sampler_small.json]

`small-dense` with random weights (vocabulary 8,192; sampling's cost does not depend on the weights), prompts of
16 tokens, `generate(..., temperature=0.8, top_k=50, top_p=0.9)` of 64 new tokens at batch 1, 8 and 32. Variants
in alternating turns (3 rounds, median of the per-turn ms/step): greedy (no sampling: the floor), the full sort of
the vocabulary per step (what generate did before: `sampling.GENERATE_CANDIDATES` set above V), and the candidates
(GENERATE_CANDIDATES = 128, the shipped setting). Each variant is compiled before the timing (warm caches).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from mole_jax import sampling
from mole_jax.bench.tools import machine
from mole_jax.config import get_preset
from mole_jax.decode import LanguageModel
from mole_jax.model import init_params

NEW, PROMPT, ROUNDS = 64, 16, 3
SETTINGS = dict(temperature=0.8, top_k=50, top_p=0.9)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset-size", default="small")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    cfg = get_preset(f"{args.preset_size}-dense")
    model = LanguageModel(cfg, init_params(cfg, seed=0))
    shipped = sampling.GENERATE_CANDIDATES
    variants = {"greedy": (shipped, {}), "full-sort": (10 ** 9, SETTINGS), "candidates": (shipped, SETTINGS)}
    rows = []
    for B in map(int, args.batch_sizes.split(",")):
        prompts = np.random.default_rng(B).integers(0, cfg.vocab_size, (B, PROMPT)).tolist()
        times = {name: [] for name in variants}
        for r in range(ROUNDS + 1):  # round 0 compiles
            for name, (candidates, kw) in variants.items():
                sampling.GENERATE_CANDIDATES = candidates
                t0 = time.perf_counter()
                model.generate(prompts, NEW, seed=r, **kw)
                if r:
                    times[name].append((time.perf_counter() - t0) / NEW * 1e3)
        sampling.GENERATE_CANDIDATES = shipped
        ms = {name: statistics.median(t) for name, t in times.items()}
        rows.append({"batch_size": B, **{f"{k}_ms_per_step": v for k, v in ms.items()},
                     "full_sort_vs_candidates": ms["full-sort"] / ms["candidates"],
                     "candidates_vs_greedy": ms["candidates"] / ms["greedy"]})
        print(f"batch {B:>3}: greedy {ms['greedy']:.2f} ms/step, full sort {ms['full-sort']:.2f}, candidates "
              f"{ms['candidates']:.2f} ({rows[-1]['full_sort_vs_candidates']:.2f}x faster than the full sort, "
              f"{rows[-1]['candidates_vs_greedy']:.2f}x greedy)")
    if args.json:
        args.json.write_text(json.dumps({
            "command": "python results/latency/sampler_profile.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "preset": f"{args.preset_size}-dense", "vocab_size": cfg.vocab_size, "settings": SETTINGS,
            "new_tokens": NEW, "prompt_len": PROMPT, "rounds": ROUNDS, "caches": "warm (compiled before timing)",
            "machine": machine(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
