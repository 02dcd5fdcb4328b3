"""The train step: optimizer, loss, gradients, placement on the mesh, and the one compiled step that `train` and
`bench train` both run.

The step is a pure function `train_step(state, tokens_AxBxT1) -> (state, metrics)`, jitted once over a
("data", "fsdp") mesh: the batch is split over every device, params and Adam moments are fully sharded
(sharding.py), the state is donated, A micro-batches are accumulated with `lax.scan`. The model is rebuilt inside
jit from the plain params dict with `nnx.merge`. `ShardedStep` builds that and compiles it ahead of time.

MoLE's routed experts read the embedding row of a token, a function of its id alone, so with `dedup` they run once
per distinct id of each device's share of a micro-batch (static capacity U from `choose_dedup_rows`; an exact
fallback beyond it). `TrainConfig.remat` recomputes each block's activations in the backward pass under a named
policy (model.remat_block); prefill and decoding never rematerialise. See docs/training.md.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mole_jax import data, sharding
from mole_jax.config import TRAINABLE, ModelConfig, MoleError, TrainConfig
from mole_jax.model import Params, graphdef_and_shapes, init_params, remat_block


# Optimizer ----------------------------------------------------------------------------------------------------
def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup to the peak over warmup_frac of the schedule's steps (the first update already gets
    peak/warmup), then cosine decay to final_lr_frac * peak at its last step, the paper's recipe; past it, the final
    rate. The schedule spans schedule_steps (fixed when a run starts), by default steps."""
    horizon = tc.schedule_steps or tc.steps
    warmup = max(1, round(tc.warmup_frac * horizon))
    peak, final = tc.peak_lr, tc.peak_lr * tc.final_lr_frac

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        progress = jnp.clip((count - warmup) / max(1, horizon - warmup), 0.0, 1.0)
        cosine = final + 0.5 * (peak - final) * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(count < warmup, peak * (count + 1) / warmup, cosine)

    return schedule


def decay_mask(params: Params) -> Params:
    """Weight decay on matrices (embeddings, projections, experts, routers), not on the RMSNorm scales: decaying a
    scale shrinks the signal toward zero instead of regularising, and the authors' HF Trainer excludes norms too."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


# MoLE's routed part: what an upcycle adds to a Dense model (upcycling.py), and all that trainable="new" trains.
NEW_PARAMS = ("experts", "norm_expert", "w_router_DxN")


def param_labels(params: Params) -> Params:
    """"new" for each leaf of MoLE's routed part (under one of NEW_PARAMS), "backbone" for every other leaf."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "new" if any(getattr(k, "key", None) in NEW_PARAMS for k in path) else "backbone", params)


