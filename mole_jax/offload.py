"""MoE with expert offloading: the baseline of the paper's Figure 3.

The routed experts live in host memory (numpy). Each step runs layer by layer: a jitted call runs the block's front
half (attention and the router's top-k choice, model.Block.front); the host reads the choice (it must: the choice
decides what to move), sends the chosen experts that are not already on the device (one device_put per layer), and
a second jitted call runs each expert on the rows that chose it only (not on every token with a zero gate). The
paper's cache policy: the experts a layer used in the previous step stay on the device; when a step used more than
top_k of them (batch > 1), top_k of those chosen at random stay. Every byte sent is counted.

This is the one loop over layers outside model.Transformer.layers, because the host must act between a layer's two
halves; it calls the model's own pieces (embed, Block.front, head), so no part of the forward pass is restated.
It satisfies decoder.StepDecoder, so the generation loop and the benchmark treat it like any other decoder.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mole_jax.config import ModelConfig
from mole_jax.decoder import Pending
from mole_jax.layers import gelu
from mole_jax.model import Params, block_graphdef, empty_cache, graphdef_and_shapes, without_routed_experts
from mole_jax.row_sources import Transfers, nbytes, next_pow2
from mole_jax.sampling import DecodeState, Sampler, advance, positions


def _embed(graphdef, params, ids_BxT, start_B):
    return nnx.merge(graphdef, params).embed(ids_BxT), positions(start_B, ids_BxT.shape[1])


def _front(block_def, block_params, h_BxTxD, pos_BxT, cache):
    mid, cache = nnx.merge(block_def, block_params).front(h_BxTxD, pos_BxT, cache)
    return mid.h_BxTxD, mid.u_BxTxD, mid.expert_MxK, mid.gates, cache


def _experts(h_BxTxD, u_BxTxD, gates_MxK, assigned_UxC, weights):
    """h + the chosen experts' gated sum, with only U experts on the device: weights[j] = (w_up_DxF, w_down_FxD)
    of the j-th needed expert, which runs on the C rows that chose it: assigned_UxC[j] holds their assignments
    m * K + k (padded with M * K: a zero row and a zero gate). A token's experts are added in increasing id, as
    the resident MoE's skip path adds them."""
    B, T, D = u_BxTxD.shape
    M, K = gates_MxK.shape
    dt = u_BxTxD.dtype
    u_MxD = jnp.concatenate([u_BxTxD.reshape(M, D), jnp.zeros((1, D), dt)])
    gates_A = jnp.concatenate([gates_MxK.reshape(-1), jnp.zeros((1,), gates_MxK.dtype)])
    out_MxD = jnp.zeros_like(u_MxD)
    for j, (w_up_DxF, w_down_FxD) in enumerate(weights):
        rows_C = assigned_UxC[j] // K
        y_CxD = gelu(u_MxD[rows_C] @ w_up_DxF.astype(dt)) @ w_down_FxD.astype(dt)
        out_MxD = out_MxD.at[rows_C].add(gates_A[assigned_UxC[j]].astype(dt)[:, None] * y_CxD)
    return h_BxTxD + out_MxD[:M].reshape(B, T, D)


def assignments(expert_MxK: np.ndarray, needed_U: np.ndarray) -> np.ndarray:
    """int32 [U, C]: for each needed expert, the assignments m * K + k that chose it, padded with M * K to C, the
    next power of two of the most any expert got (so the experts' call is traced per (U, C) only)."""
    flat_A = expert_MxK.reshape(-1)
    chosen = [np.flatnonzero(flat_A == e) for e in needed_U]
    C = next_pow2(max(len(a) for a in chosen))
    out = np.full((len(needed_U), C), flat_A.size, np.int32)
    for j, a in enumerate(chosen):
        out[j, :len(a)] = a
    return out


def _head(graphdef, *, greedy, params, h_BxTxD, last_B, cache, key, sampler, next_pos_B):
    logits_BxV = nnx.merge(graphdef, params).head(h_BxTxD, last_B)
    return advance(logits_BxV, cache, key, None if greedy else sampler, next_pos_B)


