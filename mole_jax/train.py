"""Training: one jitted, sharded step and the loop around it (data, checkpoints, resume, metrics, evaluation).

    train(model_cfg, train_cfg, out=RUN_DIR, data_source=...)   train, or resume the run in RUN_DIR
    evaluate(RUN_DIR, data_source=..., split="val")             mean next-token cross-entropy, perplexity, tokens

The step is a pure function `train_step(state, tokens_AxBxT1) -> (state, metrics)`, jitted once over a
("data", "fsdp") mesh: the batch is split over every device, params and Adam moments are fully sharded
(sharding.py), the state is donated, A micro-batches are accumulated with `lax.scan`. The model is rebuilt inside
jit from the plain params dict with `nnx.merge`. The loop dispatches step s+1 before it reads step s's metrics, and
syncs only at checkpoint and evaluation steps, where it checks that the state to save is finite.

MoLE's routed experts read the embedding row of a token, a function of its id alone, so with `dedup` they run once
per distinct id of each device's share of a micro-batch (static capacity U chosen from the run's data; an exact
fallback beyond it). See docs/training.md for the run directory, resume rules and measurements.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mole_jax import checkpoint, data, sharding
from mole_jax.config import ModelConfig, MoleError, TrainConfig
from mole_jax.model import Params, graphdef_and_shapes, init_params

# TrainConfig fields that may change when a run is resumed: they steer the loop, not the trajectory.
RUN_CONTROL = ("steps", "checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "eval_batches", "dedup")
# ModelConfig fields that choose an implementation, not parameters: a run may resume on other hardware with others.
IMPLEMENTATION = ("dtype", "moe_impl", "attention_impl")


# Optimizer ----------------------------------------------------------------------------------------------------
def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup to the peak over warmup_frac of the steps (the first update already gets peak/warmup), then
    cosine decay to final_lr_frac * peak at the last step: the paper's recipe."""
    warmup = max(1, round(tc.warmup_frac * tc.steps))
    peak, final = tc.peak_lr, tc.peak_lr * tc.final_lr_frac

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        progress = jnp.clip((count - warmup) / max(1, tc.steps - warmup), 0.0, 1.0)
        cosine = final + 0.5 * (peak - final) * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(count < warmup, peak * (count + 1) / warmup, cosine)

    return schedule


def decay_mask(params: Params) -> Params:
    """Weight decay on matrices (embeddings, projections, experts, routers), not on the RMSNorm scales: decaying a
    scale shrinks the signal toward zero instead of regularising, and the authors' HF Trainer excludes norms too."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(lr_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay, mask=decay_mask))


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


def loss_fn(params: Params, graphdef, cfg: ModelConfig, tokens_BxT1: jax.Array, dedup_rows: int = 0):
    """Mean next-token cross-entropy (float32) plus, for MoE, the load-balance and router z-losses with the
    config's coefficients. Returns (objective, metrics); metrics["loss"] is the cross-entropy alone."""
    ids_BxT, targets_BxT = tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]
    out = nnx.merge(graphdef, params)(ids_BxT, dedup_rows=dedup_rows)
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


