"""Honest storage for `bench decode`: a table read cold (its files dropped from the page cache before each turn,
no Tensorstore cache), its reads recorded, and the floor they are compared with: a thread-pool `os.pread` of the
same byte ranges (a shard file holds its rows raw and in row order from offset 0, so row v of an array is bytes
[(v % S) * row bytes, (v % S + 1) * row bytes) of its shard file v // S)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from mole_jax.bench.tools import PreadPool, drop_page_cache, read_seconds
from mole_jax.lut import LookupTable, array_row_nbytes, open_lut, shard_key

COLD_CACHE_BYTES = 0  # the cold table's Tensorstore cache pool: nothing kept between reads


class ColdTable:
    """A table opened with no Tensorstore cache whose files `drop` evicts from the page cache, recording every
    batched read (`read_stored`: ids and seconds) under the label of the turn it belongs to. Anything else is the
    table's own (a decoder uses it like the LookupTable it wraps)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.table: LookupTable = open_lut(root, cache_bytes=COLD_CACHE_BYTES)
        self.turns: list[tuple[Any, list[tuple[np.ndarray, float]]]] = []

    def __getattr__(self, name):
        return getattr(self.__dict__["table"], name)

    def drop(self, label=None) -> int:
        """Evict the table's files from the page cache; the reads that follow are recorded under `label`."""
        self.turns.append((label, []))
        return drop_page_cache(self.root)

    def read_stored(self, ids) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        out = self.table.read_stored(ids)
        if self.turns:
            self.turns[-1][1].append((np.array(ids), time.perf_counter() - t0))
        return out

    def reread_fraction(self, label) -> float | None:
        """Of the rows read in the turns recorded under `label`, the share already read earlier in the same turn
        (after a drop, the only reads the page cache can serve)."""
        seen_total, again = 0, 0
        for lab, reads in self.turns:
            if lab != label:
                continue
            seen: set[int] = set()
            for ids, _ in reads:
                ids = set(np.asarray(ids).reshape(-1).tolist())
                again += len(ids & seen)
                seen_total += len(ids)
                seen |= ids
        return again / seen_total if seen_total else None

    def check_cold(self) -> dict[str, float]:
        """The first read of the largest table file right after a drop, and a second read: a cold read is the
        slower one (unless the disk is memory)."""
        path = max((p for p in self.root.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        dropped = drop_page_cache(self.root)
        cold, warm = read_seconds(path), read_seconds(path)
        size = path.stat().st_size
        return {"file": str(path.relative_to(self.root)), "bytes": size, "dropped_bytes": dropped,
                "first_read_ms": cold * 1e3, "second_read_ms": warm * 1e3,
                "first_read_mb_per_s": size / cold / 1e6, "second_read_mb_per_s": size / warm / 1e6}


class RowRanges:
    """(file, offset, size) of each stored row: row v of array `name` is at (v % S) * row bytes of shard file
    v // S (format version 3 keeps rows raw, in row order, from offset 0; `LookupTable.check_shard` checks it)."""

    def __init__(self, table: LookupTable, root: str | Path):
        self.table, self.root = table, Path(root)

    def __call__(self, ids) -> list[tuple[str, int, int]]:
        out = []
        rows = self.table.shard_rows
        for name, (shape, dt) in self.table.layout.arrays.items():
            nbytes = array_row_nbytes(shape, dt)
            for v in np.asarray(ids).reshape(-1).tolist():
                out.append((str(self.root / shard_key(name, v // rows, shape)), (v % rows) * nbytes, nbytes))
        return out


def storage_floor(cold: ColdTable) -> dict[str, Any]:
    """Rows/s of the cold table's recorded reads in the decode, and of the same reads replayed turn by turn (each
    after a drop) through Tensorstore and as a thread-pool pread of their byte ranges, all reads of a step in
    flight at once: the floor. Empty when nothing was recorded."""
    turns = [reads for _, reads in cold.turns if reads]
    if not turns:
        return {}
    rows = sum(len(ids) for reads in turns for ids, _ in reads)
    decode_s = sum(s for reads in turns for _, s in reads)
    ranges, pool = RowRanges(cold.table, cold.root), PreadPool()
    replay_s = pread_s = 0.0
    try:
        for reads in turns:
            drop_page_cache(cold.root)
            for ids, _ in reads:
                t0 = time.perf_counter()
                cold.table.read_stored(ids)
                replay_s += time.perf_counter() - t0
            drop_page_cache(cold.root)
            for ids, _ in reads:
                step = ranges(ids)
                t0 = time.perf_counter()
                pool.read(step)
                pread_s += time.perf_counter() - t0
    finally:
        pool.close()
    return {"rows": rows, "reads": sum(len(r) for r in turns), "decode_rows_per_s": rows / decode_s,
            "tensorstore_replay_rows_per_s": rows / replay_s, "pread_rows_per_s": rows / pread_s,
            "storage_vs_pread": pread_s / decode_s, "tensorstore_replay_vs_pread": pread_s / replay_s}
