"""Everything mole-jax measures on an accelerator, in one command that fits a short window of device time:

    PYTHONPATH=. python experiments/accelerator.py [--budget-s 480] [--out results/accelerator] [--scale 160m]

On whatever backend JAX finds, it measures in this order, each piece only if the budget left covers its estimate:
  device     kind, count, memory, versions; the bf16 matmul peak; host<->device bandwidth from pageable and from
             pinned host memory
  decode     bench decode at 160M, batch 1 / 8 / 32: Dense, MoE resident and offloaded, MoLE's table on the device,
             in host RAM and on storage, side by side (mole_jax.bench.decode)
  convert    a mole-4e-160m table (random weights, float16) converted to local disk: FLOP/s, write GB/s against a
             sequential-write floor measured just before, wall time
  train      dense-160m, mole-4e-160m with dedup, moe-10e-160m and mole-4e-160m without dedup: bf16 compute with
             float32 master weights, at the paper's 2048 tokens per sequence, the largest micro-batch that fits
             (sized from the compiler's memory analysis): step time, tokens/s, MFU against the measured and the
             nominal bf16 peak, device memory; after the first two (the ratio with a goal) comes
  decode small  `bench decode --preset-size small` exactly as on the command line (its own goals: a step there
             is short, so a host round trip shows most)
and then prints one line per goal (docs/accelerators.md) saying whether it holds.

Results are written after every piece to OUT/<device kind>/accelerator.json (and .md, decode.json and
decode_small.json): a run
stopped at its budget (a watchdog ends the process there) keeps everything it measured. It needs only what an
accelerator host has preinstalled (jax, flax, optax, orbax-checkpoint, tensorstore, chex, tokenizers, safetensors,
tqdm) and no network: run it from a plain checkout with PYTHONPATH=. (no pip install). `--scale tiny` is its CPU
form, run by the test suite.
"""

from __future__ import annotations

import os

# Before JAX starts: let the training phase size its micro-batch against most of the device, not XLA's default 75%.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import argparse
import dataclasses
import json
import platform
import re
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import jax
import jaxlib
import numpy as np
from jax.sharding import SingleDeviceSharding

from mole_jax import checkpoint, data, sharding
from mole_jax.bench.decode import bench_decode
from mole_jax.bench.tools import machine, matmul_peak_flops, median
from mole_jax.config import REMAT_POLICIES, ModelConfig, TrainConfig, get_preset
from mole_jax.convert import convert_to_lut, flops_per_row
from mole_jax.model import init_params
from mole_jax.row_sources import in_program_slices_compile
from mole_jax.train_step import ShardedStep, choose_dedup_rows, nominal_peak, train_flops_per_token

TRAIN_VARIANTS = ("dense", "mole-dedup", "moe", "mole-plain")
# Last, if the budget allows: the MoE implementations "auto" did not pick, to check its choice on this backend.
ACCELERATOR_ONLY_VARIANTS = ("moe-ragged", "moe-grouped", "moe-dense")


@dataclasses.dataclass(frozen=True)
class Scale:
    """What one scale measures, and what each piece is expected to cost (seconds), to plan within the budget."""
    presets: dict[str, str]  # dense / moe / mole
    seq_len: int
    max_micro: int  # sequences per device in one micro-batch, at most
    decode_size: str  # bench decode's preset family
    batch_sizes: tuple[int, ...]
    decode_steps: int
    prompt_len: int
    timed_steps: int
    matmul_n: int
    transfer_bytes: int
    cost_s: dict[str, float]  # per piece: device, decode, convert, each train variant (and decode small)
    small_decode: bool = False  # also `bench decode --preset-size small` (the 160M scale's run)


