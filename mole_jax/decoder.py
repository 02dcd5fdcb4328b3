"""The decoding loop: a batched prefill of the right-padded prompts, then one token per sequence per step from a
preallocated KV cache, each sequence at its own position (a padded prompt's stale cache entries stay masked until
they are overwritten).

Every jitted entry point is traced once per (batch, cache length) bucket, takes only device arrays, donates the
cache and is called with keyword arguments. All host -> device traffic is an explicit, counted put
(`row_sources.Transfers.put`).

When the program can read every row it needs (Dense, MoE, MoLE with its table on the device, in host memory read
by the program, or mapped from its files on CPU: a `row_sources.TableReader`), generation runs on the device in
chunks: one dispatch runs K steps (`steps_per_dispatch`) in a `lax.while_loop` with the sampler, the KV cache and
the stop test inside, and the host reads chunk c's tokens while chunk c+1 runs (`chunked_loop`). Nothing crosses
between the host and the device inside a chunk, nor between chunks: the step counter, the stop flags and the
sampler's key stay on the device. The loop stops early once every sequence has produced `eos_id`, at exactly
the step where a step-by-step decode stops.

A table the host must fetch for (storage on an accelerator, or the host placement's host-side gather) needs the
step's tokens on the host before their rows can travel, so its steps run one per dispatch (`decode_loop`). With
`overlap` (the default) a step is then two jitted calls: block 0's front half (attention, shared FFN, router),
which needs no rows, is dispatched first from the ids still on the device; the host then reads the ids, fetches
their rows while the device works, and dispatches the rest (`forward(..., resume=mid)`). A jitted call starts only
when all of its inputs are ready, so one call could not overlap the fetch.

A device tier (row_sources.TieredRows) finds each token's tier row on the device, so a step whose ids all hit
needs nothing from the host. With `speculate` (the default) a tiered step is dispatched before the host reads its
ids whenever the previous step's ids all hit, with no fetched rows; when the host then finds a miss among them,
the step is redone from its result with the fetched rows: it writes the same KV slot again and samples with the
same key, so the tokens are those of the unspeculated step, bit for bit. A redo costs a whole step S, a
speculation that holds saves the host's round trip H, so speculating pays only when the ids after an all-hit step
all hit with probability above S / (S + H): the decoder keeps a running estimate of that probability (from every
all-hit step, speculated or not) and speculates only while it is at least SPECULATE_MIN_SUCCESS.

Memory. A prefill with a table reads every prompt token's rows, and XLA schedules the row gathers of all layers
ahead of the layers that use them (they depend only on the ids), so an unchunked prefill holds [B*T, L, N, D]
dequantized rows at once: 384 MiB of float32 for 8 prompts of 128 tokens at 410M, and without limit as the prompt
batch grows. So a prefill with a table runs in chunks of the prompt's positions (`prefill_chunk_len`), each a
dispatch of its own that writes its positions' KV entries and keeps the last prompt position's logits, with at
most `prefill_rows_bytes` of rows per chunk; a table the host fetches for fetches each chunk's distinct ids only.
A mapped table's pages stay in the process's resident set once a step has read them (the kernel maps them in, and
maps neighbouring ones already in the page cache with them), so the decoder releases them (madvise DONTNEED: they
stay in the page cache) after each prefill chunk and whenever the rows read since the last release reach
`prefill_rows_bytes`: a long prompt batch or a long generation costs page faults from the page cache, not RAM.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from functools import lru_cache, partial
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mole_jax.config import ModelConfig, MoleError
from mole_jax.layers import KVCache
from mole_jax.model import Mid, Params, empty_cache, graphdef_and_shapes, per_expert_buffers
from mole_jax.row_sources import (
    TableReader,
    TierCounts,
    TieredRows,
    Transfers,
    nbytes,
    next_pow2,
    release_pages,
    row_source,
)
from mole_jax.sampling import DecodeState, Sampler, advance, positions

# The round trip a held speculation saves is a fraction of a step (0.1-0.3 of it measured on CPU at the small
# presets), so it pays from about 0.8-0.9 success; below, the redone steps cost more than the round trips saved.
SPECULATE_MIN_SUCCESS = 0.9
_SUCCESS_WEIGHT = 1 / 16  # the running estimate's weight on the newest step: it follows the last ~16 all-hit steps
DEFAULT_STEPS_PER_DISPATCH = 16  # chunked generation's K (see STEPS_PER_DISPATCH_NOTE in docs/decoding.md)
# A prefill with a table holds at most this many bytes of dequantized rows (float32, every layer) per chunk of
# positions, and a mapped table keeps at most about this many bytes of rows read in the process's resident set
# (see the module docstring). 64 MiB: prefill chunks of 128 tokens at 410M (256 at 160M), large enough that a
# chunk's matmuls run near the speed of the whole prompt's.
PREFILL_ROWS_BYTES = 64 << 20


class Pending(NamedTuple):
    """A step between `begin` and `finish`."""

    state: DecodeState
    mid: Mid | None = None  # split steps: block 0's front half
    cache0: KVCache | None = None  # and block 0's updated cache
    origin: DecodeState | None = None  # a speculated step: the state it started from (its cache donated)


class StepDecoder(Protocol):
    """What the generation loop and the benchmarks need of a decoder (Decoder, offload.OffloadDecoder).
    Use: state = prefill(...); then per step: pending = begin(state); ids = device_get(state.ids_Bx1);
    state = finish(pending, ids). `begin` dispatches whatever needs no host-side ids, so reading the ids on the
    host overlaps with the device's work."""

    params: Params
    h2d_bytes: int
    device_param_bytes: int

    def prefill(self, ids_BxT: np.ndarray, lengths_B: np.ndarray, cache_len: int, seed: int,
                sampler: Sampler | None, greedy: bool) -> DecodeState: ...

    def begin(self, state: DecodeState, sampler: Sampler | None, greedy: bool) -> Pending: ...

    def finish(self, pending: Pending, ids_B: np.ndarray, sampler: Sampler | None, greedy: bool) -> DecodeState: ...