def make_grad_fn(cfg: ModelConfig, *, dedup_rows: int = 0, mesh=None) -> Callable:
    """(params, tokens_BxT1) -> ((objective, metrics), grads) for one micro-batch.

    dedup_rows: MoLE's distinct-id capacity U per device share of the micro-batch (0: plain per-token experts).
    On a mesh of several devices each device deduplicates its own rows inside a shard_map: a unique over the
    whole sharded batch leaves the distinct rows replicated, so every device would evaluate the experts on all
    of them (measured slower than no dedup at all). Inside the shard_map the parameters are gathered whole."""
    graphdef, _ = graphdef_and_shapes(cfg)
    groups = 1 if mesh is None else mesh.size  # the batch is split over every device

    def objective(params, tokens_BxT1, groups):
        value, metrics = loss_fn(params, graphdef, cfg, tokens_BxT1, dedup_rows)
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
                    mesh=None, param_shardings: Any = None) -> Callable:
    """The pure step: (state, tokens_AxBxT1) -> (state, metrics). A = micro-batches (gradient accumulation),
    B = sequences per micro-batch, T1 = T + 1 tokens (inputs and shifted targets). Gradients are averaged over
    micro-batches, so the update equals one step on the whole batch. dedup_rows and mesh: see make_grad_fn.
    param_shardings: keep the accumulated gradients sharded like the params (reduce-scatter, not all-reduce)."""
    schedule = lr_schedule(tc)
    grad_fn = make_grad_fn(cfg, dedup_rows=dedup_rows, mesh=mesh)

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
        metrics["grad_norm"] = global_norm(grads)
        metrics["lr"] = schedule(state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def make_eval_step(cfg: ModelConfig) -> Callable:
    """(params, tokens_BxT1, weight_B) -> (sum of token cross-entropies, tokens counted); weight 0 marks padding.
    Forward only, so MoLE's dedup would save little: plain per-token experts."""
    graphdef, _ = graphdef_and_shapes(cfg)

    def eval_step(params, tokens_BxT1, weight_B):
        logits = nnx.merge(graphdef, params)(tokens_BxT1[:, :-1]).logits_BxTxV
        ce_BxT = cross_entropy_BxT(logits, tokens_BxT1[:, 1:])
        return jnp.sum(ce_BxT * weight_B[:, None]), jnp.sum(weight_B) * ce_BxT.shape[1]

    return eval_step


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
def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh) -> TrainState:
    """Params by sharding.py's rules; Adam's moments mirror their params; counters replicated."""
    param_sh = sharding.param_shardings(cfg, mesh)
    _, shapes = graphdef_and_shapes(cfg)
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, jax.eval_shape(tx.init, shapes), param_sh,
                                   transform_non_params=lambda _: sharding.replicated(mesh))
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

    def __init__(self, mesh, num_micro: int, micro_batch: int, seq_len: int):
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


# Dedup capacity -----------------------------------------------------------------------------------------------
def choose_dedup_rows(batches: data.Batches, num_micro: int, groups: int, vocab_size: int, *, probe_steps: int = 8,
                      headroom: float = 1.1) -> dict[str, Any]:
    """The static distinct-id capacity U of MoLE's dedup, from the first batches of the run's own data.

    Each of the `groups` devices deduplicates its own share of a micro-batch (M tokens). U is the most distinct ids
    seen in a share of the first `probe_steps` steps times `headroom`, rounded up to a multiple of 128 (of 8 for
    shares under 2,048 tokens), at most min(M, V). The count of distinct ids in M tokens of text varies little
    (on the default corpus the standard deviation is 2-4% of the mean, and the most over 60 batches was within 4%
    of the most over the first 4), so 10% headroom rarely overflows; a share that does is still exact: the model
    falls back to the per-token path for it (the `dedup_overflow` metric counts them). Every padded row of U costs
    expert work, hence no more headroom than that. U = 0 (dedup off) when it cannot save work (U = M)."""
    tokens_M = batches.batch_size // num_micro // groups * batches.seq_len
    counts = []
    for step in range(probe_steps):
        ids_SxM = batches.batch(step)[:, :-1].reshape(num_micro * groups, -1)
        counts += [np.unique(share).size for share in ids_SxM]
    multiple = 128 if tokens_M >= 2048 else 8
    rows = min(math.ceil(max(counts) * headroom / multiple) * multiple, tokens_M, vocab_size)
    return {"rows": 0 if rows >= tokens_M else rows, "unique_fraction": float(np.mean(counts)) / tokens_M,
            "max_unique": int(max(counts)), "tokens_per_share": tokens_M, "shares": groups}


# Multi-host -----------------------------------------------------------------------------------------------------
def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """jax.distributed.initialize() when asked: explicit arguments, JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES
    and JAX_PROCESS_ID), or a cluster JAX detects by itself (SLURM with several tasks, Open MPI, TPU pods).
    Must run before anything touches a device."""
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    cluster = int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    if not (coordinator or cluster) or jax.distributed.is_initialized():
        return
    if num_processes is None and "JAX_NUM_PROCESSES" in env:
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in env:
        process_id = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(coordinator, num_processes, process_id)