def trained_leaves(tree: Params, trainable: str) -> list:
    """The leaves of a params-shaped tree (params, gradients) that `trainable` ("all" or "new") updates."""
    if trainable == "all":
        return jax.tree.leaves(tree)
    return [x for x, label in zip(jax.tree.leaves(tree), jax.tree.leaves(param_labels(tree))) if label == "new"]


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW after global-norm clipping. trainable="new": an optax partition in which only the routed part gets
    that optimizer (its clipping sees only the routed part's gradients) and the backbone's updates are zeros; the
    backbone has no optimizer state at all (optax.MaskedNode where its moments would be)."""
    if tc.trainable not in TRAINABLE:
        raise MoleError(f"unknown trainable {tc.trainable!r}: use one of {', '.join(TRAINABLE)}")
    tx = optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(lr_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay, mask=decay_mask))
    if tc.trainable == "all":
        return tx
    return optax.multi_transform({"new": tx, "backbone": optax.set_to_zero()}, param_labels)


# The step -----------------------------------------------------------------------------------------------------
class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Params
    opt_state: optax.OptState


def cross_entropy_BxT(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    logits = logits_BxTxV.astype(jnp.float32)
    # The target logit by a masked sum, not take_along_axis: its gradient is then an elementwise select fused
    # with the softmax, instead of a scatter into a [B, T, V] buffer of zeros.
    is_target = jnp.arange(logits.shape[-1], dtype=targets_BxT.dtype) == targets_BxT[..., None]
    target_logit = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def loss_fn(params: Params, graphdef, cfg: ModelConfig, tokens_BxT1: jax.Array, dedup_rows: int = 0, *,
            remat: str = "none"):
    """Mean next-token cross-entropy (float32) plus, for MoE, the load-balance and router z-losses with the
    config's coefficients. Returns (objective, metrics); metrics["loss"] is the cross-entropy alone. remat: the
    blocks' rematerialisation policy (model.remat_block): same values, less memory held for the backward pass."""
    ids_BxT, targets_BxT = tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]
    out = nnx.merge(graphdef, params)(ids_BxT, dedup_rows=dedup_rows, remat=remat)
    ce = jnp.mean(cross_entropy_BxT(out.logits_BxTxV, targets_BxT))
    metrics = {"loss": ce, **out.aux}
    objective = ce
    if cfg.kind == "moe":
        objective = ce + cfg.moe_balance_coef * out.aux["balance"] + cfg.moe_z_coef * out.aux["router_z"]
    return objective, metrics


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def count_unique(ids: jax.Array) -> jax.Array:
    sorted_M = jnp.sort(ids.reshape(-1))
    return 1 + jnp.sum(sorted_M[1:] != sorted_M[:-1])