# Jitted entry points: thin, separate functions, so that each is traced (and counted by the tests) on its own.
def _in_program(rows, ids_BxT):
    """A TableReader's rows of these tokens, read inside the jitted program; fetched rows as they are."""
    return rows.rows(ids_BxT) if isinstance(rows, TableReader) else rows


def _prefill(graphdef, *, greedy, params, cache, ids_BxT, lengths_B, seed, sampler, rows, mid=None):
    B, T = ids_BxT.shape
    logits_BxV, cache, _ = nnx.merge(graphdef, params).forward(
        ids_BxT, positions(jnp.zeros((B,), jnp.int32), T), caches=cache, rows=_in_program(rows, ids_BxT),
        last_B=lengths_B - 1, resume=mid)
    return advance(logits_BxV, cache, jax.random.key(seed), None if greedy else sampler, lengths_B)


def _prefill_chunk(graphdef, *, params, cache, ids_BxC, start, lengths_B, logits_BxV, rows):
    """Positions [start, start + C) of a chunked prefill: their KV entries written into `cache` (donated), and
    logits_BxV updated for the sequences whose last prompt position lies among them (the rest keep theirs)."""
    B, C = ids_BxC.shape
    last_B = lengths_B - 1 - start
    logits_c, cache, _ = nnx.merge(graphdef, params).forward(
        ids_BxC, positions(jnp.full((B,), start, jnp.int32), C), caches=cache, rows=_in_program(rows, ids_BxC),
        last_B=jnp.clip(last_B, 0, C - 1))
    here_B = (last_B >= 0) & (last_B < C)
    return cache, jnp.where(here_B[:, None], logits_c, logits_BxV)


def _prefill_end(*, greedy, cache, logits_BxV, lengths_B, seed, sampler):
    return advance(logits_BxV, cache, jax.random.key(seed), None if greedy else sampler, lengths_B)