SCALES = {
    "160m": Scale({"dense": "dense-160m", "moe": "moe-10e-160m", "mole": "mole-4e-160m"}, seq_len=2048,
                  max_micro=64, decode_size="160m", batch_sizes=(1, 8, 32), decode_steps=40, prompt_len=512,
                  timed_steps=4, matmul_n=8192, transfer_bytes=1 << 30,
                  cost_s={"device": 20, "decode": 150, "convert": 60, "train": 60, "decode small": 90},
                  small_decode=True),
    "small": Scale({"dense": "small-dense", "moe": "small-moe", "mole": "small-mole"}, seq_len=256, max_micro=32,
                   decode_size="small", batch_sizes=(1, 8, 32), decode_steps=30, prompt_len=128, timed_steps=3,
                   matmul_n=4096, transfer_bytes=256 << 20,
                   cost_s={"device": 10, "decode": 60, "convert": 20, "train": 20}),
    "tiny": Scale({"dense": "tiny-dense", "moe": "tiny-moe", "mole": "tiny-mole"}, seq_len=64, max_micro=4,
                  decode_size="tiny", batch_sizes=(1,), decode_steps=4, prompt_len=8, timed_steps=2,
                  matmul_n=256, transfer_bytes=4 << 20,
                  cost_s={"device": 2, "decode": 5, "convert": 3, "train": 3}),
}


# Budget and results --------------------------------------------------------------------------------------------
class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def allows(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s


class Results:
    """Everything measured so far, rewritten to disk (atomically) after every piece."""

    def __init__(self, out_dir: Path, header: dict[str, Any]):
        self.out_dir, self.lock = out_dir, threading.Lock()
        self.doc: dict[str, Any] = {**header, "device": None, "decode": None, "decode_small": None, "convert": None,
                                    "train": [],
                                    "skipped": [], "errors": {}, "goals": [], "stopped": None}
        out_dir.mkdir(parents=True, exist_ok=True)

    def set(self, key: str, value) -> None:
        with self.lock:
            self.doc[key] = value
            self._write()

    def note(self, key: str, item) -> None:  # append to a list, or add to a dict given (name, value)
        with self.lock:
            if isinstance(self.doc[key], dict):
                self.doc[key][item[0]] = item[1]
            else:
                self.doc[key].append(item)
            self._write()

    def finish(self, stopped: str | None) -> None:
        with self.lock:
            self.doc["stopped"] = stopped
            self.doc["goals"] = goals(self.doc)
            self.doc["wall_seconds"] = time.time() - self.doc["started_unix"]
            self._write()

    def _write(self) -> None:
        for name, text in (("accelerator.json", json.dumps(self.doc, indent=2, default=str) + "\n"),
                           ("accelerator.md", markdown(self.doc))):
            tmp = self.out_dir / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out_dir / name)


def run_piece(name: str, estimate_s: float, budget: Budget, results: Results, fn: Callable[[], Any]) -> Any:
    """Run one piece if the budget covers its estimate; an error is recorded (with its traceback's last lines)
    and the run goes on: one failing piece must not waste the window."""
    if not budget.allows(estimate_s):
        print(f"[accelerator] skip {name}: {budget.left():.0f} s left, it needs about {estimate_s:.0f} s",
              file=sys.stderr)
        results.note("skipped", name)
        return None
    t0 = time.monotonic()
    print(f"[accelerator] {name} ({budget.left():.0f} s left)", file=sys.stderr)
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - recorded, then the next piece runs
        traceback.print_exc()
        results.note("errors", (name, f"{type(e).__name__}: {e}"[:2000]))
        return None
    finally:
        print(f"[accelerator] {name} took {time.monotonic() - t0:.1f} s", file=sys.stderr)


# The device ------------------------------------------------------------------------------------------------------
def device_memory_bytes(dev) -> int | None:
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    return (stats or {}).get("bytes_limit")


def _seconds(fn: Callable[[int], Any], iters: int) -> float:
    """Median seconds of fn(i) for i in range(iters), blocking on its result."""
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(i))
        times.append(time.perf_counter() - t0)
    return median(times)


