"""One model of `bench decode` in a fresh process, so that its peak resident memory is its own (`bench decode`
runs one per chosen model with --isolate, the default at 410m and 1b):

    python -m mole_jax.bench.decode_worker JOB_JSON

JOB_JSON: {"model": a row name of bench.decode.DECODE_MODELS, "preset_size", "dtype", "table" (the random table's
directory, written by the parent), "batch_sizes", "device_rows", "dense_turns" (model "dense": time its own
turns, for when no other model takes turns with it), "turns": bench.decode.Turns's fields but the sampler and the
text}. Prints its progress, then one JSON line: the model's rows, Dense's times and bytes per
batch size (the parent pools them into the `dense` rows), this process's peak RSS with the model alone, and the
floor of its cold batched reads (bench.storage.storage_floor; empty when it made none).
"""

from __future__ import annotations

import json
import sys

from mole_jax.bench.decode import run_worker


def main(argv: list[str] | None = None) -> int:
    job_json, = sys.argv[1:] if argv is None else argv
    out = run_worker(json.loads(job_json))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
