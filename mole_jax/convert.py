"""Experts -> table: MoLE's re-parameterisation, batched, sharded, resumable, verified.

`convert_to_lut(ckpt, lut_dir)` evaluates every routed expert of every layer on every vocabulary row
(`model.Transformer.lut_rows`, in float32 whatever the training dtype) and streams the result into a table
(lut.py) through the writer's shard pipeline (lut_writer.py). The vocabulary is cut into shards (the table's
files); each device computes `batch_rows` rows per step, the steps are jitted once, the rows of a step are split
over the local devices, and the quantisation runs on the devices too, so only stored bytes reach the host. The
next step is dispatched before the previous step's rows are fetched and written, and Tensorstore writes are
asynchronous, so compute, transfer and writing overlap.

Bit-identical whatever happens: `batch_rows` divides the shard size, so every device always computes an aligned
slice of one shard with the same program. Rows therefore come out the same on 1 or 4 devices, from one or
several processes, and in an interrupted-and-resumed run as in an uninterrupted one. Progress is the set of shard
files present (a shard file appears only once fully written), so a rerun after a kill, even SIGKILL, computes
the missing shards only. The table is marked complete after a verification pass recomputes spot rows.

Several processes (`jax.distributed.initialize()` before the call) split the pending shards between them; each
computes on its own devices and writes its own shards to the shared location (a shared filesystem or gs://);
process 0 prepares the table and, after a barrier, verifies and completes it.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from mole_jax import checkpoint, lut, schemes, sharding
from mole_jax.config import ModelConfig, MoleError
from mole_jax.lut_writer import ShardPipeline, TableWriter
from mole_jax.model import graphdef_and_shapes
from mole_jax.schemes import Layout

STEP_TARGET_BYTES = 64 << 20  # float32 rows (or expert activations) one device computes per step, by default
VERIFY_ROWS = 16
# Recomputing a row in float32 with another batch shape may differ in the last bits; verification allows this
# much (relative to each expert vector's absmax) on top of the scheme's own bound.
VERIFY_RTOL = 1e-5


def flops_per_row(cfg: ModelConfig) -> int:
    """Per vocabulary row: every layer's expert norm (~4D) and N experts of two D x F matmuls (2 FLOPs a MAC)."""
    return cfg.num_layers * (cfg.num_experts * 2 * 2 * cfg.d_model * cfg.expert_dim + 4 * cfg.d_model)


def training_form_config(ckpt) -> tuple[ModelConfig, checkpoint.StepDir]:
    """The config of a checkpoint that can be tabulated, or a clear error for one that cannot."""
    meta = checkpoint.read_meta(ckpt)
    ref = checkpoint.locate(ckpt)
    cfg = ModelConfig.from_dict(meta["model_config"])
    if cfg.kind != "mole":
        raise MoleError(f"{ref.path} holds a {cfg.kind} model: only MoLE's routed experts read the token embedding, "
                        "so only a MoLE checkpoint converts to a lookup table")
    if not meta.get("has_experts", True):
        raise MoleError(f"{ref.path} is MoLE's inference form: its experts are already a table (RUN_DIR/lut); "
                        "convert needs the training-form checkpoint")
    return cfg, ref


def restore_table_inputs(ckpt, cfg: ModelConfig, placement=None) -> dict:
    """Only the parameters the table depends on: on `placement` (a Sharding) or as host numpy arrays."""
    if placement is None:
        _, params = checkpoint.restore_params(ckpt, cfg=cfg, as_numpy=True, select=lut.table_inputs)
    else:
        shardings = jax.tree.map(lambda _: placement, lut.table_inputs(graphdef_and_shapes(cfg)[1]))
        _, params = checkpoint.restore_params(ckpt, cfg=cfg, shardings=shardings, select=lut.table_inputs)
    return params


def lut_rows_fn(cfg: ModelConfig):
    """(table_inputs params, ids_R) -> float32 rows [R, L, N, D], through Transformer.lut_rows. The module's other
    parameters are zeros that lut_rows never reads, so XLA drops them: only the table's inputs reach a device."""
    cfg32 = cfg.replace(dtype="float32")
    graphdef, shapes = graphdef_and_shapes(cfg32)

    def rows(inputs, ids_R):
        full = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        full["embed_VxD"] = inputs["embed_VxD"]
        for l, b in inputs["blocks"].items():
            full["blocks"][l] = {**full["blocks"][l], **b}
        return nnx.merge(graphdef, full).lut_rows(ids_R)

    return rows