def unique_metrics(ids_BxT: jax.Array, groups: int, dedup_rows: int) -> dict[str, jax.Array]:
    """MoLE: the fraction of distinct ids in each device's share of the micro-batch (the expert work dedup
    keeps), and the fraction of shares that had more than `dedup_rows` and took the per-token path."""
    counts_G = jax.vmap(count_unique)(ids_BxT.reshape(groups, -1))
    metrics = {"unique_fraction": jnp.mean(counts_G) / (ids_BxT.size // groups)}
    if dedup_rows:
        metrics["dedup_overflow"] = jnp.mean((counts_G > dedup_rows).astype(jnp.float32))
    return metrics


def make_grad_fn(cfg: ModelConfig, *, dedup_rows: int = 0, mesh: Mesh | None = None,
                 remat: str = "none") -> Callable:
    """(params, tokens_BxT1) -> ((objective, metrics), grads) for one micro-batch. remat: see loss_fn.

    dedup_rows: MoLE's distinct-id capacity U per device share of the micro-batch (0: plain per-token experts).
    On a mesh of several devices each device deduplicates its own rows inside a shard_map: a unique over the
    whole sharded batch leaves the distinct rows replicated, so every device would evaluate the experts on all
    of them (slower than no dedup at all; docs/training.md). Inside the shard_map the parameters are gathered
    whole."""
    remat_block(remat)  # an unknown policy fails here, before any tracing
    graphdef, _ = graphdef_and_shapes(cfg)
    groups = 1 if mesh is None else mesh.size  # the batch is split over every device

    def objective(params, tokens_BxT1, groups):
        value, metrics = loss_fn(params, graphdef, cfg, tokens_BxT1, dedup_rows, remat=remat)
        if cfg.kind == "mole":
            metrics.update(unique_metrics(tokens_BxT1[:, :-1], groups, dedup_rows))
        return value, metrics

    if not (dedup_rows and groups > 1):
        return jax.value_and_grad(lambda params, tokens_BxT1: objective(params, tokens_BxT1, groups), has_aux=True)
    # The mean over devices of each device's mean loss is the global mean (equal shares); differentiating through
    # the shard_map lets JAX sum the per-device gradients of the replicated params.
    per_device = jax.shard_map(
        lambda params, tokens_BxT1: jax.lax.pmean(objective(params, tokens_BxT1, 1), sharding.BATCH_AXES),
        mesh=mesh, in_specs=(P(), P(sharding.BATCH_AXES, None)), out_specs=P())
    return jax.value_and_grad(per_device, has_aux=True)


def make_train_step(cfg: ModelConfig, tc: TrainConfig, tx: optax.GradientTransformation, *, dedup_rows: int = 0,
                    mesh: Mesh | None = None, param_shardings: Any = None) -> Callable:
    """The pure step: (state, tokens_AxBxT1) -> (state, metrics). A = micro-batches (gradient accumulation),
    B = sequences per micro-batch, T1 = T + 1 tokens (inputs and shifted targets). Gradients are averaged over
    micro-batches, so the update equals one step on the whole batch. dedup_rows and mesh: see make_grad_fn;
    tc.remat: see loss_fn. param_shardings: keep the accumulated gradients sharded like the params
    (reduce-scatter, not all-reduce)."""
    schedule = lr_schedule(tc)
    grad_fn = make_grad_fn(cfg, dedup_rows=dedup_rows, mesh=mesh, remat=tc.remat)

    def micro(params, tokens_BxT1):
        (_, metrics), grads = grad_fn(params, tokens_BxT1)
        if param_shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, param_shardings)
        return grads, metrics

    def train_step(state: TrainState, tokens_AxBxT1: jax.Array):
        num_micro = tokens_AxBxT1.shape[0]
        if num_micro == 1:
            grads, metrics = micro(state.params, tokens_AxBxT1[0])
        else:
            def body(acc, tokens_BxT1):
                return jax.tree.map(jnp.add, acc, micro(state.params, tokens_BxT1)), None

            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 jax.eval_shape(micro, state.params, tokens_AxBxT1[0]))
            total, _ = jax.lax.scan(body, zeros, tokens_AxBxT1)
            grads, metrics = jax.tree.map(lambda x: x / num_micro, total)
        metrics["grad_norm"] = global_norm(trained_leaves(grads, tc.trainable))  # the frozen grads are then unused
        metrics["lr"] = schedule(state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if tc.trainable != "all":  # frozen leaves pass through as they are (p + 0 would turn -0.0 into 0.0)
            params = jax.tree.map(lambda label, old, new: new if label == "new" else old,
                                  param_labels(params), state.params, params)
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def train_flops_per_token(cfg: ModelConfig, seq_len: int, expert_rows_per_token: float = 1.0) -> float:
    """Matmul FLOPs of one training token (forward + backward = 3x forward; 2 FLOPs per multiply-add), counted
    from the shapes: q/k/v/o projections 8D^2, attention scores and values 4TD (the full T x T that the XLA
    kernel computes), FFN / shared expert 4DF, router 2DN, routed experts N * 4DF_r per expert row, LM head 2DV.
    expert_rows_per_token: MoLE's routed experts run on this many rows per token (1 plain, the distinct-id
    fraction with dedup); MoE runs top_k of its experts per token. Norms, softmax, gathers are not counted."""
    D, T, L = cfg.d_model, seq_len, cfg.num_layers
    per_layer = 8 * D * D + 4 * T * D + 4 * D * cfg.ffn_dim
    if cfg.kind == "mole":
        per_layer += 2 * D * cfg.num_experts + cfg.num_experts * 4 * D * cfg.expert_dim * expert_rows_per_token
    elif cfg.kind == "moe":
        per_layer += 2 * D * cfg.num_experts + cfg.top_k * 4 * D * cfg.expert_dim
    return 3.0 * (L * per_layer + 2 * D * cfg.vocab_size)


# Placement ----------------------------------------------------------------------------------------------------
def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """Params by sharding.py's rules; Adam's moments mirror their params; counters replicated. A moment is found by
    its key path, which ends with its param's (`...mu['blocks'][0]['attn']['wq_DxHxK']`): this also places the
    moments of a partitioned optimizer (trainable="new"), which hold only some of the params."""
    param_sh = sharding.param_shardings(cfg, mesh)
    _, shapes = graphdef_and_shapes(cfg)
    by_path = dict(jax.tree_util.tree_flatten_with_path(param_sh)[0])

    def place(path, _):
        return next((by_path[path[i:]] for i in range(len(path)) if path[i:] in by_path), sharding.replicated(mesh))

    opt_sh = jax.tree_util.tree_map_with_path(place, jax.eval_shape(tx.init, shapes))
    return TrainState(sharding.replicated(mesh), param_sh, opt_sh)


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, shardings: TrainState) -> TrainState:
    """Initialised directly in place on the mesh (jit with out_shardings): never whole on one device."""
    def init():
        params = init_params(cfg, seed)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    return jax.jit(init, out_shardings=shardings)()


