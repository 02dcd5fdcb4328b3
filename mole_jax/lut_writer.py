"""Writing a lookup table: create, resume or replace it (`TableWriter`), stream rows into whole shards
(`ShardPipeline`), and `write_table` for rows produced on the host.

Shards are written whole, once each (no read-modify-write), and a shard file appears only once fully written,
so the set of shard files present is the progress: an interrupted writer resumes by writing the missing shards,
and only if everything that determines the stored bits is what it was (the table's settings and the producer's:
`TableWriter.start`). A table is marked complete only by its last write, after a verification pass. A converter
holds `TableLock` on a local table directory, so that a second one started on it refuses instead of mixing in.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
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
# What must be equal for an interrupted table to be resumed (with its `producer` settings, see TableWriter.start)
SETTINGS = ("format_version", "model_config", "fingerprint", "scheme", "block", "shard_rows", "checksum")


def default_shard_rows(layout: Layout, V: int) -> int:
    """A power of two of rows making a shard of about SHARD_TARGET_BYTES, at most the vocabulary."""
    rows = max(1, SHARD_TARGET_BYTES // layout.row_nbytes)
    return min(1 << (rows.bit_length() - 1), V)


def interrupted_meta(lut_dir) -> dict | None:
    """lut.json of an interrupted conversion (this format) at lut_dir, else None: what a resume keeps by default."""
    spec = lut.kvstore_spec(lut_dir)
    local = lut.local_dir(spec)
    if local is not None and not local.is_dir():
        return None
    try:
        meta = lut.read_meta(lut.open_kvstore(spec), lut.describe(spec))
    except MoleError:
        return None
    resumable = meta is not None and not meta.get("complete") and meta.get("format_version") == lut.FORMAT_VERSION
    return meta if resumable else None


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
        self.lock: TableLock | None = None

    @classmethod
    def start(cls, lut_dir, cfg: ModelConfig, scheme: str, fingerprint: str, *, block: int | None = None,
              shard_rows: int | None = None, overwrite: bool = False, checksum: bool = True,
              source: dict | None = None, producer: dict | None = None, create: bool = True,
              lock: bool = False) -> "TableWriter":
        """producer: what else determines the stored bits (convert: batch rows, backend, jax version), recorded
        and compared on resume like the table's own settings. shard_rows=None: an interrupted table's own, else
        default_shard_rows. create=False opens the table that another process prepared (multi-process
        conversion), adopting its shard_rows and producer. lock: hold a TableLock on a local directory until
        `release()` (one conversion's process 0). checksum=False (no crc32c per row) only to measure its cost."""
        layout = schemes.make_layout(scheme, cfg, block)
        if shard_rows is not None and (not isinstance(shard_rows, int) or shard_rows <= 0):
            raise MoleError(f"shard_rows must be a positive integer, got {shard_rows!r}")
        spec = lut.kvstore_spec(lut_dir)
        where = lut.describe(spec)
        if create:
            _check_destination(spec)
        kv = lut.open_kvstore(spec)
        new = {"format": lut.FORMAT, "format_version": lut.FORMAT_VERSION, "complete": False,
               "model_config": cfg.to_dict(), "fingerprint": fingerprint, "scheme": scheme, "block": layout.block,
               "shard_rows": shard_rows, "checksum": checksum, "producer": producer, "source": source or {}}
        if not create:
            return cls._join(spec, kv, new, layout, where)
        local = lut.local_dir(spec)
        held = TableLock(local, where) if lock and local is not None else None
        try:
            writer = cls._create_or_resume(spec, kv, new, layout, where, overwrite)
        except BaseException:
            if held:
                held.release()
            raise
        writer.lock = held
        return writer

    @classmethod
    def _join(cls, spec, kv, new: dict, layout: Layout, where) -> "TableWriter":
        old = lut.read_meta(kv, where)
        if old is None or old.get("format_version") != lut.FORMAT_VERSION or _difference(old, new):
            raise MoleError(f"table {where} was not prepared for this conversion")
        return cls._reopen(spec, kv, old, new, layout)

    @classmethod
    def _reopen(cls, spec, kv, old: dict, new: dict, layout: Layout) -> "TableWriter":
        V = new["model_config"]["vocab_size"]
        return cls(spec, kv, {**old, "source": new["source"]}, _open_arrays(spec, layout, V, create=False))

    @classmethod
    def _create_or_resume(cls, spec, kv, new: dict, layout: Layout, where, overwrite: bool) -> "TableWriter":
        old = lut.read_meta(kv, where)
        how = "pass overwrite=True (--overwrite) to"
        if old is not None and old.get("format_version") != lut.FORMAT_VERSION:
            if not overwrite:
                raise MoleError(f"{where} holds a table of format version {old.get('format_version')}; {how} "
                                "replace it")
        elif old is not None and old.get("complete"):
            if not overwrite:
                raise MoleError(f"{where} already holds a complete table; {how} replace it")
        elif old is not None:
            differs = _difference(old, new)
            if not differs:  # an interrupted conversion with the same parameters and settings: resume it
                return cls._reopen(spec, kv, old, new, layout)
            if not overwrite:
                raise MoleError(f"{where} holds an interrupted conversion with {differs}; rerun with the same "
                                f"settings to resume it, or {how} start over")
        if old is not None:  # replace: first make the old table unusable, then delete every array it had
            _write_meta(kv, {**old, "complete": False}, where)
            _delete_arrays(kv, where)
        V = new["model_config"]["vocab_size"]
        meta = {**new, "producer": new["producer"] or {},
                "shard_rows": new["shard_rows"] or default_shard_rows(layout, V)}
        arrays = _open_arrays(spec, layout, V, create=True, shard_rows=meta["shard_rows"], checksum=meta["checksum"])
        _write_meta(kv, meta, where)
        return cls(spec, kv, meta, arrays)

    def release(self) -> None:
        """Let another converter at this table (the end of a conversion; process exit does it too)."""
        if self.lock:
            self.lock.release()
            self.lock = None

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
        try:
            return {name: a[ids].read().result() for name, a in self._arrays.items()}
        except ValueError as e:
            raise MoleError(f"reading back rows of {self.location} failed: {lut.error_text(e)}") from None

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


def _difference(old: dict, new: dict) -> str | None:
    """The first setting in which an interrupted table differs from this run (None in `new`: take the table's),
    in words; None if it can be resumed."""
    if old.get("model_config") != new["model_config"]:
        return "another model config"
    if old.get("fingerprint") != new["fingerprint"]:
        return f"other parameters (fingerprint {str(old.get('fingerprint'))[:12]}, this run {new['fingerprint'][:12]})"
    mine = {**{k: new[k] for k in SETTINGS}, **(new["producer"] or {})}
    theirs = {**{k: old.get(k) for k in SETTINGS}, **old.get("producer", {})}
    if new["producer"] is None:  # another process of the conversion: the producer is process 0's
        mine.update({k: v for k, v in theirs.items() if k not in SETTINGS})
    for key, value in mine.items():
        if value is not None and theirs.get(key) != value:
            return f"{key} {theirs.get(key)!r} (this run: {value!r})"
    return None


def _open_arrays(spec: ts.KvStore.Spec, layout: Layout, V: int, *, create: bool, shard_rows: int = 0,
                 checksum: bool = True) -> dict:
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
                            f"{lut.error_text(e)}") from None
        want = (V, *shape)
        if tuple(arrays[name].shape) != want:
            raise MoleError(f"table array {lut.describe(spec)}/{name} has shape {tuple(arrays[name].shape)}, "
                            f"expected {want}")
    return arrays


