"""`mole-jax bench convert`: conversion FLOP/s and host memory against the vocabulary size, the latency of reading
rows from the table, and every storage scheme's bytes and error; `bench_checksums`: what the per-row crc32c costs a
conversion and a row read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mole_jax import checkpoint
from mole_jax.bench.tools import machine, matmul_peak_flops, median, print_table, write_json
from mole_jax.config import ModelConfig, MoleError, get_preset
from mole_jax.convert import flops_per_row, lut_rows_fn, restore_table_inputs
from mole_jax.lut import LookupTable, open_lut
from mole_jax.model import init_params
from mole_jax.schemes import SCHEMES, dequantize, error_bound, make_layout, quantize

WORKER = "mole_jax.bench.convert_worker"  # run as `python -m WORKER JOB_JSON`: one conversion per fresh process


def bench_convert(preset: str | None = None, *, vocab_sizes: Sequence[int] | None = None, dtype: str = "float16",
                  batch_rows: int | None = None, shard_rows: int | None = None, buffer_bytes: int | None = None,
                  json_path: str | Path | None = None) -> dict[str, Any]:
    """Conversion FLOP/s against the float32 matmul peak measured in this run, bytes written, and peak host memory
    at several vocabulary sizes; each conversion runs in a fresh process (bench/convert_worker.py), so its
    ru_maxrss is its own. The largest vocabulary is converted twice, into files and into memory (memory://), to
    separate compute from storage. Then the latency of reading B random rows from the table against a numpy
    memmap of the same bytes, and every scheme's bytes and reconstruction error."""
    cpu = jax.default_backend() == "cpu"
    cfg = get_preset(preset or ("small-mole" if cpu else "mole-4e-410m"))
    if preset is None and cpu:  # small-mole at d=512: a conversion of tens of seconds on a laptop-class CPU
        cfg = cfg.replace(d_model=512, num_heads=8, ffn_dim=2048, expert_dim=2048)
    vocab_sizes = list(vocab_sizes or ([8192, 32768] if cpu else [cfg.vocab_size // 4, cfg.vocab_size]))
    if shard_rows is None and cpu and preset is None:  # 16 MiB shards: even V=8192 has several (steady state)
        shard_rows = 1024
    with jax.default_matmul_precision("highest"):  # conversion computes in true float32
        peak = matmul_peak_flops("float32")
    settings = {"dtype": dtype, "batch_rows": batch_rows, "shard_rows": shard_rows, "buffer_bytes": buffer_bytes}
    with tempfile.TemporaryDirectory(prefix="mole-jax-bench-convert-") as tmp:
        tmp = Path(tmp)
        runs = [run for V in vocab_sizes for run in _conversions(cfg.replace(vocab_size=V), tmp, settings, peak,
                                                                 with_memory=V == vocab_sizes[-1])]
        reads = _bench_row_reads(open_lut(tmp / f"lut-{vocab_sizes[-1]}"), tmp)
        schemes = _bench_schemes(tmp / f"ckpt-{vocab_sizes[0]}", cfg.replace(vocab_size=vocab_sizes[0]))
    files = [r for r in runs if r["destination"] == "file"]
    result = {"benchmark": "convert", "machine": machine(), "model": cfg.to_dict(), "dtype": dtype,
              "matmul_peak_flops_per_s": peak, **files[-1], "runs": runs,
              "peak_rss_ratio_largest_to_smallest_vocab": files[-1]["peak_rss_bytes"] / files[0]["peak_rss_bytes"],
              "row_reads": reads, "schemes": schemes}
    _print_report(result, cfg, vocab_sizes[-1])
    write_json(json_path, result)
    return result


def _conversions(cfg: ModelConfig, tmp: Path, settings: dict, peak: float, *, with_memory: bool) -> list[dict]:
    """A random checkpoint of `cfg`, converted into files (and, `with_memory`, into memory://), one row each."""
    V = cfg.vocab_size
    ckpt = _save_random_checkpoint(cfg, tmp / f"ckpt-{V}")
    destinations = [("file", tmp / f"lut-{V}")] + ([("memory", f"memory://lut-{V}/")] if with_memory else [])
    runs = []
    for kind, dest in destinations:
        r = _run_worker({"ckpt": str(ckpt), "lut": str(dest), **settings})
        info, flops = r["info"], V * flops_per_row(cfg)
        written = (sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()) if kind == "file"
                   else info["nbytes"])
        compute_s = info["last_run"]["compute_seconds_process0"]
        runs.append({"vocab_size": V, "destination": kind, "flops": flops, "seconds": r["seconds"],
                     "compute_seconds": compute_s, "achieved_flops_per_s": flops / r["seconds"],
                     "steady_flops_per_s": flops / compute_s, "fraction_of_peak": flops / r["seconds"] / peak,
                     "steady_fraction_of_peak": flops / compute_s / peak, "bytes_written": written,
                     "bytes_per_s": written / r["seconds"], "peak_rss_bytes": r["peak_rss_bytes"],
                     "embedding_bytes": V * cfg.d_model * 4, "shard_rows": info["shard_rows"],
                     "batch_rows": info["last_run"]["batch_rows"], "passes": info["last_run"]["passes_process0"]})
    return runs


def _save_random_checkpoint(cfg: ModelConfig, path: Path) -> Path:
    mngr = checkpoint.manager(path / checkpoint.CHECKPOINTS, async_save=False)
    checkpoint.save(mngr, 0, init_params(cfg, seed=0), checkpoint.step_meta(cfg, 0))
    mngr.close()
    return path


def _run_worker(job: dict) -> dict:
    """One conversion in a fresh process (bench/convert_worker.py): its wall time, peak RSS and read_info."""
    out = subprocess.run([sys.executable, "-m", WORKER, json.dumps(job)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"conversion into {job['lut']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _print_report(result: dict[str, Any], cfg: ModelConfig, largest_vocab: int) -> None:
    runs, reads, schemes = result["runs"], result["row_reads"], result["schemes"]
    peak = result["matmul_peak_flops_per_s"]
    print(f"conversion of {cfg.num_layers} layers x {cfg.num_experts} experts, d={cfg.d_model}, F={cfg.expert_dim}, "
          f"{result['dtype']}; float32 matmul peak {peak / 1e9:.1f} GFLOP/s ({result['machine']['device']})")
    print_table([{**r, "GFLOP": r["flops"] / 1e9, "GFLOP/s": r["achieved_flops_per_s"] / 1e9,
                  "of peak": r["fraction_of_peak"], "steady of peak": r["steady_fraction_of_peak"],
                  "MB written": r["bytes_written"] / 1e6, "MB/s": r["bytes_per_s"] / 1e6,
                  "peak RSS MB": r["peak_rss_bytes"] / 1e6, "embedding MB": r["embedding_bytes"] / 1e6} for r in runs],
                ["vocab_size", "destination", "batch_rows", "shard_rows", "passes", "GFLOP", "seconds", "GFLOP/s",
                 "of peak", "steady of peak", "MB written", "MB/s", "peak RSS MB", "embedding MB"])
    print("(memory: the table is held in the converting process, so its peak RSS includes the table)")
    print(f"\nreading B random rows of the V={largest_vocab} table (median ms; memmap = the same bytes as .npy)")
    print_table(reads, ["batch", "read_stored_ms", "rows_ms", "read_stored_no_cache_ms", "memmap_ms",
                        "read_stored_over_memmap"])
    print(f"\nstorage schemes on {schemes[0]['rows']} random rows of this model (random init): bytes and "
          "reconstruction error against float32")
    print_table(schemes, ["scheme", "block", "row_bytes", "of_fp16", "rel_rms_error", "max_error_over_absmax",
                          "max_error_over_bound"])


def _memmap_copy(table: LookupTable, tmp: Path) -> dict[str, np.ndarray]:
    """The table's stored arrays as .npy memmaps (copied shard by shard: bounded memory)."""
    V, step = table.shape[0], table.meta["shard_rows"]
    memmaps = {}
    for name, (shape, dt) in table.layout.arrays.items():
        mm = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dt, shape=(V, *shape))
        for s in range(0, V, step):
            mm[s:s + step] = table.read_stored(np.arange(s, min(s + step, V)))[name]
        mm.flush()
        memmaps[name] = np.load(tmp / f"{name}.npy", mmap_mode="r")
    return memmaps


def _bench_row_reads(table: LookupTable, tmp: Path, batches: Sequence[int] = (1, 8, 32),
                     iters: int = 300) -> list[dict]:
    """Median ms to read B random rows: stored, dequantised, without the read cache, and from a memmap."""
    V = table.shape[0]
    memmaps = _memmap_copy(table, tmp)
    no_cache = open_lut(table.path, cache_bytes=0)
    rng = np.random.default_rng(0)
    rows = []
    for B in batches:
        variants = {"read_stored_ms": table.read_stored, "rows_ms": table.rows,
                    "read_stored_no_cache_ms": no_cache.read_stored,
                    "memmap_ms": lambda ids: {n: np.take(m, ids, axis=0) for n, m in memmaps.items()}}
        times = {k: [] for k in variants}
        for _ in range(iters):
            for k, fn in variants.items():  # interleaved, so that drift affects every variant alike
                ids = rng.integers(0, V, B)  # fresh ids: no variant reads rows another just cached
                t0 = time.perf_counter()
                fn(ids)
                times[k].append(time.perf_counter() - t0)
        r = {"batch": B, **{k: median(v) * 1e3 for k, v in times.items()}}
        r["read_stored_over_memmap"] = r["read_stored_ms"] / r["memmap_ms"]
        rows.append(r)
    return rows


def _bench_schemes(ckpt: Path, cfg: ModelConfig, rows: int = 2048) -> list[dict]:
    """Every scheme's bytes per row and its measured error on float32 rows of `ckpt` (quantised exactly as the
    converter stores them: the same function, bit-identical on host and device)."""
    inputs = restore_table_inputs(ckpt, cfg)
    ids = np.random.default_rng(0).choice(cfg.vocab_size, min(rows, cfg.vocab_size), replace=False)
    with jax.default_matmul_precision("highest"):
        x = np.asarray(jax.jit(lut_rows_fn(cfg))(inputs, jnp.asarray(ids, jnp.int32)))
    fp16 = make_layout("float16", cfg).row_nbytes
    out = []
    for scheme in SCHEMES:
        try:
            layout = make_layout(scheme, cfg)
        except MoleError as e:  # a scheme this model cannot store: nf3 needs d_model divisible by 8
            out.append({"scheme": scheme, "error": str(e)})
            continue
        err = np.abs(dequantize(quantize(x, scheme, layout.block), scheme).astype(np.float64) - x)
        bound = error_bound(x, scheme, layout.block)
        out.append({"scheme": scheme, "block": layout.block or None, "row_bytes": layout.row_nbytes,
                    "of_fp16": layout.row_nbytes / fp16, "rows": len(ids),
                    "rel_rms_error": float(np.sqrt(np.mean(err ** 2) / np.mean(x.astype(np.float64) ** 2))),
                    "max_error_over_absmax": float(err.max() / np.abs(x).max()),
                    "max_error_over_bound": float(np.max(err / np.maximum(bound, 1e-30)))})
    return out


# What the per-row checksums cost -------------------------------------------------------------------------------
def bench_checksums(*, vocab_size: int = 16384, dtype: str = "float16", shard_rows: int = 1024, reps: int = 3,
                    iters: int = 300, json_path: str | Path | None = None) -> dict[str, Any]:
    """The cost of the crc32c per row, side by side in one run: the same checkpoint (bench convert's CPU model)
    converted with and without checksums (alternating, each in a fresh process), then reads of B random rows from
    both tables: the storage placement's fetch (`read_stored`, with the reader's cache and without) and the host
    placement (the whole table loaded once, `read_all_stored`, where every checksum is verified; its per-step
    np.take never sees one)."""
    cfg = get_preset("small-mole").replace(d_model=512, num_heads=8, ffn_dim=2048, expert_dim=2048,
                                           vocab_size=vocab_size)
    load_before = os.getloadavg()[0]  # recorded: on a shared machine, the figures are only as quiet as it was
    with tempfile.TemporaryDirectory(prefix="mole-jax-bench-checksums-") as tmp:
        tmp = Path(tmp)
        ckpt = _save_random_checkpoint(cfg, tmp / "ckpt")
        runs = []
        for rep in range(reps):
            for checksum in (True, False):
                r = _run_worker({"ckpt": str(ckpt), "lut": str(tmp / f"lut-{checksum}-{rep}"), "dtype": dtype,
                                 "batch_rows": None, "shard_rows": shard_rows, "checksum": checksum})
                runs.append({"checksum": checksum, "rep": rep, "seconds": r["seconds"],
                             "compute_seconds": r["info"]["last_run"]["compute_seconds_process0"]})
        tables = {c: tmp / f"lut-{c}-0" for c in (True, False)}
        reads = _bench_checksum_reads(tables, vocab_size, iters)
        loads = _bench_host_loads(tables, reps=3)
    # the best of the alternating runs: the least disturbed by whatever else shares the machine
    conv = {f"{k}_{'crc' if c else 'plain'}": min(r[k] for r in runs if r["checksum"] == c)
            for c in (True, False) for k in ("seconds", "compute_seconds")}
    result = {"benchmark": "checksums", "machine": machine(), "model": cfg.to_dict(), "dtype": dtype,
              "vocab_size": vocab_size, "shard_rows": shard_rows, "conversions": runs,
              "conversion": {**conv, "ratio": conv["seconds_crc"] / conv["seconds_plain"],
                             "compute_ratio": conv["compute_seconds_crc"] / conv["compute_seconds_plain"]},
              "storage_row_reads": reads, "host_load": loads,
              "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]}}
    print(f"conversion of V={vocab_size} ({dtype}, best of {reps}): with crc32c {conv['seconds_crc']:.2f} s, "
          f"without {conv['seconds_plain']:.2f} s (x{result['conversion']['ratio']:.3f}); shard loop "
          f"x{result['conversion']['compute_ratio']:.3f}")
    print_table(reads, ["batch", "crc_ms", "plain_ms", "ratio", "crc_no_cache_ms", "plain_no_cache_ms",
                        "no_cache_ratio"])
    print(f"host placement, whole table loaded: with crc32c {loads['crc_s']:.3f} s, without {loads['plain_s']:.3f} s "
          f"(x{loads['ratio']:.3f}); its per-step fetch (np.take) reads no checksum")
    write_json(json_path, result)
    return result


def _bench_checksum_reads(tables: dict[bool, Path], V: int, iters: int) -> list[dict]:
    """Median ms to read B fresh random rows from each table, interleaved, with the reader's cache and without."""
    opened = {(c, cache): open_lut(path, **({} if cache else {"cache_bytes": 0}))
              for c, path in tables.items() for cache in (True, False)}
    names = {(True, True): "crc_ms", (False, True): "plain_ms", (True, False): "crc_no_cache_ms",
             (False, False): "plain_no_cache_ms"}
    rng = np.random.default_rng(0)
    rows = []
    for B in (1, 8, 32):
        times = {k: [] for k in names.values()}
        for _ in range(iters):
            for key, table in opened.items():
                ids = rng.integers(0, V, B)
                t0 = time.perf_counter()
                table.read_stored(ids)
                times[names[key]].append(time.perf_counter() - t0)
        r = {"batch": B, **{k: median(v) * 1e3 for k, v in times.items()}}
        rows.append({**r, "ratio": r["crc_ms"] / r["plain_ms"],
                     "no_cache_ratio": r["crc_no_cache_ms"] / r["plain_no_cache_ms"]})
    return rows


def _bench_host_loads(tables: dict[bool, Path], reps: int) -> dict:
    """Seconds to load each whole table into host memory (the host placement's start), interleaved."""
    times = {True: [], False: []}
    for _ in range(reps):
        for c, path in tables.items():
            table = open_lut(path, cache_bytes=0)
            t0 = time.perf_counter()
            table.read_all_stored()
            times[c].append(time.perf_counter() - t0)
    crc, plain = median(times[True]), median(times[False])
    return {"crc_s": crc, "plain_s": plain, "ratio": crc / plain, "table_bytes": open_lut(tables[True]).nbytes}
