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

Resuming is refused, in one line naming the setting, when anything that determines the stored bits differs from
the interrupted run: the table's settings, the batch rows, the backend, the device model or the jax version
(`producer_settings`); `--overwrite` starts over. Process 0 holds the table's lock (lut_writer.TableLock) from
start to completion, so a second conversion started on the same directory refuses.

Several processes (`jax.distributed.initialize()` before the call) share the shards by index: shard i belongs to
process i % n (`owned_shards`), whatever the others have finished, and each skips its own shards already written.
Each computes on its own devices and writes its own shards to the shared location (a shared filesystem or
gs://); process 0 prepares the table and, after a barrier, verifies and completes it.
"""

from __future__ import annotations

import os
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

from mole_jax import checkpoint, lut, lut_writer, schemes, sharding
from mole_jax.config import ModelConfig, MoleError
from mole_jax.lut_writer import ShardPipeline, TableWriter
from mole_jax.model import graphdef_and_shapes
from mole_jax.schemes import Layout

STEP_TARGET_BYTES = 64 << 20  # float32 rows (or expert activations) one device computes per step, by default
VERIFY_ROWS = 16  # spot rows a conversion recomputes before it marks the table complete
VERIFY_ROWS_PER_SHARD = 4  # random rows per shard `lut verify CKPT` recomputes by default
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
                   verify_rows: int = VERIFY_ROWS, checksum: bool = True, devices=None, progress: bool = True,
                   max_inflight_shards: int = 2) -> Path | str:
    """Tabulate a MoLE training-form checkpoint (run, checkpoints or step directory) into a table at `lut_dir`.

    dtype: the table's scheme, one of schemes.SCHEMES. batch_rows: rows each device computes per step (must divide
    shard_rows; default: the most whose float32 rows fit in 64 MiB). shard_rows: rows per table file (default:
    files of about 64 MiB). Both default to the interrupted table's when resuming.
    block: nf4/nf3 quantisation block (schemes.default_block). overwrite: replace a complete table (or an interrupted
    one of other parameters or settings); an interrupted conversion of the same parameters and settings is always
    resumed. checksum=False (no `checksums` array) only to measure what checksums cost.
    devices: the local devices to use (default all). Returns the table's location (Path or URL).
    """
    scheme = schemes.check_scheme(dtype)
    cfg, ref = training_form_config(ckpt)
    layout = schemes.make_layout(scheme, cfg, block)  # a bad scheme or block fails before anything is read
    if shard_rows is not None:  # so does a shard size whose shards would not fill whole pages
        lut_writer.check_shard_rows(layout, cfg.vocab_size, shard_rows)
    if batch_rows is not None and shard_rows is not None and (batch_rows <= 0 or shard_rows % batch_rows):
        raise MoleError(f"batch_rows {batch_rows} must be a positive divisor of shard_rows {shard_rows}")
    for name, value in (("batch_rows", batch_rows), ("shard_rows", shard_rows)):  # 0 is not "the default"
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise MoleError(f"{name} must be a positive integer, got {value!r}")
    _check_destination_writable(lut_dir)  # before the experts are read
    devices = list(devices or jax.local_devices())
    mesh = _local_mesh(devices)
    # Replicated: every device computes whole rows with all experts of a layer, so no collective ever splits a
    # sum (the same bits on any device count). The experts must fit on one device (410M-16E: 13 GB in float32).
    signature = checkpoint.params_signature(ckpt)  # before the experts are read: what the fingerprint is of
    inputs = restore_table_inputs(ckpt, cfg, NamedSharding(mesh, P()))
    fingerprint = lut.fingerprint(inputs)
    resumed = {} if overwrite else lut_writer.interrupted_meta(lut_dir) or {}  # what a resume keeps unless told
    shard_rows = shard_rows or resumed.get("shard_rows") or lut_writer.default_shard_rows(layout, cfg.vocab_size)
    if resumed.get("shard_rows") == shard_rows:
        batch_rows = batch_rows or resumed.get("producer", {}).get("batch_rows")
    batch_rows = batch_rows or default_batch_rows(cfg, shard_rows)
    if not isinstance(batch_rows, int) or batch_rows <= 0 or shard_rows % batch_rows:
        raise MoleError(f"batch_rows {batch_rows} must be a positive divisor of the table's shard_rows {shard_rows}")
    source = {"checkpoint": str(ref.path), "step": ref.step}
    # The binding lives in the table, never in the checkpoint (an input, maybe read-only or shared): the signature
    # of the parameter files the fingerprint was computed from, so that loading the table with this checkpoint
    # need not read the experts again (decode.checkpoint_fingerprint). Recorded only if the files did not change
    # while being read and are old enough for their mtimes to tell a later change (checkpoint.RACY_NS).
    now_ns = time.time_ns()
    if signature == checkpoint.params_signature(ckpt) and all(
            mtime <= now_ns - checkpoint.RACY_NS for _, mtime in signature.values()):
        source["params_files"] = signature
    writer = _start_writer(lut_dir, cfg, scheme, fingerprint, block=block, shard_rows=shard_rows,
                           overwrite=overwrite, checksum=checksum, source=source,
                           producer={"batch_rows": batch_rows, **producer_settings(devices)})
    try:
        _convert(writer, inputs, cfg=cfg, mesh=mesh, verify_rows=verify_rows, progress=progress,
                 max_inflight=max_inflight_shards)
    finally:
        writer.release()
    return writer.location


def _check_destination_writable(lut_dir) -> None:
    """A local table directory that cannot be created or written is refused now, not after the experts were read
    and tabulated; nothing is created here (the writer creates the directory, missing parents included)."""
    if not isinstance(lut_dir, (str, os.PathLike)) or "://" in str(lut_dir):  # a kvstore URL or spec: Tensorstore
        return  # checks it as it opens
    target = Path(lut_dir).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise MoleError(f"destination {target} exists and is not a directory")
    ancestor = target
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MoleError(f"cannot create {target}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise MoleError(f"destination {target} is not writable ({ancestor}: permission denied)")


def producer_settings(devices) -> dict:
    """What besides the table's settings may change the computed bits, so a resume must match it: the backend,
    the device model and the jax version (the compiler). Not the device or process count (tested identical)."""
    return {"backend": devices[0].platform, "device_kind": devices[0].device_kind, "jax": jax.__version__}


def owned_shards(num_shards: int, done: set[int], process: int, processes: int) -> list[int]:
    """The shards this process computes: shard i belongs to process i % processes (a function of the index only,
    never of what another process has finished), less those already written."""
    return [i for i in range(process, num_shards, processes) if i not in done]


def _convert(writer: TableWriter, inputs, *, cfg: ModelConfig, mesh: Mesh, verify_rows: int, progress: bool,
             max_inflight: int) -> None:
    """Compute this process's missing shards; then process 0 verifies and completes the table."""
    R = writer.meta["producer"]["batch_rows"]
    done = writer.done_shards()
    mine = owned_shards(writer.num_shards, done, jax.process_index(), jax.process_count())
    with jax.default_matmul_precision("highest"):  # true float32 matmuls on GPU/TPU too (no TF32)
        seconds = _compute_shards(writer, inputs, mine, cfg=cfg, batch_rows=R, mesh=mesh, progress=progress,
                                  max_inflight=max_inflight)
    run = {"processes": jax.process_count(), "devices_per_process": mesh.devices.size, "batch_rows": R,
           "shards_computed": writer.num_shards - len(done), "compute_seconds_process0": seconds}
    _barrier("mole-jax-convert-written")
    if jax.process_index() == 0:
        with jax.default_matmul_precision("highest"):
            report = _verify_written(writer, inputs, cfg, verify_rows, seed=int(writer.meta["fingerprint"][:15], 16))
        if not report["ok"]:
            raise MoleError(f"verification of {writer.location} failed: max error {report['max_abs_error']:.3g} is "
                            f"{report['max_error_over_allowed']:.3g}x the allowed error; the table stays incomplete")
        writer.mark_complete(report, run=run)
    _barrier("mole-jax-convert-complete")


