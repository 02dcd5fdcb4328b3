"""Experts -> table: MoLE's re-parameterisation, batched, sharded, resumable, verified, in memory bounded by one
layer.

`convert_to_lut(ckpt, lut_dir)` evaluates every routed expert of every layer on every vocabulary row (the rows of
`model.Transformer.lut_rows`, in float32 whatever the training dtype) and streams the result into a table
(lut.py) through the writer (lut_writer.py). Nothing but the table's inputs is read from the checkpoint, and
never all of them at once: the embedding once, then one layer's expert norm and experts at a time (Orbax partial
restores of those leaves), the next layer read in a background thread while the current one computes.

The vocabulary is cut into shards (the table's files); this process's shards are taken in passes of as many
shards as `buffer_bytes` holds. Within a pass, layer by layer, each device computes `batch_rows` rows per step
with that layer's experts (one compiled program serves every layer: they all have the same shapes), quantises
them on the device, and only stored bytes reach the host, where they fill the pass's shards at that layer's
index. The next step is dispatched before the previous step's rows are fetched. A shard goes to a writer thread
(lut_writer.BackgroundWriter: checksums and Tensorstore writes) as soon as its last layer is in, so writing
overlaps computing. Host memory is therefore the embedding, two layers' experts, one step's activations,
`buffer_bytes` and a few shards being written, whatever the number of layers, experts or rows; each pass reads
every layer once, so fewer, larger passes read the checkpoint fewer times.

Bit-identical whatever happens: `batch_rows` divides the shard size, so every device always computes an aligned
slice of one shard with the same program, one layer per step (`layers_per_step` in the producer settings). Rows
therefore come out the same on 1 or 4 devices, from one or several processes, with any `buffer_bytes`, and in an
interrupted-and-resumed run as in an uninterrupted one. Progress is the set of shard files present (a shard file
appears only once fully written), so a rerun after a kill, even SIGKILL, computes the missing shards only. The
table is marked complete after a verification pass compares spot rows, recomputed in another batch shape, with
what was stored.

Resuming is refused, in one line naming the setting, when anything that determines the stored bits differs from
the interrupted run: the table's settings, the batch rows, the backend, the device model or the jax version
(`producer_settings`); `--overwrite` starts over. Process 0 holds the table's lock (lut_writer.TableLock) from
start to completion, so a second conversion started on the same directory refuses.

Stopping: given `stop_signals` (the CLI passes SIGTERM and SIGINT), the first such signal stops the conversion
before its next step: the pass being computed is abandoned, the shards already handed to the writer are finished,
and `ConversionStopped` says how many shards the table holds; a second signal acts as it would have.

Several processes (`jax.distributed.initialize()` before the call) share the shards by index: shard i belongs to
process i % n (`owned_shards`), whatever the others have finished, and each skips its own shards already written.
Each computes on its own devices and writes its own shards to the shared location (a shared filesystem or
gs://); process 0 prepares the table and, after a barrier, verifies and completes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
from mole_jax.config import ModelConfig, MoleError, check_creatable
from mole_jax.lut_writer import BackgroundWriter, TableWriter
from mole_jax.model import graphdef_and_shapes
from mole_jax.schemes import Layout

# Rows per device per step (`step_rows`): XLA:CPU's float32 GEMMs [R, d] x [d, F] reach their speed only from
# several hundred rows (at d = 1,024, F = 4,096: 128 rows per step converted at 41% of the matmul peak, 512 at
# 69%), so as many as MAX_STEP_ROWS, as long as one layer's activations (every expert's hidden and output rows,
# float32) stay within STEP_TARGET_BYTES per device.
MAX_STEP_ROWS = 1024
STEP_TARGET_BYTES = 256 << 20
BUFFER_BYTES = 2 << 30  # host memory for the rows of a pass, by default
VERIFY_ROWS = 16  # spot rows a conversion recomputes before it marks the table complete
VERIFY_ROWS_PER_SHARD = 4  # random rows per shard `lut verify CKPT` recomputes by default
# Recomputing a row in float32 with another batch shape may differ in the last bits; verification allows this
# much (relative to each expert vector's absmax) on top of the scheme's own bound.
VERIFY_RTOL = 1e-5


class ConversionStopped(Exception):
    """A conversion stopped by a signal at a step boundary; everything written is kept and a rerun resumes."""

    def __init__(self, signum: int, shards_written: int, num_shards: int):
        self.signum, self.shards_written, self.num_shards = signum, shards_written, num_shards
        self.exit_status = 128 + signum  # what a shell reports for a process ended by that signal
        super().__init__(f"stopped after shard {shards_written} of {num_shards}, rerun the same command to resume")


MMAP_THRESHOLD_BYTES = 4 << 20


def return_freed_memory_promptly() -> bool:
    """Have glibc serve every allocation of MMAP_THRESHOLD_BYTES or more by mmap, so that freeing it returns it
    to the OS at once (for this whole process: `mole-jax convert` and the benchmark's conversion worker call it).
    By default glibc raises its mmap threshold to the size of the large blocks freed, so a freed layer's experts
    (tens of MiB an array) are then allocated and kept in its per-thread arenas: a conversion's peak RSS crept
    up with every layer read (measured: +130 MB from 2 to 8 layers of 64 MiB of experts; +10 MB with this).
    Returns whether it applies (False where the C library has no mallopt)."""
    M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


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
    """All the parameters the table depends on at once: on `placement` (a Sharding) or as host numpy arrays. (The
    conversion reads them a layer at a time: `CheckpointLayers`.)"""
    if placement is None:
        _, params = checkpoint.restore_params(ckpt, cfg=cfg, as_numpy=True, select=lut.table_inputs)
    else:
        shardings = jax.tree.map(lambda _: placement, lut.table_inputs(graphdef_and_shapes(cfg)[1]))
        _, params = checkpoint.restore_params(ckpt, cfg=cfg, shardings=shardings, select=lut.table_inputs)
    return params


class CheckpointLayers:
    """A checkpoint's table inputs read piece by piece, as host numpy arrays, each an Orbax partial restore of
    just those leaves (nothing else is read): `embedding()` -> embed_VxD, `layer(l)` -> layer l's
    {"norm_expert": {"scale_D"}, "experts": {"w_up_NxDxF", "w_down_NxFxD"}}. Without a barrier between
    processes: in a multi-process conversion each process reads its layers when its own passes need them."""

    def __init__(self, ckpt, cfg: ModelConfig):
        self.ckpt, self.cfg = ckpt, cfg

    def embedding(self) -> np.ndarray:
        _, params = checkpoint.restore_params(self.ckpt, cfg=self.cfg, as_numpy=True, this_process_only=True,
                                              select=lambda p: {"embed_VxD": p["embed_VxD"]})
        return params["embed_VxD"]

    def layer(self, l: int) -> dict:
        def select(p):
            b = p["blocks"][l]
            return {"blocks": {l: {"norm_expert": b["norm_expert"], "experts": b["experts"]}}}

        _, params = checkpoint.restore_params(self.ckpt, cfg=self.cfg, as_numpy=True, select=select,
                                              this_process_only=True)
        return params["blocks"][l]


class _LayerLoader:
    """Reads layers in a background thread: `request(l)` starts reading layer l (and placing it with `place`),
    `take(l)` waits for it. The caller requests a layer only once it has released all but the current one, so at
    most two layers are in memory."""

    def __init__(self, source: CheckpointLayers, place=lambda x: x):
        self._load = lambda l: place(source.layer(l))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mole-jax-read-layer")
        self._pending: dict[int, object] = {}

    def request(self, l: int) -> None:
        if l not in self._pending:
            self._pending[l] = self._pool.submit(self._load, l)

    def take(self, l: int):
        self.request(l)
        return self._pending.pop(l).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()

    def layers(self, num_layers: int):
        """Every layer in order, the next one read while the caller works on the current one."""
        for l in range(num_layers):
            layer = self.take(l)
            if l + 1 < num_layers:
                self.request(l + 1)
            yield layer
            del layer


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


def layer_rows_fn(cfg: ModelConfig):
    """(embed_VxD, one layer's table inputs, ids_R) -> that layer's float32 rows [R, 1, N, D]: Transformer.lut_rows
    of a one-layer model holding that layer (every layer has the same shapes: one compiled program serves all)."""
    rows_fn = lut_rows_fn(cfg.replace(num_layers=1))
    return lambda embed_VxD, layer, ids_R: rows_fn({"embed_VxD": embed_VxD, "blocks": {0: layer}}, ids_R)


def step_rows(cfg: ModelConfig) -> int:
    """Rows per device per step from the shapes: the largest power of two up to MAX_STEP_ROWS whose float32
    activations of one layer (R x N x (F + d) x 4 bytes: every expert's hidden and output rows) fit
    STEP_TARGET_BYTES."""
    per_row = 4 * cfg.num_experts * (cfg.expert_dim + cfg.d_model)
    cap = max(1, min(MAX_STEP_ROWS, STEP_TARGET_BYTES // per_row))
    return 1 << (cap.bit_length() - 1)


def default_batch_rows(cfg: ModelConfig, shard_rows: int) -> int:
    """The largest divisor of shard_rows up to `step_rows(cfg)` (the whole step when shard_rows is a power of two
    at least that large, as the default shard_rows are)."""
    cap = step_rows(cfg)
    return max(r for r in range(1, min(cap, shard_rows) + 1) if shard_rows % r == 0)


def default_shard_rows(cfg: ModelConfig, layout: Layout) -> int:
    """Files of about lut_writer.SHARD_TARGET_BYTES, but never fewer rows than a step (`step_rows`): a step's
    rows never cross a shard, so a smaller shard would shrink the step. A power of two (whole pages), at most V."""
    V = cfg.vocab_size
    return min(max(lut_writer.default_shard_rows(layout, V), step_rows(cfg)), V)


def _passes(shards: list[int], shard_nbytes: int, buffer_bytes: int) -> list[list[int]]:
    """These shards in groups (passes) of as many as fit buffer_bytes, at least one."""
    per_pass = max(1, buffer_bytes // shard_nbytes)
    return [shards[k:k + per_pass] for k in range(0, len(shards), per_pass)]


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
                   max_inflight_shards: int = 2, buffer_bytes: int = BUFFER_BYTES,
                   stop_signals: tuple = ()) -> Path | str:
    """Tabulate a MoLE training-form checkpoint (run, checkpoints or step directory) into a table at `lut_dir`.

    dtype: the table's scheme, one of schemes.SCHEMES. batch_rows: rows each device computes per step (must divide
    shard_rows; default: `step_rows`, from the expert shapes). shard_rows: rows per table file (default: files of
    about 64 MiB, at least one step). Both default to the interrupted table's when resuming.
    block: nf4/nf3 quantisation block (schemes.default_block). overwrite: replace a complete table (or an interrupted
    one of other parameters or settings); an interrupted conversion of the same parameters and settings is always
    resumed. checksum=False (no `checksums` array) only to measure what checksums cost.
    devices: the local devices to use (default all). buffer_bytes: host memory for the rows of a pass (at least
    one shard); each pass reads every layer's experts once. It never changes the stored bits.
    stop_signals: signals (e.g. SIGTERM, SIGINT) that stop the conversion at the next step, raising
    ConversionStopped once the shards already handed to the writer are durable (handled in the main thread only).
    Returns the table's location (Path or URL).
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
    if not isinstance(buffer_bytes, int) or isinstance(buffer_bytes, bool) or buffer_bytes <= 0:
        raise MoleError(f"buffer_bytes must be a positive integer, got {buffer_bytes!r}")
    _check_destination_writable(lut_dir)  # before the experts are read
    devices = list(devices or jax.local_devices())
    mesh = _local_mesh(devices)
    source = CheckpointLayers(ckpt, cfg)
    # Replicated: every device computes whole rows with all experts of a layer, so no collective ever splits a
    # sum (the same bits on any device count). One layer's experts must fit on one device.
    replicated = NamedSharding(mesh, P())
    with _stop_on(stop_signals) as stop:
        embed_VxD = source.embedding()
        fingerprint, signature = fingerprint_checkpoint(ckpt, cfg, source=source, embed_VxD=embed_VxD)
        embed_VxD = jax.device_put(embed_VxD, replicated)
        resumed = {} if overwrite else lut_writer.interrupted_meta(lut_dir) or {}  # what a resume keeps unless told
        shard_rows = shard_rows or resumed.get("shard_rows") or default_shard_rows(cfg, layout)
        if resumed.get("shard_rows") == shard_rows:
            batch_rows = batch_rows or resumed.get("producer", {}).get("batch_rows")
        batch_rows = batch_rows or default_batch_rows(cfg, shard_rows)
        if not isinstance(batch_rows, int) or batch_rows <= 0 or shard_rows % batch_rows:
            raise MoleError(f"batch_rows {batch_rows} must be a positive divisor of the table's shard_rows "
                            f"{shard_rows}")
        source_meta = {"checkpoint": str(ref.path), "step": ref.step}
        if signature is not None:
            source_meta["params_files"] = signature
        writer = _start_writer(lut_dir, cfg, scheme, fingerprint, block=block, shard_rows=shard_rows,
                               overwrite=overwrite, checksum=checksum, source=source_meta,
                               producer={"batch_rows": batch_rows, **producer_settings(devices)})
        loader = _LayerLoader(source, lambda layer: jax.device_put(layer, replicated))
        try:
            _convert(writer, embed_VxD, loader, cfg=cfg, mesh=mesh, verify_rows=verify_rows, progress=progress,
                     max_inflight=max_inflight_shards, buffer_bytes=buffer_bytes, stop=stop)
        finally:
            loader.close()
            writer.release()
    return writer.location


def fingerprint_checkpoint(ckpt, cfg: ModelConfig, *, source: CheckpointLayers | None = None,
                           embed_VxD: np.ndarray | None = None) -> tuple[str, dict | None]:
    """lut.fingerprint of a training-form checkpoint's table inputs, computed layer by layer on the host (one pass
    over the experts, at most two layers in memory), and the signature of the parameter files it was computed from
    (checkpoint.params_signature), for a table to record (None if they changed while being read or are too recent
    for their mtimes to tell a later change, checkpoint.RACY_NS). source / embed_VxD: the checkpoint's
    CheckpointLayers and embedding when the caller has them already. Nothing is written: the binding lives in the
    table, never in the checkpoint (an input, maybe read-only or shared), so that loading the table with this
    checkpoint need not read the experts again (decode.checkpoint_fingerprint)."""
    signature = checkpoint.params_signature(ckpt)  # before the experts are read: what the fingerprint is of
    source = source or CheckpointLayers(ckpt, cfg)
    if embed_VxD is None:
        embed_VxD = source.embedding()
    loader = _LayerLoader(source)
    try:
        fingerprint = lut.fingerprint_of(embed_VxD, loader.layers(cfg.num_layers))
    finally:
        loader.close()
    now_ns = time.time_ns()
    unchanged = signature == checkpoint.params_signature(ckpt) and all(
        mtime <= now_ns - checkpoint.RACY_NS for _, mtime in signature.values())
    return fingerprint, signature if unchanged else None


@contextlib.contextmanager
def _stop_on(signals):
    """A threading.Event set (its `signum` recorded) by the first of these signals, which then get their previous
    handlers back, so that a second one acts as it would have (Ctrl-C twice: KeyboardInterrupt). Signal handlers
    belong to the main thread: elsewhere nothing is installed and the event is never set."""
    stop = threading.Event()
    stop.signum = None
    if not signals or threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {}

    def handler(signum, frame):
        stop.signum = signum
        stop.set()
        for s, h in previous.items():
            signal.signal(s, h)

    for s in signals:
        previous[s] = signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _check_destination_writable(lut_dir) -> None:
    """A local table directory that cannot be created or written is refused now, not after the experts were read
    and tabulated; nothing is created here (the writer creates the directory, missing parents included)."""
    if not isinstance(lut_dir, (str, os.PathLike)) or "://" in str(lut_dir):  # a kvstore URL or spec: Tensorstore
        return  # checks it as it opens
    target = Path(lut_dir).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise MoleError(f"destination {target} exists and is not a directory")
    check_creatable(target)


def producer_settings(devices) -> dict:
    """What besides the table's settings may change the computed bits, so a resume must match it: the backend,
    the device model, the jax version (the compiler) and the program (one layer per step). Not the device or
    process count, nor buffer_bytes (tested identical)."""
    return {"backend": devices[0].platform, "device_kind": devices[0].device_kind, "jax": jax.__version__,
            "layers_per_step": 1}


def owned_shards(num_shards: int, done: set[int], process: int, processes: int) -> list[int]:
    """The shards this process computes: shard i belongs to process i % processes (a function of the index only,
    never of what another process has finished), less those already written."""
    return [i for i in range(process, num_shards, processes) if i not in done]


def _convert(writer: TableWriter, embed_VxD, loader: _LayerLoader, *, cfg: ModelConfig, mesh: Mesh,
             verify_rows: int, progress: bool, max_inflight: int, buffer_bytes: int, stop) -> None:
    """Compute this process's missing shards; then process 0 verifies and completes the table."""
    R = writer.meta["producer"]["batch_rows"]
    done = writer.done_shards()
    mine = owned_shards(writer.num_shards, done, jax.process_index(), jax.process_count())
    spot = None
    if jax.process_index() == 0:
        spot = _SpotRows(cfg, _spot_ids(writer.V, verify_rows, seed=int(writer.meta["fingerprint"][:15], 16)))
    passes = _passes(mine, writer.shard_rows * writer.layout.row_nbytes, buffer_bytes)
    with jax.default_matmul_precision("highest"):  # true float32 matmuls on GPU/TPU too (no TF32)
        seconds = _compute_shards(writer, embed_VxD, loader, passes, cfg=cfg, batch_rows=R, mesh=mesh,
                                  progress=progress, max_inflight=max_inflight, spot=spot, stop=stop)
        if spot is not None and not spot.complete:  # process 0 computed nothing: its spot rows need a pass
            for l, layer in enumerate(loader.layers(cfg.num_layers)):
                spot.add(l, embed_VxD, layer)
    run = {"processes": jax.process_count(), "devices_per_process": mesh.devices.size, "batch_rows": R,
           "shards_computed": writer.num_shards - len(done), "compute_seconds_process0": seconds,
           "passes_process0": len(passes), "buffer_bytes": buffer_bytes}
    _barrier("mole-jax-convert-written")
    if jax.process_index() == 0:
        report = _verify_written(writer, spot)
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


class _Stop(Exception):
    """Raised inside the shard loop when a stop signal arrived."""


def _compute_shards(writer: TableWriter, embed_VxD, loader: _LayerLoader, passes: list[list[int]], *,
                    cfg: ModelConfig, batch_rows: int, mesh: Mesh, progress: bool, max_inflight: int,
                    spot: "_SpotRows | None", stop) -> float:
    """Compute and write these passes of shards, layer by layer; returns the seconds from the first dispatch to
    the last durable write. A shard goes to the writer thread as soon as its rows of the last layer are in, so
    the writes of a pass overlap the computation of its last layer and of the next pass. Spot rows for the
    verification are computed during the first pass."""
    if not passes:
        return 0.0
    L = cfg.num_layers
    step = _LayerStep(cfg, writer.layout, embed_VxD, mesh, batch_rows, writer.shard_rows)  # compiles first
    background = BackgroundWriter(writer, max_inflight)
    meter = _Meter(sum(stop - start for shards in passes for i in shards for start, stop in [writer.shard_range(i)]),
                   cfg, progress)
    order = [(p, l) for p in range(len(passes)) for l in range(L)]  # the layers in the order they are read

    def drain(chunks, out, l, shards):
        meter.update(step.drain(chunks, out, l, shards.buffers) / L, background.bytes_written)
        if l == L - 1:
            for i in shards.completed(chunks):
                background.submit(i, shards.buffers.pop(i))

    loader.request(0)
    try:
        previous = None
        for k, (p, l) in enumerate(order):
            if l == 0:
                shards = _PassShards(writer, passes[p])
                steps = _chunks_by_step(writer, passes[p], batch_rows, mesh.devices.size)
            layer = loader.take(l)
            for s, chunks in enumerate(steps):
                if stop.is_set():
                    raise _Stop
                out = step.dispatch(embed_VxD, layer, chunks)  # runs asynchronously ...
                if previous is not None:  # ... while the previous step's rows are fetched
                    drain(*previous)
                previous = (chunks, out, l, shards)
                if s == 0 and k + 1 < len(order):
                    # the previous layer's last step is done, so its experts are free: read the next layer now
                    loader.request(order[k + 1][1])
            if spot is not None and not spot.complete:
                spot.add(l, embed_VxD, layer)
            del layer
        drain(*previous)
        background.flush()
        meter.update(0, background.bytes_written)  # the bytes count when their writes finish: the last ones only now
    except _Stop:
        background.flush()  # the shards handed over are finished; the rest of the pass is abandoned
        raise ConversionStopped(stop.signum, len(writer.done_shards()), writer.num_shards) from None
    finally:
        background.close()
        meter.close()
    return meter.seconds()


class _PassShards:
    """The host buffers of a pass's shards (stored arrays [shard rows, L, ...], filled layer by layer) and how many
    rows of each the last layer has yet to fill."""

    def __init__(self, writer: TableWriter, shards: list[int]):
        self.shard_rows = writer.shard_rows
        self.buffers = {i: _empty_shard(writer, i) for i in shards}
        self.missing = {i: stop - start for i in shards for start, stop in [writer.shard_range(i)]}

    def completed(self, chunks: list[tuple[int, int]]) -> list[int]:
        """Count these chunks' rows of the last layer in; returns the shards thereby complete."""
        done = []
        for c0, c1 in chunks:
            i = c0 // self.shard_rows
            self.missing[i] -= c1 - c0
            if self.missing[i] == 0:
                done.append(i)
        return done


def _empty_shard(writer: TableWriter, i: int) -> dict:
    start, stop = writer.shard_range(i)
    return {name: np.empty((stop - start, *shape), dt) for name, (shape, dt) in writer.layout.arrays.items()}


def _chunks_by_step(writer: TableWriter, shards: list[int], R: int, n_dev: int) -> list[list[tuple[int, int]]]:
    """Row ranges [c0, c1) of at most R rows that never cross a shard boundary, n_dev per step (one per device)."""
    chunks = [(c0, min(c0 + R, stop)) for i in shards for start, stop in [writer.shard_range(i)]
              for c0 in range(start, stop, R)]
    return [chunks[k:k + n_dev] for k in range(0, len(chunks), n_dev)]


class _LayerStep:
    """The compiled step: one layer's rows of R ids per local device -> their stored arrays [R, 1, ...],
    quantised on the devices."""

    def __init__(self, cfg: ModelConfig, layout: Layout, embed_VxD, mesh: Mesh, R: int, shard_rows: int):
        self.scheme, self.R, self.n_dev, self.shard_rows = layout.scheme, R, mesh.devices.size, shard_rows
        self.rows_sharding = NamedSharding(mesh, P(sharding.MESH_AXES))
        rows_fn = layer_rows_fn(cfg)

        def step(embed_VxD, layer, ids_B):
            rows_Bx1xNxD = rows_fn(embed_VxD, layer, ids_B)
            # Counted explicitly: a cross-device max reduction may drop NaNs (it does on the CPU backend)
            nonfinite = jnp.sum(~jnp.isfinite(rows_Bx1xNxD))
            return (schemes.quantize(rows_Bx1xNxD, layout.scheme, layout.block, xp=jnp),
                    (jnp.max(jnp.abs(rows_Bx1xNxD)), nonfinite))

        replicated = NamedSharding(mesh, P())
        layer_spec = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                                  lut.table_inputs(graphdef_and_shapes(cfg)[1])["blocks"][0])
        ids_spec = jax.ShapeDtypeStruct((self.n_dev * R,), jnp.int32, sharding=self.rows_sharding)
        self._compiled = jax.jit(step, out_shardings=(self.rows_sharding, replicated)).lower(
            embed_VxD, layer_spec, ids_spec).compile()

    def dispatch(self, embed_VxD, layer, chunks: list[tuple[int, int]]):
        """Start the step on these chunks (one per device); returns its outputs, still on the devices."""
        ids = np.zeros((self.n_dev, self.R), np.int32)  # padding rows compute row 0 and are dropped
        for k, (c0, c1) in enumerate(chunks):
            ids[k] = np.minimum(np.arange(c0, c0 + self.R), c1 - 1)
        out = self._compiled(embed_VxD, layer, jax.device_put(ids.reshape(-1), self.rows_sharding))
        for a in out[0].values():
            a.copy_to_host_async()  # the transfer starts as soon as the step is done, not when we ask
        return out

    def drain(self, chunks: list[tuple[int, int]], out, l: int, buffers: dict[int, dict]) -> int:
        """Check a dispatched step's range and copy its rows into their shards' buffers at layer l; returns the
        rows drained."""
        stored_dev, (absmax, nonfinite) = out
        _check_range(float(absmax), int(nonfinite), self.scheme, chunks)
        host = {name: np.asarray(a) for name, a in stored_dev.items()}
        for k, (c0, c1) in enumerate(chunks):
            i = c0 // self.shard_rows
            at = c0 - i * self.shard_rows
            for name, a in host.items():
                buffers[i][name][at:at + c1 - c0, l] = a[k * self.R:k * self.R + (c1 - c0), 0]
        return sum(c1 - c0 for c0, c1 in chunks)


class _SpotRows:
    """float32 rows [k, L, N, D] of the verification's spot ids, filled layer by layer by whichever pass reads the
    layers first (in another batch shape than the conversion's steps: an independent recomputation)."""

    def __init__(self, cfg: ModelConfig, ids: np.ndarray):
        self.ids = ids
        self.rows_KxLxNxD = np.zeros((len(ids), cfg.num_layers, cfg.num_experts, cfg.d_model), np.float32)
        self._fn = jax.jit(layer_rows_fn(cfg))
        self._todo = set(range(cfg.num_layers))

    @property
    def complete(self) -> bool:
        return not self._todo

    def add(self, l: int, embed_VxD, layer) -> None:
        if l in self._todo:
            self.rows_KxLxNxD[:, l] = np.asarray(self._fn(embed_VxD, layer, jnp.asarray(self.ids, jnp.int32)))[:, 0]
            self._todo.discard(l)


class _Meter:
    """The progress bar: rows converted (a step of one layer counts for 1/L of its rows), bytes durably written,
    and the conversion's FLOP rate."""

    def __init__(self, total_rows: int, cfg: ModelConfig, enabled: bool):
        self.rows, self.flops_per_row, self.t0 = 0, flops_per_row(cfg), time.perf_counter()
        self.bar = tqdm(total=total_rows, unit="row", unit_scale=True, desc="convert", disable=not enabled,
                        smoothing=0.1)

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def update(self, rows: float, bytes_written: int) -> None:
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


def _verify_written(writer: TableWriter, spot: _SpotRows) -> dict:
    """Compare the spot rows (first, last, k random; recomputed) with what the table stores."""
    got = schemes.dequantize(writer.read_stored(spot.ids), writer.layout.scheme)
    report = compare_rows(spot.rows_KxLxNxD, got, writer.layout.scheme, writer.layout.block)
    return {**report, "ids": spot.ids.tolist()}


def verify_lut(lut_dir, ckpt=None, *, rows: int = VERIFY_ROWS_PER_SHARD, full: bool = False,
               seed: int | None = None, progress: bool = False, buffer_bytes: int = BUFFER_BYTES) -> dict:
    """Check a complete table shard by shard: every shard file present, laid out as the format says (raw rows in
    row order, of its exact size: what mapping needs) and every row's checksum (each file read whole), and, given
    the checkpoint it was built from, `rows` random rows per shard (full=True: every row) recomputed
    and compared with the scheme's bound. The checkpoint is read layer by layer, as the conversion reads it: its
    fingerprint (fingerprint_checkpoint), then the recomputed rows in passes of at most buffer_bytes of float32
    rows (at least one shard), each pass reading every layer once. Returns a report: "ok", "problems" (one line
    per bad shard, naming it), "shards", "rows" recomputed, "max_abs_error", "max_error_over_allowed", "seed",
    "scheme", "fingerprint". MoleError for what is not a complete table, or (given ckpt) not one of this
    checkpoint's parameters."""
    if not full and (not isinstance(rows, int) or rows < 1):
        raise MoleError(f"rows per shard must be a positive integer, got {rows!r}")
    if not isinstance(buffer_bytes, int) or isinstance(buffer_bytes, bool) or buffer_bytes <= 0:
        raise MoleError(f"buffer_bytes must be a positive integer, got {buffer_bytes!r}")
    table = lut.open_lut(lut_dir, allow_missing=True, cache_bytes=0)  # no cache: every chunk comes from storage
    source = _checkpoint_layers(table, ckpt) if ckpt is not None else None
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % 2 ** 32)
    rng = np.random.default_rng(seed)
    problems: dict[int, str | None] = {}
    for i, key in table.missing_shards():
        start, stop = table.shard_range(i)
        problems.setdefault(i, f"shard {i} ({key}, rows {start}..{stop - 1}): missing")
    sampled: dict[int, np.ndarray] = {}  # the ids to recompute, by shard
    for i in tqdm(range(table.num_shards), desc="verify", unit="shard", disable=not progress):
        problems[i] = problems.get(i) or table.check_shard(i)
        if problems[i] or source is None:
            continue
        start, stop = table.shard_range(i)
        sampled[i] = np.arange(start, stop) if full else np.sort(
            rng.choice(np.arange(start, stop), min(rows, stop - start), replace=False))
    worst = {"rows": 0, "max_abs_error": 0.0, "max_error_over_allowed": 0.0}
    if sampled:
        batch = default_batch_rows(table.config, table.shard_rows) if full else rows  # one compiled shape
        for i, report in _recompare(table, source, sampled, batch=batch, buffer_bytes=buffer_bytes,
                                    progress=progress):
            worst = {"rows": worst["rows"] + report["rows"],
                     **{k: max(worst[k], report[k]) for k in ("max_abs_error", "max_error_over_allowed")}}
            if not report["ok"]:
                start, stop = table.shard_range(i)
                problems[i] = (f"shard {i} (rows {start}..{stop - 1}): rows differ from the checkpoint's experts by "
                               f"up to {report['max_error_over_allowed']:.3g}x the allowed error")
    bad = [line for _, line in sorted(problems.items()) if line]
    return {"ok": not bad, "problems": bad, "shards": table.num_shards, **worst, "seed": seed,
            "scheme": table.scheme, "fingerprint": table.fingerprint, "checksum": table.meta.get("checksum")}