def default_batch_rows(cfg: ModelConfig, shard_rows: int) -> int:
    """The largest divisor of shard_rows whose float32 rows and expert activations fit STEP_TARGET_BYTES."""
    per_row = 4 * max(cfg.num_layers * cfg.num_experts * cfg.d_model, cfg.num_experts * cfg.expert_dim)
    cap = max(1, STEP_TARGET_BYTES // per_row)
    return max(r for r in range(1, min(cap, shard_rows) + 1) if shard_rows % r == 0)


def compare_rows(ref_RxLxNxD: np.ndarray, got_RxLxNxD: np.ndarray, scheme: str, block: int) -> dict:
    """Stored rows against float32 recomputed ones: allowed error = the scheme's bound + VERIFY_RTOL of each expert
    vector's absmax (float32 recomputation in another batch shape may differ in the last bits). NaN fails."""
    ref = np.asarray(ref_RxLxNxD, np.float64)
    err = np.abs(np.asarray(got_RxLxNxD, np.float64) - ref)
    allowed = (schemes.error_bound(ref, scheme, block) + VERIFY_RTOL * np.abs(ref).max(axis=-1, keepdims=True)
               + 1e-30)
    ratio = err / allowed
    ok = bool(np.all(np.isfinite(err)) and np.all(ratio <= 1.0))
    return {"ok": ok, "max_abs_error": float(np.nanmax(err)) if err.size else 0.0,
            "max_error_over_allowed": float(np.nanmax(ratio)) if err.size else 0.0,
            "max_abs_bound": float(allowed.max()) if err.size else 0.0, "rows": int(len(ref))}


def _spot_ids(V: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array(sorted({0, V - 1, *rng.integers(0, V, k).tolist()}), np.int64)


def _local_mesh(devices) -> Mesh:
    return Mesh(np.array(devices).reshape(1, -1), sharding.MESH_AXES)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def convert_to_lut(ckpt, lut_dir, dtype: str = "float16", *, batch_rows: int | None = None,
                   shard_rows: int | None = None, block: int | None = None, overwrite: bool = False,
                   verify_rows: int = VERIFY_ROWS, checksum: bool = False, devices=None, progress: bool = True,
                   max_inflight_shards: int = 2) -> Path | str:
    """Tabulate a MoLE training-form checkpoint (run, checkpoints or step directory) into a table at `lut_dir`.

    dtype: the table's scheme, one of schemes.SCHEMES. batch_rows: rows each device computes per step (must divide
    shard_rows; default: the most whose float32 rows fit in 64 MiB). shard_rows: rows per table file (default:
    files of about 64 MiB; kept from the first run when resuming).
    block: nf4/nf3 quantisation block (schemes.default_block). overwrite: replace a complete table (or an interrupted
    one of other parameters); an interrupted conversion of the same parameters and settings is always resumed.
    devices: the local devices to use (default all). Returns the table's location (Path or URL).
    """
    scheme = schemes.check_scheme(dtype)
    cfg, ref = training_form_config(ckpt)
    schemes.make_layout(scheme, cfg, block)  # a bad scheme or block fails before anything is read or written
    if batch_rows is not None and shard_rows is not None and (batch_rows <= 0 or shard_rows % batch_rows):
        raise MoleError(f"batch_rows {batch_rows} must be a positive divisor of shard_rows {shard_rows}")
    devices = list(devices or jax.local_devices())
    mesh = _local_mesh(devices)
    # Replicated: every device computes whole rows with all experts of a layer, so no collective ever splits a
    # sum (the same bits on any device count). The experts must fit on one device (410M-16E: 13 GB in float32).
    inputs = restore_table_inputs(ckpt, cfg, NamedSharding(mesh, P()))
    fingerprint = lut.fingerprint(inputs)
    source = {"checkpoint": str(ref.path), "step": ref.step}
    first = jax.process_index() == 0
    writer = _start_writer(lut_dir, cfg, scheme, fingerprint, block=block, shard_rows=shard_rows,
                           overwrite=overwrite, checksum=checksum, source=source)
    S = writer.shard_rows
    R = batch_rows or default_batch_rows(cfg, S)
    if not isinstance(R, int) or R <= 0 or S % R:
        raise MoleError(f"batch_rows {R} must be a positive divisor of the table's shard_rows {S}")

    pending = writer.pending_shards()
    mine = pending[jax.process_index()::jax.process_count()]
    with jax.default_matmul_precision("highest"):  # true float32 matmuls on GPU/TPU too (no TF32)
        seconds = _compute_shards(writer, inputs, mine, cfg=cfg, batch_rows=R, mesh=mesh, progress=progress,
                                  max_inflight=max_inflight_shards)
    run = {"processes": jax.process_count(), "devices_per_process": len(devices), "batch_rows": R,
           "shards_computed": len(pending), "compute_seconds_process0": seconds}
    _barrier("mole-jax-convert-written")
    if first:
        with jax.default_matmul_precision("highest"):
            report = _verify_written(writer, inputs, cfg, verify_rows, seed=int(fingerprint[:15], 16))
        if not report["ok"]:
            raise MoleError(f"verification of {writer.location} failed: max error {report['max_abs_error']:.3g} is "
                            f"{report['max_error_over_allowed']:.3g}x the allowed error; the table stays incomplete")
        writer.mark_complete(report, run=run)
    _barrier("mole-jax-convert-complete")
    return writer.location


def _start_writer(lut_dir, cfg: ModelConfig, scheme: str, fingerprint: str, *, block: int | None,
                  shard_rows: int | None, overwrite: bool, checksum: bool, source: dict) -> TableWriter:
    """Process 0 creates, resumes or replaces the table; the other processes open it once it is prepared."""
    settings = dict(block=block, shard_rows=shard_rows, checksum=checksum, source=source)
    writer = None
    if jax.process_index() == 0:
        writer = TableWriter.start(lut_dir, cfg, scheme, fingerprint, overwrite=overwrite, **settings)
    _barrier("mole-jax-convert-start")
    if writer is None:
        writer = TableWriter.start(lut_dir, cfg, scheme, fingerprint, create=False, **settings)
    return writer


def _compute_shards(writer: TableWriter, inputs, shards: list[int], *, cfg: ModelConfig, batch_rows: int,
                    mesh: Mesh, progress: bool, max_inflight: int) -> float:
    """Compute and write these shards; returns the seconds from the first dispatch to the last durable write."""
    steps = _chunks_by_step(writer, shards, batch_rows, mesh.devices.size)
    if not steps:
        return 0.0
    step = _ConversionStep(cfg, writer.layout, inputs, mesh, batch_rows)  # compiles: before the clock starts
    pipeline = ShardPipeline(writer, max_inflight)
    meter = _Meter(sum(c1 - c0 for chunks in steps for c0, c1 in chunks), cfg, progress)
    try:
        previous = None
        for chunks in steps:
            out = step.dispatch(inputs, chunks)  # runs asynchronously ...
            if previous is not None:
                # ... while the previous step's rows are fetched and written
                meter.update(step.drain(*previous, pipeline), pipeline.bytes_written)
            previous = (chunks, out)
        meter.update(step.drain(*previous, pipeline), pipeline.bytes_written)
        pipeline.flush()
        meter.update(0, pipeline.bytes_written)  # the bytes count when their writes finish: the last ones only now
    finally:
        meter.close()
    return meter.seconds()


def _chunks_by_step(writer: TableWriter, shards: list[int], R: int, n_dev: int) -> list[list[tuple[int, int]]]:
    """Row ranges [c0, c1) of at most R rows that never cross a shard boundary, n_dev per step (one per device)."""
    chunks = [(c0, min(c0 + R, stop)) for i in shards for start, stop in [writer.shard_range(i)]
              for c0 in range(start, stop, R)]
    return [chunks[k:k + n_dev] for k in range(0, len(chunks), n_dev)]


class _ConversionStep:
    """The compiled step: R rows per local device -> their stored arrays, quantised on the devices."""

    def __init__(self, cfg: ModelConfig, layout: Layout, inputs, mesh: Mesh, R: int):
        self.scheme, self.R, self.n_dev = layout.scheme, R, mesh.devices.size
        self.rows_sharding = NamedSharding(mesh, P(sharding.MESH_AXES))
        rows_fn = lut_rows_fn(cfg)

        def step(inputs, ids_B):
            rows_BxLxNxD = rows_fn(inputs, ids_B)
            # Counted explicitly: a cross-device max reduction may drop NaNs (it does on the CPU backend)
            nonfinite = jnp.sum(~jnp.isfinite(rows_BxLxNxD))
            return (schemes.quantize(rows_BxLxNxD, layout.scheme, layout.block, xp=jnp),
                    (jnp.max(jnp.abs(rows_BxLxNxD)), nonfinite))

        ids_spec = jax.ShapeDtypeStruct((self.n_dev * R,), jnp.int32, sharding=self.rows_sharding)
        self._compiled = jax.jit(step, out_shardings=(self.rows_sharding, NamedSharding(mesh, P()))).lower(
            inputs, ids_spec).compile()

    def dispatch(self, inputs, chunks: list[tuple[int, int]]):
        """Start the step on these chunks (one per device); returns its outputs, still on the devices."""
        ids = np.zeros((self.n_dev, self.R), np.int32)  # padding rows compute row 0 and are dropped
        for k, (c0, c1) in enumerate(chunks):
            ids[k] = np.minimum(np.arange(c0, c0 + self.R), c1 - 1)
        out = self._compiled(inputs, jax.device_put(ids.reshape(-1), self.rows_sharding))
        for a in out[0].values():
            a.copy_to_host_async()  # the transfer starts as soon as the step is done, not when we ask
        return out

    def drain(self, chunks: list[tuple[int, int]], out, pipeline: ShardPipeline) -> int:
        """Check a dispatched step's range, hand its rows to the pipeline; returns the rows drained."""
        stored_dev, (absmax, nonfinite) = out
        _check_range(float(absmax), int(nonfinite), self.scheme, chunks)
        host = {name: np.asarray(a) for name, a in stored_dev.items()}
        for k, (c0, c1) in enumerate(chunks):
            pipeline.add(c0, {name: a[k * self.R:k * self.R + (c1 - c0)] for name, a in host.items()})
        return sum(c1 - c0 for c0, c1 in chunks)


class _Meter:
    """The progress bar: rows converted, bytes durably written, and the conversion's FLOP rate."""

    def __init__(self, total_rows: int, cfg: ModelConfig, enabled: bool):
        self.rows, self.flops_per_row, self.t0 = 0, flops_per_row(cfg), time.perf_counter()
        self.bar = tqdm(total=total_rows, unit="row", unit_scale=True, desc="convert", disable=not enabled,
                        smoothing=0.1)

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def update(self, rows: int, bytes_written: int) -> None:
        self.rows += rows
        self.bar.update(rows)
        written = f"{bytes_written / 1e9:.2f} GB" if bytes_written >= 1e9 else f"{bytes_written / 1e6:.0f} MB"
        rate = self.rows * self.flops_per_row / max(self.seconds(), 1e-9) / 1e9
        self.bar.set_postfix_str(f"{written} written, {rate:.1f} GFLOP/s")

    def close(self) -> None:
        self.bar.close()


def _check_range(absmax: float, nonfinite: int, scheme: str, chunks) -> None:
    first, last = chunks[0][0], chunks[-1][1]
    if nonfinite or not np.isfinite(absmax):
        raise MoleError(f"the experts' outputs for token ids {first}..{last - 1} are not finite (NaN or inf in the "
                        "checkpoint's weights?)")
    if scheme in ("float16", "nf3") and absmax > float(np.finfo(np.float16).max):
        raise MoleError(f"the experts' outputs reach {absmax:.4g}, beyond float16's range, which {scheme} stores; "
                        "use bfloat16, float32, int8 or nf4")


def _verify_written(writer: TableWriter, inputs, cfg: ModelConfig, k: int, seed: int) -> dict:
    """Recompute spot rows (first, last, k random) and compare them with what the table stores."""
    ids = _spot_ids(writer.V, k, seed)
    ref = np.asarray(jax.jit(lut_rows_fn(cfg))(inputs, jnp.asarray(ids, jnp.int32)))
    got = schemes.dequantize(writer.read_stored(ids), writer.layout.scheme)
    report = compare_rows(ref, got, writer.layout.scheme, writer.layout.block)
    return {**report, "ids": ids.tolist()}


def verify_lut(lut_dir, ckpt, *, rows: int = VERIFY_ROWS, seed: int | None = None) -> dict:
    """Recompute `rows` random rows of a table from the checkpoint it was built from and compare them with the
    table. Returns a report ({"ok", "max_abs_error", "max_error_over_allowed", ...}); the fingerprint must match
    (MoleError otherwise)."""
    table = lut.open_lut(lut_dir)
    cfg, _ = training_form_config(ckpt)
    if cfg.replace(dtype="float32", param_dtype="float32") != table.config.replace(dtype="float32",
                                                                                    param_dtype="float32"):
        raise MoleError(f"table {table.path} was built for another model than checkpoint {ckpt}")
    inputs = restore_table_inputs(ckpt, cfg)
    fp = lut.fingerprint(inputs)
    if fp != table.fingerprint:
        raise MoleError(f"table {table.path} was built from different parameters than {ckpt} (fingerprint "
                        f"{table.fingerprint[:12]}, checkpoint {fp[:12]})")
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % 2 ** 32)
    ids = _spot_ids(table.shape[0], rows, seed)
    with jax.default_matmul_precision("highest"):
        ref = np.asarray(jax.jit(lut_rows_fn(cfg))(inputs, jnp.asarray(ids, jnp.int32)))
    report = compare_rows(ref, table.rows(ids), table.scheme, table.block)
    return {**report, "seed": seed, "scheme": table.scheme, "fingerprint": fp}
