"""Inference: `mole_jax.load(ckpt, lut=..., lut_placement=...)` -> LanguageModel with `.logits`, `.generate`,
`.stream` and `.generate_text`.

Decoding is one batched prefill of the right-padded prompts, then one token per sequence per step from a
preallocated KV cache, each sequence at its own position (a padded prompt's stale cache entries stay masked until
they are overwritten). Every jitted function is traced once per (batch, cache length) bucket, takes only device
arrays and donates the cache; all host->device traffic is an explicit `jax.device_put`, counted in `h2d_bytes`.

MoLE's routed experts come from the lookup table: the rows of the step's tokens in the table's stored form
(float or quantized), dequantized on the device. Placements of the table:
  device   all of it in accelerator memory; rows gathered inside the step (the upper bound)
  host     in host RAM; the step's distinct ids are gathered into a reused staging buffer, one device_put per step
  storage  read from the Tensorstore table on disk, distinct ids only
With `overlap` (the default on accelerators), a host or storage step is two jitted calls: layer 0's attention
and shared FFN, which need no rows, are dispatched first from the ids still on the device; the host then reads the
ids, fetches their rows while the device works, and dispatches the rest of the step. (A jitted call starts only
when all of its inputs are ready, so one call could not overlap the fetch.) Dense, MoE and the device placement
need no host-side ids: step t+1 is dispatched before the host reads step t's tokens.
"""

from __future__ import annotations

from collections import deque
from functools import partial
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mole_jax import checkpoint
from mole_jax import lut as lut_lib
from mole_jax.config import ModelConfig, MoleError
from mole_jax.layers import KVCache
from mole_jax.model import Params, graphdef_and_shapes, without_routed_experts

PLACEMENTS = ("device", "host", "storage")


def check_ids(ids, cfg: ModelConfig, *, max_len: int | None = None) -> np.ndarray:
    """Validate token ids on the host: an int array [B, T], 0 <= id < V, T within the context."""
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise MoleError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise MoleError(f"token ids must have shape [batch, length], got shape {arr.shape}")
    if arr.size == 0:
        raise MoleError(f"token ids are empty (shape {arr.shape})")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= cfg.vocab_size:
        bad = lo if lo < 0 else hi
        raise MoleError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
    limit = max_len or cfg.max_seq_len
    if arr.shape[1] > limit:
        raise MoleError(f"sequence length {arr.shape[1]} exceeds the model's context of {limit} tokens")
    return arr.astype(np.int32)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# Sampling, on the device ----------------------------------------------------------------------------------------
class Sampler(NamedTuple):
    """Sampling settings as device scalars, so that changing them does not retrace the step."""

    temperature: jax.Array  # float32, > 0 (temperature 0 is the static greedy path)
    top_k: jax.Array  # int32 in [1, V]; V keeps every token
    top_p: jax.Array  # float32 in (0, 1]; 1 keeps every token