def abstract_state(cfg: ModelConfig, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    _, shapes = graphdef_and_shapes(cfg)
    abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32), shapes, jax.eval_shape(tx.init, shapes))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)


class Feeder:
    """Global [A, B, T+1] token arrays sharded over the batch axis, built from the rows this process holds
    (jax.make_array_from_process_local_data): each host reads only its own part of every batch."""

    def __init__(self, mesh: Mesh, num_micro: int, micro_batch: int, seq_len: int):
        self.shape = (num_micro, micro_batch, seq_len + 1)
        self.sharding = NamedSharding(mesh, P(None, sharding.BATCH_AXES, None))
        index = self.sharding.addressable_devices_indices_map(self.shape)
        rows = sorted({r for idx in index.values() for r in range(*idx[1].indices(micro_batch))})
        if rows != list(range(rows[0], rows[-1] + 1)):
            raise MoleError("this process's devices do not hold a contiguous block of the batch")
        self.local_rows = np.asarray(rows)
        # global row (micro-batch a, row r) = a * B + r
        self.global_rows = (np.arange(num_micro)[:, None] * micro_batch + self.local_rows[None]).reshape(-1)

    def __call__(self, rows_fn: Callable[[np.ndarray], np.ndarray]) -> jax.Array:
        """rows_fn(global row indices) -> [n, T+1] int32 for just those rows."""
        local = rows_fn(self.global_rows).reshape(self.shape[0], self.local_rows.size, self.shape[2])
        return jax.make_array_from_process_local_data(self.sharding, local, self.shape)


class ShardedStep:
    """The train step of one model and TrainConfig on a mesh: its optimizer, the state's placement, the batch
    feeder, and the step jitted with the state donated, compiled ahead of time (so that the first step's time is
    the step's, not the compiler's). What `train` runs in its loop and `bench train` times.

        step = ShardedStep(cfg, tc, mesh, dedup_rows=U)
        state = step.init_state(seed)                     # or a checkpoint restored onto step.abstract_state()
        batch = step.feed(lambda rows: batches.batch(s, rows))
        run = step.compile(state, batch)                  # run(state, batch) -> (state, metrics); donates state

    Precision: `cfg.dtype` is the compute dtype; params, gradients and Adam's moments stay `cfg.param_dtype`
    (float32), and logits, softmaxes, router and loss are float32 whatever the compute dtype. Memory:
    `tc.remat` rematerialises each block in the backward pass (model.remat_block).
    """

    def __init__(self, cfg: ModelConfig, tc: TrainConfig, mesh: Mesh, *, dedup_rows: int = 0):
        self.cfg, self.tc, self.mesh, self.dedup_rows = cfg, tc, mesh, dedup_rows
        self.tx = make_optimizer(tc)
        self.shardings = state_shardings(cfg, self.tx, mesh)
        self.feed = Feeder(mesh, tc.grad_accum, tc.batch_size // tc.grad_accum, tc.seq_len)
        step_fn = make_train_step(cfg, tc, self.tx, dedup_rows=dedup_rows, mesh=mesh,
                                  param_shardings=self.shardings.params)
        self._jitted = jax.jit(step_fn, in_shardings=(self.shardings, self.feed.sharding),
                               out_shardings=(self.shardings, None), donate_argnums=0)

    def init_state(self, seed: int) -> TrainState:
        return init_state(self.cfg, self.tx, seed, self.shardings)

    def abstract_state(self) -> TrainState:
        return abstract_state(self.cfg, self.tx, self.shardings)

    def state_from_params(self, params: Params) -> TrainState:
        """Step 0 of a run that starts from given parameters (placed as `shardings.params`, e.g. an upcycled
        checkpoint's): those parameters and a fresh optimizer state."""
        fresh = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, self.tx.init(p)),
                        out_shardings=self.shardings)
        return fresh(params)

    def compile(self, state: TrainState, tokens_AxBxT1: jax.Array) -> Callable:
        return self._jitted.lower(state, tokens_AxBxT1).compile()


