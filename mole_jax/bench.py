"""Benchmarks: `mole-jax bench train|convert|decode`. Variants are measured side by side in one run, on the same
machine, and reported as ratios; never as timed tests. This file holds the shared measuring tools; each benchmark
is one function below them."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp


def block(x):
    return jax.block_until_ready(x)


def time_calls(fn: Callable[[], Any], *, warmup: int = 2, iters: int = 10) -> list[float]:
    """Seconds per call of `fn` (which must return JAX values; we block on them), after `warmup` calls."""
    for _ in range(warmup):
        block(fn())
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        block(fn())
        out.append(time.perf_counter() - t0)
    return out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def matmul_peak_flops(dtype: str = "float32", n: int | None = None, iters: int = 10) -> float:
    """The machine's attainable matmul rate: FLOP/s of a jitted square [n, n] @ [n, n] (median of `iters`).
    The floor that training and conversion throughput are compared against, measured in the same run."""
    if n is None:
        n = 1024 if jax.default_backend() == "cpu" else 8192
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda a, b: a @ b)
    secs = median(time_calls(lambda: mm(a, b), warmup=2, iters=iters))
    return 2 * n ** 3 / secs


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
            "device_count": jax.device_count(), "jax": jax.__version__}


def print_table(rows: list[dict[str, Any]], columns: Sequence[str], file=sys.stdout) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)), file=file)
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)), file=file)


def write_json(path: str | Path | None, payload: Any) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


# mole-jax bench train ----------------------------------------------------------------------------------------
def bench_train(preset_size: str = "small", tokens_per_step: Sequence[int] = (4096, 16384, 65536),
                seq_len: int = 256, micro_tokens: int = 16384, iters: int = 3, dtype: str = "auto",
                devices: int | None = None, json_path: str | Path | None = None) -> list[dict[str, Any]]:
    """Train-step time of {size}-dense, {size}-mole with dedup and {size}-mole without (equal activated size),
    side by side in one run, at several tokens per step (micro-batches of at most `micro_tokens`, accumulated).
    Every variant is one jitted, sharded, donated step (train.make_train_step) on windows of the embedded English
    corpus (tokenised by a BPE of the preset's vocabulary). The three variants of a step size are timed in turn,
    round-robin, `iters` times after a warmup, so that a machine whose load drifts slows them alike; the row holds
    the median. Achieved FLOP/s count the model's matmuls analytically (train.train_flops_per_token; with dedup
    the experts on the rows they actually run on), against a matmul peak measured in the same run."""
    from mole_jax import data, sharding, train
    from mole_jax.config import MoleError, TrainConfig, get_preset

    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    dense, mole = (get_preset(f"{preset_size}-{k}").replace(dtype=dtype) for k in ("dense", "mole"))
    if seq_len > mole.max_seq_len:
        raise MoleError(f"sequence length {seq_len} exceeds the model's maximum of {mole.max_seq_len}")
    mesh = sharding.make_mesh(devices)
    corpus = data.open_corpus(None, vocab_size=mole.vocab_size)
    train_windows, _ = data.split_windows(corpus.tokens.size, seq_len, 0.0)
    peak = matmul_peak_flops(dtype)
    rows: list[dict[str, Any]] = []
    for tokens in tokens_per_step:
        micro = min(tokens, micro_tokens) // seq_len
        if tokens % seq_len or micro % mesh.size or tokens // seq_len % micro:
            raise MoleError(f"{tokens} tokens per step do not split into micro-batches of {micro} sequences of "
                            f"{seq_len} tokens over {mesh.size} devices")
        tc = TrainConfig(steps=1000, batch_size=tokens // seq_len, seq_len=seq_len,
                         grad_accum=tokens // seq_len // micro)
        batches = data.Batches(corpus.tokens, train_windows, seq_len=seq_len, batch_size=tc.batch_size, seed=0,
                               vocab_size=mole.vocab_size)
        dedup_rows = train.choose_dedup_rows(batches, tc.grad_accum, mesh.size, mole.vocab_size)["rows"]
        variants = {"dense": _TrainStep(dense, tc, mesh, batches, 0),
                    "mole-dedup": _TrainStep(mole, tc, mesh, batches, dedup_rows),
                    "mole-plain": _TrainStep(mole, tc, mesh, batches, 0)}
        secs: dict[str, list[float]] = {name: [] for name in variants}
        for i in range(1 + iters):
            for name, step in variants.items():
                t = step.time_one()
                if i:  # the first round is the warmup
                    secs[name].append(t)
        for name, step in variants.items():
            rows.append({"model": name, "preset": f"{preset_size}-{name.split('-')[0]}",
                         **step.row(median(secs[name]), peak)})
            print(f"  {name} at {tokens} tokens/step: {rows[-1]['step_ms']:.0f} ms", file=sys.stderr)
        del variants
    for r in rows:
        base = next(d for d in rows if d["model"] == "dense" and d["tokens_per_step"] == r["tokens_per_step"])
        r["step_time_vs_dense"] = r["step_ms"] / base["step_ms"]
    info = machine()
    print(f"bench train: {preset_size}-dense vs {preset_size}-mole, {dtype}, seq_len {seq_len}, "
          f"{info['device_count']} x {info['device']}; matmul peak {peak / 1e9:.1f} GFLOP/s")
    print_table(rows, ["model", "tokens_per_step", "grad_accum", "step_ms", "tokens_per_s", "unique_fraction",
                       "dedup_rows", "achieved_flops_per_s", "fraction_of_peak", "step_time_vs_dense"])
    for tokens in tokens_per_step:
        r = {x["model"]: x["step_time_vs_dense"] for x in rows if x["tokens_per_step"] == tokens}
        print(f"{tokens:>7} tokens/step: MoLE/Dense step time {r['mole-dedup']:.2f}x with dedup, "
              f"{r['mole-plain']:.2f}x without")
    write_json(json_path, [{**r, **info} for r in rows])
    return rows


class _TrainStep:
    """One compiled train step of bench_train with its own state (donated and replaced at every call)."""

    def __init__(self, cfg, tc, mesh, batches, dedup_rows: int):
        from mole_jax import train

        self.cfg, self.tc, self.mesh, self.dedup_rows = cfg, tc, mesh, dedup_rows
        tx = train.make_optimizer(tc)
        shardings = train.state_shardings(cfg, tx, mesh)
        feed = train.Feeder(mesh, tc.grad_accum, tc.batch_size // tc.grad_accum, tc.seq_len)
        step = jax.jit(train.make_train_step(cfg, tc, tx, dedup_rows=dedup_rows, mesh=mesh,
                                             param_shardings=shardings.params),
                       in_shardings=(shardings, feed.sharding), out_shardings=(shardings, None), donate_argnums=0)
        self.state = train.init_state(cfg, tx, 0, shardings)
        self.batch = feed(lambda r: batches.batch(0, r))
        self.compiled = step.lower(self.state, self.batch).compile()
        self.metrics = None

    def time_one(self) -> float:
        t0 = time.perf_counter()
        self.state, self.metrics = self.compiled(self.state, self.batch)
        block(self.metrics)
        return time.perf_counter() - t0

    def row(self, secs: float, peak: float) -> dict[str, Any]:
        from mole_jax import train

        metrics = jax.device_get(self.metrics)
        tc, tokens = self.tc, self.tc.batch_size * self.tc.seq_len
        unique = float(metrics["unique_fraction"]) if self.cfg.kind == "mole" else None
        expert_rows = 1.0  # per token; with dedup the experts run on the U rows of each device's share
        if self.dedup_rows:
            overflow = float(metrics["dedup_overflow"])  # shares that took the per-token path
            share = tokens // tc.grad_accum // self.mesh.size
            expert_rows = (1 - overflow) * self.dedup_rows / share + overflow
        flops = train.train_flops_per_token(self.cfg, tc.seq_len, expert_rows) * tokens
        return {"tokens_per_step": tokens, "batch_size": tc.batch_size, "grad_accum": tc.grad_accum,
                "seq_len": tc.seq_len, "step_ms": secs * 1e3, "tokens_per_s": tokens / secs,
                "unique_fraction": unique, "dedup_rows": self.dedup_rows if self.cfg.kind == "mole" else None,
                "flops_per_step": flops, "achieved_flops_per_s": flops / secs, "matmul_peak_flops_per_s": peak,
                "fraction_of_peak": flops / secs / peak, "loss": float(metrics["loss"])}


# mole-jax bench convert --------------------------------------------------------------------------------------
def bench_convert(preset: str | None = None, vocab_sizes: Sequence[int] | None = None, dtype: str = "float16",
                  batch_rows: int | None = None, shard_rows: int | None = None,
                  json_path: str | Path | None = None) -> dict[str, Any]:
    """Conversion FLOP/s against the float32 matmul peak measured in this run, bytes written, and peak host memory
    at several vocabulary sizes; each conversion runs in a fresh process, so its ru_maxrss is its own. The largest
    vocabulary is converted twice, into files and into memory (memory://), to separate compute from storage.
    Then the latency of reading B random rows from the table against a numpy memmap of the same bytes, and every
    scheme's bytes and reconstruction error."""
    import subprocess
    import tempfile

    from mole_jax import checkpoint, lut, model
    from mole_jax.config import get_preset
    from mole_jax.convert import flops_per_row

    cpu = jax.default_backend() == "cpu"
    cfg = get_preset(preset or ("small-mole" if cpu else "mole-4e-410m"))
    if preset is None and cpu:  # small-mole at d=512: a conversion of tens of seconds on a laptop-class CPU
        cfg = cfg.replace(d_model=512, num_heads=8, ffn_dim=2048, expert_dim=2048)
    vocab_sizes = list(vocab_sizes or ([8192, 32768] if cpu else [cfg.vocab_size // 4, cfg.vocab_size]))
    if shard_rows is None and cpu and preset is None:  # 16 MiB shards: even V=8192 has several (steady state)
        shard_rows = 1024
    with jax.default_matmul_precision("highest"):  # conversion computes in true float32
        peak = matmul_peak_flops("float32")
    runs = []
    with tempfile.TemporaryDirectory(prefix="mole-jax-bench-convert-") as tmp:
        for V in vocab_sizes:
            c = cfg.replace(vocab_size=V)
            ckpt = Path(tmp) / f"ckpt-{V}"
            mngr = checkpoint.manager(ckpt / checkpoint.CHECKPOINTS, async_save=False)
            checkpoint.save(mngr, 0, model.init_params(c, seed=0), checkpoint.step_meta(c, 0))
            mngr.close()
            destinations = [("file", Path(tmp) / f"lut-{V}")] + ([("memory", f"memory://lut-{V}/")]
                                                                 if V == vocab_sizes[-1] else [])
            for kind, dest in destinations:
                job = json.dumps({"ckpt": str(ckpt), "lut": str(dest), "dtype": dtype, "batch_rows": batch_rows,
                                  "shard_rows": shard_rows})
                out = subprocess.run([sys.executable, "-c", "import sys; from mole_jax.bench import "
                                      "_convert_worker; _convert_worker(sys.argv[1])", job], capture_output=True,
                                     text=True)
                if out.returncode:
                    raise RuntimeError(f"conversion of V={V} into {kind} failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                info, flops = r["info"], V * flops_per_row(c)
                written = (sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()) if kind == "file"
                           else info["nbytes"])
                compute_s = info["last_run"]["compute_seconds_process0"]
                runs.append({"vocab_size": V, "destination": kind, "flops": flops, "seconds": r["seconds"],
                             "compute_seconds": compute_s, "achieved_flops_per_s": flops / r["seconds"],
                             "steady_flops_per_s": flops / compute_s, "fraction_of_peak": flops / r["seconds"] / peak,
                             "steady_fraction_of_peak": flops / compute_s / peak, "bytes_written": written,
                             "bytes_per_s": written / r["seconds"], "peak_rss_bytes": r["peak_rss_bytes"],
                             "embedding_bytes": V * c.d_model * 4, "shard_rows": info["shard_rows"],
                             "batch_rows": info["last_run"]["batch_rows"]})
        files = [r for r in runs if r["destination"] == "file"]
        reads = _bench_row_reads(lut.open_lut(Path(tmp) / f"lut-{vocab_sizes[-1]}"), Path(tmp))
        schemes = _bench_schemes(Path(tmp) / f"ckpt-{vocab_sizes[0]}", cfg.replace(vocab_size=vocab_sizes[0]))
    result = {"benchmark": "convert", "machine": machine(), "model": cfg.to_dict(), "dtype": dtype,
              "matmul_peak_flops_per_s": peak, **files[-1], "runs": runs,
              "peak_rss_ratio_largest_to_smallest_vocab": files[-1]["peak_rss_bytes"] / files[0]["peak_rss_bytes"],
              "row_reads": reads, "schemes": schemes}
    print(f"conversion of {cfg.num_layers} layers x {cfg.num_experts} experts, d={cfg.d_model}, F={cfg.expert_dim}, "
          f"{dtype}; float32 matmul peak {peak / 1e9:.1f} GFLOP/s ({result['machine']['device']})")
    print_table([{**r, "GFLOP": r["flops"] / 1e9, "GFLOP/s": r["achieved_flops_per_s"] / 1e9,
                  "of peak": r["fraction_of_peak"], "steady of peak": r["steady_fraction_of_peak"],
                  "MB written": r["bytes_written"] / 1e6, "MB/s": r["bytes_per_s"] / 1e6,
                  "peak RSS MB": r["peak_rss_bytes"] / 1e6, "embedding MB": r["embedding_bytes"] / 1e6} for r in runs],
                ["vocab_size", "destination", "GFLOP", "seconds", "GFLOP/s", "of peak", "steady of peak",
                 "MB written", "MB/s", "peak RSS MB", "embedding MB"])
    print("(memory: the table is held in the converting process, so its peak RSS includes the table)")
    print(f"\nreading B random rows of the V={vocab_sizes[-1]} table (median ms; memmap = the same bytes as .npy)")
    print_table(reads, ["batch", "read_stored_ms", "rows_ms", "read_stored_no_cache_ms", "memmap_ms",
                        "read_stored_over_memmap"])
    print(f"\nstorage schemes on {schemes[0]['rows']} random rows of this model (random init): bytes and "
          "reconstruction error against float32")
    print_table(schemes, ["scheme", "block", "row_bytes", "of_fp16", "rel_rms_error", "max_error_over_absmax",
                          "max_error_over_bound"])
    write_json(json_path, result)
    return result


def _convert_worker(job_json: str) -> None:
    """One conversion in this (fresh) process; prints its wall time, peak RSS and the table's description."""
    from mole_jax.convert import convert_to_lut
    from mole_jax.lut import read_info

    job = json.loads(job_json)
    t0 = time.perf_counter()
    where = convert_to_lut(job["ckpt"], job["lut"], job["dtype"], batch_rows=job["batch_rows"],
                           shard_rows=job["shard_rows"], progress=False)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak_rss_bytes(), "info": read_info(where)}))


def _bench_row_reads(table, tmp: Path, batches: Sequence[int] = (1, 8, 32), iters: int = 300) -> list[dict]:
    import numpy as np

    from mole_jax import lut

    V = table.shape[0]
    step = table.meta["shard_rows"]
    memmaps = {}
    for name, (shape, dt) in table.layout.arrays.items():  # copy shard by shard: bounded memory
        mm = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dt, shape=(V, *shape))
        for s in range(0, V, step):
            mm[s:s + step] = table.read_stored(np.arange(s, min(s + step, V)))[name]
        mm.flush()
        memmaps[name] = np.load(tmp / f"{name}.npy", mmap_mode="r")
    no_cache = lut.open_lut(table.path, cache_bytes=0)
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


