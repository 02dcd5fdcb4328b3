"""The decoder: one LLaMA-style backbone whose FFN part is Dense, MoE (top-k) or MoLE, and every forward pass.

A block has two halves, each written once:
    front(h, positions, cache) -> Mid   attention, then everything that reads only the hidden state: the normed
                                        FFN input u, the shared FFN (Dense, MoLE) and the router's gates
    back(mid, routed) -> h              adds the routed experts' output
The routed experts of MoLE read what `routed` carries for the layer: the training form's token embeddings
(`ExpertInput`: u = norm_post(h); h += ffn_shared(u) + sum_n g_n * expert_n(norm_expert(x0))) or, in the
inference form (`with_experts=False`), the experts' outputs looked up per token id from the table (anything with
`for_layer(l) -> [B, T, N, D]`, e.g. `ArrayRows`; decoding passes its fetched table rows). MoE's experts read u.

`Transformer.layers` is the one loop over the blocks. Training, scoring, prefill, the decode step, the decode
step split around the row fetch (`front` of block 0 first, then `forward(..., resume=mid)`) and table conversion
(`lut_rows`) are all built from `embed`, `layers`/the block halves and `head`. The two forms give the same logits
(tests/test_model.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mole_jax.config import REMAT_POLICIES, ConfigError, ModelConfig
from mole_jax.layers import FFN, Attention, Experts, KVCache, RMSNorm, param


class Output(NamedTuple):
    logits_BxTxV: jax.Array  # float32
    cache: list[KVCache] | None  # the updated per-layer caches when a cache was passed in
    aux: dict[str, jax.Array]  # MoE: mean over layers of "balance" and "router_z"; empty for Dense and MoLE


class ExpertInput(NamedTuple):
    """What MoLE's routed experts read in the training form: every token's embedding row x0_MxD and, with dedup,
    the rows of the batch's distinct ids x0_UxD (static capacity U), each token's row in it, and whether the batch
    fit in U. The same for every layer (each layer normalises it with its own expert norm)."""

    x0_MxD: jax.Array
    x0_UxD: jax.Array | None = None
    inverse_BxT: jax.Array | None = None
    fits: jax.Array | None = None

    def for_layer(self, l: int) -> "ExpertInput":
        return self


class ArrayRows(NamedTuple):
    """Table rows of every token as one array [B, T, L, N, D]: MoLE's inference form fed directly."""

    rows_BxTxLxNxD: jax.Array

    def for_layer(self, l: int) -> jax.Array:
        return self.rows_BxTxLxNxD[:, :, l]


class Mid(NamedTuple):
    """A block between its halves: the residual stream after attention, the normed FFN input, and what the front
    computed from it."""

    h_BxTxD: jax.Array
    u_BxTxD: jax.Array
    shared_BxTxD: jax.Array | None  # the Dense FFN or MoLE's shared expert; None for MoE (no shared expert)
    gates: jax.Array | None  # MoLE: softmax over all N [B, T, N]; MoE: the top-k's softmax [M, K]
    expert_MxK: jax.Array | None  # MoE: the chosen experts
    aux: dict[str, jax.Array]  # MoE: this layer's balance and router z-loss


def route_top_k(logits_MxN: jax.Array, k: int, dtype) -> tuple[jax.Array, jax.Array]:
    """MoE routing (float32 logits): the k largest, and a softmax over those k only (Mixtral). The one routing
    function: the resident MoE and the expert-offloading baseline both use it."""
    top_logits_MxK, expert_MxK = jax.lax.top_k(logits_MxN, k)
    return expert_MxK, jax.nn.softmax(top_logits_MxK, axis=-1).astype(dtype)