# Dedup capacity -----------------------------------------------------------------------------------------------
def choose_dedup_rows(batches: data.Batches, num_micro: int, groups: int, vocab_size: int, *, probe_shares: int = 128,
                      z: float = 3.5) -> dict[str, Any]:
    """The static distinct-id capacity U of MoLE's dedup, from the first batches of the run's own data.

    Each of the `groups` devices deduplicates its own share of a micro-batch (M tokens). The count of distinct ids
    in M tokens of text is nearly normal across batches with a small spread (docs/training.md), so U is its mean
    plus `z` standard deviations over the first `probe_shares` shares of the run (at least 8 steps), and at least
    the most seen, rounded up to a multiple of 128 (of 8 for shares under 2,048 tokens), at most min(M, V). Every
    row of U costs expert work; a share with more ids than U is still exact but takes the per-token path (the
    `dedup_overflow` metric counts them), at about M / U times the expert work. z = 3.5 puts the overflow chance
    near 2e-4 per share, a negligible expected cost, and pads less than a margin over the maximum would.
    U = 0 (dedup off) when it cannot save work (U = M)."""
    tokens_M = batches.batch_size // num_micro // groups * batches.seq_len
    counts = []
    for step in range(max(8, math.ceil(probe_shares / (num_micro * groups)))):
        ids_SxM = batches.batch(step)[:, :-1].reshape(num_micro * groups, -1)
        counts += [np.unique(share).size for share in ids_SxM]
    counts_S = np.asarray(counts, np.float64)
    need = max(counts_S.mean() + z * counts_S.std(), counts_S.max())
    multiple = 128 if tokens_M >= 2048 else 8
    rows = min(math.ceil(need / multiple) * multiple, tokens_M, vocab_size)
    return {"rows": 0 if rows >= tokens_M else rows, "unique_fraction": float(counts_S.mean()) / tokens_M,
            "max_unique": int(counts_S.max()), "unique_std": float(counts_S.std()), "tokens_per_share": tokens_M,
            "shares": groups}


# The peak MFU divides by ---------------------------------------------------------------------------------------
# Nominal dense bf16 peak per device (FLOP/s), from the vendors' data sheets, matched in this order against a
# substring of jax's device_kind: the denominator of MFU on GPU/TPU.
NOMINAL_BF16_PEAK = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12),
                     ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("TPU v6", 918e12), ("TPU v5p", 459e12),
                     ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12)]


def nominal_peak(device_kind: str) -> float | None:
    """The nominal dense bf16 peak (FLOP/s) of one device of this kind, None for a kind not in the table."""
    kind = device_kind.lower()
    return next((peak for name, peak in NOMINAL_BF16_PEAK if name.lower() in kind), None)


def matmul_peak_flops(dtype: str = "float32", n: int | None = None, iters: int = 10) -> float:
    """The machine's attainable matmul rate: FLOP/s of a jitted square [n, n] @ [n, n] (median of `iters`, after
    two warm-up calls). The floor that training and conversion throughput are compared against on a backend
    without a data sheet (CPU), measured in the same run."""
    if n is None:
        n = 1024 if jax.default_backend() == "cpu" else 8192
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda a, b: a @ b)
    for _ in range(2):
        mm(a, b).block_until_ready()
    secs = []
    for _ in range(iters):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        secs.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(secs)