def _delete_arrays(kv: ts.KvStore, where) -> None:
    """Delete every key of a table but lut.json and lut.lock: all the arrays it had, whatever its scheme."""
    keep = {lut.META_KEY, lut.LOCK_KEY}
    try:
        keys = [k.decode() for k in kv.list().result()]
        tops = {k.split("/")[0] for k in keys if k not in keep}
        for top in sorted(tops):
            if top in keys:
                kv.delete(top).result()
            else:
                kv.delete_range(ts.KvStore.KeyRange(top + "/", top + "0")).result()
    except ValueError as e:
        raise MoleError(f"cannot delete the old table at {where}: {lut.error_text(e)}") from None


def _write_meta(kv: ts.KvStore, meta: dict, where) -> None:
    try:
        kv.write(lut.META_KEY, json.dumps(meta, indent=2, sort_keys=True).encode() + b"\n").result()
    except ValueError as e:
        raise MoleError(f"cannot write {where}/{lut.META_KEY}: {lut.error_text(e)}") from None


def _check_destination(spec: ts.KvStore.Spec) -> None:
    """For a local destination: a clear error now rather than a Tensorstore error mid-way, and a directory holding
    anything but a table (or a converter's lock) is never written into."""
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
    if not (p / lut.META_KEY).exists() and any(q.name != lut.LOCK_KEY for q in p.iterdir()):
        raise MoleError(f"destination {p} exists and is not a mole-jax lookup table; refusing to write into it")


class TableLock:
    """One converter at a time on a local table directory: an exclusive, non-blocking `flock` on its lut.lock,
    which names the holder. A multi-process conversion is one converter: its process 0 holds the lock for all
    (the other processes write only shards that process 0 assigned, between its barriers). The kernel releases
    the lock when the holder exits, even on SIGKILL; the file stays (deleting a lock file races with openers)."""

    def __init__(self, directory: Path, where):
        path = Path(directory) / lut.LOCK_KEY
        try:
            self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise MoleError(f"cannot create the lock file {path}: {e.strerror}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text(errors="replace").strip() or "a process that has not written its name yet"
            self.release()
            raise MoleError(f"table {where} is being written by another conversion ({holder}); wait for it to "
                            "finish or stop it, then rerun") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, (f"pid {os.getpid()} on {socket.gethostname()}, since "
                            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n").encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor of the open file releases the flock
            self._fd = None


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
        self._inflight: deque[tuple[int, list[ts.Future], int]] = deque()

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
        self._inflight.append((i, self.writer.write_shard(i, stored), (stop - start) * self.writer.layout.row_nbytes))
        while len(self._inflight) > self.max_inflight:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        i, futures, nbytes = self._inflight.popleft()
        try:
            for f in futures:
                f.result()
        except ValueError as e:  # a full disk, a lost connection...: the shards already durable stay
            raise MoleError(f"writing shard {i} of {self.writer.location} failed ({lut.error_text(e)}); the shards "
                            "written so far are kept: fix the cause, then rerun the same command to resume") from None
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