def moe_aux(logits_MxN: jax.Array, expert_MxK: jax.Array) -> dict[str, jax.Array]:
    """OLMoE/Switch auxiliaries: N * sum_i f_i P_i (f: share of assignments, P: mean router probability) and the
    router z-loss mean(logsumexp^2). Per layer; the training loss applies the coefficients."""
    N = logits_MxN.shape[-1]
    probs_MxN = jax.nn.softmax(logits_MxN, axis=-1)
    share_N = jnp.zeros((N,), jnp.float32).at[expert_MxK.reshape(-1)].add(1.0) / expert_MxK.size
    return {"balance": N * jnp.sum(share_N * jnp.mean(probs_MxN, axis=0)),
            "router_z": jnp.mean(jax.nn.logsumexp(logits_MxN, axis=-1) ** 2)}


DECODE_ROWS = 128  # skip's experts run on their chosen rows only up to this many tokens (decode-sized batches)


def moe_impl(cfg: ModelConfig, num_assignments: int, backend: str, *, split: bool = False) -> str:
    """The MoE implementation that runs `num_assignments` (tokens x top_k) on `backend` ("cpu", "gpu", "tpu").
    split: the experts are one buffer each (`per_expert_buffers`, CPU inference), which the paths that index the
    stacked weights (gather, ragged, grouped) would first copy back into one."""
    if cfg.moe_impl != "auto":
        return cfg.moe_impl
    if backend == "cpu":
        # Decode-sized batches skip the experts no row chose and run the others on their rows only (lax.switch),
        # so a decode token reads only its chosen experts' weights. Training-sized ones: the grouped matmul, which
        # runs top_k experts per token where `skip` and `dense` run every expert on every row with zero gates
        # (1.1-1.7x faster steps on CPU, and faster to compile: results/architecture/moe_cpu_impl_train_grouped.json);
        # with split experts, the weighted sum over them, which reads each buffer in place.
        if num_assignments <= DECODE_ROWS * cfg.top_k:
            return "skip"
        return "dense" if split else "grouped"
    # On accelerators a cond per expert would be a host round trip: gather the few chosen experts' weights when
    # decoding, else dropless grouped matmuls: lax.ragged_dot on TPU; on GPU, where XLA lowers ragged_dot to a
    # masked dense matmul (every expert on every row), batched GEMMs over tiles of one expert's rows.
    if num_assignments <= cfg.num_experts:
        return "gather"
    return "grouped" if backend == "gpu" else "ragged"


def per_expert_buffers(cfg: ModelConfig, params: Params, backend: str | None = None) -> Params:
    """The routed experts of resident MoE params as one buffer per expert (a tuple of N [D, F] / [F, D] arrays in
    place of each stacked array), for a backend whose MoE paths run one expert at a time (CPU: `skip`, `dense`).
    Inside a jitted step, slicing expert n out of the stacked weights is a copy on XLA's CPU backend (a
    slice_bitcast_fusion of the whole expert before its matmul, for every chosen expert at every step); a buffer of
    its own is read in place. The values are the same, and so are the logits (tests/test_model.py). Other
    backends and implementations (gather, ragged, grouped index the stack) get `params` unchanged."""
    backend = backend or jax.default_backend()
    if cfg.kind != "moe" or backend != "cpu" or cfg.moe_impl not in ("auto", "skip", "dense"):
        return params
    out = dict(params)
    out["blocks"] = {l: {**b, "experts": {k: tuple(v[n] for n in range(cfg.num_experts))
                                          for k, v in b["experts"].items()}} if "experts" in b else b
                     for l, b in params["blocks"].items()}
    return out