DECODE_FAMILIES = {"tiny": ("tiny-dense", "tiny-moe", "tiny-mole"), "small": ("small-dense", "small-moe", "small-mole"),
                   "160m": ("dense-160m", "moe-10e-160m", "mole-4e-160m"),
                   "410m": ("dense-410m", "moe-10e-410m", "mole-4e-410m")}
DECODE_MODELS = ("dense", "moe", "moe-offload", "mole-device", "mole-host", "mole-storage")


def bench_decode(preset_size: str = "small", batch_sizes: Sequence[int] = (1, 8, 32), prompt_len: int = 512,
                 link_gbps: float = 16.0, steps: int = 50, warmup: int = 3, chunk: int = 10,
                 lut_dtype: str = "float16", dtype: str | None = None, workdir=None, json_path=None,
                 plot_path=None) -> dict:
    """The paper's Figure 3 on this machine: decode ms/step of Dense, MoE (experts resident), MoE with expert
    offloading, and MoLE with its table on the device, in host RAM and on disk; models of equal activated size with
    random weights, each step after a KV cache of `prompt_len` positions (random keys/values: a step's cost does not
    depend on them). The MoLE table is random rows of the right shape and scheme, written to disk for the timing
    (no conversion). The models take turns, `chunk` timed steps each (after `warmup` untimed ones), until each has
    `steps`: a load that drifts during the run affects them alike. modeled = compute (the same model with nothing
    to move: dense, moe, mole-device) + bytes moved per step over a `link_gbps` link: the paper's estimation."""
    import tempfile

    import numpy as np

    from mole_jax import decode, lut
    from mole_jax.config import MoleError, get_preset
    from mole_jax.model import init_params

    if preset_size not in DECODE_FAMILIES:
        raise MoleError(f"unknown preset size {preset_size!r}: choose one of {', '.join(DECODE_FAMILIES)}")
    dtype = dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    cache_len = prompt_len + warmup + chunk + 1  # as the paper's HF cache: the positions in use, no bucket
    cfgs = {}
    for kind, name in zip(("dense", "moe", "mole"), DECODE_FAMILIES[preset_size]):
        c = get_preset(name)  # a longer context than the preset's is fine for timing: RoPE has no table
        cfgs[kind] = c.replace(dtype=dtype, param_dtype=dtype, max_seq_len=max(c.max_seq_len, cache_len))
    mole = cfgs["mole"]
    L, N, D = mole.num_layers, mole.num_experts, mole.d_model
    modeled_key = f"modeled_ms_per_step_{link_gbps:g}gbps"

    def random_rows(start, stop):  # row v is the same whenever asked for (the writer re-reads rows to verify)
        return np.stack([0.05 * np.random.default_rng(v).standard_normal((L, N, D), np.float32)
                         for v in range(start, stop)])

    copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))  # steps donate the cache: each turn gets its own

    def turn(model, template, n):
        dec = model.decoder
        stamps, sent = [], []
        for _ in decode.decode_loop(dec, copy(template), warmup + n + 1, None, True):
            stamps.append(time.perf_counter())
            sent.append(dec.h2d_bytes)
        return np.diff(stamps[warmup:]).tolist(), sent[-1] - sent[warmup]

    rows, dense_times, dense_sent = [], {B: [] for B in batch_sizes}, {B: 0 for B in batch_sizes}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        t0 = time.perf_counter()
        lut.write_table(Path(tmp) / "lut", mole, lut_dtype, random_rows, source={"random": "bench decode"})
        table = lut.open_lut(Path(tmp) / "lut")
        print(f"random {lut_dtype} table {table.shape}, {table.nbytes / 2**20:.1f} MiB, "
              f"{table.row_nbytes:,} bytes/row, written in {time.perf_counter() - t0:.1f} s")
        build = {"moe": lambda: decode.LanguageModel(cfgs["moe"], init_params(cfgs["moe"], seed=1)),
                 "moe-offload": lambda: decode.LanguageModel(cfgs["moe"], init_params(cfgs["moe"], seed=1),
                                                             offload_experts=True),
                 **{f"mole-{p}": (lambda p=p: decode.LanguageModel(mole, init_params(mole, seed=2, with_experts=False),
                                                                   table=table, placement=p))
                    for p in ("device", "host", "storage")}}
        dense = decode.LanguageModel(cfgs["dense"], init_params(cfgs["dense"], seed=0))
        # Each model takes turns with dense (its own ratio is then immune to a drifting machine load), one model
        # at a time: a 160M MoLE table is 3.5 GiB per copy.
        for name in DECODE_MODELS[1:]:
            model = build[name]()
            for B in batch_sizes:
                template = decode.random_state(mole, B, prompt_len, cache_len, seed=B)  # one backbone for all
                times, sent = {name: [], "dense": []}, {name: 0, "dense": 0}
                for r in range(-(-steps // chunk)):
                    n = min(chunk, steps - len(times[name]))
                    for who, m in ((name, model), ("dense", dense))[::1 if r % 2 else -1]:
                        t, b = turn(m, template, n)
                        times[who] += t
                        sent[who] += b
                del template
                dense_times[B] += times["dense"]
                dense_sent[B] += sent["dense"]
                rows.append({"model": name, "batch_size": B, "ms_per_step": median(times[name]) * 1e3,
                             "vs_dense": median(times[name]) / median(times["dense"]),
                             "h2d_bytes_per_step": sent[name] / len(times[name]),
                             "device_param_bytes": model.device_param_bytes})
                print(f"  {name:<13} batch {B:>3}: {rows[-1]['ms_per_step']:8.3f} ms/step "
                      f"({rows[-1]['vs_dense']:.3f} x dense in the same turns), "
                      f"{rows[-1]['h2d_bytes_per_step']:,.0f} bytes/step host->device")
            del model
        rows += [{"model": "dense", "batch_size": B, "ms_per_step": median(dense_times[B]) * 1e3, "vs_dense": 1.0,
                  "h2d_bytes_per_step": dense_sent[B] / len(dense_times[B]),
                  "device_param_bytes": dense.device_param_bytes} for B in batch_sizes]
        del dense
    rows.sort(key=lambda r: (r["batch_size"], DECODE_MODELS.index(r["model"])))
    by = {(r["model"], r["batch_size"]): r for r in rows}
    resident = {"dense": "dense", "moe": "moe", "moe-offload": "moe"}
    for r in rows:
        base = by[resident.get(r["model"], "mole-device"), r["batch_size"]]
        r["compute_ms_per_step"] = base["ms_per_step"]
        r[modeled_key] = base["ms_per_step"] + r["h2d_bytes_per_step"] / (link_gbps * 1e9) * 1e3

    print("")
    print_table(rows, ["model", "batch_size", "ms_per_step", "vs_dense", "h2d_bytes_per_step", "device_param_bytes",
                       modeled_key])
    summary = {
        "mole-host / dense ms (goal <= 1.05)": {B: by["mole-host", B]["vs_dense"] for B in batch_sizes},
        "mole-storage / dense ms (goal <= 1.15)": {B: by["mole-storage", B]["vs_dense"] for B in batch_sizes},
        "mole-host / dense device bytes (goal within 2%)":
            by["mole-host", batch_sizes[0]]["device_param_bytes"] / by["dense", batch_sizes[0]]["device_param_bytes"],
        "moe-offload / mole-host h2d bytes (paper ~1,500x at 410M)": {
            B: by["moe-offload", B]["h2d_bytes_per_step"] / max(by["mole-host", B]["h2d_bytes_per_step"], 1)
            for B in batch_sizes},
    }
    for k, v in summary.items():
        print(f"{k}: " + (", ".join(f"batch {B} {x:.3g}" for B, x in v.items()) if isinstance(v, dict)
                          else f"{v:.4f}"))
    print(f"(random weights and a random {lut_dtype} table; KV cache of {prompt_len} random positions; median of "
          f"{steps} steps per model in turns of {chunk}; {dtype} on {machine()['device']})")
    payload = {"benchmark": "decode", "machine": machine(), "rows": rows, "summary": summary,
               "settings": {"preset_size": preset_size, "models": dict(zip(("dense", "moe", "mole"),
                                                                            DECODE_FAMILIES[preset_size])),
                            "batch_sizes": list(batch_sizes), "prompt_len": prompt_len, "cache_len": cache_len,
                            "steps": steps, "warmup": warmup, "chunk": chunk, "link_gbps": link_gbps,
                            "lut_dtype": lut_dtype, "dtype": dtype, "weights": "random",
                            "lut": "random rows of the right shape and scheme"}}
    write_json(json_path, payload)
    if plot_path:
        _plot_decode(rows, batch_sizes, modeled_key, plot_path)
    return payload


def _plot_decode(rows, batch_sizes, modeled_key, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install mole-jax[plot]); no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "ms_per_step", "measured"), (axes[1], modeled_key, "modeled (paper method)")):
        for name in DECODE_MODELS:
            ys = [next(r[key] for r in rows if r["model"] == name and r["batch_size"] == B) for B in batch_sizes]
            ax.plot(batch_sizes, ys, marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="ms / step", title=title)
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _bench_schemes(ckpt: Path, cfg, rows: int = 2048) -> list[dict]:
    """Every scheme's bytes per row and its measured error on float32 rows of `ckpt` (quantised exactly as the
    converter stores them: the same function, bit-identical on host and device)."""
    import numpy as np

    from mole_jax import lut
    from mole_jax.convert import lut_rows_fn, restore_table_inputs

    inputs = restore_table_inputs(ckpt, cfg)
    ids = np.random.default_rng(0).choice(cfg.vocab_size, min(rows, cfg.vocab_size), replace=False)
    with jax.default_matmul_precision("highest"):
        x = np.asarray(jax.jit(lut_rows_fn(cfg))(inputs, jnp.asarray(ids, jnp.int32)))
    fp16 = lut.make_layout("float16", cfg).row_nbytes
    out = []
    for scheme in lut.SCHEMES:
        try:
            layout = lut.make_layout(scheme, cfg)
        except Exception as e:  # e.g. nf3 needs d_model divisible by 8
            out.append({"scheme": scheme, "error": str(e)})
            continue
        err = np.abs(lut.dequantize(lut.quantize(x, scheme, layout.block), scheme).astype(np.float64) - x)
        bound = lut.error_bound(x, scheme, layout.block)
        out.append({"scheme": scheme, "block": layout.block or None, "row_bytes": layout.row_nbytes,
                    "of_fp16": layout.row_nbytes / fp16, "rows": len(ids),
                    "rel_rms_error": float(np.sqrt(np.mean(err ** 2) / np.mean(x.astype(np.float64) ** 2))),
                    "max_error_over_absmax": float(err.max() / np.abs(x).max()),
                    "max_error_over_bound": float(np.max(err / np.maximum(bound, 1e-30)))})
    return out
