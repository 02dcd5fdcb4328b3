"""Writing a lookup table: create, resume or replace it (`TableWriter`), stream rows into whole shards
(`ShardPipeline`; `BackgroundWriter` does it in a thread of its own), and `write_table` for rows produced on the
host.

Shards are written whole, once each (no read-modify-write), and a shard file appears only once fully written,
so the set of shard files present is the progress: an interrupted writer resumes by writing the missing shards,
and only if everything that determines the stored bits is what it was (the table's settings and the producer's:
`TableWriter.start`). A table is marked complete only by its last write, after a verification pass. A converter
holds `TableLock` on a local table directory, so that a second one started on it refuses instead of mixing in.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import json
import os
import queue
import shutil
import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np
import tensorstore as ts
from tqdm.auto import tqdm

from mole_jax import lut, schemes
from mole_jax.config import ModelConfig, MoleError, check_creatable
from mole_jax.schemes import Layout

SHARD_TARGET_BYTES = 64 << 20  # stored bytes per shard file (default shard_rows)
# What must be equal for an interrupted table to be resumed (with its `producer` settings, see TableWriter.start)
SETTINGS = ("format_version", "model_config", "fingerprint", "scheme", "block", "shard_rows", "checksum")


def default_shard_rows(layout: Layout, V: int) -> int:
    """A power of two of rows making a shard of about SHARD_TARGET_BYTES, raised to lut.page_rows (each shard's
    rows fill whole pages in every stored array), at most the vocabulary (one shard)."""
    rows = max(1, SHARD_TARGET_BYTES // layout.row_nbytes)
    return min(max(1 << (rows.bit_length() - 1), lut.page_rows(layout)), V)


def check_shard_rows(layout: Layout, V: int, shard_rows) -> int:
    """shard_rows if a table of this layout can have it, else a MoleError saying which values it can have."""
    if not isinstance(shard_rows, int) or isinstance(shard_rows, bool) or shard_rows <= 0:
        raise MoleError(f"shard_rows must be a positive integer, got {shard_rows!r}")
    problem = lut.shard_rows_problem(layout, V, shard_rows)
    if problem:
        raise MoleError(problem)
    return shard_rows


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
        self._reader: lut.LookupTable | None = None

    @classmethod
    def start(cls, lut_dir, cfg: ModelConfig, scheme: str, fingerprint: str, *, block: int | None = None,
              shard_rows: int | None = None, overwrite: bool = False, checksum: bool = True,
              source: dict | None = None, producer: dict | None = None, create: bool = True,
              lock: bool = False) -> "TableWriter":
        """producer: what else determines the stored bits (convert: batch rows, backend, jax version), recorded
        and compared on resume like the table's own settings. shard_rows=None: an interrupted table's own, else
        default_shard_rows. create=False opens the table that another process prepared (multi-process
        conversion), adopting its shard_rows and producer. lock: hold a TableLock on a local directory until
        `release()` (one conversion's process 0). checksum=False (no `checksums` array) only to measure what
        checksums cost."""
        layout = schemes.make_layout(scheme, cfg, block)
        if shard_rows is not None:
            check_shard_rows(layout, cfg.vocab_size, shard_rows)
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
        return cls(spec, kv, {**old, "source": new["source"]},
                   _open_arrays(spec, layout, V, create=False, checksum=old.get("checksum", True)))

    @classmethod
    def _create_or_resume(cls, spec, kv, new: dict, layout: Layout, where, overwrite: bool) -> "TableWriter":
        old = lut.read_meta(kv, where)
        how = "pass overwrite=True (--overwrite) to"
        if old is not None and old.get("format_version") != lut.FORMAT_VERSION:
            if not overwrite:
                upgrade = (f" (or upgrade it: `mole-jax lut upgrade {where}`)"
                           if old.get("format_version") == 2 and old.get("complete") else "")
                raise MoleError(f"{where} holds a table of format version {old.get('format_version')}; {how} "
                                f"replace it{upgrade}")
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
        return lut.stored_shards(self.kv, lut.table_arrays(self.layout, self.meta.get("checksum", True)))

    def pending_shards(self) -> list[int]:
        done = self.done_shards()
        return [i for i in range(self.num_shards) if i not in done]

    def write_shard(self, i: int, stored: dict) -> list[ts.Future]:
        """Start writing shard i (stored arrays of exactly its rows) and its rows' checksums; returns the futures
        that complete when it is durable. The arrays must not be modified until then."""
        start, stop = self.shard_range(i)
        futures, sums = [], []
        for name, (shape, dt) in self.layout.arrays.items():
            value = np.ascontiguousarray(stored[name], dtype=dt)  # the bytes written are the bytes checksummed
            if value.shape != (stop - start, *shape):
                raise ValueError(f"shard {i} needs {name} of shape {(stop - start, *shape)}, got {value.shape}")
            sums.append(lut.row_checksums(value))
            futures.append(self._arrays[name][start:stop].write(value).commit)
        if lut.CHECKSUMS in self._arrays:
            futures.append(self._arrays[lut.CHECKSUMS][start:stop].write(np.stack(sums, axis=1)).commit)
        return futures

    def reader(self) -> lut.LookupTable:
        """The table as written, for reading back once every shard is durable (no cache: every read comes from
        storage)."""
        if self._reader is None:
            self._reader = lut.LookupTable(self.spec, self.meta, cache_bytes=0)
        return self._reader

    def read_stored(self, ids) -> dict[str, np.ndarray]:
        """Rows as stored, each verified against its checksum (the verification before completing)."""
        try:
            return self.reader().read_stored(ids)
        except MoleError as e:
            raise MoleError(f"reading back rows of {self.location} failed: {e}") from None

    def mark_complete(self, verification: dict, fingerprint: str | None = None, run: dict | None = None) -> None:
        """Record the verification (and facts about the run) and mark the table complete: the last write."""
        self._check_whole()
        self.meta = {**self.meta, "complete": True, "verification": verification, "last_run": run or {},
                     "fingerprint": fingerprint or self.meta["fingerprint"],
                     "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if not self.meta["fingerprint"]:
            raise ValueError("a table needs a fingerprint before it is complete")
        _write_meta(self.kv, self.meta, self.location)

    def _check_whole(self) -> None:
        """Every shard written, and every row file laid out as this format says (raw rows in row order, of its
        exact size: mappable), else a MoleError; the table stays incomplete."""
        missing = self.pending_shards()
        if missing:
            raise MoleError(f"table {self.location} is missing {len(missing)} shards (first: {missing[0]})")
        line = self.reader().check_structure()
        if line:
            raise MoleError(f"table {self.location} is not laid out as format version {lut.FORMAT_VERSION} says "
                            f"({line}); it stays incomplete")


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
    """The table's stored arrays (lut.table_arrays: the rows' and the checksums), created empty or opened."""
    arrays = {}
    for name, (shape, dt) in lut.table_arrays(layout, checksum).items():
        try:
            if create:
                arrays[name] = ts.open({**lut.array_spec(spec, name),
                                        "metadata": lut.stored_metadata(name, V, shape, dt, shard_rows)},
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
    check_creatable(p)
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


class BackgroundWriter:
    """Writes whole shards in a thread of its own, so that the caller computes while shards are checksummed and
    written: `submit(i, stored)` hands over shard i (stored arrays of exactly its rows, not modified afterwards),
    waiting while `max_inflight` shards are already queued (so a writer slower than the caller holds it back
    instead of piling shards up in memory); `flush()` waits until every shard handed over is durable. Writes go
    through a ShardPipeline, in the order handed over, at most `max_inflight` in flight. A failed write is raised
    in the caller at its next `submit` or `flush` as the ShardPipeline raises it (one line: the shards already
    durable stay); the shards handed over after it are dropped."""

    def __init__(self, writer: TableWriter, max_inflight: int = 2):
        self.writer = writer
        self._pipeline = ShardPipeline(writer, max_inflight)
        self._work: queue.Queue = queue.Queue(maxsize=max_inflight)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mole-jax-shard-writer", daemon=True)
        self._thread.start()

    @property
    def bytes_written(self) -> int:
        return self._pipeline.bytes_written

    def submit(self, i: int, stored: dict) -> None:
        self._raise()
        self._work.put((i, stored))

    def flush(self) -> None:
        self._work.join()
        self._raise()

    def close(self) -> None:
        """Stop the thread once the shards handed over are done."""
        if self._thread.is_alive():
            self._work.put(None)
            self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while True:
            item = self._work.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    i, stored = item
                    self._pipeline.add(self.writer.shard_range(i)[0], stored)
                    if self._work.empty():  # nothing queued: make what is in flight durable now
                        self._pipeline.flush()
            except BaseException as e:  # handed to the caller, which raises it
                self._error = e
                self._pipeline = ShardPipeline(self.writer, self._pipeline.max_inflight)
            finally:
                self._work.task_done()


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


# Upgrading a table of format version 2 ------------------------------------------------------------------------------
UPGRADE_SUFFIX = ".v3-upgrade"  # LUT_DIR.v3-upgrade: the new table, written beside the old one
RETIRED_SUFFIX = ".v2-retired"  # LUT_DIR.v2-retired: the old table once replaced, until it is deleted
_RENAME_EXCHANGE = 2


def upgrade_table(lut_dir, *, progress: bool = False) -> dict:
    """Rewrite a complete table of format version 2 (a crc32c after every row inside its shards) as version 3
    (raw rows, the `checksums` array), in place, with bit-identical rows and the same fingerprint and metadata.

    The new table is written beside the old one, in LUT_DIR.v3-upgrade, with the TableWriter (resumable: a rerun
    writes only the shards missing); each old shard is read through its own checksums, every new shard is checked
    whole (structure and row checksums) before the new table is marked complete; then the two directories are
    exchanged (renameat2 RENAME_EXCHANGE, one atomic step; two renames where the filesystem cannot exchange) and
    the old table, moved to LUT_DIR.v2-retired, is deleted. The old table is deleted only once the complete new
    one is in its place, and a rerun after a kill at any point finishes what was left. Local directories only.
    Returns {"status": "upgraded" | "finished" | "current", "location", "shard_rows", "from_shard_rows",
    "num_shards"}."""
    spec = lut.kvstore_spec(lut_dir)
    local = lut.local_dir(spec)
    if local is None:
        raise MoleError(f"`lut upgrade` works on tables in local directories and {lut.describe(spec)} is not one: "
                        "reconvert it (or copy it to a local directory, upgrade it there and copy it back)")
    target = Path(str(local).rstrip("/") or "/")
    staging = target.with_name(target.name + UPGRADE_SUFFIX)
    retired = target.with_name(target.name + RETIRED_SUFFIX)
    meta = _local_meta(target)
    if meta is None and not target.exists():
        staged = _local_meta(staging)
        if _is_current(staged) and retired.exists():  # killed between the two renames of a swap: finish it
            os.rename(staging, target)
            _sync_dir(target.parent)
            shutil.rmtree(retired)
            return _report("finished", target, staged)
        raise MoleError(f"lookup table not found: {target} does not exist")
    if meta is None:
        raise MoleError(f"{target} is not a mole-jax lookup table (no {lut.META_KEY})")
    version = meta.get("format_version")
    if version == lut.FORMAT_VERSION:
        return _report("finished" if _clear_leftovers(target, staging, retired, meta) else "current", target, meta)
    if version != 2:
        raise MoleError(f"table {target} has format version {version}: `lut upgrade` upgrades tables of version 2 "
                        f"to {lut.FORMAT_VERSION}; reconvert it")
    if not meta.get("complete"):
        raise MoleError(f"table {target} is an incomplete table of format version 2 (an interrupted conversion): "
                        f"there is nothing to upgrade; reconvert it (`mole-jax convert CKPT {target} --overwrite`)")
    if retired.exists():
        raise MoleError(f"{retired} exists, and `lut upgrade` keeps the table it replaces there: move it away, "
                        "then rerun")
    held = TableLock(target, target)  # no converter or other upgrade on the old table meanwhile
    try:
        new = _write_upgrade(spec, target, staging, meta, progress)
        _swap(target, staging, retired)
    finally:
        held.release()
    shutil.rmtree(retired)
    return _report("upgraded", target, new)


def _report(status: str, target: Path, meta: dict) -> dict:
    V = meta["model_config"]["vocab_size"]
    return {"status": status, "location": target, "shard_rows": meta["shard_rows"],
            "from_shard_rows": meta.get("upgraded", {}).get("from_shard_rows", meta["shard_rows"]),
            "num_shards": -(-V // meta["shard_rows"]), "fingerprint": meta["fingerprint"]}


def _local_meta(path: Path) -> dict | None:
    """lut.json of a local directory, None where there is none (or no directory)."""
    if not (path / lut.META_KEY).is_file():
        return None
    return lut.read_meta(lut.open_kvstore(lut.kvstore_spec(path)), path)


def _is_current(meta: dict | None) -> bool:
    return bool(meta and meta.get("format_version") == lut.FORMAT_VERSION and meta.get("complete"))


def _clear_leftovers(target: Path, staging: Path, retired: Path, meta: dict) -> bool:
    """With the upgraded table at target: delete what an interrupted upgrade left of the old one (after an
    exchange, the old table sits in staging; after the swap, in retired). True if there was something."""
    found = False
    staged = _local_meta(staging)
    if staged is not None and staged.get("format_version") == 2 and staged.get("fingerprint") == meta["fingerprint"]:
        if retired.exists():
            shutil.rmtree(retired)
        os.rename(staging, retired)
        found = True
    if retired.exists():
        shutil.rmtree(retired)
        found = True
    return found


def _write_upgrade(spec, target: Path, staging: Path, meta: dict, progress: bool) -> dict:
    """Write (or finish writing) the version 3 copy of the version 2 table at target into staging, verify it
    whole and mark it complete; returns its lut.json."""
    staged = _local_meta(staging)
    if _is_current(staged) and staged["fingerprint"] == meta["fingerprint"]:
        return staged  # written and complete: only the swap was left
    cfg, layout = lut.layout_from_meta(meta)
    V, old_rows = cfg.vocab_size, meta["shard_rows"]
    shard_rows = old_rows if lut.shard_rows_problem(layout, V, old_rows) is None else default_shard_rows(layout, V)
    old = _OldTable(spec, target, meta, layout)
    block = meta["block"] if meta["scheme"] in schemes.NF_BITS else None  # the others have no block option
    writer = TableWriter.start(staging, cfg, meta["scheme"], meta["fingerprint"], block=block,
                               shard_rows=shard_rows, source=meta.get("source"), producer=meta.get("producer") or {},
                               lock=True)
    try:
        pipeline = ShardPipeline(writer)
        for i in tqdm(writer.pending_shards(), desc="upgrade", unit="shard", disable=not progress):
            start, stop = writer.shard_range(i)
            pipeline.add(start, old.read(start, stop))
        pipeline.flush()
        reader = writer.reader()
        for i in range(writer.num_shards):  # every new shard whole: structure and every row's checksum
            line = reader.check_shard(i)
            if line:
                raise MoleError(f"the upgraded copy of {target} failed verification ({line}); delete {staging} "
                                "and rerun")
        spot = sorted({0, V - 1, *np.random.default_rng(0).integers(0, V, 8).tolist()})
        new_rows = reader.read_stored(spot)
        for name, a in old.read_ids(spot).items():  # and bit for bit against the old table, on spot rows
            if not np.array_equal(a.view(np.uint8), new_rows[name].view(np.uint8)):
                raise MoleError(f"the upgraded copy of {target} differs from it ({name}); delete {staging} and rerun")
        writer._check_whole()
        writer.meta = {**meta, "format_version": lut.FORMAT_VERSION, "shard_rows": shard_rows, "checksum": True,
                       "complete": True, "upgraded": {"from_format_version": 2, "from_shard_rows": old_rows,
                                                      "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
        _write_meta(writer.kv, writer.meta, writer.location)
    finally:
        writer.release()
    return writer.meta


class _OldTable:
    """The stored arrays of a complete version 2 table, read through their own codecs (a crc32c per row)."""

    def __init__(self, spec, where: Path, meta: dict, layout: Layout):
        self.where, self.layout = where, layout
        self.shard_rows, self.V = meta["shard_rows"], meta["model_config"]["vocab_size"]
        arrays = lut.table_arrays(layout, checksum=False)
        missing = lut.missing_shards(lut.open_kvstore(spec), arrays, -(-self.V // self.shard_rows))
        if missing:
            raise MoleError(f"cannot upgrade {where}: shard file {missing[0][1]} is missing ({len(missing)} missing; "
                            "an interrupted copy?): copy it again, or reconvert it")
        context = ts.Context({"cache_pool": {"total_bytes_limit": 0}}, lut.CONTEXT)
        try:
            self.arrays = {name: ts.open(lut.array_spec(spec, name), open=True, read=True, context=context).result()
                           for name in layout.arrays}
        except ValueError as e:
            raise MoleError(f"cannot upgrade {where}: {lut.error_text(e)}") from None

    def read(self, start: int, stop: int) -> dict:
        """Rows [start, stop), verified by the old checksums; a failure names the old shard it is in."""
        try:
            with ts.Batch() as batch:
                futures = {name: a[start:stop].read(batch=batch) for name, a in self.arrays.items()}
            return {name: f.result() for name, f in futures.items()}
        except ValueError as e:
            raise MoleError(f"cannot upgrade {self.where}: {self._damage(start, stop, e)}; the table is damaged: "
                            "restore it from a copy, or reconvert it") from None

    def read_ids(self, ids) -> dict:
        return {name: a[np.asarray(ids)].read().result() for name, a in self.arrays.items()}

    def _damage(self, start: int, stop: int, e: Exception) -> str:
        S = self.shard_rows
        for j in range(start // S, (stop - 1) // S + 1):
            a, b = j * S, min((j + 1) * S, self.V)
            for name, (shape, _) in self.layout.arrays.items():
                try:
                    self.arrays[name][a:b].read().result()
                except ValueError as err:
                    return f"shard {j} ({lut.shard_key(name, j, shape)}, rows {a}..{b - 1}): {lut.error_text(err)}"
        return lut.error_text(e)


def _swap(target: Path, staging: Path, retired: Path) -> None:
    """Put the complete upgraded table (staging) in place of the old one (target); the old one ends in retired.
    One atomic exchange where the filesystem supports it, else two renames (a rerun finishes either)."""
    if _exchange(staging, target):
        _sync_dir(target.parent)
        os.rename(staging, retired)  # staging now holds the old table
    else:
        os.rename(target, retired)
        os.rename(staging, target)
    _sync_dir(target.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Exchange two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not possible
    (no such call, or a filesystem without it)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(e, f"cannot exchange {a} and {b}: {os.strerror(e)}")


def _sync_dir(path: Path) -> None:
    """Make renames in a directory durable (fsync of the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
