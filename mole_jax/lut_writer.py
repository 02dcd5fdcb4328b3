"""Writing a lookup table: create, resume or replace it (`TableWriter`), stream rows into whole shards
(`ShardPipeline`), and `write_table` for rows produced on the host.

Shards are written whole, once each (no read-modify-write), and a shard file appears only once fully written,
so the set of shard files present is the progress: an interrupted writer resumes by writing the missing shards.
A table is marked complete only by its last write, after a verification pass.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np
import tensorstore as ts

from mole_jax import lut, schemes
from mole_jax.config import ModelConfig, MoleError
from mole_jax.schemes import Layout

SHARD_TARGET_BYTES = 64 << 20  # stored bytes per shard file (default shard_rows)


def default_shard_rows(layout: Layout, V: int) -> int:
    """A power of two of rows making a shard of about SHARD_TARGET_BYTES, at most the vocabulary."""
    rows = max(1, SHARD_TARGET_BYTES // layout.row_nbytes)
    return min(1 << (rows.bit_length() - 1), V)


# The table being written ------------------------------------------------------------------------------------------
class TableWriter:
    """Creates, resumes and completes a table; writes whole shards only (no read-modify-write).

    `TableWriter.start(...)` decides what the destination allows: a fresh table, the resumption of an interrupted
    one built from the same parameters with the same settings, or (overwrite=True) the replacement of a table.
    """

    def __init__(self, spec: ts.KvStore.Spec, kv: ts.KvStore, meta: dict, arrays: dict):
        self.spec, self.kv, self.meta, self._arrays = spec, kv, meta, arrays
        self.location = lut.describe(spec)
        self.config, self.layout = lut.layout_from_meta(meta)
        self.V = self.config.vocab_size
        self.shard_rows: int = meta["shard_rows"]
        self.num_shards = -(-self.V // self.shard_rows)

    @classmethod
    def start(cls, lut_dir, cfg: ModelConfig, scheme: str, fingerprint: str, *, block: int | None = None,
              shard_rows: int | None = None, overwrite: bool = False, checksum: bool = False,
              source: dict | None = None, create: bool = True) -> "TableWriter":
        """create=False opens the table that another process prepared (multi-process conversion).
        shard_rows=None: an interrupted table's own, else default_shard_rows."""
        layout = schemes.make_layout(scheme, cfg, block)
        if shard_rows is not None and (not isinstance(shard_rows, int) or shard_rows <= 0):
            raise MoleError(f"shard_rows must be a positive integer, got {shard_rows!r}")
        spec = lut.kvstore_spec(lut_dir)
        where = lut.describe(spec)
        if create:
            _check_writable(spec)
        kv = lut.open_kvstore(spec)
        old = lut.read_meta(kv, where)
        if old is not None:
            lut.check_version(old, where)
        meta = {"format": lut.FORMAT, "format_version": lut.FORMAT_VERSION, "complete": False,
                "model_config": cfg.to_dict(), "fingerprint": fingerprint, "scheme": scheme, "block": layout.block,
                "shard_rows": shard_rows or default_shard_rows(layout, cfg.vocab_size), "checksum": checksum,
                "source": source or {}}
        same = (old is not None and _settings(old) == _settings(meta)
                and shard_rows in (None, old["shard_rows"]))

        def reopen():
            return cls(spec, kv, {**old, "source": meta["source"]},
                       _open_arrays(spec, layout, create=False, V=cfg.vocab_size))

        if not create:
            if not same:
                raise MoleError(f"table {where} was not prepared for this conversion")
            return reopen()
        if old is None:
            local = lut.local_dir(spec)
            if local is not None and any(local.iterdir()):
                raise MoleError(f"destination {where} exists and is not a mole-jax lookup table; refusing to "
                                "write into it")
        elif same and not old.get("complete"):
            return reopen()  # an interrupted conversion of the same parameters: resume it
        elif not overwrite:
            what = ("a complete table" if old.get("complete") else
                    "an interrupted conversion with other parameters or settings")
            raise MoleError(f"{where} already holds {what}; pass overwrite=True (--overwrite) to replace it")
        else:  # replace: first make the old table unusable, then delete its arrays, then describe the new one
            _write_meta(kv, {**old, "complete": False}, where)
        arrays = _open_arrays(spec, layout, create=True, V=cfg.vocab_size, shard_rows=meta["shard_rows"],
                              checksum=checksum)
        _write_meta(kv, meta, where)
        return cls(spec, kv, meta, arrays)

    def shard_range(self, i: int) -> tuple[int, int]:
        return i * self.shard_rows, min((i + 1) * self.shard_rows, self.V)

    def done_shards(self) -> set[int]:
        return lut.stored_shards(self.kv, self.layout)

    def pending_shards(self) -> list[int]:
        done = self.done_shards()
        return [i for i in range(self.num_shards) if i not in done]

    def write_shard(self, i: int, stored: dict) -> list[ts.Future]:
        """Start writing shard i (stored arrays of exactly its rows); returns the futures that complete when it
        is durable. The arrays must not be modified until then."""
        start, stop = self.shard_range(i)
        futures = []
        for name, a in self._arrays.items():
            value = stored[name]
            if len(value) != stop - start:
                raise ValueError(f"shard {i} needs {stop - start} rows, got {len(value)}")
            futures.append(a[start:stop].write(value).commit)
        return futures

    def read_stored(self, ids) -> dict[str, np.ndarray]:
        ids = lut.check_row_ids(ids, self.V)
        return {name: a[ids].read().result() for name, a in self._arrays.items()}

    def mark_complete(self, verification: dict, fingerprint: str | None = None, run: dict | None = None) -> None:
        """Record the verification (and facts about the run) and mark the table complete: the last write."""
        missing = self.pending_shards()
        if missing:
            raise MoleError(f"table {self.location} is missing {len(missing)} shards (first: {missing[0]})")
        self.meta = {**self.meta, "complete": True, "verification": verification, "last_run": run or {},
                     "fingerprint": fingerprint or self.meta["fingerprint"],
                     "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if not self.meta["fingerprint"]:
            raise ValueError("a table needs a fingerprint before it is complete")
        _write_meta(self.kv, self.meta, self.location)


def _open_arrays(spec: ts.KvStore.Spec, layout: Layout, *, create: bool, V: int, shard_rows: int = 0,
                 checksum: bool = False) -> dict:
    arrays = {}
    for name, (shape, dt) in layout.arrays.items():
        try:
            if create:
                arrays[name] = ts.open({**lut.array_spec(spec, name),
                                        "metadata": lut.array_metadata(V, shape, dt, shard_rows, checksum)},
                                       create=True, delete_existing=True, context=lut.CONTEXT).result()
            else:
                arrays[name] = ts.open(lut.array_spec(spec, name), open=True, context=lut.CONTEXT).result()
        except ValueError as e:
            raise MoleError(f"cannot {'create' if create else 'open'} table array {lut.describe(spec)}/{name}: "
                            f"{e}") from None
        want = (V, *shape)
        if tuple(arrays[name].shape) != want:
            raise MoleError(f"table array {lut.describe(spec)}/{name} has shape {tuple(arrays[name].shape)}, "
                            f"expected {want}")
    return arrays


def _settings(meta: dict) -> tuple:
    """What must match for an interrupted conversion to be resumed rather than replaced (and shard_rows)."""
    return (meta.get("format_version"), meta.get("model_config"), meta.get("fingerprint"), meta.get("scheme"),
            meta.get("block"), meta.get("checksum"))


def _write_meta(kv: ts.KvStore, meta: dict, where) -> None:
    try:
        kv.write(lut.META_KEY, json.dumps(meta, indent=2, sort_keys=True).encode() + b"\n").result()
    except ValueError as e:
        raise MoleError(f"cannot write {where}/{lut.META_KEY}: {e}") from None


def _check_writable(spec: ts.KvStore.Spec) -> None:
    """For a local destination: a clear error now rather than a Tensorstore error mid-way."""
    local = lut.local_dir(spec)
    if local is None:
        return
    p = Path(str(local).rstrip("/") or "/")
    if p.exists() and not p.is_dir():
        raise MoleError(f"destination {p} exists and is not a directory")
    ancestor = p
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MoleError(f"cannot create {p}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise MoleError(f"destination {p} is not writable ({ancestor}: permission denied)")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MoleError(f"cannot create {p}: {e.strerror}") from None


# Rows in, whole shards out ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class _StagedShard:
    stored: dict  # the shard's stored arrays, filled as its rows arrive
    rows: int = 0  # rows filled so far


class ShardPipeline:
    """Takes rows of a table in stored form, in any aligned chunks of one shard each, assembles whole shards and
    writes each once, with at most `max_inflight` shard writes in flight (older ones are waited for first).

    `add(start, stored)` takes rows [start, start + n) of one shard; `flush()` waits for every write;
    `bytes_written` counts the stored bytes of the shards whose writes have finished.
    """

    def __init__(self, writer: TableWriter, max_inflight: int = 2):
        self.writer = writer
        self.max_inflight = max_inflight
        self.bytes_written = 0
        self._staged: dict[int, _StagedShard] = {}  # shards of which some rows have arrived
        self._inflight: deque[tuple[list[ts.Future], int]] = deque()

    def add(self, start: int, stored: dict) -> None:
        """Rows [start, start + n) of one shard (n: the arrays' leading dim). The arrays must not be modified
        until flush() returns (a whole shard is written from them directly)."""
        n = len(next(iter(stored.values())))
        i = start // self.writer.shard_rows
        shard_start, shard_stop = self.writer.shard_range(i)
        if start + n > shard_stop:
            raise ValueError(f"rows [{start}, {start + n}) cross the end of shard {i} at row {shard_stop}")
        if n == shard_stop - shard_start:  # the whole shard at once: no staging copy
            self._write(i, stored)
            return
        staged = self._staged.get(i)
        if staged is None:
            staged = self._staged[i] = self._empty_shard(shard_stop - shard_start)
        for name, a in stored.items():
            staged.stored[name][start - shard_start:start - shard_start + n] = a
        staged.rows += n
        if staged.rows == shard_stop - shard_start:
            del self._staged[i]
            self._write(i, staged.stored)

    def flush(self) -> None:
        while self._inflight:
            self._finish_oldest()

    def _empty_shard(self, rows: int) -> _StagedShard:
        return _StagedShard({name: np.empty((rows, *shape), dt)
                             for name, (shape, dt) in self.writer.layout.arrays.items()})

    def _write(self, i: int, stored: dict) -> None:
        start, stop = self.writer.shard_range(i)
        self._inflight.append((self.writer.write_shard(i, stored), (stop - start) * self.writer.layout.row_nbytes))
        while len(self._inflight) > self.max_inflight:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        futures, nbytes = self._inflight.popleft()
        try:
            for f in futures:
                f.result()
        except ValueError as e:
            raise MoleError(f"writing to {self.writer.location} failed: {e}") from None
        self.bytes_written += nbytes


# A whole table from host rows -------------------------------------------------------------------------------------
def write_table(lut_dir, cfg: ModelConfig, scheme: str, read_rows: Callable[[int, int], np.ndarray], *,
                fingerprint: str | None = None, block: int | None = None, shard_rows: int | None = None,
                overwrite: bool = False, verify_rows: int = 8, source: dict | None = None,
                max_inflight: int = 2) -> str:
    """Write a complete table from rows produced on the host: `read_rows(start, stop)` -> [stop - start, L, N, D]
    (any float dtype), called once per shard in order and again for the spot rows of the verification (the
    stored rows must equal the quantised source rows bit for bit). fingerprint=None: the table's ContentHash.
    Returns the fingerprint recorded."""
    writer = TableWriter.start(lut_dir, cfg, scheme, fingerprint or "pending", block=block, shard_rows=shard_rows,
                               overwrite=overwrite, source=source)
    content = lut.ContentHash(writer.layout, writer.V)
    pipeline = ShardPipeline(writer, max_inflight)
    try:
        for i in range(writer.num_shards):
            start, stop = writer.shard_range(i)
            stored = _quantized_rows(read_rows, start, stop, writer.layout)
            content.update(stored)
            pipeline.add(start, stored)
        pipeline.flush()
    except MoleError:
        raise
    except ValueError as e:
        raise MoleError(f"writing table {writer.location} failed: {e}") from None
    spot = _verify_against_source(writer, read_rows, verify_rows)
    fp = fingerprint or content.hexdigest()
    writer.mark_complete({"method": "rows equal their source bit for bit", "rows": spot}, fingerprint=fp)
    return fp


def _quantized_rows(read_rows: Callable[[int, int], np.ndarray], start: int, stop: int, layout: Layout) -> dict:
    return schemes.quantize(np.asarray(read_rows(start, stop)), layout.scheme, layout.block)


def _verify_against_source(writer: TableWriter, read_rows: Callable[[int, int], np.ndarray], k: int) -> list[int]:
    """The first, the last and k random rows as stored, bit for bit against their quantised source rows."""
    rng = np.random.default_rng(0)
    spot = sorted({0, writer.V - 1, *rng.integers(0, writer.V, k).tolist()})
    for v in spot:
        want = _quantized_rows(read_rows, v, v + 1, writer.layout)
        got = writer.read_stored([v])
        for name in want:
            if not np.array_equal(np.asarray(want[name]).view(np.uint8), got[name].view(np.uint8)):
                raise MoleError(f"verification of {writer.location} failed: row {v} ({name}) differs from its source")
    return spot