def _one_step(model, greedy, sampler, rows, state: DecodeState) -> DecodeState:
    logits_BxV, cache, _ = model.forward(
        state.ids_Bx1, positions(state.pos_B, 1), caches=state.cache, rows=_in_program(rows, state.ids_Bx1),
        last_B=jnp.zeros_like(state.pos_B))
    return advance(logits_BxV, cache, state.key, None if greedy else sampler, state.pos_B + 1)


def _step(graphdef, *, greedy, params, cache, ids_Bx1, pos_B, key, sampler, rows, mid=None):
    if mid is None:
        return _one_step(nnx.merge(graphdef, params), greedy, sampler, rows,
                         DecodeState(ids_Bx1, pos_B, cache, key, None))
    logits_BxV, cache, _ = nnx.merge(graphdef, params).forward(
        ids_Bx1, positions(pos_B, 1), caches=cache, rows=rows, last_B=jnp.zeros_like(pos_B), resume=mid)
    return advance(logits_BxV, cache, key, sampler if not greedy else None, pos_B + 1)


class Chunk(NamedTuple):
    """A chunk of generation on the device: the state after it, and what the host reads of it."""

    state: DecodeState
    done_B: jax.Array  # bool: the sequence has produced eos_id
    made: jax.Array  # int32 scalar: tokens generated so far (the prefill's included)
    ids_KxB: jax.Array | None  # the tokens of the chunk's steps (rows past its last step: any value)
    logits_KxBxV: jax.Array | None  # with_logits: what each was sampled from
    total: jax.Array  # int32 scalar: the tokens to make in all
    eos_id: jax.Array  # int32 scalar: the stop token (-1: none)


def _chunk(graphdef, *, greedy, steps, with_logits, params, cache, ids_Bx1, pos_B, key, logits_BxV, done_B, made,
           total, eos_id, sampler, rows, forced_SxB=None):
    """Up to `steps` decode steps in one dispatch: until `total` tokens are made or every sequence has produced
    eos_id. forced_SxB (benchmarks): after making token g, feed forced_SxB[g] instead of it."""
    model = nnx.merge(graphdef, params)
    B, V = logits_BxV.shape
    done_B = done_B | (ids_Bx1[:, 0] == eos_id)
    ids_KxB = jnp.zeros((steps, B), jnp.int32)
    logits_KxBxV = jnp.zeros((steps, B, V), jnp.float32) if with_logits else None

    def cond(carry):
        i, _, done_B, made, *_ = carry
        return (i < steps) & (made < total) & ~jnp.all(done_B)

    def body(carry):
        i, state, done_B, made, ids_KxB, logits_KxBxV = carry
        state = _one_step(model, greedy, sampler, rows, state)
        ids_B = state.ids_Bx1[:, 0]
        ids_KxB = ids_KxB.at[i].set(ids_B)
        if with_logits:
            logits_KxBxV = logits_KxBxV.at[i].set(state.logits_BxV)
        if forced_SxB is not None:
            state = state._replace(ids_Bx1=forced_SxB[made][:, None])
        return i + 1, state, done_B | (ids_B == eos_id), made + 1, ids_KxB, logits_KxBxV

    start = DecodeState(ids_Bx1, pos_B, cache, key, logits_BxV)
    _, state, done_B, made, ids_KxB, logits_KxBxV = jax.lax.while_loop(
        cond, body, (jnp.int32(0), start, done_B, made, ids_KxB, logits_KxBxV))
    return Chunk(state, done_B, made, ids_KxB, logits_KxBxV, total, eos_id)


def _front(graphdef, *, params, cache0, ids_BxT, start_B=None):
    """Block 0's front half: what a split step computes before its rows are on the device. start_B: the tokens'
    first positions (None: 0, the prefill)."""
    model = nnx.merge(graphdef, params)
    B, T = ids_BxT.shape
    start_B = jnp.zeros((B,), jnp.int32) if start_B is None else start_B
    return model.blocks[0].front(model.embed(ids_BxT), positions(start_B, T), cache0)


