"""One table conversion in a fresh process, so that its peak resident memory is its own (`bench convert` runs
one per vocabulary size and destination):

    python -m mole_jax.bench.convert_worker JOB_JSON

JOB_JSON: {"ckpt": ..., "lut": ..., "dtype": ..., "batch_rows": ..., "shard_rows": ..., optionally "checksum",
"buffer_bytes"}, as convert_to_lut takes them. Prints one JSON line: {"seconds": wall time, "peak_rss_bytes":
this process's peak, "info": lut.read_info(table)}. The conversion runs as `mole-jax convert` runs it
(convert.return_freed_memory_promptly first).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from mole_jax.convert import BUFFER_BYTES, convert_to_lut, return_freed_memory_promptly
from mole_jax.bench.tools import peak_rss_bytes
from mole_jax.lut import read_info


def run_conversion(job: dict[str, Any]) -> dict[str, Any]:
    return_freed_memory_promptly()
    t0 = time.perf_counter()
    where = convert_to_lut(job["ckpt"], job["lut"], job["dtype"], batch_rows=job["batch_rows"],
                           shard_rows=job["shard_rows"], checksum=job.get("checksum", True), progress=False,
                           buffer_bytes=job.get("buffer_bytes") or BUFFER_BYTES)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss_bytes": peak_rss_bytes(), "info": read_info(where)}


def main(argv: list[str] | None = None) -> int:
    job_json, = sys.argv[1:] if argv is None else argv
    print(json.dumps(run_conversion(json.loads(job_json))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
