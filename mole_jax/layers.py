"""Building blocks shared by Dense, MoE and MoLE: RMSNorm, RoPE attention with a KV cache, GELU FFNs.

Shapes are in names: B batch, T query length, S key length (cache), D model width, H heads, K head dim,
F FFN width, N routed experts, M flattened tokens. Every parameter carries `axes` metadata (logical axis names)
that sharding.py maps onto a mesh; nothing here knows about devices.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mole_jax.config import ModelConfig


def param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, axes: tuple, cfg: ModelConfig) -> nnx.Param:
    """A normally initialised weight (the paper: std 0.01; output projections 0.01/sqrt(2L))."""
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(cfg.param_dtype), axes=axes)


def gelu(x):
    return jax.nn.gelu(x, approximate=False)  # the authors use torch.nn.GELU(): exact erf form


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig):
        self.eps = cfg.rms_norm_eps
        self.scale_D = nnx.Param(jnp.ones((cfg.d_model,), cfg.param_dtype), axes=(None,))

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        # Normalise in float32, cast back, then scale: the reference's order of operations.
        x32 = x_BxTxD.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale_D[...].astype(x_BxTxD.dtype) * y.astype(x_BxTxD.dtype)


def rope(x_BxTxHxK: jax.Array, positions_BxT: jax.Array, rotary_dim: int, theta: float) -> jax.Array:
    """Rotary embedding, "rotate_half" convention, on the first `rotary_dim` dims of each head."""
    rot, keep = x_BxTxHxK[..., :rotary_dim], x_BxTxHxK[..., rotary_dim:]
    inv_freq = 1.0 / theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim)
    angles_BxTxR = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    angles_BxTxR = jnp.concatenate([angles_BxTxR, angles_BxTxR], axis=-1)
    cos = jnp.cos(angles_BxTxR)[:, :, None, :].astype(x_BxTxHxK.dtype)
    sin = jnp.sin(angles_BxTxR)[:, :, None, :].astype(x_BxTxHxK.dtype)
    half = rotary_dim // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    return jnp.concatenate([rot * cos + rotated * sin, keep], axis=-1)


class KVCache(NamedTuple):
    """One layer's cache: keys/values for positions [0, S) of each sequence (written at the query positions).
    Heads lead the cache length so that both attention matmuls read it in place: (b, h) are the batch dims and
    K (scores) or S (values) the contracted one, with no per-step transpose of the whole cache."""

    k_BxHxSxK: jax.Array
    v_BxHxSxK: jax.Array

    @staticmethod
    def zeros(cfg: ModelConfig, batch: int, length: int) -> "KVCache":
        shape = (batch, cfg.num_heads, length, cfg.head_dim)
        return KVCache(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))


def _write(cache_BxHxSxK: jax.Array, new_BxTxHxK: jax.Array, start_B: jax.Array) -> jax.Array:
    """Write each sequence's T new entries at its own start position (sequences advance independently)."""
    new_BxHxTxK = new_BxTxHxK.transpose(0, 2, 1, 3).astype(cache_BxHxSxK.dtype)
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice_in_dim(c, n, s, axis=1))(
        cache_BxHxSxK, new_BxHxTxK, start_B)


def cached_attention(q_BxTxHxK, cache: KVCache, positions_BxT) -> jax.Array:
    """Queries against the whole cache; a key is visible when its position <= the query's. Scores and softmax in
    float32 (the reference's order: scale, mask, softmax, cast back, weight the values)."""
    dt, K = q_BxTxHxK.dtype, q_BxTxHxK.shape[-1]
    k, v = cache.k_BxHxSxK.astype(dt), cache.v_BxHxSxK.astype(dt)
    scores_BxHxTxS = jnp.einsum("bthk,bhsk->bhts", q_BxTxHxK, k, preferred_element_type=jnp.float32)
    scores_BxHxTxS = scores_BxHxTxS * jnp.float32(1.0 / math.sqrt(K))
    visible_Bx1xTxS = jnp.arange(k.shape[2])[None, None, None, :] <= positions_BxT[:, None, :, None]
    scores_BxHxTxS = jnp.where(visible_Bx1xTxS, scores_BxHxTxS, -jnp.inf)
    probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1).astype(dt)
    return jnp.einsum("bhts,bhsk->bthk", probs_BxHxTxS, v)


