"""Why cold reads inside `bench decode` reach only ~0.65 of the pread floor on a 2-core CPU host: the same one-row
Tensorstore reads of a cold `small` table (8 KiB rows), timed back to back, after a 2 ms sleep (the reader threads
idle), and right after a jitted step of ~4 ms (the step's computation just ran on the same two cores).

    python results/latency/cold_read_profile.py [--json results/latency/cold_read_small.json]

Three rounds of 200 reads of distinct ids per case, the page cache dropped before each round; median microseconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mole_jax.bench.decode import _configs, _random_table
from mole_jax.bench.storage import ColdTable
from mole_jax.bench.tools import drop_page_cache, machine

CASES = ("back to back", "after a 2 ms sleep", "after a jitted step", "back to back (again)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    x, w = jnp.ones((64, 1024), jnp.float32), jnp.full((1024, 1024), 1e-3, jnp.float32)
    step = jax.jit(lambda x, w: jnp.tanh(jnp.tanh(x @ w) @ w) @ w)
    step(x, w).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(20):
        step(x, w).block_until_ready()
    step_ms = (time.perf_counter() - t0) / 20 * 1e3
    cfg = _configs("small", "float32", 600)["mole"]
    rng, out = np.random.default_rng(0), {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "lut"
        _random_table(root, cfg, "float16")
        cold = ColdTable(root)
        for case in CASES:
            medians = []
            for _ in range(3):
                drop_page_cache(root)
                secs = []
                for v in rng.choice(cfg.vocab_size, 200, replace=False):
                    if case == "after a jitted step":
                        step(x, w).block_until_ready()
                    elif case == "after a 2 ms sleep":
                        time.sleep(0.002)
                    t = time.perf_counter()
                    cold.table.read_stored(np.array([v]))
                    secs.append(time.perf_counter() - t)
                medians.append(round(float(np.median(secs)) * 1e6, 1))
            out[case] = medians
            print(f"{case}: median us per one-row cold read, 3 rounds: {medians}")
    if a.json:
        Path(a.json).write_text(json.dumps({"benchmark": "cold_read_profile", "machine": machine(),
                                            "command": "python results/latency/cold_read_profile.py",
                                            "step_ms": step_ms, "row_bytes": int(cold.table.row_nbytes),
                                            "median_us_per_read": out}, indent=2) + "\n")


if __name__ == "__main__":
    main()