class Block(nnx.Module):
    """One decoder layer. with_experts=False leaves the routed experts (and MoLE's expert norm) out: they live
    elsewhere (MoLE: the lookup table; MoE: host memory, the offloading baseline)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, with_experts: bool = True):
        self.cfg = cfg
        self.norm_in = RMSNorm(cfg)
        self.attn = Attention(cfg, rngs)
        self.norm_post = RMSNorm(cfg)
        if cfg.kind in ("dense", "mole"):
            self.ffn = FFN(cfg, cfg.ffn_dim, rngs)
        if cfg.kind in ("moe", "mole"):
            self.w_router_DxN = param(rngs, (cfg.d_model, cfg.num_experts), cfg.init_std, ("embed", None), cfg)
        if cfg.kind != "dense" and with_experts:
            self.experts = Experts(cfg, rngs)
        if cfg.kind == "mole" and with_experts:
            self.norm_expert = RMSNorm(cfg)

    def front(self, h_BxTxD, positions_BxT, cache: KVCache | None = None) -> tuple[Mid, KVCache | None]:
        """Everything before the routed experts: what a split decode step computes while the rows travel."""
        a, cache = self.attn(self.norm_in(h_BxTxD), positions_BxT, cache)
        h_BxTxD = h_BxTxD + a
        u_BxTxD = self.norm_post(h_BxTxD)
        kind, dt = self.cfg.kind, u_BxTxD.dtype
        shared = self.ffn(u_BxTxD) if kind in ("dense", "mole") else None
        if kind == "dense":
            return Mid(h_BxTxD, u_BxTxD, shared, None, None, {}), cache
        # float32 router logits (accumulated and returned in float32 whatever the compute dtype): the softmax, the
        # top-k choice and MoE's auxiliary losses read them.
        logits = jnp.matmul(u_BxTxD, self.w_router_DxN[...].astype(dt), preferred_element_type=jnp.float32)
        if kind == "mole":  # every routed expert, softmax over all N, no auxiliary loss
            return Mid(h_BxTxD, u_BxTxD, shared, jax.nn.softmax(logits, axis=-1).astype(dt), None, {}), cache
        logits_MxN = logits.reshape(-1, logits.shape[-1])
        expert_MxK, gates_MxK = route_top_k(logits_MxN, self.cfg.top_k, dt)
        return Mid(h_BxTxD, u_BxTxD, None, gates_MxK, expert_MxK, moe_aux(logits_MxN, expert_MxK)), cache

    def back(self, mid: Mid, routed=None) -> jax.Array:
        """The residual stream after the block. routed: MoLE's input for this layer (an ExpertInput, or the table
        rows [B, T, N, D] of the tokens); None for Dense and MoE."""
        kind = self.cfg.kind
        if kind == "dense":
            return mid.h_BxTxD + mid.shared_BxTxD
        if kind == "moe":
            return mid.h_BxTxD + self._moe_experts(mid.u_BxTxD, mid.expert_MxK, mid.gates)
        return mid.h_BxTxD + (mid.shared_BxTxD + self._mole_experts(mid, routed))

    def _mole_experts(self, mid: Mid, routed) -> jax.Array:
        gates_BxTxN = mid.gates
        B, T, D = mid.u_BxTxD.shape
        if routed is None:
            raise ValueError("a MoLE block needs its routed input: an ExpertInput (training form) or table rows")
        if not isinstance(routed, ExpertInput):  # the inference form: the experts' outputs come from the table
            return jnp.einsum("btn,btnd->btd", gates_BxTxN, routed.astype(gates_BxTxN.dtype))

        def per_token():
            x_MxD = self.norm_expert(routed.x0_MxD)
            return self.experts.mixed(x_MxD, gates_BxTxN.reshape(B * T, -1)).reshape(B, T, D)

        def per_unique():
            y_UxNxD = self.experts.all_experts(self.norm_expert(routed.x0_UxD))
            return jnp.einsum("btn,btnd->btd", gates_BxTxN, y_UxNxD[routed.inverse_BxT])

        if routed.x0_UxD is None:
            return per_token()
        # The distinct-id capacity U is static; a batch with more distinct ids than U takes the per-token path.
        # Rematerialise the fallback: differentiating a cond keeps the residuals of BOTH branches (zeros for the
        # branch not taken), and per-token residuals are [M, N, F] activations that dedup exists to avoid.
        return jax.lax.cond(routed.fits, per_unique, jax.checkpoint(per_token))

    def _moe_experts(self, u_BxTxD, expert_MxK, gates_MxK) -> jax.Array:
        B, T, D = u_BxTxD.shape
        u_MxD = u_BxTxD.reshape(B * T, D)
        impl = moe_impl(self.cfg, expert_MxK.size, jax.default_backend(),
                        split=isinstance(self.experts.w_up_NxDxF.get_value(), tuple))
        if impl == "gather":
            f_MxD = self.experts.gathered(u_MxD, expert_MxK, gates_MxK)
        elif impl == "ragged":
            f_MxD = self.experts.ragged(u_MxD, expert_MxK, gates_MxK)
        elif impl == "grouped":
            f_MxD = self.experts.grouped(u_MxD, expert_MxK, gates_MxK)
        else:
            gates_MxN = jnp.zeros((B * T, self.cfg.num_experts), u_MxD.dtype).at[
                jnp.arange(B * T)[:, None], expert_MxK].set(gates_MxK)
            f_MxD = (self.experts.mixed(u_MxD, gates_MxN) if impl == "dense" else self.experts.skip_idle(
                u_MxD, gates_MxN, row_buckets=B * T <= DECODE_ROWS))
        return f_MxD.reshape(B, T, D)


def _block_training(block: Block, h_BxTxD, positions_BxT, routed) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One whole block of a training pass (no cache): the residual stream after it and its MoE auxiliaries."""
    mid, _ = block.front(h_BxTxD, positions_BxT)
    return block.back(mid, routed), mid.aux