def sample(logits_BxV: jax.Array, key: jax.Array, sampler: Sampler | None) -> jax.Array:
    """Next token per row: argmax when `sampler` is None, else temperature, top-k then top-p (nucleus) sampling."""
    if sampler is None:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    V = logits_BxV.shape[-1]
    logits_BxV = logits_BxV / sampler.temperature
    desc_BxV = -jnp.sort(-logits_BxV, axis=-1)
    kth_Bx1 = desc_BxV[:, jnp.clip(sampler.top_k, 1, V) - 1][:, None]
    desc_BxV = jnp.where(desc_BxV < kth_Bx1, -jnp.inf, desc_BxV)
    probs_BxV = jax.nn.softmax(desc_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # of the strictly more likely tokens
    keep_BxV = (desc_BxV > -jnp.inf) & ((mass_before_BxV < sampler.top_p) | (sampler.top_p >= 1.0))
    cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, desc_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


class DecodeState(NamedTuple):
    """Everything a decode step carries, on the device."""

    ids_Bx1: jax.Array  # the tokens sampled last, fed next
    pos_B: jax.Array  # their positions
    cache: list[KVCache]
    key: jax.Array
    logits_BxV: jax.Array  # what ids_Bx1 were sampled from (float32)


def advance(logits_BxV, cache, key, sampler, next_pos_B) -> DecodeState:
    key, sub = jax.random.split(key)
    return DecodeState(sample(logits_BxV, sub, sampler)[:, None], next_pos_B, cache, key, logits_BxV)


def zeros_cache(cfg: ModelConfig, batch: int, length: int) -> list[KVCache]:
    return [KVCache.zeros(cfg, batch, length) for _ in range(cfg.num_layers)]


# The forward pass, in pieces ----------------------------------------------------------------------------------
def _embed(model, ids_BxT):
    return model.embed_VxD[...][ids_BxT].astype(model.cfg.dtype)


def logits_at(norm_out, unembed_DxV, h_BxTxD, last_B):
    """Logits of one position per sequence only: prefill need not pay the [B, T, V] head."""
    h_BxD = norm_out(h_BxTxD[jnp.arange(h_BxTxD.shape[0]), last_B])
    return jnp.einsum("bd,dv->bv", h_BxD, unembed_DxV[...].astype(h_BxD.dtype), preferred_element_type=jnp.float32)


class Rows(NamedTuple):
    """MoLE's LUT rows on the device, in the table's stored form: `stored` arrays of R rows (the whole table for
    the device placement, else the step's distinct ids) and each token's row among them."""

    stored: dict[str, jax.Array]  # every array [R, L, ...] (lut.Layout.arrays)
    index_BxT: jax.Array
    scheme: str


def _layer_rows(rows: Rows, l: int) -> jax.Array:
    """Layer l's rows of the tokens, [B, T, N, D]: pick, then dequantize only what this layer reads."""
    B, T = rows.index_BxT.shape
    picked = {k: v[rows.index_BxT.reshape(-1), l:l + 1] for k, v in rows.stored.items()}
    rows_Mx1xNxD = lut_lib.dequantize(picked, rows.scheme, xp=jnp)
    return rows_Mx1xNxD.reshape(B, T, *rows_Mx1xNxD.shape[2:])


def _hidden(model, ids_BxT, pos_BxT, cache, rows: Rows | None):
    """Every layer, before the final norm; MoLE reads `rows` (inference form) or runs its experts (training form,
    rows None). cache: one KVCache per layer, or None for a full causal pass."""
    x0_BxTxD = _embed(model, ids_BxT)
    expert_input = None
    if model.cfg.kind == "mole" and rows is None:
        expert_input = model._expert_input(ids_BxT, x0_BxTxD, 0)
    h_BxTxD, new_cache = x0_BxTxD, []
    for l, block in enumerate(model.blocks):
        h_BxTxD, c, _ = block(h_BxTxD, pos_BxT, cache=None if cache is None else cache[l],
                              expert_input=expert_input, lut_BxTxNxD=None if rows is None else _layer_rows(rows, l))
        new_cache.append(c)
    return h_BxTxD, new_cache


def _forward(model, ids_BxT, pos_BxT, cache, last_B, rows: Rows | None):
    h_BxTxD, new_cache = _hidden(model, ids_BxT, pos_BxT, cache, rows)
    return logits_at(model.norm_out, model.unembed_DxV, h_BxTxD, last_B), new_cache


def _layer0_without_rows(model, ids_BxT, pos_BxT, cache0):
    """Layer 0 up to its routed experts: attention and shared FFN (Block.__call__'s order of operations)."""
    block = model.blocks[0]
    h_BxTxD = _embed(model, ids_BxT)
    a, cache0 = block.attn(block.norm_in(h_BxTxD), pos_BxT, cache0)
    h_BxTxD = h_BxTxD + a
    u_BxTxD = block.norm_post(h_BxTxD)
    return (h_BxTxD, u_BxTxD, block.ffn(u_BxTxD)), cache0


def _forward_with_rows(model, carry, pos_BxT, cache_rest, last_B, rows):
    """The rest of the step once the rows are on the device: layer 0's routed experts, then layers 1..L-1."""
    h_BxTxD, u_BxTxD, shared_BxTxD = carry
    h_BxTxD = h_BxTxD + (shared_BxTxD + model.blocks[0]._mole_routed(u_BxTxD, None, _layer_rows(rows, 0)))
    new_cache = []
    for l in range(1, model.cfg.num_layers):
        h_BxTxD, c, _ = model.blocks[l](h_BxTxD, pos_BxT, cache=cache_rest[l - 1], lut_BxTxNxD=_layer_rows(rows, l))
        new_cache.append(c)
    return logits_at(model.norm_out, model.unembed_DxV, h_BxTxD, last_B), new_cache


def positions(start_B, T):
    return start_B[:, None] + jnp.arange(T, dtype=jnp.int32)


# Jitted entry points. Thin separate functions so that each is traced (and counted by tests) on its own.
def _rows(scheme, stored, index_BxT, ids_BxT) -> Rows | None:
    """The device placement indexes its resident table by token id; fetched rows come with their index."""
    return None if stored is None else Rows(stored, ids_BxT if index_BxT is None else index_BxT, scheme)


def _prefill(graphdef, scheme, greedy, params, cache, ids_BxT, lengths_B, seed, sampler, stored, index_BxT):
    model = nnx.merge(graphdef, params)
    B, T = ids_BxT.shape
    rows = _rows(scheme, stored, index_BxT, ids_BxT)
    logits_BxV, cache = _forward(model, ids_BxT, positions(jnp.zeros((B,), jnp.int32), T), cache,
                                 lengths_B - 1, rows)
    return advance(logits_BxV, cache, jax.random.key(seed), None if greedy else sampler, lengths_B)


def _step(graphdef, scheme, greedy, params, cache, ids_Bx1, pos_B, key, sampler, stored, index_Bx1):
    model = nnx.merge(graphdef, params)
    rows = _rows(scheme, stored, index_Bx1, ids_Bx1)
    logits_BxV, cache = _forward(model, ids_Bx1, positions(pos_B, 1), cache, jnp.zeros_like(pos_B), rows)
    return advance(logits_BxV, cache, key, None if greedy else sampler, pos_B + 1)


def _prefill_pre(graphdef, params, cache0, ids_BxT):
    B, T = ids_BxT.shape
    return _layer0_without_rows(nnx.merge(graphdef, params), ids_BxT,
                                positions(jnp.zeros((B,), jnp.int32), T), cache0)


def _prefill_post(graphdef, scheme, greedy, params, cache_rest, carry, lengths_B, seed, sampler, stored,
                  inverse_BxT):
    model = nnx.merge(graphdef, params)
    B, T = inverse_BxT.shape
    rows = Rows(stored, inverse_BxT, scheme)
    logits_BxV, cache_rest = _forward_with_rows(model, carry, positions(jnp.zeros((B,), jnp.int32), T),
                                                cache_rest, lengths_B - 1, rows)
    return advance(logits_BxV, cache_rest, jax.random.key(seed), None if greedy else sampler, lengths_B)


def _step_pre(graphdef, params, cache0, ids_Bx1, pos_B):
    return _layer0_without_rows(nnx.merge(graphdef, params), ids_Bx1, positions(pos_B, 1), cache0)


def _step_post(graphdef, scheme, greedy, params, cache_rest, carry, pos_B, key, sampler, stored, inverse_Bx1):
    model = nnx.merge(graphdef, params)
    rows = Rows(stored, inverse_Bx1, scheme)
    logits_BxV, cache_rest = _forward_with_rows(model, carry, positions(pos_B, 1), cache_rest,
                                                jnp.zeros_like(pos_B), rows)
    return advance(logits_BxV, cache_rest, key, None if greedy else sampler, pos_B + 1)


def _full_logits(graphdef, params, ids_BxT, lut_rows):
    model = nnx.merge(graphdef, params)
    lut = None if lut_rows is None else lut_rows[0][lut_rows[1]]
    return model(ids_BxT, lut_BxTxLxNxD=lut).logits_BxTxV


def _token_logprobs(graphdef, scheme, params, ids_BxT, targets_BxT, stored, index_BxT):
    """log p(target | prefix) and whether the target is the argmax, at every position ([B, T] each). The head runs
    one sequence at a time (lax.map): memory holds [T, V] logits, never [B, T, V] (16 x 2048 x 50304 is 6.6 GB)."""
    model = nnx.merge(graphdef, params)
    B, T = ids_BxT.shape
    rows = _rows(scheme, stored, index_BxT, ids_BxT)
    h_BxTxD, _ = _hidden(model, ids_BxT, positions(jnp.zeros((B,), jnp.int32), T), None, rows)
    h_BxTxD = model.norm_out(h_BxTxD)
    unembed_DxV = model.unembed_DxV[...].astype(h_BxTxD.dtype)

    def score(args):
        h_TxD, target_T = args
        logits_TxV = jnp.einsum("td,dv->tv", h_TxD, unembed_DxV, preferred_element_type=jnp.float32)
        logp_T = jnp.take_along_axis(jax.nn.log_softmax(logits_TxV, axis=-1), target_T[:, None], axis=-1)[:, 0]
        return logp_T, jnp.argmax(logits_TxV, axis=-1) == target_T

    return jax.lax.map(score, (h_BxTxD, targets_BxT))


# Row sources for the host and storage placements -------------------------------------------------------------
class _Staging:
    """Reused host buffers for a step's stored rows, in the table's stored form. Two per shape, used in turn: a
    buffer is rewritten two steps after it was sent, when that step's transfer (asynchronous, or a zero-copy alias
    on CPU) and computation are long over."""

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


class _HostRows:
    """The host placement: the whole stored table in host RAM, rows gathered with np.take."""

    def __init__(self, table):
        self.stored = table.read_all_stored()
        self.staging = _Staging(table)

    def gather(self, ids_U: np.ndarray, num_rows: int) -> dict[str, np.ndarray]:
        out = self.staging.buffer(num_rows)
        for k, v in self.stored.items():
            np.take(v, ids_U, axis=0, out=out[k][:len(ids_U)])
        return out


class _StorageRows:
    """The storage placement: rows read from the table on disk (one batched Tensorstore read)."""

    def __init__(self, table):
        self.table = table
        self.staging = _Staging(table)

    def gather(self, ids_U: np.ndarray, num_rows: int) -> dict[str, np.ndarray]:
        out = self.staging.buffer(num_rows)
        for k, v in self.table.read_stored(ids_U).items():
            out[k][:len(ids_U)] = v
        return out


class Pending(NamedTuple):
    """A step between `begin` and `finish`."""

    state: DecodeState
    carry: Any = None  # split steps: layer 0's output before its routed experts
    cache0: Any = None


class Decoder:
    """Prefill and decode steps of one model on the default device.

    table: MoLE's lookup table (inference form) or None (Dense, MoE, MoLE training form: everything in-model).
    overlap: for the host and storage placements, split each step in two jitted calls so that the row fetch runs
        while the device computes layer 0's attention (see the module docstring). Default: on accelerators. On
        the CPU backend the "device" is the host's own cores, so there is nothing idle to overlap with, and each
        call pays for fresh pages of its large temporaries (XLA's CPU allocator), which a second call doubles.
    Use: state = prefill(...); then per step: pending = begin(state); ids = device_get(state.ids_Bx1);
    state = finish(pending, ids). `begin` dispatches what needs no host-side ids (all of a step, unless rows come
    from the host), so reading the ids on the host overlaps with the device's work.
    """

    def __init__(self, cfg: ModelConfig, params: Params, *, table=None, placement: str = "device",
                 overlap: bool | None = None):
        self.config, self.table, self.placement = cfg, table, placement
        self.h2d_bytes = 0  # every byte this decoder has sent to the device
        graphdef, _ = graphdef_and_shapes(cfg, with_experts=table is None)
        scheme = table.scheme if table is not None else None
        self.params = self.put(params) if _on_host(params) else params
        self.device_table = None
        if table is not None and placement == "device":
            self.device_table = self.put(table.read_all_stored())
        fetching = table is not None and placement != "device"
        self.rows = {"host": _HostRows, "storage": _StorageRows}[placement](table) if fetching else None
        self.split = fetching and (jax.default_backend() != "cpu" if overlap is None else overlap)
        jit = partial(jax.jit, static_argnums=(0,))
        self._zeros = jax.jit(partial(zeros_cache, cfg), static_argnums=(0, 1))
        self._prefill = jit(partial(_prefill, graphdef, scheme), donate_argnums=(2,))
        self._step = jit(partial(_step, graphdef, scheme), donate_argnums=(2,))
        if self.split:
            self._prefill_pre = jax.jit(partial(_prefill_pre, graphdef), donate_argnums=(1,))
            self._prefill_post = jit(partial(_prefill_post, graphdef, scheme), donate_argnums=(2,))
            self._step_pre = jax.jit(partial(_step_pre, graphdef), donate_argnums=(1,))
            self._step_post = jit(partial(_step_post, graphdef, scheme), donate_argnums=(2,))

    @property
    def device_param_bytes(self) -> int:
        """What stays resident on the accelerator: the parameters, and the table when it lives there."""
        return nbytes(self.params) + (nbytes(self.device_table) if self.device_table is not None else 0)

    def put(self, tree):
        """The one way onto the device: explicit, and counted."""
        self.h2d_bytes += nbytes(tree)
        return jax.device_put(tree)

    def _fetch(self, ids: np.ndarray, num_rows: int):
        """Stored rows of the distinct ids (padded to `num_rows`) and each token's row among them, in one put."""
        unique_U, inverse = np.unique(ids.reshape(-1), return_inverse=True)
        stored = self.rows.gather(unique_U, num_rows)
        return self.put((stored, inverse.reshape(ids.shape).astype(np.int32)))

    def prefill(self, ids_BxT: np.ndarray, lengths_B: np.ndarray, cache_len: int, seed: int,
                sampler: Sampler | None, greedy: bool) -> DecodeState:
        B, _ = ids_BxT.shape
        cache = self._zeros(B, cache_len)
        ids_d, lengths_d, seed_d = self.put((ids_BxT, lengths_B, np.int32(seed)))
        num_rows = _next_pow2(len(np.unique(ids_BxT)))  # one batched read of every prompt row
        if self.rows is None:
            return self._prefill(greedy, self.params, cache, ids_d, lengths_d, seed_d, sampler, self.device_table,
                                 None)
        if not self.split:
            return self._prefill(greedy, self.params, cache, ids_d, lengths_d, seed_d, sampler,
                                 *self._fetch(ids_BxT, num_rows))
        carry, cache0 = self._prefill_pre(self.params, cache[0], ids_d)
        stored, inverse = self._fetch(ids_BxT, num_rows)
        state = self._prefill_post(greedy, self.params, cache[1:], carry, lengths_d, seed_d, sampler, stored, inverse)
        return state._replace(cache=[cache0, *state.cache])  # layer 0's cache never passes through post (a copy)

    def begin(self, state: DecodeState, sampler: Sampler | None, greedy: bool) -> Pending:
        if self.rows is None:
            return Pending(self._step(greedy, self.params, state.cache, state.ids_Bx1, state.pos_B, state.key,
                                      sampler, self.device_table, None))
        if not self.split:
            return Pending(state)  # everything waits for the rows
        carry, cache0 = self._step_pre(self.params, state.cache[0], state.ids_Bx1, state.pos_B)
        return Pending(state, carry, cache0)

    def finish(self, pending: Pending, ids_B: np.ndarray, sampler: Sampler | None, greedy: bool) -> DecodeState:
        if self.rows is None:
            return pending.state
        state = pending.state
        rows = self._fetch(ids_B[:, None], len(ids_B))  # fixed shape: no retrace as the distinct ids vary
        if not self.split:
            return self._step(greedy, self.params, state.cache, state.ids_Bx1, state.pos_B, state.key, sampler,
                              *rows)
        new = self._step_post(greedy, self.params, state.cache[1:], pending.carry, state.pos_B, state.key, sampler,
                              *rows)
        return new._replace(cache=[pending.cache0, *new.cache])


def decode_loop(decoder, state: DecodeState, num_tokens: int, sampler: Sampler | None,
                greedy: bool) -> Iterator[tuple[np.ndarray, jax.Array]]:
    """From a state whose ids are the first new tokens: yield `num_tokens` tokens per sequence (host numpy [B])
    with the logits each came from (on the device). The next step is dispatched before the host reads the ids."""
    for i in range(num_tokens):
        pending = decoder.begin(state, sampler, greedy) if i + 1 < num_tokens else None
        ids_B = jax.device_get(state.ids_Bx1)[:, 0]  # one sync per step; the device is already busy
        yield ids_B, state.logits_BxV
        if pending is None:
            return
        state = decoder.finish(pending, ids_B, sampler, greedy)


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
    return jax.jit(partial(_random_state, cfg, batch, filled, cache_len))(jax.random.key(seed))


def _on_host(tree) -> bool:
    return any(isinstance(x, np.ndarray) for x in jax.tree.leaves(tree))


# The model -------------------------------------------------------------------------------------------------------
class LanguageModel:
    """A model ready for inference on the default device: `.logits`, `.token_logprobs` (scoring), `.generate`,
    `.stream`, `.generate_text`.

    table: MoLE's lookup table (a `lut.LookupTable`, or any object with its interface) for the inference form,
    kept at `placement`; None runs the model as trained. offload_experts: MoE only, the offloading baseline.
    overlap: see Decoder.
    """

    def __init__(self, cfg: ModelConfig, params: Params, *, table=None, placement: str = "device",
                 offload_experts: bool = False, overlap: bool | None = None, run_dir: Path | None = None):
        if placement not in PLACEMENTS:
            raise MoleError(f"unknown LUT placement {placement!r}: use one of {', '.join(PLACEMENTS)}")
        if table is not None and cfg.kind != "mole":
            raise MoleError(f"a lookup table is only for MoLE models, not {cfg.kind}")
        if offload_experts and cfg.kind != "moe":
            raise MoleError(f"expert offloading is the MoE baseline; this model is {cfg.kind}")
        self.config, self.table, self.run_dir, self.offload_experts = cfg, table, run_dir, offload_experts
        self.placement = placement if table is not None else None
        self._tokenizer = None
        if offload_experts:
            from mole_jax.offload import OffloadDecoder

            self.decoder = OffloadDecoder(cfg, params)
        else:
            if table is not None:
                _check_table_shape(table, cfg)
                if "experts" in params["blocks"][0]:
                    params = without_routed_experts(params)
            self.decoder = Decoder(cfg, params, table=table, placement=placement, overlap=overlap)
        self.graphdef, _ = graphdef_and_shapes(cfg, with_experts=table is None)
        self._logits = jax.jit(partial(_full_logits, self.graphdef))
        self._token_logprobs = jax.jit(partial(_token_logprobs, self.graphdef,
                                               table.scheme if table is not None else None))
        self._scoring: deque = deque()  # token_logprobs calls whose fetched rows may still be in use

    @property
    def params(self) -> Params:
        return self.decoder.params

    @property
    def h2d_bytes(self) -> int:
        """Bytes sent host -> device so far (parameters, tables, prompts, LUT rows, offloaded experts)."""
        return self.decoder.h2d_bytes

    @property
    def device_param_bytes(self) -> int:
        return self.decoder.device_param_bytes

    def logits(self, ids) -> np.ndarray:
        """Next-token logits, float32 numpy [B, T, V], for int token ids [B, T] (one full pass, no cache)."""
        ids = check_ids(ids, self.config)
        if self.offload_experts:
            raise MoleError("logits() needs the experts on the device; load the MoE without offload_experts")
        lut_rows = None
        if self.table is not None:
            unique_U, inverse = np.unique(ids.reshape(-1), return_inverse=True)
            lut_rows = (self.table.rows(unique_U), inverse.reshape(ids.shape).astype(np.int32))
        ids_d, lut_rows = self.decoder.put((ids, lut_rows))
        return jax.device_get(self._logits(self.params, ids_d, lut_rows))

    def token_logprobs(self, inputs_BxT, targets_BxT) -> tuple[jax.Array, jax.Array]:
        """Scoring, as lm-eval's loglikelihood needs it: for int token ids [B, T] and their next tokens [B, T],
        log p(targets[b, t] | inputs[b, :t+1]) (float32 [B, T]) and whether each target is the argmax (bool [B, T]).

        One jitted call on the device; only these [B, T] values come back, never the [B, T, V] logits. It is traced
        once per (B, T) (pad T to a few buckets), and for a table at the host or storage placement per power of two
        of distinct ids: the rows of the batch's distinct ids travel in the table's stored form, in one put (the
        device placement gathers from its resident table). Returns device arrays as soon as the call is dispatched,
        so the caller can prepare the next batch while this one runs (np.asarray reads them).
        """
        ids = check_ids(inputs_BxT, self.config)
        targets = check_ids(targets_BxT, self.config)
        if targets.shape != ids.shape:
            raise MoleError(f"targets have shape {targets.shape} but inputs have shape {ids.shape}")
        if self.offload_experts:
            raise MoleError("token_logprobs() needs the experts on the device; load the MoE without offload_experts")
        dec = self.decoder
        ids_d, targets_d = dec.put((ids, targets))
        if dec.rows is None:  # everything is on the device: the parameters and, for MoLE, any table
            return self._token_logprobs(self.params, ids_d, targets_d, dec.device_table, None)
        if len(self._scoring) == 2:  # the staging buffer about to be refilled was sent two calls ago: done?
            jax.block_until_ready(self._scoring.popleft())
        stored, index_BxT = dec._fetch(ids, _next_pow2(len(np.unique(ids))))
        out = self._token_logprobs(self.params, ids_d, targets_d, stored, index_BxT)
        self._scoring.append(out)
        return out

    # Generation ----------------------------------------------------------------------------------------------
    def _prompts(self, prompt_ids, max_new_tokens: int) -> tuple[list[np.ndarray], bool]:
        """Validated prompts, and whether a single prompt (a flat list or 1-D array) was given."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens < 1:
            raise MoleError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not isinstance(prompt_ids, (list, tuple, np.ndarray, jax.Array)):
            raise MoleError(f"prompts must be token ids (a list of ints, a list of lists, or an int array), got "
                            f"{type(prompt_ids).__name__}")
        if len(prompt_ids) == 0:
            raise MoleError("the prompt is empty: give at least one token")
        single = all(np.ndim(p) == 0 for p in prompt_ids)
        out = []
        for i, p in enumerate([prompt_ids] if single else prompt_ids):
            if np.size(p) == 0:
                raise MoleError("the prompt is empty: give at least one token" if single else
                                f"prompt {i} is empty: give at least one token")
            p = check_ids(np.asarray(p).reshape(1, -1), self.config)[0]
            if len(p) + max_new_tokens > self.config.max_seq_len:
                raise MoleError(f"a prompt of {len(p)} tokens plus {max_new_tokens} new tokens exceeds the model's "
                                f"context of {self.config.max_seq_len} tokens")
            out.append(p)
        return out, single

    def _prepare(self, prompt_ids, max_new_tokens, temperature, top_k, top_p, eos_id):
        prompts, single = self._prompts(prompt_ids, max_new_tokens)
        if eos_id is not None and not 0 <= eos_id < self.config.vocab_size:
            raise MoleError(f"eos_id {eos_id} is outside the vocabulary [0, {self.config.vocab_size})")
        return prompts, single, self._sampler(temperature, top_k, top_p)

    def _sampler(self, temperature, top_k, top_p) -> Sampler | None:
        V = self.config.vocab_size
        if not temperature >= 0:
            raise MoleError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
        if top_k is not None and not 1 <= top_k:
            raise MoleError(f"top_k must be a positive integer, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise MoleError(f"top_p must be in (0, 1], got {top_p}")
        if temperature == 0:
            return None
        return self.decoder.put(Sampler(np.float32(temperature), np.int32(min(top_k or V, V)),
                                        np.float32(top_p or 1.0)))

    def _steps(self, prompts: list[np.ndarray], max_new_tokens: int, sampler: Sampler | None,
               seed: int) -> Iterator[tuple[np.ndarray, jax.Array]]:
        """Per step: the new token of every sequence (host numpy [B]) and the logits it came from (device)."""
        lengths = np.array([len(p) for p in prompts], np.int32)
        longest = int(lengths.max())
        cache_len = min(_next_pow2(longest + max_new_tokens), self.config.max_seq_len)
        T = min(max(_next_pow2(longest), 8), cache_len)
        # Right-padded with each prompt's first token: the padding's keys stay masked, and MoLE needs no extra row.
        ids_BxT = np.stack([np.concatenate([p, np.full(T - len(p), p[0], np.int32)]) for p in prompts])
        greedy = sampler is None
        state = self.decoder.prefill(ids_BxT, lengths, cache_len, seed, sampler, greedy)
        yield from decode_loop(self.decoder, state, max_new_tokens, sampler, greedy)

    def stream(self, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, eos_id: int | None = None, seed: int = 0) -> Iterator[list[int | None]]:
        """Yield, step by step, each prompt's new token id, or None for a prompt that already stopped at eos_id.
        See `generate` for the arguments."""
        prompts, _, sampler = self._prepare(prompt_ids, max_new_tokens, temperature, top_k, top_p, eos_id)
        live = np.ones(len(prompts), bool)
        for ids_B, _ in self._steps(prompts, max_new_tokens, sampler, seed):
            out = [int(t) if a else None for t, a in zip(ids_B, live)]
            if eos_id is not None:
                live &= ids_B != eos_id
            yield [None if t == eos_id else t for t in out]
            if not live.any():
                return

    def generate(self, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, eos_id: int | None = None, seed: int = 0,
                 return_logits: bool = False):
        """New token ids for each prompt.

        prompt_ids: one prompt (a list of ints), a list of prompts of any lengths, or an int array [B, T].
        temperature 0 (the default) is greedy; otherwise sample from softmax(logits / temperature) restricted to
        the top_k most likely tokens and to the smallest set whose probability reaches top_p. Generation of a
        sequence stops before eos_id (not included). Returns a list of ints for one prompt, else a list of lists;
        with return_logits, also the float32 logits each new token was chosen from ([n_new, V] per prompt).
        """
        prompts, single, sampler = self._prepare(prompt_ids, max_new_tokens, temperature, top_k, top_p, eos_id)
        new = [[] for _ in prompts]
        logits = [[] for _ in prompts]
        live = np.ones(len(prompts), bool)
        for ids_B, logits_BxV in self._steps(prompts, max_new_tokens, sampler, seed):
            if return_logits:
                logits_BxV = jax.device_get(logits_BxV)
            for b in np.flatnonzero(live):
                if eos_id is not None and ids_B[b] == eos_id:
                    live[b] = False
                    continue
                new[b].append(int(ids_B[b]))
                if return_logits:
                    logits[b].append(logits_BxV[b])
            if not live.any():
                break
        if return_logits:
            logits = [np.stack(x) if x else np.zeros((0, self.config.vocab_size), np.float32) for x in logits]
            return (new[0], logits[0]) if single else (new, logits)
        return new[0] if single else new

    # Text ------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The run's tokenizer (RUN_DIR/tokenizer.json), or None."""
        if self._tokenizer is None and self.run_dir is not None:
            path = Path(self.run_dir) / checkpoint.TOKENIZER
            if path.is_file():
                from mole_jax.data import load_tokenizer

                self._tokenizer = load_tokenizer(path)
        return self._tokenizer

    @property
    def eos_id(self) -> int | None:
        from mole_jax.data import EOS

        return None if self.tokenizer is None else self.tokenizer.token_to_id(EOS)

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise MoleError("this run has no tokenizer (RUN_DIR/tokenizer.json): give token ids instead of text")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        ids = self._need_tokenizer().encode(text, add_special_tokens=False).ids
        if not ids:
            raise MoleError("the prompt is empty: give at least one token")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._need_tokenizer().decode(list(ids))

    def generate_text(self, prompt: str | Sequence[str], max_new_tokens: int, **kw) -> str | list[str]:
        """The continuation of each prompt as text (stopping at the tokenizer's end-of-text token by default);
        keyword arguments as for `generate`."""
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        kw.setdefault("eos_id", self.eos_id)
        new = self.generate([self.encode(t) for t in texts], max_new_tokens, **kw)
        out = [self.decode(ids) for ids in new]
        return out[0] if isinstance(prompt, str) else out


def _check_table_shape(table, cfg: ModelConfig) -> None:
    want = (cfg.vocab_size, cfg.num_layers, cfg.num_experts, cfg.d_model)
    if tuple(table.shape) != want:
        raise MoleError(f"the lookup table at {table.path} has shape {tuple(table.shape)}; this model needs {want}")


def _open_table(lut) -> lut_lib.LookupTable:
    return lut if isinstance(lut, lut_lib.LookupTable) else lut_lib.open_lut(lut)


def _check_fingerprint(table, expected_fingerprint: str, what) -> lut_lib.LookupTable:
    """The table must have been built from these weights."""
    if table.fingerprint != expected_fingerprint:
        raise MoleError(f"the lookup table at {table.path} was built from another checkpoint than {what} "
                        f"(fingerprint {table.fingerprint[:12]} != {expected_fingerprint[:12]})")
    return table


def load(path: str | Path, lut=None, lut_placement: str = "device", *, offload_experts: bool = False,
         overlap: bool | None = None) -> LanguageModel:
    """Load a checkpoint (a run directory = its latest step, a checkpoints directory, or a step directory).

    lut: MoLE only: a lookup table directory (or an opened table) to decode with, in inference form: the routed
        experts never reach the device. An inference-form checkpoint (imported from the authors' `moe_table`)
        uses RUN_DIR/lut by default. The table must have been built from this checkpoint's weights.
    lut_placement: where the table lives while decoding: "device", "host" (RAM) or "storage" (disk).
    offload_experts: MoE only: keep the routed experts in host memory (the paper's offloading baseline).
    overlap: host/storage placements: overlap the row fetch with layer 0 (default: on accelerators; see Decoder).
    """
    if lut_placement not in PLACEMENTS:
        raise MoleError(f"unknown LUT placement {lut_placement!r}: use one of {', '.join(PLACEMENTS)}")
    meta = checkpoint.read_meta(path)
    ref = checkpoint.locate(path)
    cfg = ModelConfig.from_dict(meta["model_config"])
    kw = dict(placement=lut_placement, offload_experts=offload_experts, overlap=overlap, run_dir=ref.run_dir)
    if cfg.kind != "mole":
        if lut is not None:
            raise MoleError(f"{ref.path} is a {cfg.kind} model; a lookup table is only for MoLE")
        _, params = checkpoint.restore_params(path, cfg=cfg, as_numpy=offload_experts)
        return LanguageModel(cfg, params, **kw)
    if not meta.get("has_experts", True):
        if lut is None:
            if ref.run_dir is None or not (ref.run_dir / checkpoint.LUT).exists():
                where = ref.run_dir / checkpoint.LUT if ref.run_dir else "its run directory"
                raise MoleError(f"{ref.path} is MoLE's inference form and needs its lookup table, but {where} is "
                                "missing; pass lut=LUT_DIR (--lut)")
            lut = ref.run_dir / checkpoint.LUT
        table = _check_fingerprint(_open_table(lut), meta.get("lut_fingerprint", ""), ref.path)
        _, params = checkpoint.restore_params(path, cfg=cfg, with_experts=False)
        return LanguageModel(cfg, params, table=table, **kw)
    if lut is None:
        _, params = checkpoint.restore_params(path, cfg=cfg)
        return LanguageModel(cfg, params, **kw)
    table = _open_table(lut)
    # The experts serve only to check the table: read on the host, they never reach the device.
    _, inputs = checkpoint.restore_params(path, cfg=cfg, as_numpy=True, select=lut_lib.table_inputs)
    _check_fingerprint(table, lut_lib.fingerprint(inputs), ref.path)
    del inputs
    _, params = checkpoint.restore_params(path, cfg=cfg, with_experts=False)
    return LanguageModel(cfg, params, table=table, **kw)