def attention_impl(requested: str | None, *, backend: str, dtype, head_dim: int) -> str:
    """The implementation of jax.nn.dot_product_attention to use. None or "auto": cuDNN's fused kernel on GPU for
    bfloat16/float16 and head dims it takes (a multiple of 8), else XLA's (the only one on CPU and TPU, and the one
    that computes float32 exactly)."""
    if requested not in (None, "auto"):
        return requested
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if backend == "gpu" and half and head_dim % 8 == 0 else "xla"


def causal_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, requested: str | None = None) -> jax.Array:
    """Causal self-attention of T tokens among themselves (softmax in float32 in either implementation)."""
    impl = attention_impl(requested, backend=jax.default_backend(), dtype=q_BxTxHxK.dtype,
                          head_dim=q_BxTxHxK.shape[-1])
    if impl == "cudnn" and requested in (None, "auto"):
        try:
            return jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, is_causal=True,
                                                implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError):
            pass  # cuDNN refuses these shapes, this GPU or its own version while tracing: XLA's kernel instead
        impl = "xla"
    return jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, is_causal=True, implementation=impl)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, H, K = cfg.d_model, cfg.num_heads, cfg.head_dim
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.cfg = cfg
        self.wq_DxHxK = param(rngs, (D, H, K), cfg.init_std, ("embed", "heads", None), cfg)
        self.wk_DxHxK = param(rngs, (D, H, K), cfg.init_std, ("embed", "heads", None), cfg)
        self.wv_DxHxK = param(rngs, (D, H, K), cfg.init_std, ("embed", "heads", None), cfg)
        self.wo_HxKxD = param(rngs, (H, K, D), out_std, ("heads", None, "embed"), cfg)

    def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, cache: KVCache | None = None):
        """Causal self-attention. Without a cache, the T tokens attend among themselves (training, scoring).
        With a cache, the new keys/values are written at `positions_BxT` (contiguous per sequence) and the queries
        attend to every cached position <= their own: stale entries beyond a sequence's position stay masked."""
        cfg, dt = self.cfg, x_BxTxD.dtype
        q = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.wq_DxHxK[...].astype(dt))
        k = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.wk_DxHxK[...].astype(dt))
        v = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.wv_DxHxK[...].astype(dt))
        q = rope(q, positions_BxT, cfg.rotary_dim, cfg.rope_theta)
        k = rope(k, positions_BxT, cfg.rotary_dim, cfg.rope_theta)
        if cache is None:  # positions increase along each row, so "key position <= query position" is causal
            out_BxTxHxK = causal_attention(q, k, v, cfg.attention_impl)
        else:
            cache = KVCache(_write(cache.k_BxHxSxK, k, positions_BxT[:, 0]),
                            _write(cache.v_BxHxSxK, v, positions_BxT[:, 0]))
            out_BxTxHxK = cached_attention(q, cache, positions_BxT)
        return jnp.einsum("bthk,hkd->btd", out_BxTxHxK, self.wo_HxKxD[...].astype(dt)), cache


class FFN(nnx.Module):
    """down(gelu(up(x))): the dense FFN and MoLE's shared expert."""

    def __init__(self, cfg: ModelConfig, width: int, rngs: nnx.Rngs):
        self.w_up_DxF = param(rngs, (cfg.d_model, width), cfg.init_std, ("embed", "mlp"), cfg)
        self.w_down_FxD = param(rngs, (width, cfg.d_model), cfg.init_std / math.sqrt(2 * cfg.num_layers),
                                ("mlp", "embed"), cfg)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        dt = x_BxTxD.dtype
        return gelu(x_BxTxD @ self.w_up_DxF[...].astype(dt)) @ self.w_down_FxD[...].astype(dt)


