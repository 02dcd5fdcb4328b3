"""The MoLE lookup table on storage: format, quantisation, metadata, and `open_lut(...).rows(ids)`.

A table is a directory (or any Tensorstore kvstore: `memory://`, `gs://bucket/path/`, `s3://...`) holding

    lut.json        metadata: format version, model config, fingerprint of the parameters it was built from,
                    scheme, quantisation block, shard rows, the stored arrays, and `complete` (set only after a
                    verification pass; a table without it refuses to open)
    payload/        zarr3 array, the values (or packed codes) of every row: [V, L, N, D] for float schemes
    scales/         zarr3 array, quantisation scales (int8, nf4, nf3 only)

Every stored array has the vocabulary as its first dimension, so one token id is one contiguous row over all
layers and experts (the authors' row-major [V, L*N*d] layout). The read chunk is one row; the write chunk is a
shard of `shard_rows` rows (zarr3 `sharding_indexed` codec), so a table is tens to hundreds of files, not V. No
compression: the payloads are floats or already-dense codes. A shard file appears only once fully written (the
kvstore writes a temporary file and renames it), so the set of shard files present *is* the conversion progress.

Schemes (bytes per value, and the error bound that `error_bound` states and the tests check):
    float32   4 bytes    exact
    bfloat16  2 bytes    round-to-nearest: |err| <= 2^-8 |x| (+ subnormals)
    float16   2 bytes    round-to-nearest: |err| <= 2^-11 |x| + 2^-25
    int8      1 byte + a float32 scale per (row, layer, expert): code = round(127 x / absmax), |err| <= absmax / 254
    nf4       4 bits (two codes per byte) + a float32 scale (the absmax) per block of `block` values; the QLoRA
              NormalFloat code book; |err| <= 0.152 * block absmax (half the widest gap of the code book)
    nf3       3 bits (eight codes in three bytes) + a float16 scale per block; the NormalFloat construction with
              8 levels; |err| <= 0.233 * block absmax * (1 + 2^-10) (the scale is rounded up to float16)
Blocks never straddle two expert vectors: `block` divides D (nf4: even, nf3: a multiple of 8 so codes pack into
whole bytes). Defaults follow the paper's Table 8 (NF4 block 768, NF3 block 128): the largest such divisor of D
not above 768 (nf4) or 128 (nf3); at D = 768 these are the paper's blocks and the bytes are 25.3% and 19.5% of fp16.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from statistics import NormalDist
from typing import Callable

import ml_dtypes
import numpy as np
import tensorstore as ts

from mole_jax.config import ModelConfig, MoleError

FORMAT = "mole-jax-lut"
FORMAT_VERSION = 1
SCHEMES = ("float32", "bfloat16", "float16", "int8", "nf4", "nf3")
FLOAT_SCHEMES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "float16": np.dtype(np.float16)}
META_KEY = "lut.json"
NF_BITS = {"nf4": 4, "nf3": 3}
NF_PAPER_BLOCK = {"nf4": 768, "nf3": 128}  # mole.md section 5 (paper Table 8)
SHARD_TARGET_BYTES = 64 << 20  # stored bytes per shard file (default shard_rows)
READ_CACHE_BYTES = 64 << 20  # shard indexes and recently read rows (a complete table never changes)
# Recomputing a row in float32 with another batch shape may differ in the last bits; verification allows this
# much (relative to each expert vector's absmax) on top of the scheme's own bound.
VERIFY_RTOL = 1e-5


# NormalFloat code books ---------------------------------------------------------------------------------------
def nf_codebook(bits: int) -> np.ndarray:
    """QLoRA's NormalFloat levels for `bits` bits: 2^(b-1) positive and 2^(b-1) - 1 negative quantiles of N(0, 1)
    plus an exact zero, scaled to [-1, 1]. The outermost quantile is at `offset`, halfway between the centres of
    the end bins of 2^b - 1 and 2^b equal-probability bins (bits=4 gives QLoRA's NF4 table, offset 0.9677)."""
    n = 2 ** bits
    offset = 1 - 0.5 * (1 / (2 * (n - 1)) + 1 / (2 * n))
    inv = NormalDist().inv_cdf
    pos = [inv(p) for p in np.linspace(offset, 0.5, n // 2 + 1)[:-1]]
    neg = [-inv(p) for p in np.linspace(offset, 0.5, n // 2)[:-1]]
    levels = np.array(sorted(pos + [0.0] + neg))
    return (levels / levels.max()).astype(np.float32)


NF_CODEBOOK = {name: nf_codebook(bits) for name, bits in NF_BITS.items()}
# Codes are chosen by counting the midpoints below a value: the nearest level, in one vectorised search.
NF_MIDPOINTS = {name: ((cb[1:] + cb[:-1]) / 2).astype(np.float32) for name, cb in NF_CODEBOOK.items()}
NF_HALF_GAP = {name: float(np.max(np.diff(cb.astype(np.float64))) / 2) for name, cb in NF_CODEBOOK.items()}


# Stored layout --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    """What a scheme stores per token row: {array name: (shape after the vocabulary dim, dtype)}."""

    scheme: str
    L: int
    N: int
    D: int
    block: int  # values per scale: D for int8, the NF block for nf4/nf3, 0 for float schemes

    @property
    def arrays(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        L, N, D = self.L, self.N, self.D
        if self.scheme in FLOAT_SCHEMES:
            return {"payload": ((L, N, D), FLOAT_SCHEMES[self.scheme])}
        if self.scheme == "int8":
            return {"payload": ((L, N, D), np.dtype(np.int8)), "scales": ((L, N), np.dtype(np.float32))}
        bits, nb = NF_BITS[self.scheme], D // self.block
        scale_dtype = np.float16 if self.scheme == "nf3" else np.float32
        return {"payload": ((L, N, nb, self.block * bits // 8), np.dtype(np.uint8)),
                "scales": ((L, N, nb), np.dtype(scale_dtype))}

    @property
    def row_nbytes(self) -> int:
        return sum(math.prod(shape) * dt.itemsize for shape, dt in self.arrays.values())


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise MoleError(f"unknown table dtype {scheme!r}: choose one of {', '.join(SCHEMES)}")
    return scheme


def default_block(scheme: str, D: int) -> int:
    """The quantisation block of a scheme for width D (see the module docstring)."""
    check_scheme(scheme)
    if scheme in FLOAT_SCHEMES:
        return 0
    if scheme == "int8":
        return D
    multiple = 8 // math.gcd(8, NF_BITS[scheme])  # values that fill whole bytes: 2 for nf4, 8 for nf3
    fits = [b for b in range(multiple, min(D, NF_PAPER_BLOCK[scheme]) + 1, multiple) if D % b == 0]
    if not fits:
        raise MoleError(f"{scheme} packs {multiple} values per whole byte group, so it needs d_model divisible by "
                        f"{multiple}; this model has d_model {D} (use int8 or a float dtype)")
    return fits[-1]


def make_layout(scheme: str, cfg: ModelConfig, block: int | None = None) -> Layout:
    """The stored layout of `scheme` for this model; `block` overrides the nf4/nf3 default."""
    D = cfg.d_model
    if block is None:
        block = default_block(scheme, D)
    elif scheme not in NF_BITS:
        raise MoleError(f"{scheme} has no block size option (got block={block})")
    else:
        multiple = 8 // math.gcd(8, NF_BITS[scheme])
        if block <= 0 or D % block or block % multiple:
            raise MoleError(f"{scheme} block {block} must divide d_model {D} and be a multiple of {multiple}")
    return Layout(scheme, cfg.num_layers, cfg.num_experts, D, block)


# Quantisation: numpy or jax.numpy (`xp`), so conversion quantises on the accelerator and decoding dequantises
# there; the same operations give the same bits on either side.
def quantize(x_RxLxNxD, scheme: str, block: int = 0, xp=np) -> dict:
    """float rows [R, L, N, D] -> the stored arrays of `scheme` (see Layout.arrays), each with leading dim R."""
    x = x_RxLxNxD.astype(xp.float32)
    if scheme in FLOAT_SCHEMES:
        return {"payload": x.astype(FLOAT_SCHEMES[scheme])}
    if scheme == "int8":
        # times a float32 constant, not / 127: XLA turns division by a constant into this multiplication, and
        # numpy must give the same bits
        scale_RxLxN = xp.max(xp.abs(x), axis=-1) * xp.float32(1 / 127)
        safe = xp.where(scale_RxLxN > 0, scale_RxLxN, 1)
        q = xp.clip(xp.round(x / safe[..., None]), -127, 127).astype(xp.int8)
        return {"payload": q, "scales": scale_RxLxN}
    R, L, N, D = x.shape
    xb = x.reshape(R, L, N, D // block, block)
    absmax = xp.max(xp.abs(xb), axis=-1)
    if scheme == "nf3":  # float16 scales, rounded up so that every |x| / scale stays within [-1, 1]
        s16 = absmax.astype(xp.float16)
        scale = xp.where(s16.astype(xp.float32) < absmax, xp.nextafter(s16, xp.float16(np.inf)), s16)
    else:
        scale = absmax
    safe = xp.where(scale > 0, scale, 1).astype(xp.float32)
    y = xb / safe[..., None]
    codes = xp.searchsorted(xp.asarray(NF_MIDPOINTS[scheme]), y, side="left").astype(xp.uint8)
    return {"payload": _pack(codes, NF_BITS[scheme], xp), "scales": scale}


def dequantize(stored: dict, scheme: str, xp=np):
    """Stored arrays (from `read_stored`, `read_all_stored` or `quantize`) -> float32 rows [R, L, N, D].
    Works with xp=jax.numpy inside jax.jit, and gives exactly `LookupTable.rows`."""
    payload = stored["payload"]
    if scheme in FLOAT_SCHEMES:
        return payload.astype(xp.float32)
    if scheme == "int8":
        return payload.astype(xp.float32) * stored["scales"].astype(xp.float32)[..., None]
    check_scheme(scheme)
    R, L, N, nb, nbytes = payload.shape
    codes = _unpack(payload, NF_BITS[scheme], xp)
    values = xp.asarray(NF_CODEBOOK[scheme])[codes] * stored["scales"].astype(xp.float32)[..., None]
    return values.reshape(R, L, N, nb * codes.shape[-1])


def _pack(codes, bits: int, xp):
    """[..., block] codes < 2^bits -> [..., block * bits / 8] bytes, little-endian within each byte group."""
    *lead, block = codes.shape
    per = 8 // math.gcd(8, bits)  # codes per group: 2 (nf4) or 8 (nf3)
    groups = codes.reshape(*lead, block // per, per).astype(xp.uint32)
    word = groups[..., 0]
    for j in range(1, per):
        word = word | (groups[..., j] << (bits * j))
    nbytes = per * bits // 8  # 1 or 3
    out = xp.stack([(word >> (8 * k)) & 0xFF for k in range(nbytes)], axis=-1).astype(xp.uint8)
    return out.reshape(*lead, block * bits // 8)


def _unpack(packed, bits: int, xp):
    *lead, n = packed.shape
    per = 8 // math.gcd(8, bits)
    nbytes = per * bits // 8
    b = packed.reshape(*lead, n // nbytes, nbytes).astype(xp.uint32)
    word = b[..., 0]
    for k in range(1, nbytes):
        word = word | (b[..., k] << (8 * k))
    mask = (1 << bits) - 1
    codes = xp.stack([(word >> (bits * j)) & mask for j in range(per)], axis=-1)
    return codes.reshape(*lead, n // nbytes * per).astype(xp.int32)


def error_bound(x_RxLxNxD: np.ndarray, scheme: str, block: int = 0) -> np.ndarray:
    """Per-value bound on |x - dequantize(quantize(x))| for float32 rows x (the module docstring's table, plus the
    float32 rounding of the quantiser's own arithmetic)."""
    x = np.abs(np.asarray(x_RxLxNxD, np.float64))
    f32 = 2.0 ** -22
    if scheme == "float32":
        return np.zeros_like(x)
    if scheme == "bfloat16":
        return x * 2.0 ** -8 + 2.0 ** -133
    if scheme == "float16":
        return x * 2.0 ** -11 + 2.0 ** -25
    if scheme == "int8":
        absmax = x.max(axis=-1, keepdims=True)
        return np.broadcast_to(absmax * (1 / 254 + f32), x.shape)
    check_scheme(scheme)
    R, L, N, D = x.shape
    absmax = x.reshape(R, L, N, D // block, block).max(axis=-1, keepdims=True)
    scale = absmax * (1 + 2.0 ** -10) if scheme == "nf3" else absmax
    bound = scale * (NF_HALF_GAP[scheme] + f32)
    return np.broadcast_to(bound, (R, L, N, D // block, block)).reshape(R, L, N, D)


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
# One context for the process, so that `memory://` tables written by convert are seen by open_lut; readers add
# their own cache pool on top of it.
_CONTEXT = ts.Context()


def _kvstore_spec(location) -> ts.KvStore.Spec:
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


def _local_dir(spec: ts.KvStore.Spec) -> Path | None:
    j = spec.to_json()
    return Path(j["path"]) if j.get("driver") == "file" else None


def describe(location) -> Path | str:
    """How to show a table's location: a Path for local directories, else the kvstore URL."""
    spec = _kvstore_spec(location)
    local = _local_dir(spec)
    if local is not None:
        return Path(str(local).rstrip("/") or "/")
    try:
        return spec.url
    except Exception:  # a spec without a URL form (rare drivers)
        return json.dumps(spec.to_json())


def _open_kv(spec: ts.KvStore.Spec, context: ts.Context = _CONTEXT) -> ts.KvStore:
    try:
        return ts.KvStore.open(spec, context=context).result()
    except ValueError as e:
        raise MoleError(f"cannot open table location {describe(spec)}: {e}") from None


def _read_meta(kv: ts.KvStore, where) -> dict | None:
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


def _check_version(meta: dict, where) -> None:
    v = meta.get("format_version")
    if v != FORMAT_VERSION:
        raise MoleError(f"table {where} has format version {v}; this mole-jax reads version {FORMAT_VERSION}")


def _array_spec(kv_spec: ts.KvStore.Spec, name: str) -> dict:
    return {"driver": "zarr3", "kvstore": (kv_spec / f"{name}/").to_json()}


def _array_metadata(V: int, row_shape: tuple, dtype: np.dtype, shard_rows: int, checksum: bool) -> dict:
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


def _layout_from_meta(meta: dict) -> tuple[ModelConfig, Layout]:
    cfg = ModelConfig.from_dict(meta["model_config"])
    return cfg, Layout(meta["scheme"], cfg.num_layers, cfg.num_experts, cfg.d_model, meta["block"])


# Reading --------------------------------------------------------------------------------------------------------
def read_info(lut_dir) -> dict:
    """A table's description (complete or not): lut.json plus location, bytes and shards present."""
    spec = _kvstore_spec(lut_dir)
    where = describe(spec)
    local = _local_dir(spec)
    if local is not None and not local.is_dir():
        raise MoleError(f"lookup table not found: {where} does not exist")
    kv = _open_kv(spec)
    meta = _read_meta(kv, where)
    if meta is None:
        raise MoleError(f"{where} is not a mole-jax lookup table (no {META_KEY})")
    _check_version(meta, where)
    cfg, layout = _layout_from_meta(meta)
    V = cfg.vocab_size
    num_shards = -(-V // meta["shard_rows"])
    return {**meta, "location": str(where), "shape": [V, layout.L, layout.N, layout.D],
            "row_nbytes": layout.row_nbytes, "nbytes": V * layout.row_nbytes, "num_shards": num_shards,
            "shards_written": len(stored_shards(kv, layout)), "fp16_nbytes": V * layout.L * layout.N * layout.D * 2}


def stored_shards(kv: ts.KvStore, layout: Layout) -> set[int]:
    """Indices of the shards present in every stored array. A shard key exists only once its write finished (the
    kvstore writes to a temporary name and renames), so this is the set of durable shards."""
    done = None
    for name, (shape, _) in layout.arrays.items():
        prefix = f"{name}/c/"
        tail = "/0" * len(shape)  # the row dims are never split: one shard spans them all
        keys = kv.list(ts.KvStore.KeyRange(prefix, prefix[:-1] + "0")).result()
        found = set()
        for k in keys:
            k = k.decode()
            if k.endswith(tail) and k[len(prefix):-len(tail)].isdigit():
                found.add(int(k[len(prefix):-len(tail)]))
        done = found if done is None else done & found
    return done or set()


def _check_row_ids(ids, V: int) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise MoleError(f"row ids must be integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise MoleError(f"row ids must be a 1-D sequence, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= V):
        bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
        raise MoleError(f"row id {bad} is outside the table's vocabulary [0, {V})")
    return arr.astype(np.int64)


class LookupTable:
    """A complete table, opened for reading. Reads go straight to Tensorstore: one batched integer-array read per
    stored array, with a cache pool holding shard indexes and recently read rows."""

    def __init__(self, spec: ts.KvStore.Spec, meta: dict, cache_bytes: int):
        self.path = describe(spec)
        self.meta = meta
        self.config, self.layout = _layout_from_meta(meta)
        self.scheme: str = meta["scheme"]
        self.dtype: str = self.scheme
        self.block: int = meta["block"]
        self.fingerprint: str = meta["fingerprint"]
        self.shape = (self.config.vocab_size, self.layout.L, self.layout.N, self.layout.D)
        self.row_nbytes: int = self.layout.row_nbytes
        self.nbytes: int = self.shape[0] * self.row_nbytes
        context = ts.Context({"cache_pool": {"total_bytes_limit": cache_bytes}}, _CONTEXT)
        try:
            self._arrays = {name: ts.open(_array_spec(spec, name), read=True, context=context,
                                          recheck_cached_data="open", recheck_cached_metadata="open").result()
                            for name in self.layout.arrays}
        except ValueError as e:
            raise MoleError(f"table {self.path} is damaged: {e}") from None
        for name, (shape, dt) in self.layout.arrays.items():
            a = self._arrays[name]
            if tuple(a.shape) != (self.shape[0], *shape) or np.dtype(a.dtype.numpy_dtype) != dt:
                raise MoleError(f"table {self.path} is damaged: array {name} is {a.dtype} {a.shape}, "
                                f"expected {dt} {(self.shape[0], *shape)}")

    def __repr__(self):
        return f"LookupTable({self.path}, {self.scheme}, shape={self.shape}, {self.nbytes / 2**30:.3f} GiB)"

    def read_stored(self, ids) -> dict[str, np.ndarray]:
        """The stored arrays (payload, scales...) of these rows, each with leading dim len(ids): what decoding
        transfers. Any order, duplicates allowed."""
        ids = _check_row_ids(ids, self.shape[0])
        try:
            with ts.Batch() as batch:
                futures = {name: a[ids].read(batch=batch) for name, a in self._arrays.items()}
            return {name: f.result() for name, f in futures.items()}
        except ValueError as e:
            raise MoleError(f"reading rows of {self.path} failed: {e}") from None

    def rows(self, ids) -> np.ndarray:
        """float32 [len(ids), L, N, D]: the routed experts' outputs for these token ids, dequantised."""
        return dequantize(self.read_stored(ids), self.scheme, np)

    def read_all_stored(self) -> dict[str, np.ndarray]:
        """The whole table's stored arrays in host memory."""
        try:
            futures = {name: a.read() for name, a in self._arrays.items()}
            return {name: f.result() for name, f in futures.items()}
        except ValueError as e:
            raise MoleError(f"reading {self.path} failed: {e}") from None

    def error_bound(self, x_RxLxNxD: np.ndarray) -> np.ndarray:
        return error_bound(x_RxLxNxD, self.scheme, self.block)


def open_lut(lut_dir, *, expect_fingerprint: str | None = None, cache_bytes: int = READ_CACHE_BYTES) -> LookupTable:
    """Open a complete table. Raises MoleError for a missing location, something that is not a table, an unknown
    format version, an incomplete table (an interrupted conversion: rerun it), and, given `expect_fingerprint`,
    a table built from other parameters."""
    spec = _kvstore_spec(lut_dir)
    where = describe(spec)
    local = _local_dir(spec)
    if local is not None and not local.is_dir():
        raise MoleError(f"lookup table not found: {where} does not exist")
    meta = _read_meta(_open_kv(spec), where)
    if meta is None:
        hint = " (a run directory? its table is RUN_DIR/lut)" if local and (local / "lut" / META_KEY).is_file() else ""
        raise MoleError(f"{where} is not a mole-jax lookup table (no {META_KEY}){hint}")
    _check_version(meta, where)
    if not meta.get("complete"):
        raise MoleError(f"table {where} is incomplete (its conversion was interrupted or failed verification); "
                        "rerun the same `mole-jax convert` command to finish it")
    if expect_fingerprint is not None and meta["fingerprint"] != expect_fingerprint:
        raise MoleError(f"table {where} was built from different parameters (fingerprint "
                        f"{meta['fingerprint'][:12]}, expected {expect_fingerprint[:12]})")
    return LookupTable(spec, meta, cache_bytes)


# Writing --------------------------------------------------------------------------------------------------------
class TableWriter:
    """Creates, resumes and completes a table; writes whole shards only (no read-modify-write).

    `TableWriter.start(...)` decides what the destination allows: a fresh table, the resumption of an interrupted
    one built from the same parameters with the same settings, or (overwrite=True) the replacement of a table.
    """

    def __init__(self, spec: ts.KvStore.Spec, kv: ts.KvStore, meta: dict, arrays: dict):
        self.spec, self.kv, self.meta, self._arrays = spec, kv, meta, arrays
        self.location = describe(spec)
        self.config, self.layout = _layout_from_meta(meta)
        self.V = self.config.vocab_size
        self.shard_rows: int = meta["shard_rows"]
        self.num_shards = -(-self.V // self.shard_rows)

    @classmethod
    def start(cls, lut_dir, cfg: ModelConfig, scheme: str, fingerprint: str, *, block: int | None = None,
              shard_rows: int | None = None, overwrite: bool = False, checksum: bool = False,
              source: dict | None = None, create: bool = True) -> "TableWriter":
        """create=False opens the table that another process prepared (multi-process conversion).
        shard_rows=None: an interrupted table's own, else default_shard_rows."""
        layout = make_layout(scheme, cfg, block)
        if shard_rows is not None and (not isinstance(shard_rows, int) or shard_rows <= 0):
            raise MoleError(f"shard_rows must be a positive integer, got {shard_rows!r}")
        spec = _kvstore_spec(lut_dir)
        where = describe(spec)
        if create:
            _check_writable(spec)
        kv = _open_kv(spec)
        old = _read_meta(kv, where)
        if old is not None:
            _check_version(old, where)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "complete": False,
                "model_config": cfg.to_dict(), "fingerprint": fingerprint, "scheme": scheme, "block": layout.block,
                "shard_rows": shard_rows or default_shard_rows(layout, cfg.vocab_size), "checksum": checksum,
                "source": source or {}}
        same = (old is not None and _settings(old) == _settings(meta)
                and shard_rows in (None, old["shard_rows"]))

        def reopen():
            return cls(spec, kv, {**old, "source": meta["source"]},
                       cls._open_arrays(spec, layout, create=False, V=cfg.vocab_size))

        if not create:
            if not same:
                raise MoleError(f"table {where} was not prepared for this conversion")
            return reopen()
        if old is None:
            local = _local_dir(spec)
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
        arrays = cls._open_arrays(spec, layout, create=True, V=cfg.vocab_size, shard_rows=meta["shard_rows"],
                                  checksum=checksum)
        _write_meta(kv, meta, where)
        return cls(spec, kv, meta, arrays)

    @staticmethod
    def _open_arrays(spec, layout: Layout, *, create: bool, V: int, shard_rows: int = 0,
                     checksum: bool = False) -> dict:
        arrays = {}
        for name, (shape, dt) in layout.arrays.items():
            try:
                if create:
                    arrays[name] = ts.open({**_array_spec(spec, name),
                                            "metadata": _array_metadata(V, shape, dt, shard_rows, checksum)},
                                           create=True, delete_existing=True, context=_CONTEXT).result()
                else:
                    arrays[name] = ts.open(_array_spec(spec, name), open=True, context=_CONTEXT).result()
            except ValueError as e:
                raise MoleError(f"cannot {'create' if create else 'open'} table array {describe(spec)}/{name}: "
                                f"{e}") from None
            want = (V, *shape)
            if tuple(arrays[name].shape) != want:
                raise MoleError(f"table array {describe(spec)}/{name} has shape {tuple(arrays[name].shape)}, "
                                f"expected {want}")
        return arrays

    def shard_range(self, i: int) -> tuple[int, int]:
        return i * self.shard_rows, min((i + 1) * self.shard_rows, self.V)

    def done_shards(self) -> set[int]:
        return stored_shards(self.kv, self.layout)

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
        ids = _check_row_ids(ids, self.V)
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


def _settings(meta: dict) -> tuple:
    """What must match for an interrupted conversion to be resumed rather than replaced (and shard_rows)."""
    return (meta.get("format_version"), meta.get("model_config"), meta.get("fingerprint"), meta.get("scheme"),
            meta.get("block"), meta.get("checksum"))


def _write_meta(kv: ts.KvStore, meta: dict, where) -> None:
    try:
        kv.write(META_KEY, json.dumps(meta, indent=2, sort_keys=True).encode() + b"\n").result()
    except ValueError as e:
        raise MoleError(f"cannot write {where}/{META_KEY}: {e}") from None


def _check_writable(spec: ts.KvStore.Spec) -> None:
    """For a local destination: a clear error now rather than a Tensorstore error mid-way."""
    local = _local_dir(spec)
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


def default_shard_rows(layout: Layout, V: int) -> int:
    """A power of two of rows making a shard of about SHARD_TARGET_BYTES, at most the vocabulary."""
    rows = max(1, SHARD_TARGET_BYTES // layout.row_nbytes)
    return min(1 << (rows.bit_length() - 1), V)


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
    layout = writer.layout
    content = ContentHash(layout, writer.V)
    inflight: list[list[ts.Future]] = []
    try:
        for i in range(writer.num_shards):
            start, stop = writer.shard_range(i)
            stored = quantize(np.asarray(read_rows(start, stop)), scheme, layout.block)
            content.update(stored)
            inflight.append(writer.write_shard(i, stored))
            while len(inflight) > max_inflight:
                for f in inflight.pop(0):
                    f.result()
        for fs in inflight:
            for f in fs:
                f.result()
    except ValueError as e:
        raise MoleError(f"writing table {writer.location} failed: {e}") from None
    rng = np.random.default_rng(0)
    spot = sorted({0, writer.V - 1, *rng.integers(0, writer.V, verify_rows).tolist()})
    for v in spot:
        want = quantize(np.asarray(read_rows(v, v + 1)), scheme, layout.block)
        got = writer.read_stored([v])
        for name in want:
            if not np.array_equal(np.asarray(want[name]).view(np.uint8), got[name].view(np.uint8)):
                raise MoleError(f"verification of {writer.location} failed: row {v} ({name}) differs from its source")
    fp = fingerprint or content.hexdigest()
    writer.mark_complete({"method": "rows equal their source bit for bit", "rows": spot}, fingerprint=fp)
    return fp