# The run directory ----------------------------------------------------------------------------------------------
def _differences(old: dict, new: dict, ignore=()) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in ignore and old.get(k) != new.get(k)]


def _check_resumable(out: Path, run: dict, cfg: ModelConfig, tc: TrainConfig, preset: str | None) -> None:
    """An existing OUT may only be continued by the same run: same model, same optimisation and data settings."""
    if preset and run.get("preset") and run["preset"] != preset:
        raise MoleError(f"{out} holds a run of preset {run['preset']}, not {preset}: choose another --out")
    diff = _differences(run.get("model_config", {}), cfg.to_dict(), IMPLEMENTATION)
    if diff:
        raise MoleError(f"{out} holds a run of another model ({'; '.join(diff)}): choose another --out")
    diff = _differences(run.get("train_config", {}), tc.to_dict(), RUN_CONTROL)
    if diff:
        raise MoleError(f"{out} holds a run with other training settings ({'; '.join(diff)}): choose another --out")


def _check_same_data(out: Path, run: dict, desc: dict) -> None:
    old = run.get("data", {})
    for key in ("kind", "fingerprint", "num_tokens"):
        if old.get(key) != desc.get(key):
            raise MoleError(f"{out} was trained on other data ({key}: {old.get(key)!r} -> {desc.get(key)!r}): "
                            "resume with the run's data or choose another --out")


