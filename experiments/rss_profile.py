"""Peak resident memory of a decode, Dense against MoLE with its table in host memory and on storage (mapped, and
read in batches).

    python experiments/rss_profile.py [--preset-size 160m] [--json results/latency/rss_160m.json]

The parent writes bench decode's random float16 table of the family's MoLE once (under --workdir, default a
temporary directory); each placement then decodes in a process of its own (`LanguageModel.generate`, random
weights, batch 1, a 64-token prompt, 64 new tokens, greedy) and reports its peak resident set (VmHWM,
bench.tools.peak_rss_bytes: the pages of a mapped file count while the process has them mapped in, not the rest of
the page cache). The table's files are dropped from the page cache before each storage run, so that process starts cold
(the mapped table is checked row by row when it is opened, in pieces released as they are checked).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, time
import numpy as np
from mole_jax.bench.decode import DECODE_FAMILIES, _configs
from mole_jax.bench.tools import peak_rss_bytes
from mole_jax.decode import LanguageModel
from mole_jax.lut import open_lut
from mole_jax.model import init_params
size, placement, table_dir = sys.argv[1:4]
cfgs = _configs(size, "float32", 256)
if placement == "dense":
    model = LanguageModel(cfgs["dense"], init_params(cfgs["dense"], seed=0))
else:
    mole = cfgs["mole"]
    kw = {"storage-batched": dict(placement="storage", storage_read="batched"),
          "storage": dict(placement="storage", storage_read="mapped"), "host": dict(placement="host")}[placement]
    model = LanguageModel(mole, init_params(mole, seed=2, with_experts=False), table=open_lut(table_dir), **kw)
prompt = np.random.default_rng(0).integers(0, cfgs["dense"].vocab_size, 64).tolist()
model.generate(prompt, 8)  # compiles
t0 = time.perf_counter()
model.generate(prompt, 64)
ms = (time.perf_counter() - t0) / 64 * 1e3
print(json.dumps({"placement": placement, "peak_rss_bytes": peak_rss_bytes(), "ms_per_step": ms}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset-size", default="160m")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from mole_jax.bench.decode import _configs, _random_table
    from mole_jax.bench.storage import ColdTable
    from mole_jax.bench.tools import machine

    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        table = _random_table(Path(tmp) / "lut", _configs(args.preset_size, "float32", 256)["mole"], "float16")
        for placement in ("dense", "storage", "storage-batched", "host"):
            if placement.startswith("storage"):
                ColdTable(Path(tmp) / "lut").drop()
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", CHILD, args.preset_size, placement, str(Path(tmp) / "lut")],
                               capture_output=True, text=True, timeout=3600)
            if r.returncode:
                sys.exit(r.stderr[-3000:])
            rows.append({**json.loads(r.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - t0})
            print(rows[-1])
        table_bytes = table.nbytes
    dense = rows[0]["peak_rss_bytes"]
    for r in rows:
        r["rss_minus_dense_mb"] = (r["peak_rss_bytes"] - dense) / 2 ** 20
    summary = {"table_bytes": table_bytes, **{f"{r['placement']}_minus_dense_mb": r["rss_minus_dense_mb"]
                                              for r in rows[1:]}}
    print(summary)
    if args.json:
        args.json.write_text(json.dumps({
            "command": "python experiments/rss_profile.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "preset_size": args.preset_size, "machine": machine(), "rows": rows, "summary": summary,
            "parent_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