def _checkpoint_layers(table: lut.LookupTable, ckpt) -> CheckpointLayers:
    """`ckpt`'s table inputs to read layer by layer, refusing a checkpoint of another model or other parameters
    (its fingerprint computed layer by layer: fingerprint_checkpoint)."""
    cfg, _ = training_form_config(ckpt)
    if cfg.replace(dtype="float32", param_dtype="float32") != table.config.replace(dtype="float32",
                                                                                    param_dtype="float32"):
        raise MoleError(f"table {table.path} was built for another model than checkpoint {ckpt}")
    source = CheckpointLayers(ckpt, cfg)
    fp, _ = fingerprint_checkpoint(ckpt, cfg, source=source)
    if fp != table.fingerprint:
        raise MoleError(f"table {table.path} was built from different parameters than {ckpt} (fingerprint "
                        f"{table.fingerprint[:12]}, checkpoint {fp[:12]})")
    return source


def _recompare(table: lut.LookupTable, source: CheckpointLayers, sampled: dict[int, np.ndarray], *, batch: int,
               buffer_bytes: int, progress: bool):
    """(shard, compare_rows report) for every shard of `sampled` (shard -> ids), its rows recomputed in float32
    from the checkpoint layer by layer: shards in passes of at most buffer_bytes of rows (at least one shard),
    each pass reading every layer once (at most two in memory) and then comparing its shards with the table."""
    cfg = table.config
    L = cfg.num_layers
    row_nbytes = 4 * L * cfg.num_experts * cfg.d_model
    passes, current, used = [], [], 0
    for i, ids in sampled.items():
        if current and used + len(ids) * row_nbytes > buffer_bytes:
            passes.append(current)
            current, used = [], 0
        current.append(i)
        used += len(ids) * row_nbytes
    passes.append(current)
    layer_fn = jax.jit(layer_rows_fn(cfg))
    embed_VxD = jax.device_put(source.embedding())  # placed once, as each layer is (not once per batch)
    bar = tqdm(total=len(passes) * L, desc="recompute", unit="layer", disable=not progress)
    try:
        for shards in passes:
            ids = np.concatenate([sampled[i] for i in shards])
            ref_RxLxNxD = np.empty((len(ids), L, cfg.num_experts, cfg.d_model), np.float32)
            loader = _LayerLoader(source, jax.device_put)
            try:
                for l, layer in enumerate(loader.layers(L)):
                    with jax.default_matmul_precision("highest"):
                        rows = _recompute(lambda ids_R, layer=layer: layer_fn(embed_VxD, layer, ids_R), ids, batch)
                    ref_RxLxNxD[:, l] = rows[:, 0]
                    del rows, layer  # released before the loader is asked for the next layer
                    bar.update(1)
            finally:
                loader.close()
            at = 0
            for i in shards:
                n = len(sampled[i])
                yield i, compare_rows(ref_RxLxNxD[at:at + n], table.rows(sampled[i]), table.scheme, table.block)
                at += n
            del ref_RxLxNxD
    finally:
        bar.close()


def _recompute(rows_fn, ids: np.ndarray, batch: int) -> np.ndarray:
    """float32 rows of these ids (rows_fn: ids -> rows), `batch` at a time (the last batch padded: one compiled
    shape)."""
    out = []
    for s in range(0, len(ids), batch):
        part = ids[s:s + batch]
        padded = np.concatenate([part, np.repeat(part[-1:], batch - len(part))])
        out.append(np.asarray(rows_fn(jnp.asarray(padded, jnp.int32)))[:len(part)])
    return np.concatenate(out)