def remat_block(policy: str):
    """`_block_training` rematerialised under a named policy (config.REMAT_POLICIES), or None for "none" (every
    activation kept for the backward pass). "block" keeps only each block's inputs and recomputes the whole block
    in the backward pass (the least memory: MaxText's "full"); "dots" also keeps the outputs of the matmuls
    without batch dimensions (projections, FFNs, router, experts: MaxText's "minimal"), so the backward pass
    recomputes only elementwise work and attention's [T, T] scores, which it no longer stores."""
    if policy not in REMAT_POLICIES:
        raise ConfigError(f"unknown remat policy {policy!r}: use one of {', '.join(REMAT_POLICIES)}")
    keep = {"none": None, "block": jax.checkpoint_policies.nothing_saveable,
            "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[policy]
    return None if keep is None else nnx.remat(_block_training, policy=keep)


class Transformer(nnx.Module):
    """Dense / MoE / MoLE decoder. `with_experts=False` leaves the routed experts out: MoLE's inference form (no
    routed experts, no expert norms: what decoding keeps on the accelerator), or a MoE whose experts are offloaded."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, with_experts: bool = True):
        self.cfg = cfg
        self.with_experts = with_experts or cfg.kind == "dense"
        self.embed_VxD = param(rngs, (cfg.vocab_size, cfg.d_model), cfg.init_std, ("vocab", "embed"), cfg)
        self.blocks = nnx.List([Block(cfg, rngs, with_experts=self.with_experts) for _ in range(cfg.num_layers)])
        self.norm_out = RMSNorm(cfg)
        self.unembed_DxV = param(rngs, (cfg.d_model, cfg.vocab_size), cfg.init_std, ("embed", "vocab"), cfg)

    # The pieces -------------------------------------------------------------------------------------------------
    def embed(self, ids_BxT: jax.Array) -> jax.Array:
        """x0 = E[ids], no scaling: the first hidden state, and what MoLE's routed experts read."""
        return self.embed_VxD[...][ids_BxT].astype(self.cfg.dtype)

    def head(self, h_BxTxD: jax.Array, last_B: jax.Array | None = None) -> jax.Array:
        """float32 logits [..., V] after the final norm; with last_B, of one position per sequence only ([B, V]):
        prefill and decoding need not pay the [B, T, V] head."""
        if last_B is not None:
            h_BxTxD = h_BxTxD[jnp.arange(h_BxTxD.shape[0]), last_B]
        h = self.norm_out(h_BxTxD)
        return jnp.einsum("...d,dv->...v", h, self.unembed_DxV[...].astype(h.dtype),
                          preferred_element_type=jnp.float32)

    def expert_input(self, ids_BxT: jax.Array, x0_BxTxD: jax.Array, dedup_rows: int = 0) -> ExpertInput:
        """MoLE's training-form routed input; with dedup_rows, the batch's distinct ids (static capacity)."""
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

    def layers(self, h_BxTxD, positions_BxT, routed=None, caches: list[KVCache] | None = None, *,
               resume: Mid | None = None, remat: str = "none"
               ) -> tuple[jax.Array, list[KVCache | None], dict[str, jax.Array]]:
        """The one loop over the blocks: the hidden state before the final norm, the updated caches and the mean
        MoE auxiliaries. routed: MoLE's routed input (`for_layer(l)`), None for Dense and MoE. caches: one
        KVCache per block whose attention runs here (None: a full causal pass). resume: block 0's front half,
        already computed (the split decode step); caches then start at block 1, and h_BxTxD is not read.
        remat: training only (no caches, no resume): each block rematerialised under this policy (`remat_block`)."""
        rematerialised = remat_block(remat)
        if rematerialised is not None and (caches is not None or resume is not None):
            raise ValueError("remat is for training passes: no caches, no resumed step")
        caches_in = iter(caches) if caches is not None else None
        new_caches, aux_layers = [], []
        for l, block in enumerate(self.blocks):
            routed_l = None if routed is None else routed.for_layer(l)
            if l == 0 and resume is not None:
                h_BxTxD, aux = block.back(resume, routed_l), resume.aux
            elif rematerialised is not None:
                h_BxTxD, aux = rematerialised(block, h_BxTxD, positions_BxT, routed_l)
                new_caches.append(None)
            else:
                mid, cache = block.front(h_BxTxD, positions_BxT, None if caches_in is None else next(caches_in))
                new_caches.append(cache)
                h_BxTxD, aux = block.back(mid, routed_l), mid.aux
            aux_layers.append(aux)
        aux = {k: jnp.mean(jnp.stack([a[k] for a in aux_layers])) for k in aux_layers[-1]}
        return h_BxTxD, new_caches, aux

    def routed_input(self, ids_BxT, x0_BxTxD, rows=None, dedup_rows: int = 0):
        """What MoLE's routed experts read: the table rows when given, else the training form's embeddings."""
        if self.cfg.kind != "mole" or rows is not None:
            return rows
        if not self.with_experts:
            raise ValueError("MoLE inference form needs the table rows of these tokens")
        return self.expert_input(ids_BxT, x0_BxTxD, dedup_rows)

    # Forward passes -----------------------------------------------------------------------------------------------
    def forward(self, ids_BxT, positions_BxT=None, *, caches=None, rows=None, dedup_rows: int = 0, last_B=None,
                resume: Mid | None = None, remat: str = "none"):
        """(logits, caches, aux). rows: MoLE's table rows (`for_layer`); dedup_rows: see __call__; last_B: logits
        of one position per sequence; resume: continue from block 0's front half; remat: see `layers`."""
        B, T = ids_BxT.shape
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x0_BxTxD = self.embed(ids_BxT)  # when resumed with table rows it is unread, and XLA drops it
        routed = self.routed_input(ids_BxT, x0_BxTxD, rows, dedup_rows)
        h_BxTxD, caches, aux = self.layers(x0_BxTxD, positions_BxT, routed, caches, resume=resume, remat=remat)
        return self.head(h_BxTxD, last_B), caches, aux

    def __call__(self, ids_BxT: jax.Array, *, positions_BxT: jax.Array | None = None,
                 cache: list[KVCache] | None = None, lut_BxTxLxNxD: jax.Array | None = None,
                 dedup_rows: int = 0, remat: str = "none") -> Output:
        """Logits for `ids_BxT`.

        positions_BxT: absolute positions (default 0..T-1); with `cache`, where the new keys/values are written.
        lut_BxTxLxNxD: MoLE inference form: the routed experts' outputs for these tokens, from the LUT.
        dedup_rows: MoLE training form: evaluate the routed experts once per distinct token id, with room for this
            many distinct ids (static); a batch with more takes the plain per-token path. 0 disables it.
        remat: training: recompute each block's activations in the backward pass under this policy (one of
            config.REMAT_POLICIES; `remat_block`). The values are the same; only memory and time change.
        """
        rows = None if lut_BxTxLxNxD is None else ArrayRows(lut_BxTxLxNxD)
        logits, caches, aux = self.forward(ids_BxT, positions_BxT, caches=cache, rows=rows, dedup_rows=dedup_rows,
                                           remat=remat)
        return Output(logits, caches if cache is not None else None, aux)

    def lut_rows(self, ids_R: jax.Array) -> jax.Array:
        """MoLE re-parameterisation: every routed expert of every layer on the embedding rows of `ids_R`,
        [R, L, N, D] (the LUT's row layout), computed in the config's dtype."""
        if self.cfg.kind != "mole" or not self.with_experts:
            raise ValueError("lut_rows needs a MoLE model in training form (with its routed experts)")
        x0_RxD = self.embed(ids_R)
        return jnp.stack([b.experts.all_experts(b.norm_expert(x0_RxD)) for b in self.blocks], axis=1)

    def init_cache(self, batch: int, length: int) -> list[KVCache]:
        return empty_cache(self.cfg, batch, length)


def empty_cache(cfg: ModelConfig, batch: int, length: int) -> list[KVCache]:
    """One zeroed KVCache of `length` positions per layer."""
    return [KVCache.zeros(cfg, batch, length) for _ in range(cfg.num_layers)]


# Parameters as a plain nested dict ({"blocks": {0: {...}}, "embed_VxD": ...}) are the one pytree that optax trains,
# Orbax saves, hf.py maps and sharding.py places; `nnx.merge(graphdef, params)` turns them back into a module.
Params = dict


def graphdef_and_shapes(cfg: ModelConfig, *, with_experts: bool = True):
    """The module's graph definition and its parameters' shapes and dtypes, without allocating anything."""
    graphdef, state = nnx.split(abstract_module(cfg, with_experts=with_experts))
    return graphdef, nnx.to_pure_dict(state)


# Tracing a module's construction takes a tenth of a second at any size, and every jitted entry point, checkpoint
# read and sharding rule asks for the same few configs: built once per (config, form).
@functools.lru_cache(maxsize=32)
def abstract_module(cfg: ModelConfig, *, with_experts: bool = True) -> Transformer:
    """The model with shapes and metadata (sharding axes) in place of arrays: shared, so read it, never change it."""
    return nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0), with_experts=with_experts))


@functools.lru_cache(maxsize=32)
def block_graphdef(cfg: ModelConfig, *, with_experts: bool = True):
    """One block's graph definition: `nnx.merge(block_graphdef(cfg), params["blocks"][l])` is layer l alone."""
    return nnx.split(nnx.eval_shape(lambda: Block(cfg, nnx.Rngs(0), with_experts=with_experts)))[0]


def init_params(cfg: ModelConfig, seed: int = 0, *, with_experts: bool = True) -> Params:
    return nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(seed), with_experts=with_experts)))


def without_routed_experts(params: Params) -> Params:
    """Training-form params -> what stays on the accelerator when the routed experts live elsewhere (MoLE's table,
    the MoE offloading baseline's host memory): drop the routed experts and expert norms."""
    out = dict(params)
    out["blocks"] = {l: {k: v for k, v in b.items() if k not in ("experts", "norm_expert")}
                     for l, b in params["blocks"].items()}
    return out