def _start_writer(lut_dir, cfg: ModelConfig, scheme: str, fingerprint: str, *, block: int | None,
                  shard_rows: int, overwrite: bool, checksum: bool, source: dict, producer: dict) -> TableWriter:
    """Process 0 locks and creates, resumes or replaces the table; the other processes open it once it is
    prepared, adopting its settings (the lock of process 0 covers them: one conversion, one lock)."""
    if jax.process_index() == 0:
        writer = TableWriter.start(lut_dir, cfg, scheme, fingerprint, block=block, shard_rows=shard_rows,
                                   overwrite=overwrite, checksum=checksum, source=source, producer=producer,
                                   lock=True)
    _barrier("mole-jax-convert-start")
    if jax.process_index() != 0:
        writer = TableWriter.start(lut_dir, cfg, scheme, fingerprint, block=block, checksum=checksum, source=source,
                                   create=False)
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


def verify_lut(lut_dir, ckpt=None, *, rows: int = VERIFY_ROWS_PER_SHARD, full: bool = False,
               seed: int | None = None, progress: bool = False) -> dict:
    """Check a complete table shard by shard: every shard file present, laid out as the format says (raw rows in
    row order, of its exact size: what mapping needs) and every row's checksum (each file read whole), and, given
    the checkpoint it was built from, `rows` random rows per shard (full=True: every row) recomputed
    and compared with the scheme's bound. Returns a report: "ok", "problems" (one line per bad shard, naming it),
    "shards", "rows" recomputed, "max_abs_error", "max_error_over_allowed", "seed", "scheme", "fingerprint".
    MoleError for what is not a complete table, or (given ckpt) not one of this checkpoint's parameters."""
    if not full and (not isinstance(rows, int) or rows < 1):
        raise MoleError(f"rows per shard must be a positive integer, got {rows!r}")
    table = lut.open_lut(lut_dir, allow_missing=True, cache_bytes=0)  # no cache: every chunk comes from storage
    inputs = _checkpoint_inputs(table, ckpt) if ckpt is not None else None
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % 2 ** 32)
    rng = np.random.default_rng(seed)
    rows_fn = jax.jit(lut_rows_fn(table.config))
    problems: dict[int, str | None] = {}
    for i, key in table.missing_shards():
        start, stop = table.shard_range(i)
        problems.setdefault(i, f"shard {i} ({key}, rows {start}..{stop - 1}): missing")
    batch = default_batch_rows(table.config, table.shard_rows) if full else rows  # one compiled shape
    worst = {"rows": 0, "max_abs_error": 0.0, "max_error_over_allowed": 0.0}
    for i in tqdm(range(table.num_shards), desc="verify", unit="shard", disable=not progress):
        problems[i] = problems.get(i) or table.check_shard(i)
        if problems[i] or inputs is None:
            continue
        start, stop = table.shard_range(i)
        ids = np.arange(start, stop) if full else np.sort(rng.choice(np.arange(start, stop), min(rows, stop - start),
                                                                     replace=False))
        with jax.default_matmul_precision("highest"):
            ref = _recompute(rows_fn, inputs, ids, batch)
        report = compare_rows(ref, table.rows(ids), table.scheme, table.block)
        worst = {"rows": worst["rows"] + report["rows"],
                 **{k: max(worst[k], report[k]) for k in ("max_abs_error", "max_error_over_allowed")}}
        if not report["ok"]:
            problems[i] = (f"shard {i} (rows {start}..{stop - 1}): rows differ from the checkpoint's experts by up "
                           f"to {report['max_error_over_allowed']:.3g}x the allowed error")
    bad = [line for _, line in sorted(problems.items()) if line]
    return {"ok": not bad, "problems": bad, "shards": table.num_shards, **worst, "seed": seed,
            "scheme": table.scheme, "fingerprint": table.fingerprint, "checksum": table.meta.get("checksum")}


