"""Where a decode step's table rows come from, and every byte that moves host -> device.

MoLE's routed experts read the table rows of the step's tokens, in the table's stored form (float or quantized),
dequantized on the device layer by layer (`TableRows.for_layer`). The table lives at one of three placements:
    device   all of it in accelerator memory: the step gathers its tokens' rows by token id (`TableReader`)
    host     in host RAM, read by the compiled step itself (`TableReader` over host memory): on an accelerator the
             stored arrays live in the "pinned_host" memory kind and the step moves each token's row to device
             memory with a dynamic slice (the pattern of XLA's host offloading; a gather cannot index host memory,
             jax issue 34041); on the CPU backend, where the device's memory is host RAM, the step gathers. The
             step's ids never leave the device, so its steps pipeline like Dense's.
    storage  read from the table's files: on the CPU backend, a mapping of the files aliased as the step's table
             operand (`TableReader` again: a page fault serves a cold row, the page cache is the RAM tier); on
             accelerators, whose pinned memory cannot fault pages in, one batched Tensorstore read of the step's
             distinct ids, sent in one put (`StorageRows`), optionally behind a device tier (`TieredRows`).
`HostRows` (the host gathers with numpy and puts the rows) is the host placement's fallback on a backend that cannot
compile the in-program read, and the benchmarks' `mole-host-gather` row.

On accelerators whose JAX device offers the "pinned_host" memory kind, fetched rows are staged through pinned
(page-locked) host memory on their way (`Transfers`, `pinned="auto"`): the device then copies them by DMA, while a
put from ordinary pageable numpy goes through the driver's bounce buffers at a fraction of the bandwidth. Every put
is asynchronous: nothing here waits for a transfer, so a step's computation is dispatched right behind its rows.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import mmap
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from mole_jax import data, schemes
from mole_jax.config import MoleError

PLACEMENTS = ("device", "host", "storage")
# How the host placement's rows reach the step: "program" (the compiled step reads host memory itself) or "gather"
# (the host reads the step's ids, gathers their rows with numpy and puts them: a round trip per step).
HOST_READS = ("program", "gather")
# How the storage placement's rows reach the step: "mapped" (CPU backend, a local table: the files' mapping aliased
# as the step's table operand), "batched" (one Tensorstore read of the step's distinct ids, put by the host), or
# "auto": mapped where it can be, else batched.
STORAGE_READS = ("auto", "mapped", "batched")
# A step with at most this many tokens slices their rows out of host memory one by one, unrolled; a larger one
# (prefill, scoring) in a loop over the tokens, so that the program does not grow with the prompt.
UNROLLED_SLICES = 64
PINNED_MODES = ("auto", "on", "off")
PINNED_HOST = "pinned_host"  # JAX's memory kind for page-locked host memory
# "auto" stages a put through pinned memory only within these sizes: below, the second dispatch costs more than the
# bandwidth saves; above, a one-time bulk put (parameters, a device-resident table) would pin a copy of itself.
PINNED_MIN_BYTES, PINNED_MAX_BYTES = 1 << 18, 1 << 28
# A put of at most this many bytes goes through a jitted identity, whose host arguments JAX moves in its C++ dispatch
# path: 35-53 us for a step's rows and index on CPU, where `jax.device_put` of the same two arrays spends 93-107 us
# in Python whatever their size (results/latency/put_small.json). The identity copies its input once on the device
# (XLA has no aliasing for a host argument), which is nothing at this size but would double a bulk put (parameters,
# a device-resident table).
SMALL_PUT_MAX_BYTES = 1 << 20


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def memory_kinds(device) -> tuple[str, ...]:
    """The memory kinds a JAX device addresses ("device", "pinned_host", "unpinned_host", ...)."""
    return tuple(m.kind for m in device.addressable_memories())


@functools.lru_cache(maxsize=None)
def _identity_onto(target: SingleDeviceSharding):
    """The small-put path's jitted identity, one per device for the process: its traces are shared by every
    Transfers (each new shape of a put compiles once, ~15 ms on CPU)."""
    return jax.jit(lambda tree: tree, out_shardings=target)


class Transfers:
    """The one way onto the device: explicit, asynchronous puts, with the bytes counted.

    pinned: "auto" stages the host arrays of a put through pinned host memory on an accelerator that offers it
        (puts of PINNED_MIN_BYTES to PINNED_MAX_BYTES: a step's rows, offloaded experts), "on" stages every put
        wherever the device offers "pinned_host" (the CPU backend included, where it only adds a copy), "off"
        never. The values moved are the same bits either way. `set_pinned` changes the mode of a live source.
    """

    def __init__(self, pinned: str = "auto", device=None):
        self.bytes_sent = 0
        self.device = device if device is not None else jax.devices()[0]
        self.set_pinned(pinned)

    def set_pinned(self, mode: str) -> None:
        if mode not in PINNED_MODES:
            raise MoleError(f"unknown pinned staging mode {mode!r}: use one of {', '.join(PINNED_MODES)}")
        offered = PINNED_HOST in memory_kinds(self.device)
        if mode == "on" and not offered:
            raise MoleError(f"pinned staging: the {self.device.platform} device offers no {PINNED_HOST!r} memory "
                            f"(its memory kinds: {', '.join(memory_kinds(self.device))})")
        self.mode = mode
        use = offered and (mode == "on" or (mode == "auto" and self.device.platform != "cpu"))
        self.pinned = SingleDeviceSharding(self.device, memory_kind=PINNED_HOST) if use else None
        self.target = SingleDeviceSharding(self.device)
        self._small_put = _identity_onto(self.target)

    def stages(self, num_bytes: int) -> bool:
        """Whether a put of this many bytes goes through pinned host memory."""
        if self.pinned is None:
            return False
        return self.mode == "on" or PINNED_MIN_BYTES <= num_bytes <= PINNED_MAX_BYTES

    def stage(self, arrays: list) -> list:
        """Host arrays -> the same values in pinned host memory (one asynchronous put)."""
        return jax.device_put(arrays, self.pinned)

    def put(self, tree):
        num_bytes = nbytes(tree)
        self.bytes_sent += num_bytes
        if not self.stages(num_bytes):
            if num_bytes > SMALL_PUT_MAX_BYTES:
                return jax.device_put(tree, self.target)
            with jax.transfer_guard_host_to_device("allow"):  # explicit here: the jitted identity's arguments
                return self._small_put(tree)
        leaves, treedef = jax.tree.flatten(tree)
        on_host = [isinstance(x, (np.ndarray, np.generic)) for x in leaves]
        staged = iter(self.stage([x for x, host in zip(leaves, on_host) if host]))
        moved = jax.device_put([next(staged) if host else x for x, host in zip(leaves, on_host)], self.target)
        return jax.tree.unflatten(treedef, moved)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TableRows:
    """Table rows on the device, in the stored form: `stored` arrays of R rows each (the whole table for the device
    placement, else a step's distinct ids) and each token's row among them. The model reads them through
    `for_layer` (model.Transformer.layers)."""

    stored: dict[str, jax.Array]  # every array [R, L, ...] (schemes.Layout.arrays)
    index_BxT: jax.Array
    scheme: str = dataclasses.field(metadata={"static": True})

    def for_layer(self, l: int) -> jax.Array:
        """Layer l's rows of the tokens, float [B, T, N, D]: pick, then dequantize only what this layer reads."""
        B, T = self.index_BxT.shape
        picked = {k: v[self.index_BxT.reshape(-1), l:l + 1] for k, v in self.stored.items()}
        rows_Mx1xNxD = schemes.dequantize(picked, self.scheme, xp=jnp)
        return rows_Mx1xNxD.reshape(B, T, *rows_Mx1xNxD.shape[2:])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TableReader:
    """A table that the compiled step reads itself: the stored arrays [V, L, ...] and how the step takes its tokens'
    rows from them (`rows`, called inside jit). `slices` (host memory on an accelerator): each token's row is a
    dynamic slice moved to device memory; otherwise a gather, for arrays the device indexes (device memory; on the
    CPU backend any host array, a mapped file included)."""

    stored: dict[str, jax.Array]
    scheme: str = dataclasses.field(metadata={"static": True})
    slices: bool = dataclasses.field(default=False, metadata={"static": True})

    def rows(self, ids_BxT: jax.Array) -> TableRows:
        if not self.slices:
            return TableRows(self.stored, ids_BxT, self.scheme)
        B, T = ids_BxT.shape
        ids_M = ids_BxT.reshape(-1)

        def row(v, i):
            return jax.device_put(jax.lax.dynamic_slice_in_dim(v, i, 1), jax.memory.Space.Device)[0]

        if ids_M.size <= UNROLLED_SLICES:
            picked = {k: jnp.stack([row(v, ids_M[m]) for m in range(ids_M.size)]) for k, v in self.stored.items()}
        else:
            picked = jax.lax.map(lambda i: {k: row(v, i) for k, v in self.stored.items()}, ids_M)
        return TableRows(picked, jnp.arange(B * T, dtype=jnp.int32).reshape(B, T), self.scheme)


def device_table(table, transfers: Transfers) -> TableReader:
    """The device placement: the whole stored table resident in device memory."""
    if transfers.device.platform == "cpu":
        return TableReader(in_host_ram(table, transfers), table.scheme)
    return TableReader(transfers.put(table.read_all_stored()), table.scheme)


def in_host_ram(table, transfers: Transfers) -> dict[str, jax.Array]:
    """The CPU backend's whole table in RAM, one copy: the stored arrays read straight into page-aligned buffers
    (`LookupTable.read_all_into`: the shard files in order at the disk's sequential rate, every row's crc32c
    checked while the next piece is read), which `jax.device_put` aliases instead of copying (a numpy array of
    ordinary alignment is copied: twice the table at peak). The bytes are counted as sent."""
    out = table.read_all_into(_aligned_empty) if hasattr(table, "read_all_into") else \
        {k: _copy_aligned(v) for k, v in table.read_all_stored().items()}
    transfers.bytes_sent += nbytes(out)
    return jax.device_put(out, transfers.target)


def _aligned_empty(shape: tuple, dtype) -> np.ndarray:
    """An uninitialised array in its own anonymous mapping: page-aligned, and returned to the OS when freed."""
    count = int(np.prod(shape))
    buf = mmap.mmap(-1, max(count * np.dtype(dtype).itemsize, 1))
    return np.frombuffer(buf, dtype, count=count).reshape(shape)


def _copy_aligned(src: np.ndarray) -> np.ndarray:
    dst = _aligned_empty(src.shape, src.dtype)
    dst[...] = src
    return dst


def release_pages(address: int, num_bytes: int) -> None:
    """Drop this process's pages of a file mapping from `address` on (MADV_DONTNEED: the page cache keeps them, and
    the next access faults them in again). Linux only, a no-op elsewhere."""
    if not sys.platform.startswith("linux") or num_bytes == 0:
        return
    start = address - address % mmap.PAGESIZE
    length = -(-(address + num_bytes - start) // mmap.PAGESIZE) * mmap.PAGESIZE
    _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), 4)  # MADV_DONTNEED


@functools.lru_cache(maxsize=1)
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def in_program_slices_compile(device) -> str | None:
    """None if this backend compiles a step that moves dynamic slices of a pinned_host array to device memory,
    else why not (one line)."""
    host = SingleDeviceSharding(device, memory_kind=PINNED_HOST)
    probe = TableReader({"payload": jax.ShapeDtypeStruct((4, 1, 1, 8), np.float16, sharding=host)}, "float16",
                        slices=True)
    try:
        jax.jit(lambda r, ids: r.rows(ids).for_layer(0)).lower(
            probe, jax.ShapeDtypeStruct((2, 1), np.int32)).compile()
    except Exception as e:  # any refusal of the backend: the caller falls back and says why
        return " ".join(str(e).split())[:200]
    return None


def host_table(table, transfers: Transfers, *, slices: bool | None = None) -> TableReader | None:
    """The host placement read by the program: the stored table in host memory. slices=None: the backend's choice
    (a gather on CPU, whose device memory is host RAM; per-row slices out of pinned memory elsewhere). None when
    the backend offers no host memory kind or cannot compile the slices (the caller falls back to HostRows)."""
    device = transfers.device
    if slices is None:
        slices = device.platform != "cpu"
    if not slices:  # CPU: the device's memory is host RAM
        return TableReader(in_host_ram(table, transfers), table.scheme)
    if PINNED_HOST not in memory_kinds(device):
        return None
    if in_program_slices_compile(device) is not None:
        return None
    stored = jax.device_put(table.read_all_stored(), SingleDeviceSharding(device, memory_kind=PINNED_HOST))
    return TableReader(stored, table.scheme, slices=True)


class _Staging:
    """Reused host buffers for a step's stored rows. Two per shape, used in turn: a buffer is rewritten two steps
    after it was sent, when that step's transfer (asynchronous, or a zero-copy alias on CPU) and computation are
    long over."""

    def __init__(self, table):
        self.form = table.layout.arrays  # {name: (row shape, dtype)}
        self._buffers: dict[int, list[dict[str, np.ndarray]]] = {}
        self._turn = 0

    def buffer(self, num_rows: int) -> dict[str, np.ndarray]:
        pair = self._buffers.get(num_rows)
        if pair is None:
            pair = self._buffers[num_rows] = [{k: np.empty((num_rows, *shape), dt) for k, (shape, dt)
                                               in self.form.items()} for _ in range(2)]
        self._turn ^= 1
        return pair[self._turn]


class _FetchedRows:
    """A table off the device: the rows of a step's distinct ids are gathered on the host, then sent at once."""

    def __init__(self, table, transfers: Transfers):
        self.table, self.scheme, self.transfers = table, table.scheme, transfers
        self.staging = _Staging(table)

    def read(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The stored rows of `ids` in new host arrays."""
        out = {k: np.empty((len(ids), *shape), dt) for k, (shape, dt) in self.staging.form.items()}
        self._read_into(ids, out)
        return out

    def fetch(self, ids: np.ndarray, num_rows: int) -> TableRows:
        """The stored rows of the distinct ids of `ids` (padded to `num_rows` rows, so the step's shapes do not
        change as the number of distinct ids does) and each token's row among them, in one put."""
        unique_U, inverse = distinct(ids.reshape(-1))
        out = self.staging.buffer(num_rows)
        self._read_into(unique_U, {k: v[:len(unique_U)] for k, v in out.items()})
        stored, index = self.transfers.put((out, inverse.reshape(ids.shape).astype(np.int32)))
        return TableRows(stored, index, self.scheme)

    def _read_into(self, ids_U: np.ndarray, out: dict[str, np.ndarray]) -> None:
        raise NotImplementedError


class HostRows(_FetchedRows):
    """The host placement: the whole stored table in host RAM, rows gathered with np.take."""

    def __init__(self, table, transfers: Transfers):
        super().__init__(table, transfers)
        self.stored = table.read_all_stored()

    def _read_into(self, ids_U, out):
        for k, v in self.stored.items():
            np.take(v, ids_U, axis=0, out=out[k])


class StorageRows(_FetchedRows):
    """The storage placement: rows read from the table's files (one batched Tensorstore read per step)."""

    def _read_into(self, ids_U, out):
        for k, v in self.table.read_stored(ids_U).items():
            out[k][...] = v


def distinct(ids_M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(ids_M, return_inverse=True), without its sort when there is one id (a batch-1 step)."""
    if ids_M.size == 1:
        return ids_M.astype(np.int64), np.zeros(1, np.int64)
    return np.unique(ids_M, return_inverse=True)


def tier_ids(counts_V: np.ndarray | None, num_rows: int, vocab_size: int) -> np.ndarray:
    """The `num_rows` most frequent ids (ties: the lower id first), sorted; without counts, the lowest ids (a BPE
    vocabulary numbers its merges in the order it learned them, most frequent first)."""
    if counts_V is None:
        return np.arange(num_rows, dtype=np.int64)
    return np.sort(np.argsort(-np.asarray(counts_V, np.int64), kind="stable")[:num_rows])


def device_tier(table, run_dir: Path | None, *, device_rows: int | None = None,
                device_tier_bytes: int | None = None, token_counts=None) -> np.ndarray | None:
    """The ids of a device tier: the `device_rows` most frequent (or as many rows as fit `device_tier_bytes`),
    ordered by `token_counts` (int [V], or a .npy file of them), by default the run's RUN_DIR/token_counts.npy;
    without counts, the lowest ids. None: no tier."""
    if device_rows is None and device_tier_bytes is None:
        return None
    if device_rows is not None and device_tier_bytes is not None:
        raise MoleError("give a device tier's size as rows or as bytes, not both")
    V = table.shape[0]
    rows = device_rows if device_rows is not None else int(device_tier_bytes) // table.row_nbytes
    if isinstance(rows, bool) or not 1 <= rows:
        raise MoleError(f"a device tier needs at least one row; got {rows} (a row is {table.row_nbytes:,} bytes)")
    if token_counts is None and run_dir is not None and (Path(run_dir) / data.TOKEN_COUNTS).is_file():
        token_counts = Path(run_dir) / data.TOKEN_COUNTS
    if isinstance(token_counts, (str, Path)):
        token_counts = np.load(token_counts, allow_pickle=False)
    if token_counts is not None and np.shape(token_counts) != (V,):
        raise MoleError(f"token counts have shape {np.shape(token_counts)}; the table's vocabulary needs ({V},)")
    return tier_ids(token_counts, min(rows, V), V)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TieredTableRows:
    """A step's rows from a device tier and from the rows fetched for its misses. Each token's slot in the tier is
    looked up on the device from its id, so a step whose ids all hit needs nothing from the host; a miss takes its
    row among `fetched`. Selecting stored bits before dequantizing keeps every row bit for bit the table's."""

    tier: dict[str, jax.Array]  # [K, L, ...] the tier's stored rows
    slot_V: jax.Array  # int32 [V]: each id's row in the tier, -1 off it
    fetched: dict[str, jax.Array]  # [R, L, ...] the step's missed rows (any values when nothing missed)
    fetched_index_BxT: jax.Array  # each missed token's row among `fetched` (any value for a hit)
    ids_BxT: jax.Array
    scheme: str = dataclasses.field(metadata={"static": True})

    def for_layer(self, l: int) -> jax.Array:
        B, T = self.ids_BxT.shape
        slot_M = self.slot_V[self.ids_BxT.reshape(-1)]
        hit_M = slot_M >= 0
        tier_M, fetched_M = jnp.maximum(slot_M, 0), self.fetched_index_BxT.reshape(-1)
        picked = {}
        for k, v in self.tier.items():
            from_tier, from_fetched = v[tier_M, l:l + 1], self.fetched[k][fetched_M, l:l + 1]
            picked[k] = jnp.where(hit_M.reshape(-1, *[1] * (v.ndim - 1)), from_tier, from_fetched)
        rows_Mx1xNxD = schemes.dequantize(picked, self.scheme, xp=jnp)
        return rows_Mx1xNxD.reshape(B, T, *rows_Mx1xNxD.shape[2:])


_zeros = jax.jit(jnp.zeros, static_argnums=(0, 1))  # made on the device: no host -> device transfer


@dataclasses.dataclass
class TierCounts:
    """What a device tier saw: tokens looked up, tokens found on the tier, distinct missed rows fetched, rows sent
    (the fetched rows padded to a power of two), and steps whose rows were fetched."""
    tokens: int = 0
    hits: int = 0
    rows_fetched: int = 0
    rows_sent: int = 0
    fetches: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.tokens, 1)


class TieredRows:
    """The rows of ids `tier_K` resident on the device (read once from `misses`, a HostRows or StorageRows) in
    front of `misses` for every other id. `fetch` moves only a step's missed rows; when every id hits it moves
    nothing and the step reads a resident placeholder instead of fetched rows."""

    def __init__(self, table, transfers: Transfers, *, misses: _FetchedRows, tier_K: np.ndarray):
        self.scheme, self.transfers, self.misses = table.scheme, transfers, misses
        V = table.shape[0]
        self.ids_K = np.asarray(tier_K, np.int64)
        self.slot_V = np.full(V, -1, np.int32)
        self.slot_V[self.ids_K] = np.arange(len(self.ids_K), dtype=np.int32)
        self.tier, self.slot_V_device = transfers.put((misses.read(self.ids_K), self.slot_V))
        self.counts = TierCounts()
        self._idle: dict[tuple, tuple] = {}

    @property
    def stored(self) -> dict[str, jax.Array]:
        """What stays on the device: the tier's rows (and the id -> slot map, counted by `nbytes`)."""
        return {**self.tier, "slot_V": self.slot_V_device}

    def all_hit(self, ids: np.ndarray) -> bool:
        return bool((self.slot_V[ids.reshape(-1)] >= 0).all())

    def idle(self, ids_device: jax.Array) -> TieredTableRows:
        """The rows of a step whose ids all hit: no fetched rows (a device-resident placeholder row), nothing sent.
        The placeholders are made on the device, so creating them moves nothing from the host."""
        shape = tuple(ids_device.shape)
        if shape not in self._idle:
            fetched = {k: _zeros((1, *v.shape[1:]), v.dtype) for k, v in self.tier.items()}
            self._idle[shape] = fetched, _zeros(shape, np.dtype(np.int32))
        fetched, index = self._idle[shape]
        return TieredTableRows(self.tier, self.slot_V_device, fetched, index, ids_device, self.scheme)

    def fetch(self, ids: np.ndarray, ids_device: jax.Array) -> TieredTableRows:
        """The rows of `ids` (host copy of `ids_device`): the missed distinct ids' rows, padded to a power of two
        rows (a few step shapes, not one per count), in one put; nothing when every id hits."""
        flat_M = ids.reshape(-1)
        miss_M = self.slot_V[flat_M] < 0
        c = self.counts
        c.tokens += flat_M.size
        c.hits += int(flat_M.size - miss_M.sum())
        if not miss_M.any():
            return self.idle(ids_device)
        unique_U, inverse = distinct(flat_M[miss_M])
        num_rows = next_pow2(len(unique_U))
        out = self.misses.staging.buffer(num_rows)
        self.misses._read_into(unique_U, {k: v[:len(unique_U)] for k, v in out.items()})
        index_M = np.zeros(flat_M.shape, np.int32)
        index_M[miss_M] = inverse
        c.rows_fetched, c.rows_sent, c.fetches = c.rows_fetched + len(unique_U), c.rows_sent + num_rows, c.fetches + 1
        fetched, index = self.transfers.put((out, index_M.reshape(ids.shape)))
        return TieredTableRows(self.tier, self.slot_V_device, fetched, index, ids_device, self.scheme)


def mapped_table(table, device, *, verify: bool = True) -> TableReader:
    """The storage placement on the CPU backend: the table's files mapped (lut.LookupTable.mapped_stored) and
    aliased, not copied, as the step's table operand: a row is read from the page cache, or from the disk by a page
    fault, when a step gathers it."""
    if device.platform != "cpu":
        raise MoleError(f"a mapped table is read by the CPU backend only: the {device.platform} device cannot fault "
                        "pages of a file in (use storage_read='batched')")
    return TableReader(jax.device_put(table.mapped_stored(verify=verify), SingleDeviceSharding(device)), table.scheme)


def storage_read_for(table, device, storage_read: str) -> str:
    """"mapped" or "batched" for a table at the storage placement: `storage_read` itself, or for "auto" mapped on
    the CPU backend when the table can be mapped (a local table), else batched."""
    if storage_read not in STORAGE_READS:
        raise MoleError(f"unknown storage read {storage_read!r}: use one of {', '.join(STORAGE_READS)}")
    if storage_read != "auto":
        return storage_read
    local = isinstance(getattr(table, "path", None), Path)  # lut.describe: a Path for a local table, else a URL
    return "mapped" if device.platform == "cpu" and local else "batched"


def row_source(table, placement: str, transfers: Transfers, tier_K: np.ndarray | None = None, *,
               host_read: str = "program", storage_read: str = "auto"):
    """The rows of `table` kept at `placement`: a TableReader (device; host read by the program; storage mapped),
    HostRows (host read by the host) or StorageRows (storage read in batches); with `tier_K` (a placement the host
    fetches for), the rows of those ids on the device in front of them (TieredRows)."""
    if host_read not in HOST_READS:
        raise MoleError(f"unknown host read {host_read!r}: use one of {', '.join(HOST_READS)}")
    if placement == "storage":
        storage_read = "batched" if tier_K is not None and storage_read == "auto" else storage_read
        if storage_read_for(table, transfers.device, storage_read) == "mapped":
            if tier_K is not None:
                raise MoleError("a device tier fronts rows that the host fetches; a mapped table's rows are read by "
                                "the step itself (use storage_read='batched' for a tier)")
            return mapped_table(table, transfers.device)
    fetched = placement == "storage" or (placement == "host" and host_read == "gather")
    if tier_K is not None and not fetched:
        raise MoleError("a device tier fronts rows that the host fetches (the storage placement, or host with "
                        f"host_read='gather'); the {placement} placement's rows are read by the step itself")
    if placement == "device":
        return device_table(table, transfers)
    if placement == "host" and host_read == "program":
        reader = host_table(table, transfers)
        if reader is not None:
            return reader
        _warn_no_program_read(transfers.device)
    source = StorageRows(table, transfers) if placement == "storage" else HostRows(table, transfers)
    return source if tier_K is None else TieredRows(table, transfers, misses=source, tier_K=tier_K)


@functools.lru_cache(maxsize=None)
def _warn_no_program_read(device) -> None:
    """Once per device: why the host placement falls back to the host's gather."""
    why = (f"it offers no {PINNED_HOST!r} memory" if PINNED_HOST not in memory_kinds(device)
           else in_program_slices_compile(device))
    warnings.warn(f"the {device.platform} backend (jax {jax.__version__}) cannot run the host placement's in-program "
                  f"read ({why}); the host reads each step's rows instead (one round trip per step)", stacklevel=3)