class OffloadDecoder:
    """A MoE model whose routed experts stay in host memory; see the module docstring."""

    def __init__(self, cfg: ModelConfig, params: Params, *, seed: int = 0):
        if cfg.kind != "moe":
            raise ValueError("expert offloading is the MoE baseline: it needs a MoE config")
        self.config = cfg
        self.transfers = Transfers()
        self.experts_moved = 0  # expert transfers so far (one expert = its two matrices)
        blocks = params["blocks"]
        self.experts_host = [(np.asarray(blocks[l]["experts"]["w_up_NxDxF"]),
                              np.asarray(blocks[l]["experts"]["w_down_NxFxD"])) for l in range(cfg.num_layers)]
        self.expert_bytes = self.experts_host[0][0][0].nbytes + self.experts_host[0][1][0].nbytes
        self.params = self.transfers.put(jax.tree.map(np.asarray, without_routed_experts(params)))
        self.resident: list[dict[int, tuple]] = [{} for _ in range(cfg.num_layers)]  # expert id -> device weights
        self._rng = np.random.default_rng(seed)
        graphdef, _ = graphdef_and_shapes(cfg, with_experts=False)
        self._embed = jax.jit(partial(_embed, graphdef))
        self._front = jax.jit(partial(_front, block_graphdef(cfg, with_experts=False)), donate_argnums=(3,))
        self._experts = jax.jit(_experts)  # traced per (experts needed in a layer, rows per expert)
        self._head = jax.jit(partial(_head, graphdef), static_argnames=("greedy",), donate_argnames=("cache",))
        self._zeros = jax.jit(partial(empty_cache, cfg), static_argnums=(0, 1))
        self._first_pos = jax.jit(lambda lengths_B: (jnp.zeros_like(lengths_B), lengths_B - 1))
        self._next_pos = jax.jit(lambda pos_B: (jnp.zeros_like(pos_B), pos_B + 1))
        self._key = jax.jit(jax.random.key)

    @property
    def h2d_bytes(self) -> int:
        return self.transfers.bytes_sent

    @property
    def device_param_bytes(self) -> int:
        """Resident between steps: everything but the experts, plus the cached experts (top_k per layer)."""
        return nbytes(self.params) + self.config.num_layers * self.config.top_k * self.expert_bytes

    def _layers(self, h_BxTxD, pos_BxT, cache):
        new_cache = []
        for l in range(self.config.num_layers):
            h_BxTxD, u, expert_MxK, gates, c = self._front(self.params["blocks"][l], h_BxTxD, pos_BxT, cache[l])
            new_cache.append(c)
            chosen_MxK = jax.device_get(expert_MxK)  # the router decides what must move: a sync
            needed = np.unique(chosen_MxK)
            resident, (up_NxDxF, down_NxFxD) = self.resident[l], self.experts_host[l]
            missing = [int(e) for e in needed if int(e) not in resident]
            assigned_d, moved = self.transfers.put((assignments(chosen_MxK, needed),
                                                    [(up_NxDxF[e], down_NxFxD[e]) for e in missing]))
            resident.update(zip(missing, moved))
            self.experts_moved += len(missing)
            h_BxTxD = self._experts(h_BxTxD, u, gates, assigned_d, tuple(resident[int(e)] for e in needed))
            keep = needed if len(needed) <= self.config.top_k else self._rng.choice(
                needed, self.config.top_k, replace=False)
            self.resident[l] = {int(e): resident[int(e)] for e in keep}
        return h_BxTxD, new_cache

    def prefill(self, ids_BxT, lengths_B, cache_len, seed, sampler: Sampler | None, greedy) -> DecodeState:
        B, _ = ids_BxT.shape
        cache = self._zeros(B, cache_len)
        ids_d, lengths_d, seed_d = self.transfers.put((ids_BxT, lengths_B, np.int32(seed)))
        start_B, last_B = self._first_pos(lengths_d)
        h, cache = self._layers(*self._embed(self.params, ids_d, start_B), cache)
        return self._head(greedy=greedy, params=self.params, h_BxTxD=h, last_B=last_B, cache=cache,
                          key=self._key(seed_d), sampler=sampler, next_pos_B=lengths_d)

    def begin(self, state: DecodeState, sampler: Sampler | None, greedy) -> Pending:
        last_B, next_pos_B = self._next_pos(state.pos_B)
        h, cache = self._layers(*self._embed(self.params, state.ids_Bx1, state.pos_B), state.cache)
        return Pending(self._head(greedy=greedy, params=self.params, h_BxTxD=h, last_B=last_B, cache=cache,
                                  key=state.key, sampler=sampler, next_pos_B=next_pos_B))

    def finish(self, pending: Pending, ids_B, sampler, greedy) -> DecodeState:
        return pending.state