def _checkpoint_inputs(table: lut.LookupTable, ckpt) -> dict:
    """The table inputs of `ckpt` (host arrays), refusing a checkpoint of another model or other parameters."""
    cfg, _ = training_form_config(ckpt)
    if cfg.replace(dtype="float32", param_dtype="float32") != table.config.replace(dtype="float32",
                                                                                    param_dtype="float32"):
        raise MoleError(f"table {table.path} was built for another model than checkpoint {ckpt}")
    inputs = restore_table_inputs(ckpt, cfg)
    fp = lut.fingerprint(inputs)
    if fp != table.fingerprint:
        raise MoleError(f"table {table.path} was built from different parameters than {ckpt} (fingerprint "
                        f"{table.fingerprint[:12]}, checkpoint {fp[:12]})")
    return inputs


def _recompute(rows_fn, inputs, ids: np.ndarray, batch: int) -> np.ndarray:
    """float32 rows of these ids, `batch` at a time (the last batch padded: one compiled shape)."""
    out = []
    for s in range(0, len(ids), batch):
        part = ids[s:s + batch]
        padded = np.concatenate([part, np.repeat(part[-1:], batch - len(part))])
        out.append(np.asarray(rows_fn(inputs, jnp.asarray(padded, jnp.int32)))[:len(part)])
    return np.concatenate(out)
