"""How fast a cold table row comes in through a memory map, touched page by page as a compiled gather touches it,
against the same row announced to the kernel first (madvise(MADV_WILLNEED) on its byte range).

    python experiments/cold_row_probe.py [--row-bytes 196608] [--rows 10000] [--reads 200] [--json FILE]

Writes a file of random rows (196,608 bytes: a 410M-4E float16 row) under --workdir, then in rounds alternating the
two ways: drops the file from the page cache, reads --reads random rows, and records the median and mean ms a row.
Random faults on a mapping lose the kernel's read-around (its miss heuristics), so a row of 48 pages can come in
a page at a time; the hint asks for the whole range as one read.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mole_jax.bench.tools import drop_page_cache, machine, write_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row-bytes", type=int, default=196608)
    p.add_argument("--rows", type=int, default=10000)
    p.add_argument("--reads", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = Path(tmp) / "rows.bin"
        with open(path, "wb") as f:
            for start in range(0, args.rows, 100):
                f.write(os.urandom(args.row_bytes * min(100, args.rows - start)))
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            rows_NxR = np.frombuffer(m, np.uint8).reshape(args.rows, args.row_bytes)
            rng, results = np.random.default_rng(0), []
            for r in range(args.rounds):
                for mode in ("fault", "willneed"):
                    drop_page_cache(tmp)
                    ms = []
                    for i in rng.choice(args.rows, args.reads, replace=False):
                        t = time.perf_counter()
                        if mode == "willneed":
                            m.madvise(mmap.MADV_WILLNEED, int(i) * args.row_bytes, args.row_bytes)
                        int(rows_NxR[i, ::mmap.PAGESIZE].sum())  # every page of the row
                        ms.append(1e3 * (time.perf_counter() - t))
                    results.append({"round": r, "mode": mode, "median_ms_per_row": float(np.median(ms)),
                                    "mean_ms_per_row": float(np.mean(ms))})
                    print(results[-1])
            del rows_NxR
            m.close()
    payload = {"benchmark": "cold_row_probe", "machine": machine(), "row_bytes": args.row_bytes, "rows": args.rows,
               "reads": args.reads, "command": "python experiments/cold_row_probe.py " + " ".join(sys.argv[1:]),
               "results": results}
    if args.json:
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
