"""The MoLE lookup table on storage, for reading: format, locations, metadata, fingerprints, `open_lut(...).rows`,
and the table's rows memory-mapped (`LookupTable.mapped_stored`).

A table is a directory (or any Tensorstore kvstore: `memory://`, `gs://bucket/path/`, `s3://...`) holding

    lut.json        metadata: format version, model config, fingerprint of the parameters it was built from,
                    scheme, quantisation block, shard rows, the settings that produced the bits, and `complete`
                    (set only after a verification pass; a table without it refuses to open)
    payload/        zarr3 array, the values (or packed codes) of every row: [V, L, N, D] for float schemes
    scales/         zarr3 array, quantisation scales (int8, nf4, nf3 only)
    checksums/      zarr3 array, uint32 [V, number of the arrays above]: the crc32c of each row's bytes in each
    lut.lock        what a converter locks while it runs (lut_writer.TableLock; written by `convert` only)

Every stored array has the vocabulary as its first dimension, so one token id is one contiguous row over all
layers and experts (the authors' row-major [V, L*N*d] layout). Each stored array is cut into shards of
`shard_rows` rows (S), one file each (zarr3 `sharding_indexed`, one row per inner chunk, index at the end), and a
shard file holds its rows raw, in row order, from offset 0: rows [i*S, (i+1)*S) of an array are bytes
[0, S * row bytes) of its shard file i, and S * row bytes is a whole number of 4096-byte pages (or the table is
one shard). So the files of an array, mapped one after another, are the array itself (`mapped_stored`). No
compression: the payloads are floats or already-dense codes. A shard file appears only once fully written (the
kvstore writes a temporary file and renames it), so the set of shard files present *is* the conversion progress.

A table that opens is whole: `open_lut` lists the shard files once and refuses a table missing any (an
interrupted copy), naming the first. Rows carry no checksum inside their shard (they must stay raw); the
`checksums` array holds a crc32c per row and stored array, and every read path verifies the rows it returns
against them (`read_stored`, `read_all_stored`, `check_shard`, `mapped_stored`), so a flipped byte raises an
error naming its shard; shard indexes and the checksums' own chunks carry a crc32c too. A chunk missing inside a
shard is an error, never fill values, and all-zero rows are stored like any other. The schemes and their error
bounds are in schemes.py; writing and `lut upgrade` are lut_writer.py.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import mmap
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import crc32c
import numpy as np
import tensorstore as ts

from mole_jax import schemes
from mole_jax.config import ModelConfig, MoleError
from mole_jax.schemes import Layout

FORMAT = "mole-jax-lut"
FORMAT_VERSION = 3  # raw rows in row order (mappable), per-row crc32c in the `checksums` array
META_KEY = "lut.json"
LOCK_KEY = "lut.lock"
CHECKSUMS = "checksums"  # the array of per-row checksums
PAGE_BYTES = 4096  # a shard's rows fill whole pages of this size, so each shard file maps at its place
INDEX_ENTRY_BYTES, INDEX_CRC_BYTES = 16, 4  # a shard index: (offset, nbytes) little-endian uint64 per row; crc32c
MISSING_ENTRY = 2 ** 64 - 1  # a shard index's (offset, nbytes) of an absent inner chunk (rows past V)
READ_CACHE_BYTES = 64 << 20  # shard indexes and recently read rows (a complete table never changes)
# `read_all_into` reads this much of a shard file per preadv: large enough that the disk streams (readahead keeps
# ahead of the reads), small enough that the checksum of one piece overlaps the read of the next.
SEQUENTIAL_PIECE = 32 << 20

# One context for the process, so that `memory://` tables written by convert are seen by open_lut; readers add
# their own cache pool on top of it.
CONTEXT = ts.Context()


# Fingerprints ---------------------------------------------------------------------------------------------------
def table_inputs(params: dict) -> dict:
    """The parameters that determine the table, as a pruned params tree: the embedding and, per layer, the expert
    norm and the routed experts. Works on shapes too (checkpoint.restore_params(select=table_inputs))."""
    blocks = params["blocks"]
    if not all("experts" in b and "norm_expert" in b for b in blocks.values()):
        raise MoleError("these parameters have no routed experts with expert norms: only MoLE's training form "
                        "can be tabulated")
    return {"embed_VxD": params["embed_VxD"],
            "blocks": {l: {"norm_expert": b["norm_expert"], "experts": b["experts"]} for l, b in blocks.items()}}


def fingerprint(params: dict) -> str:
    """sha256 (hex) of exactly what determines the table: embed_VxD and, per layer in order, norm_expert.scale_D,
    experts.w_up_NxDxF and experts.w_down_NxFxD, each as its name, shape and little-endian float32 bytes."""
    inputs = table_inputs(params)
    return fingerprint_of(inputs["embed_VxD"], (inputs["blocks"][l] for l in sorted(inputs["blocks"], key=int)))


def fingerprint_of(embed_VxD, blocks) -> str:
    """`fingerprint` from the embedding and an iterable of every layer's table inputs ({"norm_expert": ...,
    "experts": ...}) in layer order, consumed one at a time: a converter reading one layer at a time never holds
    more than one."""
    h = hashlib.sha256(b"mole-jax-lut-params/1\0")

    def add(name, value):
        a = np.ascontiguousarray(np.asarray(value), dtype="<f4")
        h.update(f"{name}{list(a.shape)}\0".encode())
        h.update(memoryview(a).cast("B"))

    add("embed_VxD", embed_VxD)
    for l, b in enumerate(blocks):
        add(f"blocks.{l}.norm_expert.scale_D", b["norm_expert"]["scale_D"])
        add(f"blocks.{l}.experts.w_up_NxDxF", b["experts"]["w_up_NxDxF"])
        add(f"blocks.{l}.experts.w_down_NxFxD", b["experts"]["w_down_NxFxD"])
        del b  # released before the iterable is asked for the next layer
    return h.hexdigest()


class ContentHash:
    """Fingerprint of a table given as its stored arrays (used when there are no parameters, e.g. a table imported
    from the authors' inference form): sha256 over, per stored array in name order, its name, dtype, shape and the
    sha256 of its little-endian row-major bytes. Fed shard by shard, in row order."""

    def __init__(self, layout: Layout, V: int):
        self.layout, self.V = layout, V
        self._h = {name: hashlib.sha256() for name in layout.arrays}

    def update(self, stored: dict) -> None:
        for name, h in self._h.items():
            a = np.asarray(stored[name])
            h.update(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).view(np.uint8))

    def hexdigest(self) -> str:
        h = hashlib.sha256(b"mole-jax-lut-table/1\0")
        for name, (shape, dt) in sorted(self.layout.arrays.items()):
            h.update(f"{name}:{dt.name}:{[self.V, *shape]}\0".encode() + self._h[name].digest())
        return h.hexdigest()


def table_fingerprint(stored: dict, layout: Layout) -> str:
    """ContentHash of whole stored arrays, e.g. {"payload": model.moe_table.weight as [V, L, N, D]}."""
    V = len(stored["payload"])
    h = ContentHash(layout, V)
    h.update(stored)
    return h.hexdigest()


# Locations ------------------------------------------------------------------------------------------------------
def kvstore_spec(location) -> ts.KvStore.Spec:
    """A local path (str or Path), a kvstore URL (file://, memory://, gs://, s3://...), or a kvstore JSON spec."""
    if isinstance(location, ts.KvStore.Spec):
        spec = location
    elif isinstance(location, dict):
        spec = ts.KvStore.Spec(location)
    elif isinstance(location, str) and "://" in location:
        try:
            spec = ts.KvStore.Spec(location)
        except ValueError as e:
            raise MoleError(f"unusable table location {location!r}: {e}") from None
    else:
        spec = ts.KvStore.Spec({"driver": "file", "path": str(Path(location).expanduser().absolute())})
    path = spec.path
    if path and not path.endswith("/"):
        spec = ts.KvStore.Spec({**spec.to_json(), "path": path + "/"})
    return spec


def local_dir(spec: ts.KvStore.Spec) -> Path | None:
    """The directory of a `file` kvstore; None for any other driver."""
    j = spec.to_json()
    return Path(j["path"]) if j.get("driver") == "file" else None


def describe(location) -> Path | str:
    """How to show a table's location: a Path for local directories, else the kvstore URL."""
    spec = kvstore_spec(location)
    local = local_dir(spec)
    if local is not None:
        return Path(str(local).rstrip("/") or "/")
    try:
        return spec.url
    except Exception:  # a spec without a URL form (rare drivers)
        return json.dumps(spec.to_json())


def open_kvstore(spec: ts.KvStore.Spec) -> ts.KvStore:
    try:
        return ts.KvStore.open(spec, context=CONTEXT).result()
    except ValueError as e:
        raise MoleError(f"cannot open table location {describe(spec)}: {e}") from None


# Metadata and the stored arrays -----------------------------------------------------------------------------------
def read_meta(kv: ts.KvStore, where) -> dict | None:
    """The table's lut.json; None where there is none. Something else under that name raises MoleError."""
    try:
        r = kv.read(META_KEY).result()
    except ValueError as e:
        raise MoleError(f"cannot read {where}/{META_KEY}: {e}") from None
    if r.state != "value":
        return None
    try:
        meta = json.loads(bytes(r.value))
    except json.JSONDecodeError as e:
        raise MoleError(f"{where}/{META_KEY} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MoleError(f"{where}/{META_KEY} is not a mole-jax lookup table description")
    return meta


def check_version(meta: dict, where) -> None:
    v = meta.get("format_version")
    if v == 1:  # rows without checksums, all-zero rows never stored: nothing to tell them from a lost chunk
        raise MoleError(f"table {where} has format version 1, which has no checksums; this mole-jax reads version "
                        f"{FORMAT_VERSION}: reconvert it (`mole-jax convert CKPT {where} --overwrite`, or "
                        "`import-hf --overwrite` for an imported table)")
    if v == 2:
        raise MoleError(f"table {where} has format version 2; this mole-jax reads version {FORMAT_VERSION}: upgrade "
                        f"it with `mole-jax lut upgrade {where}` (or reconvert it)")
    if v != FORMAT_VERSION:
        raise MoleError(f"table {where} has format version {v}; this mole-jax reads version {FORMAT_VERSION}")


def layout_from_meta(meta: dict) -> tuple[ModelConfig, Layout]:
    cfg = ModelConfig.from_dict(meta["model_config"])
    return cfg, Layout(meta["scheme"], cfg.num_layers, cfg.num_experts, cfg.d_model, meta["block"])


def table_arrays(layout: Layout, checksum: bool = True) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Every array a table stores, {name: (row shape, dtype)}: the scheme's (payload, scales...) and, with
    checksums, `checksums`: uint32 [V, len(layout.arrays)], row v's crc32c in each of them, in the layout's order.
    (checksum=False: only the tables made to measure what checksums cost.)"""
    arrays = dict(layout.arrays)
    if checksum:
        arrays[CHECKSUMS] = ((len(layout.arrays),), np.dtype(np.uint32))
    return arrays


def array_row_nbytes(shape: tuple, dtype: np.dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def page_rows(layout: Layout, page: int = PAGE_BYTES) -> int:
    """The fewest rows whose bytes are whole pages in every stored array (a power of two for a power-of-two
    page): shard_rows must be a multiple of it, unless the table is a single shard."""
    return max(page // math.gcd(array_row_nbytes(s, dt), page) for s, dt in layout.arrays.values())


def shard_rows_problem(layout: Layout, V: int, shard_rows: int, page: int = PAGE_BYTES) -> str | None:
    """Why shards of `shard_rows` rows cannot be mapped one after another (None: they can): each shard's rows
    must fill whole pages, so that shard file i maps at i * shard_rows * row bytes. A single shard always can."""
    if shard_rows >= V:
        return None
    for name, (shape, dt) in layout.arrays.items():
        nbytes = shard_rows * array_row_nbytes(shape, dt)
        if nbytes % page:
            return (f"shard_rows {shard_rows} makes {name} shards of {nbytes:,} bytes, not a whole number of "
                    f"{page}-byte pages (the rows of each shard must fill whole pages to be memory-mapped): use a "
                    f"multiple of {page_rows(layout, page)}, or at least the vocabulary ({V})")
    return None


def array_spec(kv_spec: ts.KvStore.Spec, name: str) -> dict:
    """The Tensorstore spec of stored array `name` (payload, scales, checksums) of the table at kv_spec, for
    reading and writing alike: a missing chunk is an error, never fill values, and a chunk equal to the fill value
    (an all-zero row) is stored like any other, so that a whole table has every chunk."""
    return {"driver": "zarr3", "kvstore": (kv_spec / f"{name}/").to_json(), "fill_missing_data_reads": False,
            "store_data_equal_to_fill_value": True}


_LITTLE = {"name": "bytes", "configuration": {"endian": "little"}}


def array_metadata(V: int, row_shape: tuple, dtype: np.dtype, shard_rows: int) -> dict:
    """zarr3 metadata of a stored array of rows: `shard_rows` rows per shard file, one row per inner chunk, the
    rows raw (just the `bytes` codec: no checksum inside the shard, so the file's first bytes are its rows) and
    the shard index at the end, with its own crc32c."""
    return {
        "shape": [V, *row_shape],
        "data_type": np.dtype(dtype).name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard_rows, *row_shape]}},
        "chunk_key_encoding": {"name": "default"},
        "fill_value": 0,
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [1, *row_shape],  # the read unit: one token's row
            "codecs": [_LITTLE],
            "index_codecs": [_LITTLE, {"name": "crc32c"}],
            "index_location": "end"}}],
    }


def checksums_metadata(V: int, columns: int, shard_rows: int) -> dict:
    """zarr3 metadata of the `checksums` array: one chunk (file) per shard, with a crc32c of its own."""
    return {
        "shape": [V, columns],
        "data_type": "uint32",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard_rows, columns]}},
        "chunk_key_encoding": {"name": "default"},
        "fill_value": 0,
        "codecs": [_LITTLE, {"name": "crc32c"}],
    }


def stored_metadata(name: str, V: int, row_shape: tuple, dtype: np.dtype, shard_rows: int) -> dict:
    if name == CHECKSUMS:
        return checksums_metadata(V, row_shape[0], shard_rows)
    return array_metadata(V, row_shape, dtype, shard_rows)


def _normal_codecs(codecs: list, one_byte: bool = False) -> list:
    """A zarr3 codec chain with defaults spelled out, to compare what a table holds with what this format says
    (one_byte: the values are single bytes, whose `bytes` codec needs no endianness)."""
    out = []
    for c in codecs or []:
        conf = dict(c.get("configuration") or {})
        if c.get("name") == "sharding_indexed":
            conf.setdefault("index_location", "end")
            conf["codecs"] = _normal_codecs(conf.get("codecs"), one_byte)
            conf["index_codecs"] = _normal_codecs(conf.get("index_codecs"))
        elif c.get("name") == "bytes" and one_byte:
            conf.pop("endian", None)
        out.append({"name": c.get("name"), **conf})
    return out


def metadata_problem(found: dict, want: dict) -> str | None:
    """How a stored array's zarr.json differs from this format's (None: it does not)."""
    for key in ("shape", "data_type", "chunk_grid", "chunk_key_encoding"):
        if found.get(key) != want[key]:
            return f"its {key} is {json.dumps(found.get(key))}, expected {json.dumps(want[key])}"
    one_byte = want["data_type"] in ("int8", "uint8")
    if _normal_codecs(found.get("codecs"), one_byte) != _normal_codecs(want["codecs"], one_byte):
        return (f"its codecs are {json.dumps(found.get('codecs'))}, not format version {FORMAT_VERSION}'s "
                f"{json.dumps(want['codecs'])}")
    return None


def shard_key(name: str, i: int, row_shape: tuple) -> str:
    """The key of shard i of stored array `name`: zarr3 default chunk keys; the row dims are never split."""
    return f"{name}/c/{i}" + "/0" * len(row_shape)


def index_nbytes(shard_rows: int) -> int:
    """Bytes of a shard index (at the end of every shard file of a row array)."""
    return shard_rows * INDEX_ENTRY_BYTES + INDEX_CRC_BYTES


def shard_file_nbytes(rows: int, row_nbytes: int, shard_rows: int) -> int:
    """The exact size of a shard file of `rows` rows: the rows, then the index."""
    return rows * row_nbytes + index_nbytes(shard_rows)


def index_problem(index: bytes, rows: int, row_nbytes: int, shard_rows: int) -> str | None:
    """Why a shard index (the file's last index_nbytes(shard_rows) bytes) does not say "rows 0..rows-1 raw, in
    order, from offset 0" (None: it does). Rows past the vocabulary (the last shard) are absent entries."""
    if len(index) != index_nbytes(shard_rows):
        return f"its index is {len(index)} bytes, expected {index_nbytes(shard_rows)}"
    body = memoryview(index)[:-INDEX_CRC_BYTES]
    if crc32c.crc32c(body) != int.from_bytes(index[-INDEX_CRC_BYTES:], "little"):
        return "its index does not match its checksum"
    entries = np.frombuffer(body, "<u8").reshape(shard_rows, 2)
    want = np.full((shard_rows, 2), MISSING_ENTRY, np.uint64)
    want[:rows, 0] = np.arange(rows, dtype=np.uint64) * np.uint64(row_nbytes)
    want[:rows, 1] = row_nbytes
    bad = np.flatnonzero(np.any(entries != want, axis=1))
    if bad.size:
        j = int(bad[0])
        return (f"its index puts row {j} at (offset {int(entries[j, 0])}, {int(entries[j, 1])} bytes), not at "
                f"({int(want[j, 0])}, {int(want[j, 1])}): not raw rows in row order")
    return None


def _shards_of(kv: ts.KvStore, name: str, row_shape: tuple) -> set[int]:
    prefix, tail = f"{name}/c/", "/0" * len(row_shape)
    found = set()
    for k in kv.list(ts.KvStore.KeyRange(prefix, prefix[:-1] + "0")).result():
        k = k.decode()
        if k.endswith(tail) and k[len(prefix):-len(tail)].isdigit():
            found.add(int(k[len(prefix):-len(tail)]))
    return found


def stored_shards(kv: ts.KvStore, arrays: dict) -> set[int]:
    """Indices of the shards present in every stored array (`arrays`: table_arrays(...)). A shard key exists only
    once its write finished (the kvstore writes to a temporary name and renames), so this is the set of durable
    shards."""
    found = [_shards_of(kv, name, shape) for name, (shape, _) in arrays.items()]
    return set.intersection(*found) if found else set()


def missing_shards(kv: ts.KvStore, arrays: dict, num_shards: int) -> list[tuple[int, str]]:
    """(shard index, key) of every shard file absent from the store, in shard order: one listing per array."""
    present = {name: _shards_of(kv, name, shape) for name, (shape, _) in arrays.items()}
    return [(i, shard_key(name, i, shape)) for i in range(num_shards)
            for name, (shape, _) in arrays.items() if i not in present[name]]


def error_text(e: Exception) -> str:
    """A Tensorstore error as one short line (without the source locations it appends)."""
    return " ".join(str(e).split(" [source locations=")[0].split())


def check_row_ids(ids, V: int) -> np.ndarray:
    """Token ids as a 1-D int64 array, or a MoleError naming what is wrong with them."""
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise MoleError(f"row ids must be integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise MoleError(f"row ids must be a 1-D sequence, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= V):
        bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
        raise MoleError(f"row id {bad} is outside the table's vocabulary [0, {V})")
    return arr.astype(np.int64)


# Checksums --------------------------------------------------------------------------------------------------------
_GIL_FREE_ROW_BYTES = 4096  # rows at least this long are checksummed with the GIL released (threads overlap)
_POOL: ThreadPoolExecutor | None = None


def workers() -> int:
    """Threads for checksumming: the CPUs this process may run on (at most 16)."""
    return max(1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(workers(), thread_name_prefix="mole-jax-crc")
    return _POOL


def row_checksums(rows: np.ndarray, release_gil: bool = False) -> np.ndarray:
    """uint32 [R]: the crc32c of each row's bytes (rows: any array with the rows first, C-contiguous or not).
    release_gil: let other threads run while long rows are checksummed (for threads over many rows; a few rows
    are faster without)."""
    a = np.ascontiguousarray(rows)
    n = len(a)
    if n == 0:
        return np.zeros(0, np.uint32)
    flat = a.reshape(n, a.size // n).view(np.uint8)
    mode = 1 if release_gil and flat.shape[1] >= _GIL_FREE_ROW_BYTES else 0
    f = crc32c.crc32c
    return np.array([f(r, 0, mode) for r in flat], np.uint32)


def row_checksums_parallel(rows: np.ndarray, chunk_bytes: int = 8 << 20) -> np.ndarray:
    """row_checksums over threads, for many rows (whole arrays)."""
    a = np.ascontiguousarray(rows)
    n = len(a)
    step = max(1, chunk_bytes // max(1, a.nbytes // max(n, 1)))
    if n <= step or workers() == 1:
        return row_checksums(a)
    parts = list(_pool().map(lambda s: row_checksums(a[s:s + step], True), range(0, n, step)))
    return np.concatenate(parts)


def _read_exactly(fd: int, into: memoryview, offset: int) -> None:
    """Fill `into` from the file at `offset` (preadv until full: a read may return less than asked)."""
    done = 0
    while done < len(into):
        n = os.preadv(fd, [into[done:]], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"the file ended {len(into) - done:,} bytes early")
        done += n


# Memory mapping (Linux) --------------------------------------------------------------------------------------------
_MAP_FIXED, _MAP_NORESERVE = 0x10, 0x4000
_MADV_DONTNEED = 4
_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                             ctypes.c_int64]
        lib.munmap.restype = ctypes.c_int
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.madvise.restype = ctypes.c_int
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _LIBC = lib
    return _LIBC


class FileMapping:
    """One reserved range of virtual memory (an anonymous PROT_NONE mapping) into which files are mapped
    read-only and shared (MAP_FIXED at chosen offsets); unmapped as a whole once nothing refers to it. `array`
    gives a read-only numpy view of the range that keeps the mapping alive (as do all views of it)."""

    def __init__(self, nbytes: int):
        self.size = max(-(-nbytes // mmap.PAGESIZE), 1) * mmap.PAGESIZE
        self.address = 0
        self._munmap = _libc().munmap  # held: at interpreter exit the module's globals may be gone before __del__
        addr = _libc().mmap(None, self.size, 0,  # PROT_NONE
                            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            e = ctypes.get_errno()
            raise OSError(e, f"cannot reserve {nbytes:,} bytes of address space: {os.strerror(e)}")
        self.address = addr

    def map_file(self, offset: int, path, length: int) -> None:
        """Map the first `length` bytes of the file at `path` at offset `offset` (a page multiple) of the range."""
        if length <= 0:
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = _libc().mmap(self.address + offset, length, mmap.PROT_READ, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
        finally:
            os.close(fd)  # the mapping keeps the file
        if addr != self.address + offset:
            e = ctypes.get_errno()
            raise OSError(e, f"cannot map {path}: {os.strerror(e)}")

    def advise(self, offset: int, length: int, advice: int) -> bool:
        """madvise on a part of the range (page-aligned offset); False where the kernel refuses (old kernels)."""
        if length <= 0:
            return True
        return _libc().madvise(self.address + offset, length, advice) == 0

    def array(self, dtype: np.dtype, shape: tuple) -> np.ndarray:
        """A read-only numpy array of this dtype and shape at the start of the range (the array holds the
        mapping: it is unmapped only once the array and every view of it are gone)."""
        buf = (ctypes.c_char * self.size).from_address(self.address)
        buf._mole_jax_mapping = self  # the ctypes buffer keeps the mapping; the memoryview keeps the buffer
        count = math.prod(shape) * np.dtype(dtype).itemsize
        return np.frombuffer(memoryview(buf).toreadonly(), np.uint8, count).view(dtype).reshape(shape)

    def close(self) -> None:
        if self.address:
            self._munmap(self.address, self.size)
            self.address = 0

    def __del__(self):
        self.close()


# Reading --------------------------------------------------------------------------------------------------------
def _existing_meta(spec: ts.KvStore.Spec, where) -> tuple[ts.KvStore, dict | None]:
    """The kvstore of a table location and its metadata (None: no lut.json); a missing directory raises."""
    local = local_dir(spec)
    if local is not None and not local.is_dir():
        raise MoleError(f"lookup table not found: {where} does not exist")
    kv = open_kvstore(spec)
    return kv, read_meta(kv, where)


def read_info(lut_dir) -> dict:
    """A table's description (complete or not): lut.json plus location, bytes and shards present."""
    spec = kvstore_spec(lut_dir)
    where = describe(spec)
    kv, meta = _existing_meta(spec, where)
    if meta is None:
        raise MoleError(f"{where} is not a mole-jax lookup table (no {META_KEY})")
    check_version(meta, where)
    cfg, layout = layout_from_meta(meta)
    V = cfg.vocab_size
    num_shards = -(-V // meta["shard_rows"])
    arrays = table_arrays(layout, meta.get("checksum", True))
    return {**meta, "location": str(where), "shape": [V, layout.L, layout.N, layout.D],
            "row_nbytes": layout.row_nbytes, "nbytes": V * layout.row_nbytes, "num_shards": num_shards,
            "shards_written": len(stored_shards(kv, arrays)), "fp16_nbytes": V * layout.L * layout.N * layout.D * 2}


class LookupTable:
    """A complete table, opened for reading. `read_stored` goes straight to Tensorstore: one batched integer-array
    read per stored array, with a cache pool holding shard indexes and recently read rows; each row read is
    verified against its crc32c in the `checksums` array (loaded shard by shard as rows of a shard are first read,
    then kept: 4 bytes per row and array). `read_all_stored` and `check_shard` read the shard files whole and
    check them themselves; `mapped_stored` gives the rows of a local table as memory-mapped numpy arrays. A
    failed read names the shard it failed in."""

    def __init__(self, spec: ts.KvStore.Spec, meta: dict, cache_bytes: int):
        self.path = describe(spec)
        self.meta = meta
        self.config, self.layout = layout_from_meta(meta)
        self.scheme: str = meta["scheme"]
        self.block: int = meta["block"]
        self.fingerprint: str = meta["fingerprint"]
        self.shape = (self.config.vocab_size, self.layout.L, self.layout.N, self.layout.D)
        self.row_nbytes: int = self.layout.row_nbytes
        self.nbytes: int = self.shape[0] * self.row_nbytes
        self.shard_rows: int = meta["shard_rows"]
        self.num_shards = -(-self.shape[0] // self.shard_rows)
        self.checksummed = bool(meta.get("checksum", True))
        self.arrays = table_arrays(self.layout, self.checksummed)  # every stored array, checksums included
        self._spec = spec
        self._kv = open_kvstore(spec)
        self._arrays = self._open_arrays(spec, cache_bytes)  # the rows' arrays (payload, scales)
        self._sums_array = self._arrays.pop(CHECKSUMS, None)
        self._sums = np.zeros((self.shape[0], len(self.layout.arrays)), np.uint32)
        self._sums_loaded = np.zeros(self.num_shards, bool)
        self._all_sums_loaded = False

    def _open_arrays(self, spec: ts.KvStore.Spec, cache_bytes: int) -> dict:
        context = ts.Context({"cache_pool": {"total_bytes_limit": cache_bytes}}, CONTEXT)
        V = self.shape[0]
        for name, (shape, dt) in self.arrays.items():
            key = f"{name}/zarr.json"
            try:
                r = self._kv.read(key).result()
                found = json.loads(bytes(r.value)) if r.state == "value" else None
            except (ValueError, json.JSONDecodeError) as e:
                raise MoleError(f"table {self.path} is damaged: {key}: {error_text(e)}") from None
            if found is None:
                raise MoleError(f"table {self.path} is damaged: {key} is missing")
            problem = metadata_problem(found, stored_metadata(name, V, shape, dt, self.shard_rows))
            if problem:
                raise MoleError(f"table {self.path} is damaged: {key} does not describe format version "
                                f"{FORMAT_VERSION}'s {name} array: {problem}")
        try:
            arrays = {name: ts.open(array_spec(spec, name), read=True, context=context,
                                    recheck_cached_data="open", recheck_cached_metadata="open").result()
                      for name in self.arrays}
        except ValueError as e:
            raise MoleError(f"table {self.path} is damaged: {error_text(e)}") from None
        for name, (shape, dt) in self.arrays.items():
            a = arrays[name]
            if tuple(a.shape) != (V, *shape) or np.dtype(a.dtype.numpy_dtype) != dt:
                raise MoleError(f"table {self.path} is damaged: array {name} is {a.dtype} {a.shape}, "
                                f"expected {dt} {(V, *shape)}")
        return arrays

    def __repr__(self):
        return f"LookupTable({self.path}, {self.scheme}, shape={self.shape}, {self.nbytes / 2**30:.3f} GiB)"

    def shard_range(self, i: int) -> tuple[int, int]:
        return i * self.shard_rows, min((i + 1) * self.shard_rows, self.shape[0])

    def _where(self, name: str, i: int) -> str:
        """How errors name shard i of stored array `name`."""
        start, stop = self.shard_range(i)
        return f"shard {i} ({shard_key(name, i, self.arrays[name][0])}, rows {start}..{stop - 1})"

    # Rows through Tensorstore ---------------------------------------------------------------------------------
    def read_stored(self, ids) -> dict[str, np.ndarray]:
        """The stored arrays (payload, scales...) of these rows, each with leading dim len(ids): what decoding
        transfers. Any order, duplicates allowed. Every row is verified against its checksum."""
        ids = check_row_ids(ids, self.shape[0])
        try:
            with ts.Batch() as batch:
                futures = {name: a[ids].read(batch=batch) for name, a in self._arrays.items()}
                sums = {} if self._all_sums_loaded else self._sums_futures(np.unique(ids // self.shard_rows), batch)
            out = {name: f.result() for name, f in futures.items()}
        except ValueError as e:
            raise MoleError(f"reading rows of {self.path} failed: {self._first_damage(ids, e)}") from None
        line = self._store_sums(sums) or self._check_rows(ids, out, parallel=False)
        if line:
            raise MoleError(f"reading rows of {self.path} failed: {line}")
        return out

    def rows(self, ids) -> np.ndarray:
        """float32 [len(ids), L, N, D]: the routed experts' outputs for these token ids, dequantised."""
        return schemes.dequantize(self.read_stored(ids), self.scheme, np)

    def read_all_stored(self) -> dict[str, np.ndarray]:
        """The whole table's stored arrays in host memory, every row verified against its checksum. The shard
        files are read whole (mapped, for a local table) and their rows copied out, each file checked as
        `check_shard` does (size, index saying raw rows in order), threads over the shards."""
        line = self._store_sums(self._sums_futures(np.arange(self.num_shards), None))
        if line:
            raise MoleError(f"reading {self.path} failed: {line}")
        out = {name: np.empty((self.shape[0], *shape), dt) for name, (shape, dt) in self.layout.arrays.items()}
        sums = self._sums if self._sums_array is not None else None

        def shard(i: int, parallel: bool) -> str | None:
            start, stop = self.shard_range(i)
            for col, name in enumerate(self.layout.arrays):
                line = self._check_file(name, i, None if sums is None else sums[start:stop, col],
                                        out[name][start:stop], parallel)
                if line:
                    return line
            return None

        line = self._first_line(shard)
        if line:
            raise MoleError(f"reading {self.path} failed: {line}")
        return out

    def _first_line(self, shard) -> str | None:
        """shard(i, parallel) over every shard, threads over the shards when there are several (else threads
        inside the shard: parallel=True); the first shard's line that is not None."""
        if self.num_shards >= 2 and workers() > 1:
            lines = _pool().map(lambda i: shard(i, False), range(self.num_shards))
        else:
            lines = (shard(i, True) for i in range(self.num_shards))
        return next((line for line in lines if line), None)

    def _shard_file(self, name: str, i: int):
        """Shard i's file of row array `name` whole: (buffer, mapping to close or None), mapped read-only for a
        local table and read from the kvstore otherwise; or a str saying why it cannot be had."""
        key = shard_key(name, i, self.arrays[name][0])
        local = local_dir(self._spec)
        if local is None:
            try:
                r = self._kv.read(key).result()
            except ValueError as e:
                return error_text(e)
            return (r.value, None) if r.state == "value" else "missing"
        try:
            with open(local / key, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if not size:
                    return b"", None
                m = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        except FileNotFoundError:
            return "missing"
        except OSError as e:
            return e.strerror or str(e)
        return m, m

    def _check_file(self, name: str, i: int, sums: np.ndarray | None, into: np.ndarray | None,
                    parallel: bool) -> str | None:
        """Check shard i's file of row array `name` as stored: its exact size, its index saying raw rows in row
        order from offset 0, and (given their checksums) every row's crc32c; copy its rows into `into` (the
        shard's rows of an output array) if given. One line naming the shard and the problem, or None."""
        where = self._where(name, i)
        got = self._shard_file(name, i)
        if isinstance(got, str):
            return f"{where}: {got}"
        data, mapping = got
        try:
            problem = self._check_buffer(data, name, i, sums, into, parallel)
        finally:
            if mapping is not None:
                try:
                    mapping.close()
                except BufferError:  # a view still alive (an exception's traceback): unmapped when it goes
                    pass
        return f"{where}: {problem}" if problem else None

    def _check_buffer(self, data, name: str, i: int, sums, into, parallel: bool) -> str | None:
        start, stop = self.shard_range(i)
        n, S = stop - start, self.shard_rows
        rb = array_row_nbytes(*self.layout.arrays[name])
        size, want = len(data), shard_file_nbytes(n, rb, S)
        if size != want:
            return f"the file is {size:,} bytes, expected {want:,}"
        problem = index_problem(bytes(data[size - index_nbytes(S):]), n, rb, S)
        if problem:
            return problem
        rows = np.frombuffer(data, np.uint8, n * rb).reshape(n, rb)
        if into is not None:
            copy = into.reshape(n, -1).view(np.uint8)
            np.copyto(copy, rows)
            rows = copy
        if sums is not None:
            got = row_checksums_parallel(rows) if parallel else row_checksums(rows, True)
            bad = np.flatnonzero(got != sums)
            if bad.size:
                return f"row {start + int(bad[0])} does not match its checksum"
        return None

    def _sums_futures(self, shards: np.ndarray, batch) -> dict[int, ts.Future]:
        """Start reading the checksums of those of these shards not loaded yet."""
        if self._sums_array is None or self._all_sums_loaded:
            return {}
        need = shards[~self._sums_loaded[shards]]
        return {int(i): self._sums_array[slice(*self.shard_range(int(i)))].read(batch=batch) for i in need}

    def _store_sums(self, futures: dict[int, ts.Future]) -> str | None:
        """Keep the checksums read; a line naming the first shard whose checksums cannot be read, else None."""
        for i, f in sorted(futures.items()):
            try:
                values = f.result()
            except ValueError as e:
                return f"{self._where(CHECKSUMS, i)}: {error_text(e)}"
            self._sums[slice(*self.shard_range(i))] = values
            self._sums_loaded[i] = True
        self._all_sums_loaded = bool(self._sums_loaded.all())
        return None

    def _check_rows(self, ids: np.ndarray, stored: dict, parallel: bool) -> str | None:
        """A line naming the first row (lowest id) that differs from its checksum, with its shard; None if none
        does. The checksums of the ids' shards must be loaded."""
        if self._sums_array is None or not len(ids):
            return None
        want = self._sums[ids]
        for col, name in enumerate(self.layout.arrays):
            got = (row_checksums_parallel if parallel else row_checksums)(stored[name])
            bad = ids[got != want[:, col]]
            if bad.size:
                v = int(bad.min())
                return f"{self._where(name, v // self.shard_rows)}: row {v} does not match its checksum"
        return None

    def error_bound(self, x_RxLxNxD: np.ndarray) -> np.ndarray:
        return schemes.error_bound(x_RxLxNxD, self.scheme, self.block)

    # Whole shards: `lut verify`, error attribution, structure ---------------------------------------------------
    def check_shard(self, i: int) -> str | None:
        """Read every file of shard i from storage and check it: each row array's file of its exact size, its
        index saying raw rows in row order (what mapping needs), every row's crc32c against the `checksums` array
        (whose own chunk has a crc32c). None if all is well, else one line naming the shard and what is wrong
        with it."""
        start, stop = self.shard_range(i)
        sums = None
        if self._sums_array is not None:
            try:
                r = self._kv.read(shard_key(CHECKSUMS, i, self.arrays[CHECKSUMS][0])).result()
                if r.state != "value":
                    return f"{self._where(CHECKSUMS, i)}: missing"
                sums = self._sums_array[start:stop].read().result()
            except ValueError as e:
                return f"{self._where(CHECKSUMS, i)}: {error_text(e)}"
        for col, name in enumerate(self.layout.arrays):
            line = self._check_file(name, i, None if sums is None else sums[:, col], None, True)
            if line:
                return line
        return None

    def structure_problem(self, i: int) -> str | None:
        """Shard i's row files without reading their rows: present, of their exact size (local tables), and
        their indexes saying raw rows in row order from offset 0. One line naming what is wrong, else None."""
        start, stop = self.shard_range(i)
        n, S = stop - start, self.shard_rows
        local = local_dir(self._spec)
        for name, (shape, dt) in self.layout.arrays.items():
            where, rb, key = self._where(name, i), array_row_nbytes(shape, dt), shard_key(name, i, shape)
            if local is not None:
                try:
                    with open(local / key, "rb") as f:
                        size, want = os.fstat(f.fileno()).st_size, shard_file_nbytes(n, rb, S)
                        if size != want:
                            return f"{where}: the file is {size:,} bytes, expected {want:,}"
                        index = os.pread(f.fileno(), index_nbytes(S), size - index_nbytes(S))
                except FileNotFoundError:
                    return f"{where}: missing"
                except OSError as e:
                    return f"{where}: {e.strerror}"
            else:
                try:
                    r = self._kv.read(key, byte_range=slice(-index_nbytes(S), None)).result()
                except ValueError as e:
                    return f"{where}: {error_text(e)}"
                if r.state != "value":
                    return f"{where}: missing"
                index = r.value
            problem = index_problem(index, n, rb, S)
            if problem:
                return f"{where}: {problem}"
        return None

    def check_structure(self) -> str | None:
        """structure_problem of every shard: the first problem, or None."""
        for i in range(self.num_shards):
            line = self.structure_problem(i)
            if line:
                return line
        return None

    def missing_shards(self) -> list[tuple[int, str]]:
        """(shard index, key) of every shard file absent from storage (one listing per stored array)."""
        return missing_shards(self._kv, self.arrays, self.num_shards)

    def _first_damage(self, ids: np.ndarray, e: Exception) -> str:
        """Why a read of these ids failed: the first of their shards that fails to read on its own."""
        for i in np.unique(ids // self.shard_rows).tolist():
            line = self.check_shard(i)
            if line:
                return line
        return error_text(e)  # a failure that rereading does not reproduce (transient storage error)

    # The whole table, read sequentially ------------------------------------------------------------------------
    def read_all_into(self, alloc) -> dict[str, np.ndarray]:
        """The whole table's stored arrays, each read into `alloc(shape, dtype)` (e.g. a page-aligned buffer) at
        the disk's sequential rate: a local table's shard files are read in order, in pieces of SEQUENTIAL_PIECE
        bytes (`os.preadv` straight into the buffer: one kernel copy, no mapping, no second pass), and each piece's
        rows are checked against their crc32c by a thread while the next piece is read. First the files' presence,
        sizes and indexes are checked (`check_structure`); a table on another kvstore is read with
        `read_all_stored` and copied. Raises MoleError naming the first damaged shard."""
        local = local_dir(self._spec)
        if local is None:
            out = {}
            for name, src in self.read_all_stored().items():
                out[name] = alloc(src.shape, src.dtype)
                out[name][...] = src
            return out
        missing = self.missing_shards()
        if missing:
            raise MoleError(f"table {self.path} is not whole: shard file {missing[0][1]} is missing")
        line = self.check_structure() or self._store_sums(self._sums_futures(np.arange(self.num_shards), None))
        if line:
            raise MoleError(f"reading {self.path} failed: {line}")
        sums = self._sums if self._sums_array is not None else None
        out, checks = {}, []
        try:
            for col, (name, (shape, dt)) in enumerate(self.layout.arrays.items()):
                dst = out[name] = alloc((self.shape[0], *shape), dt)
                rb = array_row_nbytes(shape, dt)
                bytes_RxW = dst.reshape(self.shape[0], -1).view(np.uint8)
                per_piece = max(1, SEQUENTIAL_PIECE // rb)
                for i in range(self.num_shards):
                    start, stop = self.shard_range(i)
                    fd = os.open(local / shard_key(name, i, shape), os.O_RDONLY)
                    try:
                        if hasattr(os, "posix_fadvise"):
                            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger readahead window
                        for a in range(start, stop, per_piece):
                            b = min(a + per_piece, stop)
                            piece = bytes_RxW[a:b]
                            _read_exactly(fd, memoryview(piece).cast("B"), (a - start) * rb)
                            if sums is not None:
                                checks.append((name, a, _pool().submit(row_checksums, piece, True), col))
                            while checks and (checks[0][2].done() or len(checks) > 2 * workers()):
                                self._raise_bad(*checks.pop(0))
                    finally:
                        os.close(fd)
            while checks:
                self._raise_bad(*checks.pop(0))
        except OSError as e:
            raise MoleError(f"reading {self.path} failed: {e.strerror or e}") from None
        return out

    def _raise_bad(self, name: str, start: int, future, col: int) -> None:
        """Raise MoleError naming the first row of a piece (from row `start`) whose crc32c is not its own."""
        got = future.result()
        bad = np.flatnonzero(got != self._sums[start:start + len(got), col])
        if bad.size:
            v = start + int(bad[0])
            raise MoleError(f"reading {self.path} failed: {self._where(name, v // self.shard_rows)}: row {v} does "
                            "not match its checksum")

    # Rows memory-mapped ---------------------------------------------------------------------------------------
    def mapped_stored(self, verify: bool = True) -> dict[str, np.ndarray]:
        """Each stored array (payload, scales...) as one read-only numpy array [V, *row shape] of its stored
        dtype whose memory is the table's files, mapped (Linux, a table in a local directory): shard file i of an
        array is mapped at row i * shard_rows of one reserved range, so nothing is read until rows are used and
        `jax.device_put` on the CPU backend aliases it. The arrays hold their mappings (unmapped when the last
        view of them goes); the files must not change while mapped.

        Checks first that every shard file is present, of its exact size, and holds raw rows in row order (its
        index), else raises MoleError naming the shard. verify=True also reads every row once and checks its
        crc32c (threads over the rows; the pages are released from this process afterwards, they stay in the page
        cache); verify=False skips that, for a table already checked with `mole-jax lut verify`. A table on
        another kvstore (memory://, gs://...) raises MoleError: it cannot be mapped."""
        local = local_dir(self._spec)
        if local is None:
            driver = self._spec.to_json().get("driver", "?")
            raise MoleError(f"table {self.path} cannot be memory-mapped: it is on a {driver!r} kvstore, and only a "
                            "table in a local directory can be (read its rows with read_stored or read_all_stored)")
        if not sys.platform.startswith("linux") or sys.byteorder != "little":
            raise MoleError(f"table {self.path} cannot be memory-mapped here: mapping needs little-endian Linux")
        V = self.shape[0]
        problem = shard_rows_problem(self.layout, V, self.shard_rows, mmap.PAGESIZE)
        if problem:
            raise MoleError(f"table {self.path} cannot be memory-mapped on this machine: {problem}")
        missing = self.missing_shards()
        if missing:
            raise MoleError(f"table {self.path} is not whole: shard file {missing[0][1]} is missing")
        line = self.check_structure()
        if line:
            raise MoleError(f"table {self.path} is damaged: {line}")
        mappings, out = {}, {}
        try:
            for name, (shape, dt) in self.layout.arrays.items():
                rb = array_row_nbytes(shape, dt)
                m = mappings[name] = FileMapping(V * rb)
                for i in range(self.num_shards):
                    start, stop = self.shard_range(i)
                    m.map_file(start * rb, local / shard_key(name, i, shape), (stop - start) * rb)
                out[name] = m.array(dt, (V, *shape))
        except OSError as e:
            raise MoleError(f"cannot memory-map table {self.path}: {e.strerror or e}") from None
        if verify and self._sums_array is not None:
            line = self._verify_mapped(out, mappings)
            if line:
                raise MoleError(f"table {self.path} is damaged: {line}")
        return out

    def _verify_mapped(self, arrays: dict[str, np.ndarray], mappings: dict[str, FileMapping]) -> str | None:
        """Every row of the mapped arrays against its checksum, in pieces of ~8 MiB over threads; each piece is
        released after (MADV_DONTNEED: its pages leave this process's resident set, not the page cache). The
        first bad row's line, or None."""
        line = self._store_sums(self._sums_futures(np.arange(self.num_shards), None))
        if line:
            return line
        V, unit = self.shape[0], page_rows(self.layout, mmap.PAGESIZE)
        step = max(unit, (8 << 20) // max(1, self.row_nbytes) // unit * unit)
        sizes = {name: array_row_nbytes(*self.layout.arrays[name]) for name in arrays}

        def piece(start: int) -> str | None:
            stop = min(start + step, V)
            for col, (name, a) in enumerate(arrays.items()):
                rb, m = sizes[name], mappings[name]
                got = row_checksums(a[start:stop], True)
                m.advise(start * rb, (stop - start) * rb, _MADV_DONTNEED)
                bad = np.flatnonzero(got != self._sums[start:stop, col])
                if bad.size:
                    v = start + int(bad[0])
                    return f"{self._where(name, v // self.shard_rows)}: row {v} does not match its checksum"
            return None

        return next((r for r in _pool().map(piece, range(0, V, step)) if r), None)


def open_lut(lut_dir, *, expect_fingerprint: str | None = None, cache_bytes: int = READ_CACHE_BYTES,
             allow_missing: bool = False) -> LookupTable:
    """Open a complete, whole table. Raises MoleError for a missing location, something that is not a table, an
    unknown format version (version 2: with the command that upgrades it), an incomplete table (an interrupted
    conversion: rerun it), a stored array whose zarr.json is not this format's, a shard file missing (an
    incomplete copy; allow_missing=True skips this check, for `lut verify` to report every one), and, given
    `expect_fingerprint`, a table built from other parameters."""
    spec = kvstore_spec(lut_dir)
    where = describe(spec)
    _, meta = _existing_meta(spec, where)
    if meta is None:
        local = local_dir(spec)
        hint = " (a run directory? its table is RUN_DIR/lut)" if local and (local / "lut" / META_KEY).is_file() else ""
        raise MoleError(f"{where} is not a mole-jax lookup table (no {META_KEY}){hint}")
    check_version(meta, where)
    if not meta.get("complete"):
        raise MoleError(f"table {where} is incomplete (its conversion was interrupted or failed verification); "
                        "rerun the same `mole-jax convert` command to finish it")
    if expect_fingerprint is not None and meta["fingerprint"] != expect_fingerprint:
        raise MoleError(f"table {where} was built from different parameters (fingerprint "
                        f"{meta['fingerprint'][:12]}, expected {expect_fingerprint[:12]})")
    table = LookupTable(spec, meta, cache_bytes)
    missing = [] if allow_missing else table.missing_shards()
    if missing:
        raise MoleError(f"table {where} is not whole: shard file {missing[0][1]} is missing ({len(missing)} of "
                        f"{table.num_shards * len(table.arrays)} missing; an interrupted copy?): copy it "
                        "again or reconvert it")
    return table