def transfer_rates(dev, nbytes: int, iters: int = 5) -> dict[str, Any]:
    """Bytes/s host->device and device->host from pageable numpy and, where the backend has it, from pinned host
    memory. Every device->host copy reads a fresh array: a jax.Array caches its host copy after the first read."""
    on_device = SingleDeviceSharding(dev)
    x = np.random.default_rng(0).integers(0, 255, nbytes, np.uint8)
    copies = [jax.block_until_ready(jax.device_put(x, on_device) + np.uint8(i)) for i in range(iters + 1)]
    rates: dict[str, Any] = {"bytes": nbytes,
                             "h2d_pageable": nbytes / _seconds(lambda i: jax.device_put(x, on_device), iters),
                             "d2h_pageable": nbytes / _seconds(lambda i: np.asarray(copies[i]), iters)}
    kinds = sorted(m.kind for m in dev.addressable_memories())
    rates["memory_kinds"] = kinds
    if "pinned_host" in kinds:
        pinned = SingleDeviceSharding(dev, memory_kind="pinned_host")
        x_pinned = jax.block_until_ready(jax.device_put(x, pinned))
        rates["h2d_pinned"] = nbytes / _seconds(lambda i: jax.device_put(x_pinned, on_device), iters)
        rates["d2h_pinned"] = nbytes / _seconds(lambda i: jax.device_put(copies[i], pinned), iters)
    return rates


def measure_device(scale: Scale) -> dict[str, Any]:
    dev = jax.devices()[0]
    peak = matmul_peak_flops("bfloat16", n=scale.matmul_n)
    return {**machine(), "platform": dev.platform, "process_count": jax.process_count(),
            "memory_bytes": device_memory_bytes(dev), "python": platform.python_version(),
            "jaxlib": jaxlib.__version__,
            "bf16_matmul_peak_flops_per_s": peak, "nominal_bf16_peak_flops_per_s": nominal_peak(dev.device_kind),
            "transfer": transfer_rates(dev, scale.transfer_bytes)}


# Decoding --------------------------------------------------------------------------------------------------------
def measure_decode(scale: Scale, out_dir: Path, workdir: Path) -> dict[str, Any]:
    """bench decode at the scale's size, and whether this backend compiles the host placement's in-program read
    (per-row dynamic slices of pinned_host memory moved to device memory: without it `mole-host` is the host's
    gather)."""
    why = in_program_slices_compile(jax.devices()[0])
    return {**_kept(bench_decode(scale.decode_size, batch_sizes=scale.batch_sizes, prompt_len=scale.prompt_len,
                                 steps=scale.decode_steps, chunk=min(10, scale.decode_steps), warmup=2,
                                 workdir=workdir, json_path=out_dir / "decode.json")),
            "in_program_host_read": {"compiles": why is None, "why_not": why}}


def measure_decode_small(out_dir: Path, workdir: Path) -> dict[str, Any]:
    """`mole-jax bench decode --preset-size small` with the command's defaults."""
    return _kept(bench_decode("small", workdir=workdir, json_path=out_dir / "decode_small.json"))


def _kept(payload: dict[str, Any]) -> dict[str, Any]:
    keep = ("model", "batch_size", "steps_per_dispatch", "ms_per_step", "vs_dense", "h2d_bytes_per_step",
            "device_param_bytes")
    return {"rows": [{k: r[k] for k in keep} for r in payload["rows"]], "settings": payload["settings"],
            "summary": payload["summary"]}


# Conversion ------------------------------------------------------------------------------------------------------
def write_floor(directory: Path, nbytes: int, block: int = 64 << 20) -> float:
    """Bytes/s of a sequential write of `nbytes` to `directory`, fsynced: the disk's floor for a conversion."""
    path = directory / "write-floor.bin"
    chunk = np.random.default_rng(1).integers(0, 255, min(block, nbytes), np.uint8).tobytes()
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for start in range(0, nbytes, len(chunk)):
            f.write(chunk[:min(len(chunk), nbytes - start)])
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return nbytes / seconds