class Experts(nnx.Module):
    """N routed experts with the FFN's form, stored as batched weights [N, D, F] / [N, F, D]. They run as one
    matmul per expert on contiguous weight slices: measured faster than one einsum over all experts (on CPU that
    einsum transposes [N, D, F] to [D, N*F] on every call) and no more FLOPs."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        N, D, F = cfg.num_experts, cfg.d_model, cfg.expert_dim
        self.num_experts = N
        self.w_up_NxDxF = param(rngs, (N, D, F), cfg.init_std, ("experts", "embed", "mlp"), cfg)
        self.w_down_NxFxD = param(rngs, (N, F, D), cfg.init_std / math.sqrt(2 * cfg.num_layers),
                                  ("experts", "mlp", "embed"), cfg)

    def expert(self, n: int, x_MxD: jax.Array) -> jax.Array:
        dt = x_MxD.dtype
        return gelu(x_MxD @ self.w_up_NxDxF[n].astype(dt)) @ self.w_down_NxFxD[n].astype(dt)

    def all_experts(self, x_MxD: jax.Array) -> jax.Array:
        """Every expert on every row: [M, N, D]."""
        return jnp.stack([self.expert(n, x_MxD) for n in range(self.num_experts)], axis=1)

    def mixed(self, x_MxD: jax.Array, gates_MxN: jax.Array) -> jax.Array:
        """sum_n gates[m, n] * expert_n(x[m]), without materialising [M, N, D]."""
        gates_MxN = gates_MxN.astype(x_MxD.dtype)
        out_MxD = gates_MxN[:, :1] * self.expert(0, x_MxD)
        for n in range(1, self.num_experts):
            out_MxD = out_MxD + gates_MxN[:, n:n + 1] * self.expert(n, x_MxD)
        return out_MxD

    def gathered(self, x_MxD: jax.Array, expert_MxK: jax.Array, gates_MxK: jax.Array) -> jax.Array:
        """Top-k by gathering each row's chosen experts' weights: decode-sized batches on accelerators."""
        dt = x_MxD.dtype
        h_MxKxF = gelu(jnp.einsum("md,mkdf->mkf", x_MxD, self.w_up_NxDxF[...][expert_MxK].astype(dt)))
        return jnp.einsum("mkf,mkfd->md", h_MxKxF * gates_MxK.astype(dt)[:, :, None],
                          self.w_down_NxFxD[...][expert_MxK].astype(dt))

    def skip_idle(self, x_MxD: jax.Array, gates_MxN: jax.Array, *, row_buckets: bool = False) -> jax.Array:
        """Like `mixed`, but an expert that no row chose is skipped (lax.cond at run time): the CPU path for top-k
        (a decode step reads only the chosen experts' weights). row_buckets (decode-sized batches): an expert
        runs only on the rows that chose it, gathered into the smallest of a few static sizes (M/8, M/4, M/2, M)
        that holds them (lax.switch), instead of on every row with a zero gate."""
        gates_MxN = gates_MxN.astype(x_MxD.dtype)
        out_MxD = jnp.zeros_like(x_MxD)
        M = x_MxD.shape[0]
        sizes = sorted({max(1, M >> s) for s in range(4)}) if row_buckets else [M]
        for n in range(self.num_experts):
            g_M = gates_MxN[:, n]
            count = jnp.sum(g_M != 0)
            rows_M = jnp.argsort(g_M == 0, stable=True)  # the rows that chose n first

            def run(acc, C, n=n, g_M=g_M, rows_M=rows_M):
                rows_C = rows_M[:C]
                return acc.at[rows_C].add(g_M[rows_C, None] * self.expert(n, x_MxD[rows_C]))

            branches = [lambda acc: acc] + [partial(run, C=C) for C in sizes]
            which = jnp.where(count == 0, 0, 1 + jnp.searchsorted(jnp.array(sizes), count))
            out_MxD = jax.lax.switch(which, branches, out_MxD)
        return out_MxD

    def ragged(self, x_MxD: jax.Array, expert_MxK: jax.Array, gates_MxK: jax.Array) -> jax.Array:
        """Dropless top-k: sort the M*K assignments by expert and run grouped matmuls (lax.ragged_dot), so each
        token pays only its K experts. The fast path on TPU; on CPU ragged_dot is emulated and slow, and XLA's GPU
        backend lowers it to a masked dense matmul (every expert on every row; see `grouped`)."""
        M, K = expert_MxK.shape
        N, dt = self.w_up_NxDxF.shape[0], x_MxD.dtype
        flat_expert = expert_MxK.reshape(-1)
        order = jnp.argsort(flat_expert, stable=True)
        token_of = order // K
        group_sizes = jnp.bincount(flat_expert, length=N).astype(jnp.int32)
        xs = x_MxD[token_of]
        h = gelu(jax.lax.ragged_dot(xs, self.w_up_NxDxF[...].astype(dt), group_sizes))
        ys = jax.lax.ragged_dot(h, self.w_down_NxFxD[...].astype(dt), group_sizes)
        ys = ys * gates_MxK.reshape(-1)[order][:, None].astype(dt)
        return jnp.zeros_like(x_MxD).at[token_of].add(ys)

    def grouped(self, x_MxD: jax.Array, expert_MxK: jax.Array, gates_MxK: jax.Array,
                tile: int | None = None) -> jax.Array:
        """Dropless top-k as one batched matmul over tiles of rows, each tile one expert's: the M*K assignments
        sorted by expert, each expert's rows padded to whole tiles, every tile multiplied by its expert's weights
        (gathered per tile). Exact, with static shapes: at most M*K/tile + N tiles. The tile (default: a quarter
        of an expert's mean load) trades padding (at most N tiles of rows) against weight copies (one per tile).
        GPU training's path: a grouped matmul from batched GEMMs, where lax.ragged_dot would run every expert."""
        M, K = expert_MxK.shape
        N, D = self.num_experts, x_MxD.shape[-1]
        A, dt = M * K, x_MxD.dtype
        tile = tile or _tile_rows(A // (4 * N))
        num_tiles = -(-A // tile) + N
        expert_A = expert_MxK.reshape(-1)
        order_A = jnp.argsort(expert_A, stable=True)  # assignments by expert
        sorted_expert_A = expert_A[order_A]
        rows_N = jnp.bincount(expert_A, length=N).astype(jnp.int32)
        tiles_N = -(-rows_N // tile)
        first_tile_N, first_row_N = jnp.cumsum(tiles_N) - tiles_N, jnp.cumsum(rows_N) - rows_N
        slot_sorted_A = (first_tile_N[sorted_expert_A] * tile + jnp.arange(A, dtype=jnp.int32)
                         - first_row_N[sorted_expert_A])
        slot_A = jnp.zeros((A,), jnp.int32).at[order_A].set(slot_sorted_A)  # each assignment's row among the tiles
        token_R = jnp.full((num_tiles * tile,), M, jnp.int32).at[slot_A].set(jnp.arange(A, dtype=jnp.int32) // K)
        x_GxTxD = jnp.concatenate([x_MxD, jnp.zeros((1, D), dt)])[token_R].reshape(num_tiles, tile, D)
        expert_G = jnp.minimum(jnp.searchsorted(jnp.cumsum(tiles_N), jnp.arange(num_tiles), side="right"), N - 1)
        h_GxTxF = gelu(jnp.einsum("gtd,gdf->gtf", x_GxTxD, self.w_up_NxDxF[...].astype(dt)[expert_G]))
        y_RxD = jnp.einsum("gtf,gfd->gtd", h_GxTxF, self.w_down_NxFxD[...].astype(dt)[expert_G]).reshape(-1, D)
        return jnp.einsum("mk,mkd->md", gates_MxK.astype(dt), y_RxD[slot_A].reshape(M, K, D))


def _tile_rows(rows: int) -> int:
    """Rows per tile of `Experts.grouped`: at least 8, a multiple of 8, of 128 from 128 on (whole GEMM tiles)."""
    unit = 128 if rows >= 128 else 8
    return max(8, -(-rows // unit) * unit)