def _data_argument(desc: dict):
    """The `data` argument that reopens a recorded source."""
    return None if desc["kind"] == "default" else desc["paths"][0] if desc["kind"] == "hf" else desc["paths"]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from (the killed run's steps after it are redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line cut by a kill
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def _finite(metrics: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values())


@dataclasses.dataclass
class RunResult:
    out: Path
    step: int  # the last step trained (and checkpointed)
    loss: float | None  # training loss at that step
    val_loss: float | None  # the last validation loss
    dedup_rows: int
    history: list[dict[str, Any]]  # the metrics written by this call


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, *, out: str | Path, data_source=None, tokenizer=None,
          devices: int | None = None, preset: str | None = None, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None) -> RunResult:
    """Train `model_cfg` with `train_cfg` into the run directory `out`, or continue the run already there.

    data_source: None / "default" (the embedded corpus), text file(s) or directory, a .bin token file, or
        "hf:NAME" (see data.py). tokenizer: a tokenizer.json path or `tokenizers.Tokenizer`; default: the run's
        own tokenizer.json when resuming, else a byte-level BPE trained on the text with the model's vocab size.
    devices: how many devices to use (default: all). preset: the preset's name, recorded in run.json.
    on_step(step, metrics): called on every process after each step's metrics are read (one step late).
    Rerunning the same call on the same `out` resumes from the latest checkpoint; the batches are a pure function
    of (seed, step), so the resumed run is the uninterrupted run. Bad input raises MoleError before anything
    is written.
    """
    cfg, tc, out = model_cfg, train_cfg, Path(out).expanduser().absolute()
    # --- validate everything before writing anything -----------------------------------------------------------
    if tc.seq_len < 1 or tc.seq_len > cfg.max_seq_len:
        raise MoleError(f"sequence length {tc.seq_len} exceeds the model's maximum of {cfg.max_seq_len}"
                        if tc.seq_len > 0 else f"sequence length must be positive, got {tc.seq_len}")
    if tc.steps < 1 or tc.batch_size < 1 or tc.grad_accum < 1:
        raise MoleError("steps, batch size and grad accumulation must be positive")
    if tc.batch_size % tc.grad_accum:
        raise MoleError(f"batch size {tc.batch_size} is not divisible by grad accumulation {tc.grad_accum}")
    mesh = sharding.make_mesh(devices)
    micro_batch = tc.batch_size // tc.grad_accum
    if micro_batch % mesh.size:
        raise MoleError(f"{micro_batch} sequences per micro-batch cannot be split over {mesh.size} devices: "
                        "make batch size / grad accumulation a multiple of the device count")
    if out.exists() and not out.is_dir():
        raise MoleError(f"--out {out} is a file")
    run = checkpoint.read_run(out) if out.is_dir() else {}
    if out.is_dir() and not run and any(out.iterdir()):
        raise MoleError(f"{out} exists and is not a mole-jax run directory: choose another --out")
    if run:
        if "train_config" not in run:
            raise MoleError(f"{out} holds a run that was not trained here (an import): choose another --out")
        _check_resumable(out, run, cfg, tc, preset)
        if tokenizer is None and (out / checkpoint.TOKENIZER).is_file():
            tokenizer = out / checkpoint.TOKENIZER
        if data_source is None and run["data"]["kind"] != "default":
            data_source = _data_argument(run["data"])
    corpus = data.open_corpus(data_source, vocab_size=cfg.vocab_size, tokenizer=tokenizer)
    if run:
        _check_same_data(out, run, corpus.description)
    train_windows, val_windows = data.split_windows(corpus.tokens.size, tc.seq_len, tc.val_fraction)
    batches = data.Batches(corpus.tokens, train_windows, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=tc.seed,
                           vocab_size=cfg.vocab_size)
    batches.batch(0)  # the first batch reads and checks its token ids before anything is written
    dedup = {"rows": 0}
    if cfg.kind == "mole" and tc.dedup:
        dedup = choose_dedup_rows(batches, tc.grad_accum, mesh.size, cfg.vocab_size)
    lead = jax.process_index() == 0
    if jax.process_count() > 1:  # every host must have read the same data
        from jax.experimental import multihost_utils
        multihost_utils.assert_equal(np.frombuffer(bytes.fromhex(corpus.description["fingerprint"]), np.uint8),
                                     "the hosts read different data")

    # --- the run directory ------------------------------------------------------------------------------------
    ckpt_dir = out / checkpoint.CHECKPOINTS
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        record = {"format": checkpoint.FORMAT, "preset": preset or run.get("preset"), "model_config": cfg.to_dict(),
                  "train_config": tc.to_dict(), "data": run.get("data", corpus.description), "dedup": dedup,
                  "devices": mesh.size, "processes": jax.process_count(), "val_windows": int(val_windows.size),
                  "train_windows": int(train_windows.size)}
        checkpoint.write_json_atomic(out / checkpoint.RUN_FILE, record)
        if corpus.tokenizer is not None and not (out / checkpoint.TOKENIZER).is_file():
            tmp = out / (checkpoint.TOKENIZER + ".tmp")
            corpus.tokenizer.save(str(tmp))
            tmp.replace(out / checkpoint.TOKENIZER)
    mngr = checkpoint.manager(ckpt_dir, max_to_keep=tc.keep_checkpoints, save_interval_steps=tc.checkpoint_every)
    try:
        return _loop(cfg, tc, out, mesh, mngr, batches, corpus, val_windows, dedup["rows"], lead, progress, on_step)
    finally:
        mngr.wait_until_finished()
        mngr.close()