def measure_convert(cfg: ModelConfig, workdir: Path) -> dict[str, Any]:
    """A random-weight checkpoint of `cfg` converted to a float16 table on local disk, as `mole-jax convert` does."""
    with tempfile.TemporaryDirectory(dir=workdir, prefix="convert-") as tmp:
        tmp = Path(tmp)
        table_bytes = cfg.vocab_size * cfg.num_layers * cfg.num_experts * cfg.d_model * 2
        floor = write_floor(tmp, min(table_bytes, 4 << 30))
        mngr = checkpoint.manager(tmp / "ckpt" / checkpoint.CHECKPOINTS, async_save=False)
        checkpoint.save(mngr, 0, init_params(cfg, seed=0), checkpoint.step_meta(cfg, 0))
        mngr.close()
        t0 = time.perf_counter()
        convert_to_lut(tmp / "ckpt", tmp / "lut", "float16", progress=False)
        wall = time.perf_counter() - t0
        written = sum(f.stat().st_size for f in (tmp / "lut").rglob("*") if f.is_file())
    flops = cfg.vocab_size * flops_per_row(cfg)
    return {"model": cfg.to_dict(), "scheme": "float16", "wall_seconds": wall, "flops": flops,
            "achieved_flops_per_s": flops / wall, "bytes_written": written, "write_bytes_per_s": written / wall,
            "write_floor_bytes_per_s": floor, "wall_over_floor": wall / (written / floor),
            "note": "the floor is a sequential fsynced write; the conversion's writes may land in the page cache"}


# Training --------------------------------------------------------------------------------------------------------
def _is_oom(e: Exception) -> bool:
    return bool(re.search(r"RESOURCE_EXHAUSTED|out of memory|Out of memory", str(e)))


def _footprint(compiled) -> int | None:
    """Device bytes a compiled step needs: its arguments, outputs and temporaries, less what is donated."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


class TrainVariant:
    """One model's compiled train step at `micro` sequences per device (one micro-batch per step)."""

    def __init__(self, cfg: ModelConfig, name: str, scale: Scale, mesh, corpus, micro: int, remat: str):
        seq = min(scale.seq_len, cfg.max_seq_len)
        tc = TrainConfig(steps=1000, batch_size=micro * mesh.size, seq_len=seq, grad_accum=1, remat=remat)
        windows, _ = data.split_windows(corpus.tokens.size, seq, 0.0)
        self.batches = data.Batches(corpus.tokens, windows, seq_len=seq, batch_size=tc.batch_size, seed=0,
                                    vocab_size=cfg.vocab_size)
        self.dedup_rows = (choose_dedup_rows(self.batches, 1, mesh.size, cfg.vocab_size)["rows"]
                           if name == "mole-dedup" else 0)
        self.cfg, self.tc, self.micro, self.mesh = cfg, tc, micro, mesh
        self.step = ShardedStep(cfg, tc, mesh, dedup_rows=self.dedup_rows)
        self.state = self.step.init_state(seed=0)
        self.batch = self.step.feed(lambda rows: self.batches.batch(0, rows))
        t0 = time.perf_counter()
        self.compiled = self.step.compile(self.state, self.batch)
        self.compile_seconds = time.perf_counter() - t0
        self.footprint = _footprint(self.compiled)

    def time_steps(self, n: int) -> tuple[list[float], dict]:
        metrics, secs = None, []
        for i in range(n + 1):  # the first is a warmup
            t0 = time.perf_counter()
            self.state, metrics = self.compiled(self.state, self.batch)
            jax.block_until_ready(metrics)
            if i:
                secs.append(time.perf_counter() - t0)
        return secs, jax.device_get(metrics)


def largest_micro(cfg, name, scale, mesh, corpus, memory_bytes, remat: str) -> TrainVariant:
    """The largest power-of-two micro-batch (sequences per device, at most scale.max_micro) whose compiled step
    fits the device: a step at one sequence is compiled first, and its temporaries per sequence extrapolated."""
    if memory_bytes is None:  # no memory figure (CPU): the scale's own cap
        return TrainVariant(cfg, name, scale, mesh, corpus, scale.max_micro, remat)
    probe = TrainVariant(cfg, name, scale, mesh, corpus, 1, remat)
    if probe.footprint is None:
        return probe
    per_seq = probe.compiled.memory_analysis().temp_size_in_bytes
    fixed = probe.footprint - per_seq
    micro = 1
    while micro * 2 <= scale.max_micro and fixed + micro * 2 * per_seq <= 0.9 * memory_bytes:
        micro *= 2
    del probe
    while True:
        try:
            return TrainVariant(cfg, name, scale, mesh, corpus, micro, remat)
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e) or micro == 1:
                raise
            micro //= 2