class Decoder:
    """Prefill and decode steps of one model on the default device (see the module docstring).

    table: MoLE's lookup table (inference form) or None (Dense, MoE, MoLE training form: everything in-model).
    placement: where the table lives (row_sources.PLACEMENTS); host_read: how the host placement's rows reach the
        step (row_sources.HOST_READS: "program", the default, or "gather", the host's round trip); storage_read:
        the storage placement's (row_sources.STORAGE_READS: "auto", the default, maps the files on the CPU backend
        and reads batches through Tensorstore elsewhere).
    steps_per_dispatch: K, the steps one dispatch runs when the program reads every row itself (default
        DEFAULT_STEPS_PER_DISPATCH); a table the host fetches for runs one step per dispatch whatever K is.
    overlap: for a table the host fetches for, split each step in two jitted calls so that the row fetch runs
        while the device computes block 0's front half (default; False: one call per step).
    tier_K: the ids whose rows stay on the device in front of a table the host fetches for (row_sources.TieredRows).
    speculate: with a tier, dispatch a step before its ids are read when the previous step's ids all hit and the
        ids after an all-hit step have lately all hit often enough (see the module docstring).
    prefill_rows_bytes: with a table, the bound on a prefill chunk's rows and on a mapped table's resident rows
        (default PREFILL_ROWS_BYTES; see the module docstring).
    """

    def __init__(self, cfg: ModelConfig, params: Params, *, table=None, placement: str = "device",
                 host_read: str = "program", storage_read: str = "auto", steps_per_dispatch: int | None = None,
                 overlap: bool = True, tier_K: np.ndarray | None = None, speculate: bool = True,
                 prefill_rows_bytes: int = PREFILL_ROWS_BYTES):
        self.config, self.table, self.placement = cfg, table, placement
        if isinstance(prefill_rows_bytes, bool) or not isinstance(prefill_rows_bytes, (int, np.integer)) \
                or prefill_rows_bytes < 1:
            raise MoleError(f"prefill rows bytes must be a positive integer, got {prefill_rows_bytes!r}")
        self.prefill_rows_bytes = int(prefill_rows_bytes)
        self.steps_per_dispatch = check_steps_per_dispatch(steps_per_dispatch)
        self.transfers = Transfers()
        # CPU: each MoE expert its own buffer, so a step does not copy the experts it runs (a no-op elsewhere)
        params = per_expert_buffers(cfg, params)
        self.params = self.transfers.put(params) if _on_host(params) else params
        source = None if table is None else row_source(table, placement, self.transfers, tier_K,
                                                         host_read=host_read, storage_read=storage_read)
        self.reader = source if isinstance(source, TableReader) else None  # rows the program reads itself
        self.source = None if self.reader is not None else source  # rows the host fetches for each step
        self.fetching = self.source is not None
        self.chunked = not self.fetching
        self.rows_read = 0  # tokens whose rows the program read from a table off the device (host, storage)
        # A file mapping (CPU storage): its pages can be released from the process and faulted in again. Never an
        # anonymous buffer (the host placement's copy), whose pages MADV_DONTNEED would zero.
        self.mapped = placement == "storage" and self.reader is not None
        self._mapped_at_release = resident_file_bytes() if self.mapped else 0
        self.tiered = isinstance(self.source, TieredRows)
        self.speculate, self.redone, self._last_all_hit = speculate and self.tiered, 0, False
        self.speculation_success = 1.0  # P(a step's ids all hit | the previous step's did), a running estimate
        self.split = self.fetching and overlap
        graphdef, _ = graphdef_and_shapes(cfg, with_experts=table is None)
        jit = partial(jax.jit, static_argnames=("greedy",), donate_argnames=("cache",))
        self._zeros = jax.jit(partial(empty_cache, cfg), static_argnums=(0, 1))
        self._prefill = jit(partial(_prefill, graphdef))
        self._step = jit(partial(_step, graphdef))
        self._chunk = jax.jit(partial(_chunk, graphdef), static_argnames=("greedy", "steps", "with_logits"),
                              donate_argnames=("cache",))
        self._front = jax.jit(partial(_front, graphdef), donate_argnames=("cache0",))
        self._prefill_chunk = jax.jit(partial(_prefill_chunk, graphdef), donate_argnames=("cache",))
        self._prefill_end = jax.jit(_prefill_end, static_argnames=("greedy",), donate_argnames=("cache",))
        self._logits0 = jax.jit(lambda B: jnp.zeros((B, cfg.vocab_size), jnp.float32), static_argnums=0)

    @property
    def h2d_bytes(self) -> int:
        """Bytes moved host -> device: every put, and the rows the program read from host memory or storage."""
        off_device = self.reader is not None and self.placement != "device"
        return self.transfers.bytes_sent + (self.rows_read * self.table.row_nbytes if off_device else 0)

    @property
    def device_param_bytes(self) -> int:
        """What stays resident on the accelerator: the parameters, and the table (or its tier) when it lives there."""
        if self.placement == "device" and self.reader is not None:
            table = self.reader.stored
        else:
            table = self.source.stored if self.tiered else None
        return nbytes(self.params) + (nbytes(table) if table is not None else 0)

    @property
    def tier_counts(self) -> TierCounts | None:
        """A device tier's lookups so far (hits, rows fetched and sent), or None without a tier."""
        return self.source.counts if self.tiered else None

    def prefill_chunk_len(self, B: int, T: int) -> int:
        """The positions per prefill chunk for B prompts of T positions: T without a table; with one, the largest
        power of two C <= T with B * C tokens' rows (every layer, float32) within prefill_rows_bytes (at least 1:
        a decode step holds B tokens' rows anyway)."""
        if self.table is None:
            return T
        _, L, N, D = self.table.shape
        tokens = self.prefill_rows_bytes // (L * N * D * np.dtype(np.float32).itemsize)
        per_row = max(1, tokens // B)
        return min(T, 1 << (per_row.bit_length() - 1))

    def release_mapped(self) -> None:
        """A mapped table: drop the pages of its rows from this process's resident set (they stay in the page
        cache; the next read faults them in again). Nothing for any other table."""
        if self.mapped:
            for a in self.reader.stored.values():
                release_pages(a.unsafe_buffer_pointer(), a.nbytes)
            self._mapped_at_release = resident_file_bytes()

    def bound_mapped(self) -> None:
        """A mapped table: release its pages once the process's resident file pages have grown by
        prefill_rows_bytes since the last release. Measured, not counted from the rows read: a fault maps a whole
        large folio of the page cache (Linux 6.x; up to 2 MiB), so the pages mapped per row read depend on how the
        file was read into the cache (measured: 1,024 random 32 KiB rows mapped 376 MiB of a table read
        sequentially before, 60 MiB of a cold one)."""
        if self.mapped and resident_file_bytes() - self._mapped_at_release >= self.prefill_rows_bytes:
            self.release_mapped()

    def prefill(self, ids_BxT: np.ndarray, lengths_B: np.ndarray, cache_len: int, seed: int,
                sampler: Sampler | None, greedy: bool) -> DecodeState:
        B, T = ids_BxT.shape
        C = self.prefill_chunk_len(B, T)
        if C < T:
            return self._chunked_prefill(ids_BxT, lengths_B, cache_len, seed, sampler, greedy, C)
        cache = self._zeros(B, cache_len)
        ids_d, lengths_d, seed_d = self.transfers.put((ids_BxT, lengths_B, np.int32(seed)))
        args = dict(greedy=greedy, params=self.params, lengths_B=lengths_d, seed=seed_d, sampler=sampler)
        if not self.fetching:
            self.rows_read += ids_BxT.size if self.reader is not None else 0
            return self._prefill(**args, cache=cache, ids_BxT=ids_d, rows=self.reader)
        if self.tiered:
            self._last_all_hit = False  # the first step of a generation waits for its ids
            return self._prefill(**args, cache=cache, ids_BxT=ids_d, rows=self.source.fetch(ids_BxT, ids_d))
        num_rows = next_pow2(len(np.unique(ids_BxT)))  # one batched read of the prompts' distinct ids
        if not self.split:
            return self._prefill(**args, cache=cache, ids_BxT=ids_d, rows=self.source.fetch(ids_BxT, num_rows))
        mid, cache0 = self._front(params=self.params, cache0=cache[0], ids_BxT=ids_d)
        state = self._prefill(**args, cache=cache[1:], ids_BxT=ids_d, rows=self.source.fetch(ids_BxT, num_rows),
                              mid=mid)
        return state._replace(cache=[cache0, *state.cache])  # block 0's cache never passes through the second call

    def _chunked_prefill(self, ids_BxT: np.ndarray, lengths_B: np.ndarray, cache_len: int, seed: int,
                         sampler: Sampler | None, greedy: bool, C: int) -> DecodeState:
        """The prefill in chunks of C positions (the last may be shorter), one dispatch each: the same KV entries
        and logits as one pass, with a chunk's rows at a time (see the module docstring)."""
        B, T = ids_BxT.shape
        cache, logits_BxV = self._zeros(B, cache_len), self._logits0(B)
        lengths_d, seed_d = self.transfers.put((lengths_B, np.int32(seed)))
        for start in range(0, T, C):
            ids_BxC = np.ascontiguousarray(ids_BxT[:, start:start + C])
            ids_d, start_d = self.transfers.put((ids_BxC, np.int32(start)))
            if self.reader is not None:
                rows = self.reader
                self.rows_read += ids_BxC.size
            elif self.tiered:
                rows = self.source.fetch(ids_BxC, ids_d)
            else:
                rows = self.source.fetch(ids_BxC, next_pow2(len(np.unique(ids_BxC))))
            cache, logits_BxV = self._prefill_chunk(params=self.params, cache=cache, ids_BxC=ids_d, start=start_d,
                                                    lengths_B=lengths_d, logits_BxV=logits_BxV, rows=rows)
            if self.fetching or self.mapped:
                # Fetched rows: the next fetch may refill this chunk's staging buffer. Mapped rows: the pages this
                # chunk faulted in are released once it has read them. Either way the host waits for the chunk.
                jax.block_until_ready(logits_BxV)
                self.release_mapped()
        if self.tiered:
            self._last_all_hit = False  # the first step of a generation waits for its ids
        return self._prefill_end(greedy=greedy, cache=cache, logits_BxV=logits_BxV, lengths_B=lengths_d,
                                 seed=seed_d, sampler=sampler)

    def start(self, state: DecodeState, num_tokens: int, eos_id: int | None) -> Chunk:
        """The chunked loop's first carry: `state` (its ids the first of `num_tokens` tokens) and, on the device,
        the stop flags, the count of tokens made and the loop's constants (one put)."""
        if not self.chunked:
            raise MoleError("this decoder's table is fetched by the host: it runs one step per dispatch")
        # committed like a chunk's outputs, so that the first chunk and the next share one trace
        done, made, total, eos = self.transfers.put((np.zeros(state.ids_Bx1.shape[:1], bool), np.int32(1),
                                                     np.int32(num_tokens), np.int32(-1 if eos_id is None else eos_id)))
        return Chunk(state, done, made, None, None, total, eos)

    def chunk(self, carry: Chunk, sampler: Sampler | None, greedy: bool, *, with_logits: bool = False,
              forced_SxB: jax.Array | None = None) -> Chunk:
        """Dispatch the next chunk from `carry` (its cache donated): up to steps_per_dispatch steps. Moves nothing
        between the host and the device."""
        state = carry.state
        return self._chunk(greedy=greedy, steps=self.steps_per_dispatch, with_logits=with_logits,
                           params=self.params, cache=state.cache, ids_Bx1=state.ids_Bx1, pos_B=state.pos_B,
                           key=state.key, logits_BxV=state.logits_BxV, done_B=carry.done_B, made=carry.made,
                           total=carry.total, eos_id=carry.eos_id, sampler=sampler, rows=self.reader,
                           forced_SxB=forced_SxB)

    def begin(self, state: DecodeState, sampler: Sampler | None, greedy: bool) -> Pending:
        if not self.fetching:
            self.rows_read += state.ids_Bx1.shape[0] if self.reader is not None else 0
            return Pending(self._step(greedy=greedy, params=self.params, cache=state.cache, ids_Bx1=state.ids_Bx1,
                                      pos_B=state.pos_B, key=state.key, sampler=sampler, rows=self.reader))
        if self.speculate and self._last_all_hit and self.speculation_success >= SPECULATE_MIN_SUCCESS:
            return Pending(self._step(greedy=greedy, params=self.params, cache=state.cache, ids_Bx1=state.ids_Bx1,
                                      pos_B=state.pos_B, key=state.key, sampler=sampler,
                                      rows=self.source.idle(state.ids_Bx1)), origin=state)
        if not self.split:
            return Pending(state)  # everything waits for the rows
        mid, cache0 = self._front(params=self.params, cache0=state.cache[0], ids_BxT=state.ids_Bx1,
                                  start_B=state.pos_B)
        return Pending(state, mid, cache0)

    def finish(self, pending: Pending, ids_B: np.ndarray, sampler: Sampler | None, greedy: bool) -> DecodeState:
        if not self.fetching:
            return pending.state
        if self.tiered:
            return self._finish_tiered(pending, ids_B, sampler, greedy)
        rows = self.source.fetch(ids_B[:, None], len(ids_B))  # a fixed shape: no retrace as the distinct ids vary
        return self._complete(pending, rows, sampler, greedy)

    def _complete(self, pending: Pending, rows, sampler: Sampler | None, greedy: bool) -> DecodeState:
        """The step of `pending.state` with its rows: whole, or the rest after block 0's front half."""
        state = pending.state
        args = dict(greedy=greedy, params=self.params, ids_Bx1=state.ids_Bx1, pos_B=state.pos_B, key=state.key,
                    sampler=sampler, rows=rows)
        if pending.mid is None:
            return self._step(**args, cache=state.cache)
        new = self._step(**args, cache=state.cache[1:], mid=pending.mid)
        return new._replace(cache=[pending.cache0, *new.cache])

    def _finish_tiered(self, pending: Pending, ids_B: np.ndarray, sampler: Sampler | None,
                       greedy: bool) -> DecodeState:
        """A tiered step: the speculated one when its ids all hit, else (re)done with its missed rows. A redo starts
        from the speculated step's cache: only the slot at pos_B differs from the original's, and it is written
        again before it is read."""
        origin = pending.origin or pending.state
        rows = self.source.fetch(ids_B[:, None], origin.ids_Bx1)
        all_hit = self.source.all_hit(ids_B)
        if self._last_all_hit:  # would a speculation have held? (known whether or not this step speculated)
            self.speculation_success += (all_hit - self.speculation_success) * _SUCCESS_WEIGHT
        self._last_all_hit = all_hit
        if pending.origin is None:
            return self._complete(pending, rows, sampler, greedy)
        if all_hit:
            return pending.state
        self.redone += 1  # whole: the speculated step's cache, the original step's ids, positions and key
        return self._complete(Pending(origin._replace(cache=pending.state.cache)), rows, sampler, greedy)


def decode_loop(decoder: StepDecoder, state: DecodeState, num_tokens: int, sampler: Sampler | None,
                greedy: bool) -> Iterator[tuple[np.ndarray, jax.Array]]:
    """One step per dispatch, from a state whose ids are the first new tokens: yield `num_tokens` tokens per
    sequence (host numpy [B]) with the logits each came from (on the device). The next step is dispatched before
    the host reads the ids."""
    for i in range(num_tokens):
        pending = decoder.begin(state, sampler, greedy) if i + 1 < num_tokens else None
        ids_B = jax.device_get(state.ids_Bx1)[:, 0]  # one sync per step; the device is already busy
        yield ids_B, state.logits_BxV
        if pending is None:
            return
        state = decoder.finish(pending, ids_B, sampler, greedy)


def chunked_loop(decoder: Decoder, state: DecodeState, num_tokens: int, sampler: Sampler | None, greedy: bool, *,
                 eos_id: int | None = None, with_logits: bool = False,
                 forced_SxB: jax.Array | None = None) -> Iterator[tuple[np.ndarray, jax.Array | None]]:
    """decode_loop's tokens, K steps per dispatch: chunk c+1 is dispatched before the host reads chunk c's tokens.
    Stops after the step at which every sequence has produced eos_id. Logits (on the device) only with_logits,
    else None. forced_SxB: see `_chunk`."""
    K = decoder.steps_per_dispatch
    carry = decoder.start(state, num_tokens, eos_id)
    pending = decoder.chunk(carry, sampler, greedy, with_logits=with_logits, forced_SxB=forced_SxB) \
        if num_tokens > 1 else None
    first_B = jax.device_get(state.ids_Bx1)[:, 0]
    yield first_B, (state.logits_BxV if with_logits else None)
    made = 1
    live = eos_id is None or bool((first_B != eos_id).any())
    while pending is not None and live:
        ahead = made + K < num_tokens
        nxt = decoder.chunk(pending, sampler, greedy, with_logits=with_logits, forced_SxB=forced_SxB) \
            if ahead else None
        ids_KxB, now = jax.device_get((pending.ids_KxB, pending.made))
        if decoder.reader is not None:  # the rows the chunk's steps read
            decoder.rows_read += ids_KxB.shape[1] * (int(now) - made)
            decoder.bound_mapped()  # a mapped table's pages: released past the bound (the next chunk faults them in)
        for k in range(int(now) - made):
            yield ids_KxB[k], (pending.logits_KxBxV[k] if with_logits else None)
        live = int(now) - made == min(K, num_tokens - made)  # a chunk ends early only when every sequence stopped
        made, pending = int(now), nxt


def _random_state(cfg: ModelConfig, batch: int, filled: int, cache_len: int, key) -> DecodeState:
    k_ids, k_cache, key = jax.random.split(key, 3)
    shape = (batch, cfg.num_heads, cache_len, cfg.head_dim)
    cache = [KVCache(*(jax.random.normal(k, shape, cfg.dtype) for k in jax.random.split(kl)))
             for kl in jax.random.split(k_cache, cfg.num_layers)]
    ids_Bx1 = jax.random.randint(k_ids, (batch, 1), 0, cfg.vocab_size, jnp.int32)
    return DecodeState(ids_Bx1, jnp.full((batch,), filled, jnp.int32), cache, key,
                       jnp.zeros((batch, cfg.vocab_size), jnp.float32))


def random_state(cfg: ModelConfig, batch: int, filled: int, cache_len: int, seed: int = 0) -> DecodeState:
    """A decode state as if `filled` prompt positions had been prefilled, with random keys and values and random
    next ids: for timing decode steps without paying a long prefill (a step's cost does not depend on the
    values)."""
    if not filled < cache_len <= cfg.max_seq_len:
        raise MoleError(f"need filled < cache_len <= max_seq_len, got {filled}, {cache_len}, {cfg.max_seq_len}")
    return _random_state_fn(cfg, batch, filled, cache_len)(jax.random.key(seed))


@lru_cache(maxsize=64)
def _random_state_fn(cfg: ModelConfig, batch: int, filled: int, cache_len: int):
    """Compiled once per shape: a benchmark asks for the same state for every model it times."""
    return jax.jit(partial(_random_state, cfg, batch, filled, cache_len))


def check_steps_per_dispatch(steps: int | None) -> int:
    """K: a positive integer (None: DEFAULT_STEPS_PER_DISPATCH)."""
    if steps is None:
        return DEFAULT_STEPS_PER_DISPATCH
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise MoleError(f"steps per dispatch must be a positive integer, got {steps!r}")
    return int(steps)


def resident_file_bytes() -> int:
    """The bytes of file-backed and shared pages in this process's resident set (Linux /proc/self/statm's
    "shared" field: RssFile + RssShmem; ~10 us to read); 0 where there is no /proc."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[2]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


_PAGE_BYTES = mmap.PAGESIZE


def _on_host(tree) -> bool:
    return any(isinstance(x, np.ndarray) for x in jax.tree.leaves(tree))
