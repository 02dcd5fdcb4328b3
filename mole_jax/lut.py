"""The MoLE lookup table on storage, for reading: format, locations, metadata, fingerprints, `open_lut(...).rows`.

A table is a directory (or any Tensorstore kvstore: `memory://`, `gs://bucket/path/`, `s3://...`) holding

    lut.json        metadata: format version, model config, fingerprint of the parameters it was built from,
                    scheme, quantisation block, shard rows, the stored arrays, the settings that produced the
                    bits, and `complete` (set only after a verification pass; a table without it refuses to open)
    payload/        zarr3 array, the values (or packed codes) of every row: [V, L, N, D] for float schemes
    scales/         zarr3 array, quantisation scales (int8, nf4, nf3 only)
    lut.lock        what a converter locks while it runs (lut_writer.TableLock; written by `convert` only)

Every stored array has the vocabulary as its first dimension, so one token id is one contiguous row over all
layers and experts (the authors' row-major [V, L*N*d] layout). The read chunk is one row; the write chunk is a
shard of `shard_rows` rows (zarr3 `sharding_indexed` codec), so a table is tens to hundreds of files, not V. No
compression: the payloads are floats or already-dense codes. A shard file appears only once fully written (the
kvstore writes a temporary file and renames it), so the set of shard files present *is* the conversion progress.

A table that opens is whole: `open_lut` lists the shard files once and refuses a table missing any (an
interrupted copy), naming the first; every row carries a crc32c that each read verifies (and every shard index
another), so a flipped byte raises an error naming its shard; a chunk missing inside a shard is an error, never
fill values, and all-zero rows are stored like any other. `LookupTable.check_shard` reads every chunk of a shard
(`mole-jax lut verify`). The schemes and their error bounds are in schemes.py; writing is lut_writer.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import tensorstore as ts

from mole_jax import schemes
from mole_jax.config import ModelConfig, MoleError
from mole_jax.schemes import Layout

FORMAT = "mole-jax-lut"
FORMAT_VERSION = 2  # 2: a crc32c per row, all-zero rows stored, missing chunks are errors (1: none of these)
META_KEY = "lut.json"
LOCK_KEY = "lut.lock"
READ_CACHE_BYTES = 64 << 20  # shard indexes and recently read rows (a complete table never changes)

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
    h = hashlib.sha256(b"mole-jax-lut-params/1\0")

    def add(name, value):
        a = np.ascontiguousarray(np.asarray(value), dtype="<f4")
        h.update(f"{name}{list(a.shape)}\0".encode())
        h.update(memoryview(a).cast("B"))

    add("embed_VxD", inputs["embed_VxD"])
    for l in sorted(inputs["blocks"], key=int):
        b = inputs["blocks"][l]
        add(f"blocks.{l}.norm_expert.scale_D", b["norm_expert"]["scale_D"])
        add(f"blocks.{l}.experts.w_up_NxDxF", b["experts"]["w_up_NxDxF"])
        add(f"blocks.{l}.experts.w_down_NxFxD", b["experts"]["w_down_NxFxD"])
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
    if v != FORMAT_VERSION:
        raise MoleError(f"table {where} has format version {v}; this mole-jax reads version {FORMAT_VERSION}")


def layout_from_meta(meta: dict) -> tuple[ModelConfig, Layout]:
    cfg = ModelConfig.from_dict(meta["model_config"])
    return cfg, Layout(meta["scheme"], cfg.num_layers, cfg.num_experts, cfg.d_model, meta["block"])


def array_spec(kv_spec: ts.KvStore.Spec, name: str) -> dict:
    """The Tensorstore spec of stored array `name` (payload, scales) of the table at kv_spec, for reading and
    writing alike: a missing chunk is an error, never fill values, and a chunk equal to the fill value (an
    all-zero row) is stored like any other, so that a whole table has every chunk."""
    return {"driver": "zarr3", "kvstore": (kv_spec / f"{name}/").to_json(), "fill_missing_data_reads": False,
            "store_data_equal_to_fill_value": True}


def array_metadata(V: int, row_shape: tuple, dtype: np.dtype, shard_rows: int, checksum: bool) -> dict:
    """zarr3 metadata of a stored array: one row per read chunk, `shard_rows` rows per shard file, a crc32c per
    row (checksum=False only to measure what it costs) and per shard index."""
    inner = [{"name": "bytes", "configuration": {"endian": "little"}}] + ([{"name": "crc32c"}] if checksum else [])
    return {
        "shape": [V, *row_shape],
        "data_type": dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard_rows, *row_shape]}},
        "chunk_key_encoding": {"name": "default"},
        "fill_value": 0,
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [1, *row_shape],  # the read unit: one token's row
            "codecs": inner,
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            "index_location": "end"}}],
    }


def shard_key(name: str, i: int, row_shape: tuple) -> str:
    """The key of shard i of stored array `name`: zarr3 default chunk keys; the row dims are never split."""
    return f"{name}/c/{i}" + "/0" * len(row_shape)


def _shards_of(kv: ts.KvStore, name: str, row_shape: tuple) -> set[int]:
    prefix, tail = f"{name}/c/", "/0" * len(row_shape)
    found = set()
    for k in kv.list(ts.KvStore.KeyRange(prefix, prefix[:-1] + "0")).result():
        k = k.decode()
        if k.endswith(tail) and k[len(prefix):-len(tail)].isdigit():
            found.add(int(k[len(prefix):-len(tail)]))
    return found


def stored_shards(kv: ts.KvStore, layout: Layout) -> set[int]:
    """Indices of the shards present in every stored array. A shard key exists only once its write finished (the
    kvstore writes to a temporary name and renames), so this is the set of durable shards."""
    found = [_shards_of(kv, name, shape) for name, (shape, _) in layout.arrays.items()]
    return set.intersection(*found) if found else set()


def missing_shards(kv: ts.KvStore, layout: Layout, num_shards: int) -> list[tuple[int, str]]:
    """(shard index, key) of every shard file absent from the store, in shard order: one listing per array."""
    present = {name: _shards_of(kv, name, shape) for name, (shape, _) in layout.arrays.items()}
    return [(i, shard_key(name, i, shape)) for i in range(num_shards)
            for name, (shape, _) in layout.arrays.items() if i not in present[name]]


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
    return {**meta, "location": str(where), "shape": [V, layout.L, layout.N, layout.D],
            "row_nbytes": layout.row_nbytes, "nbytes": V * layout.row_nbytes, "num_shards": num_shards,
            "shards_written": len(stored_shards(kv, layout)), "fp16_nbytes": V * layout.L * layout.N * layout.D * 2}


class LookupTable:
    """A complete table, opened for reading. Reads go straight to Tensorstore: one batched integer-array read per
    stored array, with a cache pool holding shard indexes and recently read rows. Every read verifies the rows'
    checksums; a failed read names the shard it failed in."""

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
        self._spec = spec
        self._arrays = self._open_arrays(spec, cache_bytes)

    def _open_arrays(self, spec: ts.KvStore.Spec, cache_bytes: int) -> dict:
        context = ts.Context({"cache_pool": {"total_bytes_limit": cache_bytes}}, CONTEXT)
        try:
            arrays = {name: ts.open(array_spec(spec, name), read=True, context=context,
                                    recheck_cached_data="open", recheck_cached_metadata="open").result()
                      for name in self.layout.arrays}
        except ValueError as e:
            raise MoleError(f"table {self.path} is damaged: {error_text(e)}") from None
        for name, (shape, dt) in self.layout.arrays.items():
            a = arrays[name]
            if tuple(a.shape) != (self.shape[0], *shape) or np.dtype(a.dtype.numpy_dtype) != dt:
                raise MoleError(f"table {self.path} is damaged: array {name} is {a.dtype} {a.shape}, "
                                f"expected {dt} {(self.shape[0], *shape)}")
        return arrays

    def __repr__(self):
        return f"LookupTable({self.path}, {self.scheme}, shape={self.shape}, {self.nbytes / 2**30:.3f} GiB)"

    def shard_range(self, i: int) -> tuple[int, int]:
        return i * self.shard_rows, min((i + 1) * self.shard_rows, self.shape[0])

    def read_stored(self, ids) -> dict[str, np.ndarray]:
        """The stored arrays (payload, scales...) of these rows, each with leading dim len(ids): what decoding
        transfers. Any order, duplicates allowed."""
        ids = check_row_ids(ids, self.shape[0])
        try:
            with ts.Batch() as batch:
                futures = {name: a[ids].read(batch=batch) for name, a in self._arrays.items()}
            return {name: f.result() for name, f in futures.items()}
        except ValueError as e:
            raise MoleError(f"reading rows of {self.path} failed: {self._first_damage(ids, e)}") from None

    def rows(self, ids) -> np.ndarray:
        """float32 [len(ids), L, N, D]: the routed experts' outputs for these token ids, dequantised."""
        return schemes.dequantize(self.read_stored(ids), self.scheme, np)

    def read_all_stored(self) -> dict[str, np.ndarray]:
        """The whole table's stored arrays in host memory."""
        try:
            futures = {name: a.read() for name, a in self._arrays.items()}
            return {name: f.result() for name, f in futures.items()}
        except ValueError as e:
            raise MoleError(f"reading {self.path} failed: "
                            f"{self._first_damage(np.arange(self.shape[0]), e)}") from None

    def error_bound(self, x_RxLxNxD: np.ndarray) -> np.ndarray:
        return schemes.error_bound(x_RxLxNxD, self.scheme, self.block)

    def check_shard(self, i: int) -> str | None:
        """Read every row of shard i of every stored array (each row's checksum verified): None if all is well,
        else one line naming the shard and what is wrong with it."""
        start, stop = self.shard_range(i)
        for name, (shape, _) in self.layout.arrays.items():
            try:
                self._arrays[name][start:stop].read().result()
            except ValueError as e:
                return f"shard {i} ({shard_key(name, i, shape)}, rows {start}..{stop - 1}): {error_text(e)}"
        return None

    def missing_shards(self) -> list[tuple[int, str]]:
        """(shard index, key) of every shard file absent from storage (one listing per stored array)."""
        return missing_shards(open_kvstore(self._spec), self.layout, self.num_shards)

    def _first_damage(self, ids: np.ndarray, e: Exception) -> str:
        """Why a read of these ids failed: the first of their shards that fails to read on its own."""
        for i in np.unique(ids // self.shard_rows).tolist():
            line = self.check_shard(i)
            if line:
                return line
        return error_text(e)  # a failure that rereading does not reproduce (transient storage error)


def open_lut(lut_dir, *, expect_fingerprint: str | None = None, cache_bytes: int = READ_CACHE_BYTES,
             allow_missing: bool = False) -> LookupTable:
    """Open a complete, whole table. Raises MoleError for a missing location, something that is not a table, an
    unknown format version, an incomplete table (an interrupted conversion: rerun it), a shard file missing (an
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
                        f"{table.num_shards * len(table.layout.arrays)} missing; an interrupted copy?): copy it "
                        "again or reconvert it")
    return table