def measure_train_variant(name: str, cfg: ModelConfig, scale: Scale, mesh, corpus, device: dict,
                          remat: str) -> dict[str, Any]:
    variant = largest_micro(cfg, name, scale, mesh, corpus, device.get("memory_bytes"), remat)
    while True:
        try:
            secs, metrics = variant.time_steps(scale.timed_steps)
            break
        except Exception as e:  # noqa: BLE001 - the estimate was too optimistic: halve and go on
            if not _is_oom(e) or variant.micro == 1:
                raise
            micro = variant.micro // 2
            del variant
            variant = TrainVariant(cfg, name, scale, mesh, corpus, micro, remat)
    tokens = variant.tc.batch_size * variant.tc.seq_len
    step_s = median(secs)
    model_flops = train_flops_per_token(cfg, variant.tc.seq_len) * tokens  # the model's, whatever dedup saves
    measured, nominal = device.get("bf16_matmul_peak_flops_per_s"), device.get("nominal_bf16_peak_flops_per_s")
    n = mesh.size
    stats = jax.devices()[0].memory_stats() or {}
    return {"model": name, "preset": scale.presets[name.split("-")[0]], "dtype": cfg.dtype, "remat": remat,
            "moe_impl": cfg.moe_impl if cfg.kind == "moe" else None,
            "param_dtype": cfg.param_dtype, "seq_len": variant.tc.seq_len, "micro_batch_per_device": variant.micro,
            "devices": n, "tokens_per_step": tokens, "dedup_rows": variant.dedup_rows or None,
            "step_ms": step_s * 1e3, "tokens_per_s": tokens / step_s, "compile_seconds": variant.compile_seconds,
            "model_flops_per_step": model_flops,
            "mfu_vs_measured_peak": model_flops / step_s / (measured * n) if measured else None,
            "mfu_vs_nominal_peak": model_flops / step_s / (nominal * n) if nominal else None,
            "compiled_footprint_bytes": variant.footprint, "loss": float(metrics["loss"]),
            "device_peak_bytes_in_use": stats.get("peak_bytes_in_use"),
            "unique_fraction": float(metrics["unique_fraction"]) if "unique_fraction" in metrics else None}


def train_configs(scale: Scale, dtype: str) -> dict[str, ModelConfig]:
    """Training's configs: compute in `dtype` with float32 master weights (and so float32 optimizer state)."""
    cfgs = {k: get_preset(p).replace(dtype=dtype, param_dtype="float32") for k, p in scale.presets.items()}
    return {"dense": cfgs["dense"], "mole-dedup": cfgs["mole"], "moe": cfgs["moe"], "mole-plain": cfgs["mole"],
            **{f"moe-{impl}": cfgs["moe"].replace(moe_impl=impl) for impl in ("ragged", "grouped", "dense")}}


