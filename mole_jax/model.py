"""The decoder: one LLaMA-style backbone whose FFN part is Dense, MoE (top-k) or MoLE.

MoLE in training form: the routed experts read the per-layer-normalised token embedding x0, not the hidden state:
    u = norm_post(h);  g = softmax(u @ Wr) over all N;  h += ffn_shared(u) + sum_n g_n * expert_n(norm_expert(x0))
MoLE in inference form (`with_experts=False`): the experts are gone and the caller passes their outputs, looked
up per token id from the LUT, as `lut_BxTxLxNxD`. The two forms give the same logits (tests/test_model.py).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mole_jax.config import ModelConfig
from mole_jax.layers import FFN, Attention, Experts, KVCache, RMSNorm, param


class Output(NamedTuple):
    logits_BxTxV: jax.Array  # float32
    cache: list[KVCache] | None  # the updated per-layer caches when a cache was passed in
    aux: dict[str, jax.Array]  # MoE: mean over layers of "balance" and "router_z"; empty for Dense and MoLE


class ExpertInput(NamedTuple):
    """What MoLE's routed experts read: every token's embedding row x0_MxD and, with dedup, the rows of the
    batch's distinct ids x0_UxD (static capacity U), each token's row in it, and whether the batch fit in U."""

    x0_MxD: jax.Array
    x0_UxD: jax.Array | None = None
    inverse_BxT: jax.Array | None = None
    fits: jax.Array | None = None


def _moe_impl(cfg: ModelConfig, num_assignments: int) -> str:
    if cfg.moe_impl != "auto":
        return cfg.moe_impl
    if jax.default_backend() == "cpu":
        # One matmul per expert, skipped when idle (lax.cond): measured fastest on CPU at every batch size, from
        # one decode token (only the chosen experts' weights are read) to training batches (no weight transposes).
        return "skip"
    # On accelerators a cond per expert would be a host round trip: gather the few chosen experts' weights when
    # decoding, else dropless grouped matmuls.
    return "gather" if num_assignments <= cfg.num_experts else "ragged"


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, with_experts: bool = True):
        self.cfg = cfg
        self.norm_in = RMSNorm(cfg)
        self.attn = Attention(cfg, rngs)
        self.norm_post = RMSNorm(cfg)
        if cfg.kind in ("dense", "mole"):
            self.ffn = FFN(cfg, cfg.ffn_dim, rngs)
        if cfg.kind in ("moe", "mole"):
            self.w_router_DxN = param(rngs, (cfg.d_model, cfg.num_experts), cfg.init_std, ("embed", None), cfg)
        if cfg.kind == "moe" or (cfg.kind == "mole" and with_experts):
            self.experts = Experts(cfg, rngs)
        if cfg.kind == "mole" and with_experts:
            self.norm_expert = RMSNorm(cfg)

    def __call__(self, h_BxTxD, positions_BxT, *, cache=None, expert_input: ExpertInput | None = None,
                 lut_BxTxNxD=None):
        a, cache = self.attn(self.norm_in(h_BxTxD), positions_BxT, cache)
        h_BxTxD = h_BxTxD + a
        u_BxTxD = self.norm_post(h_BxTxD)
        aux = {}
        if self.cfg.kind == "dense":
            f = self.ffn(u_BxTxD)
        elif self.cfg.kind == "moe":
            f, aux = self._moe(u_BxTxD)
        else:
            f = self.ffn(u_BxTxD) + self._mole_routed(u_BxTxD, expert_input, lut_BxTxNxD)
        return h_BxTxD + f, cache, aux

    def _router_logits(self, u_BxTxD):
        return u_BxTxD @ self.w_router_DxN[...].astype(u_BxTxD.dtype)

    def _mole_routed(self, u_BxTxD, expert_input, lut_BxTxNxD):
        B, T, D = u_BxTxD.shape
        dt = u_BxTxD.dtype
        gates_BxTxN = jax.nn.softmax(self._router_logits(u_BxTxD).astype(jnp.float32), axis=-1).astype(dt)
        if lut_BxTxNxD is not None:
            return jnp.einsum("btn,btnd->btd", gates_BxTxN, lut_BxTxNxD.astype(dt))
        if expert_input is None:
            raise ValueError("a MoLE block needs expert_input (training form) or lut_BxTxNxD (inference form)")

        def per_token():
            x_MxD = self.norm_expert(expert_input.x0_MxD)
            return self.experts.mixed(x_MxD, gates_BxTxN.reshape(B * T, -1)).reshape(B, T, D)

        def per_unique():
            y_UxNxD = self.experts.all_experts(self.norm_expert(expert_input.x0_UxD))
            return jnp.einsum("btn,btnd->btd", gates_BxTxN, y_UxNxD[expert_input.inverse_BxT])

        if expert_input.x0_UxD is None:
            return per_token()
        # The distinct-id capacity U is static; a batch with more distinct ids than U takes the per-token path.
        # Rematerialise the fallback: differentiating a cond keeps the residuals of BOTH branches (zeros for the
        # branch not taken), and per-token residuals are [M, N, F] activations that dedup exists to avoid.
        return jax.lax.cond(expert_input.fits, per_unique, jax.checkpoint(per_token))

    def _moe(self, u_BxTxD):
        cfg = self.cfg
        B, T, D = u_BxTxD.shape
        u_MxD = u_BxTxD.reshape(B * T, D)
        logits_MxN = self._router_logits(u_MxD).astype(jnp.float32)
        top_logits_MxK, expert_MxK = jax.lax.top_k(logits_MxN, cfg.top_k)
        gates_MxK = jax.nn.softmax(top_logits_MxK, axis=-1).astype(u_MxD.dtype)  # softmax over the k chosen only
        impl = _moe_impl(cfg, B * T * cfg.top_k)
        if impl == "gather":
            f_MxD = self.experts.gathered(u_MxD, expert_MxK, gates_MxK)
        elif impl == "ragged":
            f_MxD = self.experts.ragged(u_MxD, expert_MxK, gates_MxK)
        else:
            gates_MxN = jnp.zeros_like(logits_MxN, u_MxD.dtype).at[jnp.arange(B * T)[:, None], expert_MxK].set(
                gates_MxK)
            f_MxD = (self.experts.mixed if impl == "dense" else self.experts.skip_idle)(u_MxD, gates_MxN)
        # OLMoE/Switch auxiliaries: N * sum_i f_i P_i (f: share of assignments, P: mean router probability) and
        # the router z-loss mean(logsumexp^2). Returned per layer; the training loss applies the coefficients.
        probs_MxN = jax.nn.softmax(logits_MxN, axis=-1)
        share_N = jnp.zeros((cfg.num_experts,), jnp.float32).at[expert_MxK.reshape(-1)].add(1.0) / expert_MxK.size
        aux = {
            "balance": cfg.num_experts * jnp.sum(share_N * jnp.mean(probs_MxN, axis=0)),
            "router_z": jnp.mean(jax.nn.logsumexp(logits_MxN, axis=-1) ** 2),
        }
        return f_MxD.reshape(B, T, D), aux


class Transformer(nnx.Module):
    """Dense / MoE / MoLE decoder. `with_experts=False` builds MoLE's inference form (no routed experts, no expert
    norms): what decoding keeps on the accelerator."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, with_experts: bool = True):
        self.cfg = cfg
        self.with_experts = with_experts or cfg.kind != "mole"
        self.embed_VxD = param(rngs, (cfg.vocab_size, cfg.d_model), cfg.init_std, ("vocab", "embed"), cfg)
        self.blocks = nnx.List([Block(cfg, rngs, with_experts=with_experts) for _ in range(cfg.num_layers)])
        self.norm_out = RMSNorm(cfg)
        self.unembed_DxV = param(rngs, (cfg.d_model, cfg.vocab_size), cfg.init_std, ("embed", "vocab"), cfg)

    def __call__(self, ids_BxT: jax.Array, *, positions_BxT: jax.Array | None = None,
                 cache: list[KVCache] | None = None, lut_BxTxLxNxD: jax.Array | None = None,
                 dedup_rows: int = 0) -> Output:
        """Logits for `ids_BxT`.

        positions_BxT: absolute positions (default 0..T-1); with `cache`, where the new keys/values are written.
        lut_BxTxLxNxD: MoLE inference form: the routed experts' outputs for these tokens, from the LUT.
        dedup_rows: MoLE training form: evaluate the routed experts once per distinct token id, with room for this
            many distinct ids (static); a batch with more takes the plain per-token path. 0 disables it.
        """
        cfg = self.cfg
        B, T = ids_BxT.shape
        dt = jnp.dtype(cfg.dtype)
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        embed_VxD = self.embed_VxD[...]
        x0_BxTxD = embed_VxD[ids_BxT].astype(dt)

        expert_input = None
        if cfg.kind == "mole" and lut_BxTxLxNxD is None:
            if not self.with_experts:
                raise ValueError("MoLE inference form needs lut_BxTxLxNxD (the LUT rows of these tokens)")
            expert_input = self._expert_input(ids_BxT, x0_BxTxD, dedup_rows)

        h_BxTxD = x0_BxTxD
        new_cache, aux_layers = [], []
        for l, block in enumerate(self.blocks):
            h_BxTxD, layer_cache, aux = block(
                h_BxTxD, positions_BxT, cache=None if cache is None else cache[l], expert_input=expert_input,
                lut_BxTxNxD=None if lut_BxTxLxNxD is None else lut_BxTxLxNxD[:, :, l])
            new_cache.append(layer_cache)
            aux_layers.append(aux)

        h_BxTxD = self.norm_out(h_BxTxD)
        logits = jnp.einsum("btd,dv->btv", h_BxTxD, self.unembed_DxV[...].astype(dt),
                            preferred_element_type=jnp.float32)
        aux = {k: jnp.mean(jnp.stack([a[k] for a in aux_layers])) for k in aux_layers[0]} if aux_layers[0] else {}
        return Output(logits, new_cache if cache is not None else None, aux)

    def _expert_input(self, ids_BxT, x0_BxTxD, dedup_rows):
        B, T, D = x0_BxTxD.shape
        x0_MxD = x0_BxTxD.reshape(B * T, D)
        if not dedup_rows:
            return ExpertInput(x0_MxD)
        ids_M = ids_BxT.reshape(-1)
        unique_U, inverse_M = jnp.unique(ids_M, size=dedup_rows, fill_value=0, return_inverse=True)
        sorted_M = jnp.sort(ids_M)
        num_unique = 1 + jnp.sum(sorted_M[1:] != sorted_M[:-1])
        x0_UxD = self.embed_VxD[...][unique_U].astype(x0_BxTxD.dtype)
        return ExpertInput(x0_MxD, x0_UxD, inverse_M.reshape(B, T), num_unique <= dedup_rows)

    def lut_rows(self, ids_R: jax.Array) -> jax.Array:
        """MoLE re-parameterisation: every routed expert of every layer on the embedding rows of `ids_R`,
        [R, L, N, D] (the LUT's row layout), computed in the config's dtype."""
        if self.cfg.kind != "mole" or not self.with_experts:
            raise ValueError("lut_rows needs a MoLE model in training form (with its routed experts)")
        x0_RxD = self.embed_VxD[...][ids_R].astype(self.cfg.dtype)
        return jnp.stack([b.experts.all_experts(b.norm_expert(x0_RxD)) for b in self.blocks], axis=1)

    def init_cache(self, batch: int, length: int) -> list[KVCache]:
        return [KVCache.zeros(self.cfg, batch, length) for _ in range(self.cfg.num_layers)]


# Parameters as a plain nested dict ({"blocks": {0: {...}}, "embed_VxD": ...}) are the one pytree that optax trains,
# Orbax saves, hf.py maps and sharding.py places; `nnx.merge(graphdef, params)` turns them back into a module.
Params = dict


def graphdef_and_shapes(cfg: ModelConfig, *, with_experts: bool = True):
    """The module's graph definition and its parameters' shapes and dtypes, without allocating anything."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0), with_experts=with_experts))
    graphdef, state = nnx.split(abstract)
    return graphdef, nnx.to_pure_dict(state)


def init_params(cfg: ModelConfig, seed: int = 0, *, with_experts: bool = True) -> Params:
    return nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(seed), with_experts=with_experts)))


def without_routed_experts(params: Params) -> Params:
    """MoLE training-form params -> inference form: drop what the LUT replaces (routed experts, expert norms)."""
    out = dict(params)
    out["blocks"] = {l: {k: v for k, v in b.items() if k not in ("experts", "norm_expert")}
                     for l, b in params["blocks"].items()}
    return out