def _loop(cfg, tc, out, mesh, mngr, batches, corpus, val_windows, dedup_rows, lead, progress, on_step) -> RunResult:
    tx = make_optimizer(tc)
    shardings = state_shardings(cfg, tx, mesh)
    start = mngr.latest_step() or 0
    if start:
        params, opt_state = checkpoint.restore_train_state(mngr, start, abstract_state(cfg, tx, shardings))
        state = TrainState(jax.device_put(jnp.asarray(start, jnp.int32), shardings.step), params, opt_state)
    else:
        state = init_state(cfg, tx, tc.seed, shardings)
    metrics_path = out / checkpoint.METRICS
    if lead:
        _truncate_metrics(metrics_path, start)
    if start >= tc.steps:
        return RunResult(out, start, None, None, dedup_rows, [])

    micro_batch = tc.batch_size // tc.grad_accum
    feed = Feeder(mesh, tc.grad_accum, micro_batch, tc.seq_len)
    step_fn = jax.jit(make_train_step(cfg, tc, tx, dedup_rows=dedup_rows, mesh=mesh,
                                      param_shardings=shardings.params),
                      in_shardings=(shardings, feed.sharding), out_shardings=(shardings, None), donate_argnums=0)
    batch = feed(lambda rows: batches.batch(start, rows))
    compiled = step_fn.lower(state, batch).compile()  # ahead of time: the first step's throughput is honest
    evaluator = Evaluator(cfg, mesh, shardings.params, micro_batch, tc.seq_len)
    val_windows = val_windows[:tc.eval_batches * evaluator.batch]
    tokens_per_step = tc.batch_size * tc.seq_len

    bar = None
    if progress and lead:
        from tqdm.auto import tqdm
        bar = tqdm(total=tc.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
    log = open(metrics_path, "a") if lead else None
    history: list[dict] = []
    clock = {"step": start, "time": time.perf_counter()}  # throughput is measured between reads

    def read(step: int, metrics) -> dict[str, float]:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        values["tokens_per_s"] = tokens_per_step * (step - clock["step"]) / max(now - clock["time"], 1e-9)
        clock.update(step=step, time=now)
        if not _finite(values):
            mngr.wait_until_finished()
            bad = {k: v for k, v in values.items() if not math.isfinite(v)}
            raise MoleError(f"non-finite loss at step {step} ({bad}); stopped without saving it: the last good "
                            f"checkpoint is step {mngr.latest_step() or 'none'} in {out}")
        if bar is not None:
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_s']:.0f}", refresh=False)
        return values

    def write(step: int, values: dict[str, float], **extra):
        record = {"step": step, **values, "epoch": round(batches.epoch(step), 4), **extra}
        history.append(record)
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()

    val_loss, pending = None, None
    try:
        for step in range(start, tc.steps):
            state, metrics = compiled(state, batch)
            done = step + 1
            if done < tc.steps:  # the host builds the next batch while this step runs
                batch = feed(lambda rows, s=done: batches.batch(s, rows))
            if pending is not None:  # the previous step's metrics, read while this one runs
                values = read(*pending)
                if pending[0] % tc.log_every == 0:
                    write(pending[0], values)
                if on_step:
                    on_step(pending[0], values)
            pending = (done, metrics)
            save = done % tc.checkpoint_every == 0 or done == tc.steps  # (Orbax would also save step 1)
            evaluate_now = (tc.eval_every and done % tc.eval_every == 0) or done == tc.steps
            if save or evaluate_now:  # sync: what we save or evaluate must be known finite first
                values, pending = read(*pending), None
                extra = {}
                if evaluate_now and val_windows.size:
                    extra["val_loss"] = val_loss = evaluator.loss(state.params, corpus.tokens, val_windows)
                write(done, values, **extra)
                if save:
                    meta = checkpoint.step_meta(cfg, done, has_experts=True, loss=values["loss"], **extra)
                    checkpoint.save(mngr, done, state.params, meta, opt_state=state.opt_state, force=True)
                if on_step:
                    on_step(done, values)
                clock.update(time=time.perf_counter())  # evaluation and saving are not training throughput
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    last = history[-1] if history else {}
    return RunResult(out, tc.steps, last.get("loss"), val_loss, dedup_rows, history)


# Evaluation ------------------------------------------------------------------------------------------------------
class Evaluator:
    """Mean next-token cross-entropy over a list of windows, in sharded batches (the last one padded)."""

    def __init__(self, cfg: ModelConfig, mesh, param_shardings, batch: int, seq_len: int):
        self.cfg, self.seq_len = cfg, seq_len
        self.batch = max(mesh.size, batch // mesh.size * mesh.size)
        self.feed = Feeder(mesh, 1, self.batch, seq_len)
        self.weight_sharding = NamedSharding(mesh, P(sharding.BATCH_AXES))
        eval_step = make_eval_step(cfg)
        self.step = jax.jit(lambda params, x_1xBxT1, w_B: eval_step(params, x_1xBxT1[0], w_B),
                            in_shardings=(param_shardings, self.feed.sharding, self.weight_sharding))

    def loss(self, params, tokens: np.ndarray, windows: np.ndarray) -> float:
        total, count = self.totals(params, tokens, windows)
        return total / count

    def totals(self, params, tokens: np.ndarray, windows: np.ndarray) -> tuple[float, int]:
        """(sum of token cross-entropies, tokens) over `windows`; batches are dispatched before any is read."""
        sums = []
        for i in range(0, windows.size, self.batch):
            chunk = windows[i:i + self.batch]
            padded = np.concatenate([chunk, np.full(self.batch - chunk.size, chunk[0])])
            weight_B = (np.arange(self.batch) < chunk.size).astype(np.float32)
            x = self.feed(lambda rows, p=padded: data.read_windows(tokens, p[rows], self.seq_len, self.cfg.vocab_size))
            w = jax.make_array_from_process_local_data(self.weight_sharding, weight_B[self.feed.local_rows],
                                                       (self.batch,))
            sums.append(self.step(params, x, w))
        sums = jax.device_get(sums)
        return float(sum(np.float64(s) for s, _ in sums)), int(sum(int(c) for _, c in sums))


def evaluate(run_dir: str | Path, *, data_source=None, split: str = "val", batch_size: int | None = None,
             seq_len: int | None = None, devices: int | None = None, max_windows: int | None = None) -> dict:
    """Mean next-token cross-entropy (nats), perplexity and token count of a checkpoint on a split of a corpus.

    run_dir: a run directory (its latest step), or any checkpoint `mole_jax.load` accepts. data_source: default:
    the run's own data. split: "val" / "train" (the run's deterministic split) or "all" (every window).
    The windows are the run's: seq_len + 1 tokens at stride seq_len."""
    ref = checkpoint.locate(run_dir)
    meta = checkpoint.read_meta(run_dir)
    if not meta.get("has_experts", True):
        raise MoleError(f"{ref.path} is MoLE's inference form: evaluate the training-form checkpoint")
    run = checkpoint.read_run(ref.run_dir) if ref.run_dir else {}
    tc = TrainConfig.from_dict(run.get("train_config", {}))
    cfg = checkpoint.model_config(run_dir)
    seq_len = seq_len or tc.seq_len
    if seq_len > cfg.max_seq_len:
        raise MoleError(f"sequence length {seq_len} exceeds the model's maximum of {cfg.max_seq_len}")
    tokenizer = None
    if ref.run_dir and (ref.run_dir / checkpoint.TOKENIZER).is_file():
        tokenizer = ref.run_dir / checkpoint.TOKENIZER
    if data_source is None:
        if "data" not in run:
            raise MoleError(f"{run_dir} records no training data: pass the data to evaluate on")
        data_source = _data_argument(run["data"])
    is_tokens = _is_token_source(data_source)
    if tokenizer is None and not is_tokens:
        raise MoleError(f"{run_dir} has no tokenizer.json, so it can only be evaluated on a token file (.bin)")
    corpus = data.open_corpus(data_source, vocab_size=cfg.vocab_size, tokenizer=tokenizer)
    windows = data.windows_for_split(corpus.tokens.size, seq_len, tc.val_fraction, split)
    if max_windows:
        windows = windows[:max_windows]
    if not windows.size:
        raise MoleError(f"the data has no complete window of {seq_len + 1} tokens")
    mesh = sharding.make_mesh(devices)
    _, params = checkpoint.restore_params(ref.path, shardings=sharding.param_shardings(cfg, mesh))
    evaluator = Evaluator(cfg, mesh, jax.tree.map(lambda x: x.sharding, params),
                          batch_size or tc.batch_size // tc.grad_accum, seq_len)
    total, count = evaluator.totals(params, corpus.tokens, windows)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count, "split": split,
            "windows": int(windows.size), "step": ref.step, "seq_len": seq_len, "checkpoint": str(ref.path)}


def _is_token_source(source) -> bool:
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source or [])
    return any(str(p).endswith(".bin") for p in items)