# Goals -----------------------------------------------------------------------------------------------------------
def goals(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per goal of docs/accelerators.md: the measured value and whether it holds (None: not measured)."""
    out = []

    def goal(text: str, value, holds_if: Callable[[Any], bool]):
        ok = None if value is None else bool(holds_if(value))
        out.append({"goal": text, "value": value, "holds": ok})

    train = {r["model"]: r for r in doc.get("train") or []}
    dense = train.get("dense")
    goal("training MFU of dense (vs nominal bf16 peak) >= 0.35", dense and dense["mfu_vs_nominal_peak"],
         lambda v: v >= 0.35)
    for name, limit in (("mole-dedup", 1.10), ("moe", 1.5)):
        ratio = (train[name]["step_ms"] / train[name]["tokens_per_step"]
                 / (dense["step_ms"] / dense["tokens_per_step"])) if dense and name in train else None
        goal(f"training step time per token {name} / dense <= {limit}", ratio, lambda v, lim=limit: v <= lim)
    transfer = (doc.get("device") or {}).get("transfer") or {}
    goal("host->device from pinned memory >= 20 GB/s", transfer.get("h2d_pinned") and transfer["h2d_pinned"] / 1e9,
         lambda v: v >= 20)
    decode = doc.get("decode") or {}
    compiled = (decode.get("in_program_host_read") or {}).get("compiles")
    goal("the backend compiles the host placement's in-program read", compiled, lambda v: v)
    rows = {(r["model"], r["batch_size"]): r for r in (decode.get("rows") or [])}
    for name, limit in (("mole-host", 1.03), ("mole-storage", 1.15)):
        for B in sorted({b for _, b in rows}):
            goal(f"decode {name} / dense at batch {B} <= {limit}", rows.get((name, B), {}).get("vs_dense"),
                 lambda v, lim=limit: v <= lim)
    small = {(r["model"], r["batch_size"]): r for r in ((doc.get("decode_small") or {}).get("rows") or [])}
    for B in sorted({b for _, b in small}):
        for name, limit in (("mole-host", 1.03), ("mole-storage", 1.25)):
            goal(f"decode small {name} / dense at batch {B} <= {limit}", small.get((name, B), {}).get("vs_dense"),
                 lambda v, lim=limit: v <= lim)
    batch1 = min((b for _, b in rows), default=None)
    offload, host = rows.get(("moe-offload", batch1)), rows.get(("mole-host", batch1))
    goal(f"moe-offload / mole-host bytes per step at batch {batch1} >= 1000",
         offload and host and offload["h2d_bytes_per_step"] / max(host["h2d_bytes_per_step"], 1), lambda v: v >= 1000)
    conv = doc.get("convert")
    goal("conversion wall <= 1.3 x bytes / write floor", conv and conv["wall_over_floor"], lambda v: v <= 1.3)
    return out


def markdown(doc: dict[str, Any]) -> str:
    dev = doc.get("device") or {}
    lines = [f"# Accelerator run: {dev.get('device', '?')} x {dev.get('device_count', '?')}", "",
             f"Command: `{doc['command']}`", f"Started {doc['started']}; scale {doc['scale']}; budget "
             f"{doc['budget_s']} s; {'stopped: ' + doc['stopped'] if doc.get('stopped') else 'ran to the end'}.", ""]
    if dev:
        t = dev.get("transfer") or {}
        lines += ["## Device", "", f"jax {dev.get('jax')}, jaxlib {dev.get('jaxlib')}, memory "
                  f"{_gb(dev.get('memory_bytes'))} GB; bf16 matmul peak measured "
                  f"{_tf(dev.get('bf16_matmul_peak_flops_per_s'))} TFLOP/s, nominal "
                  f"{_tf(dev.get('nominal_bf16_peak_flops_per_s'))} TFLOP/s.",
                  f"Host->device GB/s: pageable {_gb(t.get('h2d_pageable'))}, pinned {_gb(t.get('h2d_pinned'))}; "
                  f"device->host: pageable {_gb(t.get('d2h_pageable'))}, pinned {_gb(t.get('d2h_pinned'))}.", ""]
    lines += _table("Goals", doc.get("goals") or [], ["goal", "value", "holds"])
    lines += _table("Training", doc.get("train") or [],
                    ["model", "micro_batch_per_device", "tokens_per_step", "step_ms", "tokens_per_s",
                     "mfu_vs_measured_peak", "mfu_vs_nominal_peak", "compiled_footprint_bytes", "loss"])
    for key, title in (("decode", "Decoding"), ("decode_small", "Decoding, small presets")):
        lines += _table(f"{title} (ms per step; vs_dense from the same turns)", (doc.get(key) or {}).get("rows") or [],
                        ["model", "batch_size", "ms_per_step", "vs_dense", "h2d_bytes_per_step", "device_param_bytes"])
    if doc.get("convert"):
        lines += _table("Conversion", [doc["convert"]], ["wall_seconds", "achieved_flops_per_s", "bytes_written",
                                                          "write_bytes_per_s", "write_floor_bytes_per_s",
                                                          "wall_over_floor"])
    for key, title in (("skipped", "Skipped (budget)"), ("errors", "Errors")):
        if doc.get(key):
            items = doc[key].items() if isinstance(doc[key], dict) else ((k, "") for k in doc[key])
            lines += [f"## {title}", ""] + [f"- {k}{': ' + v if v else ''}" for k, v in items] + [""]
    return "\n".join(lines) + "\n"


def _gb(x):
    return None if x is None else round(x / 1e9, 2)


def _tf(x):
    return None if x is None else round(x / 1e12, 1)


def _table(title: str, rows: list[dict], columns: list[str]) -> list[str]:
    if not rows:
        return []

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    return ([f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows] + [""])


# The run ---------------------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage block too)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=480.0, help="stop here, keeping what was measured (default 480)")
    p.add_argument("--out", default="results/accelerator", help="results go to OUT/<device kind>/")
    p.add_argument("--scale", choices=tuple(SCALES), default="160m", help="160m: the paper's; tiny: the CPU check")
    p.add_argument("--remat", choices=REMAT_POLICIES, default="none",
                   help="training's activation rematerialisation (default none: the fastest when the batch fits)")
    p.add_argument("--workdir", default=None, help="local disk for the tables and checkpoints (default: a temp dir)")
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error("--budget-s must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget, scale = Budget(args.budget_s), SCALES[args.scale]
    dev = jax.devices()[0]
    out_dir = Path(args.out) / _slug(getattr(dev, "device_kind", dev.platform))
    command = "PYTHONPATH=. python experiments/accelerator.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = Results(out_dir, {"command": command.strip(), "scale": args.scale, "budget_s": args.budget_s,
                                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "started_unix": time.time()})
    watchdog = threading.Timer(max(budget.left(), 0), _stop_at_budget, (results,))
    watchdog.daemon = True
    watchdog.start()
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="mole-jax-accelerator-") as work:
        _run(scale, budget, results, Path(work), args.remat)
    watchdog.cancel()
    results.finish(None)
    print((out_dir / "accelerator.md").read_text())
    return 0


def _run(scale: Scale, budget: Budget, results: Results, work: Path, remat: str) -> None:
    cost = scale.cost_s
    device = run_piece("device", cost["device"], budget, results, lambda: measure_device(scale)) or {}
    results.set("device", device or None)
    decode = run_piece("decode", cost["decode"], budget, results, lambda: measure_decode(scale, results.out_dir, work))
    results.set("decode", decode)
    mole = get_preset(scale.presets["mole"])
    results.set("convert", run_piece("convert", cost["convert"], budget, results, lambda: measure_convert(mole, work)))
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"  # bf16 matmuls on CPU are emulated: slow
    cfgs, mesh = train_configs(scale, dtype), sharding.make_mesh(None)
    corpus = run_piece("train data", cost["device"], budget, results,
                       lambda: data.open_corpus(None, vocab_size=cfgs["dense"].vocab_size))
    variants = TRAIN_VARIANTS + (ACCELERATOR_ONLY_VARIANTS if jax.default_backend() != "cpu" else ())
    variants = variants if corpus is not None else ()

    def train(name: str) -> None:
        row = run_piece(f"train {name}", cost["train"], budget, results,
                        lambda: measure_train_variant(name, cfgs[name], scale, mesh, corpus, device, remat))
        if row:
            results.note("train", row)

    for name in variants[:2]:  # Dense and MoLE-dedup: the ratio with a goal
        train(name)
    if scale.small_decode:
        results.set("decode_small", run_piece("decode small", cost["decode small"], budget, results,
                                              lambda: measure_decode_small(results.out_dir, work)))
    for name in variants[2:]:
        train(name)


def _stop_at_budget(results: Results) -> None:
    """The watchdog: the budget is spent in the middle of a piece; keep what was measured and end the process."""
    print("[accelerator] budget reached: stopping with what was measured", file=sys.stderr)
    results.finish("budget reached in the middle of a piece")
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
