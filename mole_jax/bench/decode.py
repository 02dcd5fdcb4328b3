"""`mole-jax bench decode`: the paper's Figure 3 on this machine: decode ms/step and bytes moved per step of Dense,
MoE (resident and offloaded) and MoLE (its table on the device, in host memory, on disk cold and warm).

Every step decodes text: its next tokens are a stretch of the embedded corpus's held-out windows (teacher forcing on
the device: the step still samples its own tokens), a different stretch every turn. A model whose program reads
every row itself runs `steps_per_dispatch` steps per dispatch (chunked_loop), and is timed against Dense at the
same K; a table the host fetches for runs one step per dispatch and waits for each step's tokens, timed against
Dense at its default K (Dense's fastest path). Rows:
    dense, dense-k1          Dense at the default K and at one step per dispatch
    moe, moe-offload         the resident MoE; the paper's expert-offloading baseline (one step per dispatch)
    mole-device              the table in device memory
    mole-host, mole-host-k1  the table in host memory, read by the step itself (default K, and K = 1)
    mole-host-gather         the host gathers each step's rows and puts them (one round trip per step)
    mole-storage             on CPU the table's files mapped, read by the step itself, cold; elsewhere batched
    mole-storage-warm        the same, warm (page cache and, for batched reads, Tensorstore's cache pool)
    mole-storage-batched     one batched Tensorstore read per step, cold
    mole-storage-tier        batched reads behind a device tier of the most frequent ids, cold
Cold: before each turn the table's files are dropped from the page cache (and a mapping's pages from the
process), and batched reads have no Tensorstore cache pool. The batched cold reads are recorded and replayed
against a thread-pool `pread` of the same byte ranges (`bench.storage.storage_floor`): the rows/s a reader could
reach on this disk.

`models` picks a subset of the rows (Dense still takes its turns with each of them). With `isolate` (the default
at ISOLATED_SIZES) each chosen model runs in a process of its own (bench/decode_worker.py, Dense built beside it
for its turns), and each row records `peak_rss_bytes`: the peak resident memory of that process after the model
alone ran an untimed turn at every batch size, before its Dense partner was built (`dense`: Dense alone).
One process per model is what lets a 410M or 1B comparison fit a 24 GB machine (a resident MoE-10E of 410M is
~8 GB of float32, the host placement's table 10 GB), and what makes a row's memory its own: a process that built
the models before it keeps their heap, its page-cache mappings and its compiled programs. The cost is a Python
and JAX start and Dense's compilation per model (10-20 s each at the small sizes): below 410M the whole
comparison fits one process (160M: 3.5 GiB per table copy) and runs there by default, each row then recording the
process's running peak."""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mole_jax.bench.storage import ColdTable, storage_floor
from mole_jax.bench.tools import (drop_page_cache, machine, median, peak_rss_bytes, print_table, release_mapped,
                                  write_json)
from mole_jax import data
from mole_jax.config import ModelConfig, MoleError, get_preset
from mole_jax.decode import LanguageModel
from mole_jax.decoder import DEFAULT_STEPS_PER_DISPATCH, chunked_loop, decode_loop, random_state
from mole_jax.lut import LookupTable, open_lut
from mole_jax.lut_writer import write_table
from mole_jax.model import init_params
from mole_jax.row_sources import tier_ids
from mole_jax.sampling import make_sampler

DECODE_FAMILIES = {"tiny": ("tiny-dense", "tiny-moe", "tiny-mole"), "small": ("small-dense", "small-moe", "small-mole"),
                   "160m": ("dense-160m", "moe-10e-160m", "mole-4e-160m"),
                   "410m": ("dense-410m", "moe-10e-410m", "mole-4e-410m"),
                   "1b": ("dense-1b", "moe-10e-1b", "mole-4e-1b")}
DECODE_MODELS = ("dense", "dense-k1", "moe", "moe-offload", "mole-device", "mole-host", "mole-host-k1",
                 "mole-host-gather", "mole-storage", "mole-storage-warm", "mole-storage-batched", "mole-storage-tier")
CACHE = {"mole-storage": "cold", "mole-storage-batched": "cold", "mole-storage-tier": "cold",
         "mole-storage-warm": "warm"}  # the rest: no storage
K1 = ("dense-k1", "mole-host-k1")  # one step per dispatch by choice
ISOLATED_SIZES = ("410m", "1b")  # isolate=None: one process per model at these sizes (see the module docstring)
WORKER = "mole_jax.bench.decode_worker"  # `python -m WORKER JOB_JSON`: one model's rows in a process of its own
SAMPLE_TOP_K = 64  # every turn samples its tokens (temperature 1, top-k), each turn from its own seed

_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))  # steps donate the cache: each turn gets its own


@dataclasses.dataclass(frozen=True)
class Turns:
    """How the models take turns: `steps` timed steps per (model, batch size), in turns of `chunk`, each turn
    after `warmup` untimed steps, from a KV cache filled to `prompt_len` of `cache_len` positions, sampling with
    `sampler` (on the device), each step's next tokens `text_N` from a start that depends on the turn (None: the
    model's own tokens)."""
    steps: int
    chunk: int
    warmup: int
    prompt_len: int
    cache_len: int
    steps_per_dispatch: int
    sampler: Any = None
    text_N: np.ndarray | None = None


def bench_decode(preset_size: str = "small", *, batch_sizes: Sequence[int] = (1, 8, 32), prompt_len: int = 512,
                 link_gbps: float = 16.0, steps: int = 64, warmup: int = 16, chunk: int = 32,
                 lut_dtype: str = "float16", dtype: str | None = None, device_rows: int | None = None,
                 steps_per_dispatch: int = DEFAULT_STEPS_PER_DISPATCH, models: Sequence[str] | None = None,
                 isolate: bool | None = None, workdir=None, json_path=None, plot_path=None,
                 profile_dir=None) -> dict:
    """The paper's Figure 3 on this machine: decode ms/step of Dense, MoE (experts resident), MoE with expert
    offloading, and MoLE with its table on the device, in host RAM and on disk; models of equal activated size with
    random weights, each step after a KV cache of `prompt_len` positions (random keys/values: a step's cost does not
    depend on them). The MoLE table is random rows of the right shape and scheme, written to disk for the timing
    (no conversion). The models take turns, `chunk` timed steps each (after `warmup` untimed ones), until each has
    `steps`: a load that drifts during the run affects them alike. modeled = compute (the same model with nothing
    to move: dense, moe, mole-device) + bytes moved per step over a `link_gbps` link: the paper's estimation.
    steps_per_dispatch: K of the chunked rows (a turn's steps and warmup are rounded up to whole chunks).
    models: the rows to measure (names of DECODE_MODELS; None: all). isolate: each model in a process of its own,
    with its peak resident memory (see the module docstring); False: all in this one, whose running peak each row
    then records; None: isolated at ISOLATED_SIZES.
    profile_dir: after each row's timing, a jax.profiler trace of a few of its decode steps (`profile_turn`) in
    profile_dir/MODEL-batchB."""
    models = check_models(models)
    if preset_size not in DECODE_FAMILIES:
        raise MoleError(f"unknown preset size {preset_size!r}: choose one of {', '.join(DECODE_FAMILIES)}")
    isolate = preset_size in ISOLATED_SIZES if isolate is None else bool(isolate)
    if device_rows is not None and device_rows < 1:
        raise MoleError(f"--device-rows must be a positive number of table rows, got {device_rows}")
    dtype = dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    if isinstance(steps_per_dispatch, bool) or steps_per_dispatch < 1:
        raise MoleError(f"--steps-per-dispatch must be a positive integer, got {steps_per_dispatch}")
    K = steps_per_dispatch
    chunk, warmup = -(-chunk // K) * K, -(-warmup // K) * K  # whole chunks
    cache_len = prompt_len + warmup + chunk + 1  # as the paper's HF cache: the positions in use
    cfgs = _configs(preset_size, dtype, cache_len)
    turns = Turns(steps, chunk, warmup, prompt_len, cache_len, K,
                  jax.device_put(make_sampler(1.0, SAMPLE_TOP_K, 1.0, cfgs["mole"].vocab_size)),
                  _held_out_text(cfgs["mole"].vocab_size)[1])
    modeled_key = f"modeled_ms_per_step_{link_gbps:g}gbps"
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        table = _random_table(Path(tmp) / "lut", cfgs["mole"], lut_dtype)
        cold = ColdTable(Path(tmp) / "lut")
        cold_check = cold.check_cold()
        print(f"page cache dropped: first read of {cold_check['file']} ({cold_check['bytes'] / 2**20:.1f} MiB) "
              f"{cold_check['first_read_mb_per_s']:.0f} MB/s, second read {cold_check['second_read_mb_per_s']:.0f} "
              "MB/s")
        if isolate:
            rows, floor = _measure_isolated(models, preset_size, dtype, Path(tmp) / "lut", batch_sizes, turns,
                                            device_rows, profile_dir)
        else:
            rows = _measure(cfgs, table, cold, batch_sizes, turns, device_rows, models, profile_dir)
            floor = storage_floor(cold)
    by = _derive(rows, modeled_key, link_gbps, np.dtype(lut_dtype).itemsize / np.dtype(dtype).itemsize)

    print("")
    for r in rows:
        r["peak_rss_mb"] = r["peak_rss_bytes"] / 2 ** 20
    print_table(rows, ["model", "batch_size", "steps_per_dispatch", "cache", "ms_per_step", "vs_dense",
                       "h2d_bytes_per_step",
                       "h2d_bytes_per_step_as_lut_dtype", "device_param_bytes", modeled_key, "peak_rss_mb"])
    summary = _summary(by, batch_sizes, floor, lut_dtype)
    print(f"(random weights and a random {lut_dtype} table; KV cache of {prompt_len} random positions; each step "
          f"samples (top-k {SAMPLE_TOP_K}) and is fed held-out text, a new stretch every turn; median of {steps} "
          f"steps per model in turns of {chunk}; {dtype} on {machine()['device']})")
    payload = {"benchmark": "decode", "machine": machine(), "rows": rows, "summary": summary,
               "storage": {"cold_check": cold_check, "floor": floor},
               "settings": {"preset_size": preset_size, "models": dict(zip(("dense", "moe", "mole"),
                                                                            DECODE_FAMILIES[preset_size])),
                            "batch_sizes": list(batch_sizes), "prompt_len": prompt_len, "cache_len": cache_len,
                            "rows": list(models), "isolate": isolate,
                            "peak_rss": "each model's own process (isolate): its peak resident memory after the "
                                        "model alone ran an untimed turn at every batch size, before Dense was "
                                        "built beside it" if isolate else
                                        "one process for every row: the process's peak so far after each "
                                        "model's untimed turns (cumulative)",
                            "steps": steps, "warmup": warmup, "chunk": chunk, "steps_per_dispatch": K,
                            "link_gbps": link_gbps,
                            "lut_dtype": lut_dtype, "dtype": dtype, "weights": "random",
                            "device_rows": _tier_rows(cfgs["mole"].vocab_size, device_rows),
                            "lut": "random rows of the right shape and scheme",
                            "tokens": f"each step samples (temperature 1, top-k {SAMPLE_TOP_K}) and is then fed the "
                                      "next tokens of held-out text (the embedded corpus's validation windows), "
                                      "a new stretch every turn",
                            "vs_dense": "each model in turns with Dense at the same steps per dispatch (a table "
                                        "the host fetches for: Dense at the default K)",
                            "tier_order": "token counts of the embedded corpus's training windows",
                            "cold": "page cache dropped before each turn (posix_fadvise DONTNEED; a mapping's "
                                    "pages released first, madvise DONTNEED), no Tensorstore cache pool"}}
    write_json(json_path, payload)
    if plot_path:
        _plot_decode(rows, batch_sizes, modeled_key, plot_path)
    return payload


def _derive(rows: list[dict], modeled_key: str, link_gbps: float, lut_per_param: float) -> dict:
    """Sort the rows and add what follows from them: the compute of the same model with nothing to move, the
    modeled time, the bytes moved like for like. Returns them by (model, batch size)."""
    rows.sort(key=lambda r: (r["batch_size"], DECODE_MODELS.index(r["model"])))
    by = {(r["model"], r["batch_size"]): r for r in rows}
    resident = {"dense": "dense", "dense-k1": "dense", "moe": "moe", "moe-offload": "moe"}
    for r in rows:
        base = by.get((resident.get(r["model"], "mole-device"), r["batch_size"]))  # absent from a --models subset
        r["compute_ms_per_step"] = base and base["ms_per_step"]
        r[modeled_key] = base and base["ms_per_step"] + r["h2d_bytes_per_step"] / (link_gbps * 1e9) * 1e3
        # like for like: the offloaded experts as if stored in the table's dtype (MoLE's rows already are)
        r["h2d_bytes_per_step_as_lut_dtype"] = r["h2d_bytes_per_step"] * (
            lut_per_param if r["model"] == "moe-offload" else 1.0)
    return by


def _configs(preset_size: str, dtype: str, cache_len: int) -> dict[str, ModelConfig]:
    cfgs = {}
    for kind, name in zip(("dense", "moe", "mole"), DECODE_FAMILIES[preset_size]):
        c = get_preset(name)  # a longer context than the preset's is fine for timing: RoPE has no table
        cfgs[kind] = c.replace(dtype=dtype, param_dtype=dtype, max_seq_len=max(c.max_seq_len, cache_len))
    return cfgs


def _random_table(path: Path, mole: ModelConfig, lut_dtype: str) -> LookupTable:
    """A table of random rows of MoLE's shape, stored with `lut_dtype`, written to `path` and opened."""
    L, N, D = mole.num_layers, mole.num_experts, mole.d_model
    # Row v is pool row v mod P, so it is the same whenever asked for (the writer re-reads rows to verify), and a
    # 160M table (50k rows of 37k values) is written in seconds; timing does not depend on the values.
    pool_PxLxNxD = 0.05 * np.random.default_rng(0).standard_normal((min(256, mole.vocab_size), L, N, D), np.float32)

    def random_rows(start, stop):
        return pool_PxLxNxD[np.arange(start, stop) % len(pool_PxLxNxD)]

    t0 = time.perf_counter()
    write_table(path, mole, lut_dtype, random_rows, source={"random": "bench decode"})
    table = open_lut(path)
    print(f"random {lut_dtype} table {table.shape}, {table.nbytes / 2**20:.1f} MiB, "
          f"{table.row_nbytes:,} bytes/row, written in {time.perf_counter() - t0:.1f} s")
    return table


def _model_builders(cfgs: dict[str, ModelConfig], table: LookupTable, cold: ColdTable | None = None,
                    device_rows: int | None = None, K: int = DEFAULT_STEPS_PER_DISPATCH
                    ) -> dict[str, Callable[[], LanguageModel]]:
    """Every model but Dense, built when its turn comes: a 160M MoLE table is 3.5 GiB per copy. `cold`: the table
    of the cold storage rows (CACHE), `table` the warm one."""
    moe, mole, dense = cfgs["moe"], cfgs["mole"], cfgs["dense"]
    cold = table if cold is None else cold

    def mole_model(placement: str, lut, **kw) -> Callable[[], LanguageModel]:
        kw = {"steps_per_dispatch": K, **kw}
        return lambda: LanguageModel(mole, init_params(mole, seed=2, with_experts=False), table=lut,
                                     placement=placement, **kw)

    # the resident MoE on its fastest exact path: on CPU one buffer per expert (no copy of a chosen expert per step)
    return {"dense-k1": lambda: LanguageModel(dense, init_params(dense, seed=0), steps_per_dispatch=1),
            "moe": lambda: LanguageModel(moe, init_params(moe, seed=1), steps_per_dispatch=K),
            "moe-offload": lambda: LanguageModel(moe, init_params(moe, seed=1), offload_experts=True),
            "mole-device": mole_model("device", table), "mole-host": mole_model("host", table),
            "mole-host-k1": mole_model("host", table, steps_per_dispatch=1),
            "mole-host-gather": mole_model("host", table, host_read="gather"),
            "mole-storage": mole_model("storage", cold), "mole-storage-warm": mole_model("storage", table),
            "mole-storage-batched": mole_model("storage", cold, storage_read="batched"),
            "mole-storage-tier": lambda: _tiered(mole, cold, "storage", device_rows)}


def _tier_rows(vocab_size: int, device_rows: int | None) -> int:
    return min(device_rows or max(1, vocab_size // 10), vocab_size)


def _tiered(mole: ModelConfig, table, placement: str, device_rows: int | None = None) -> LanguageModel:
    """MoLE with a device tier of `device_rows` (default 10% of the vocabulary) of the ids most frequent in the
    embedded corpus's training windows (tokenised by a BPE trained to the preset's vocabulary: the random table has
    no training data of its own); the timed steps read its held-out windows."""
    V = mole.vocab_size
    tier_K = tier_ids(_held_out_text(V)[0], _tier_rows(V, device_rows), V)
    return LanguageModel(mole, init_params(mole, seed=2, with_experts=False), table=table, placement=placement,
                         tier_K=tier_K)


@functools.lru_cache(maxsize=4)
def _held_out_text(vocab_size: int, seq_len: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The embedded corpus tokenised to `vocab_size` ids: the token counts [V] of its training windows, and its
    validation windows' tokens [N] in a row (the text the timed steps are fed)."""
    tokens = data.open_corpus(None, vocab_size=vocab_size).tokens
    _, val = data.split_windows(tokens.size, seq_len, 0.1)
    counts_V = data.token_counts(tokens, vocab_size, seq_len=seq_len, exclude_windows=val)
    return counts_V, np.concatenate([tokens[w * seq_len:(w + 1) * seq_len] for w in val]).astype(np.int32)


def check_models(models: Sequence[str] | None) -> tuple[str, ...]:
    """The chosen rows in DECODE_MODELS's order (None: all); an unknown or missing name is one line."""
    if models is None:
        return DECODE_MODELS
    names = [m.strip() for m in models if m.strip()] if not isinstance(models, str) else \
        [m.strip() for m in models.split(",") if m.strip()]
    unknown = [m for m in names if m not in DECODE_MODELS]
    if unknown or not names:
        what = f"unknown model {unknown[0]!r}" if unknown else "no model given"
        raise MoleError(f"--models: {what}: choose from {', '.join(DECODE_MODELS)}")
    return tuple(m for m in DECODE_MODELS if m in names)


_ALONE_SEED = 1 << 20  # the untimed turns of a model alone read their own stretch of text


def _measure_model(name: str, cfgs: dict[str, ModelConfig], table: LookupTable, cold: ColdTable,
                   batch_sizes: Sequence[int], turns: Turns, device_rows: int | None = None,
                   dense: LanguageModel | None = None, dense_turns: bool = True,
                   profile_dir: str | Path | None = None) -> dict[str, Any]:
    """One model's rows, each batch size in turns with Dense at the model's steps per dispatch (its ratio is then
    immune to a drifting machine load). First the model alone runs one untimed turn at every batch size (compiling
    its programs), and `peak_rss_bytes` is this process's peak then, before Dense is built beside it (`dense`:
    one already built, else built here). For "dense" itself: Dense alone, its peak and (dense_turns) its own timed
    turns. Returns the rows and Dense's times and bytes per batch size (pooled over models by the caller).
    profile_dir: each row's steps traced after its timing and counts (profile_turn), and Dense's once per batch
    size."""
    K = turns.steps_per_dispatch
    build = _model_builders(cfgs, table, cold, device_rows, K)

    def make_dense() -> LanguageModel:
        return LanguageModel(cfgs["dense"], init_params(cfgs["dense"], seed=0), steps_per_dispatch=K)

    model = (dense or make_dense()) if name == "dense" else build[name]()
    for B in batch_sizes:
        template = random_state(cfgs["mole"], B, turns.prompt_len, turns.cache_len, seed=B)  # one backbone
        time_turn(model, template, turns.steps_per_dispatch, turns.warmup, sampler=turns.sampler, seed=_ALONE_SEED,
                  text_N=turns.text_N)  # a chunk after the warmup: every program of a turn has run
        del template
    out = {"rows": [], "dense_times": {B: [] for B in batch_sizes}, "dense_sent": {B: 0 for B in batch_sizes},
           "peak_rss_bytes": peak_rss_bytes(), "dense_device_param_bytes": None}
    if name == "dense":
        out["dense_device_param_bytes"] = model.device_param_bytes
        for B in batch_sizes if dense_turns else ():
            template = random_state(cfgs["mole"], B, turns.prompt_len, turns.cache_len, seed=B)
            for r in range(-(-turns.steps // turns.chunk)):
                n = min(turns.chunk, turns.steps - len(out["dense_times"][B]))
                t, b = time_turn(model, template, n, turns.warmup, sampler=turns.sampler, seed=r, text_N=turns.text_N)
                out["dense_times"][B] += t
                out["dense_sent"][B] += b
            del template
        return out
    dense = dense or make_dense()
    ref = build["dense-k1"]() if name in K1 and name != "dense-k1" else dense
    out["dense_device_param_bytes"] = dense.device_param_bytes
    for B in batch_sizes:
        template = random_state(cfgs["mole"], B, turns.prompt_len, turns.cache_len, seed=B)  # one backbone
        before = (lambda: _make_cold(model, cold, (name, B))) if CACHE.get(name) == "cold" else None
        tier = getattr(model.decoder, "tier_counts", None)  # a device tier's lookups: this batch size's hit rate
        hits0, tokens0 = (tier.hits, tier.tokens) if tier else (0, 0)
        times, sent = time_against_dense(name, model, ref, template, turns, before=before)
        del template
        if ref is dense:
            out["dense_times"][B] += times["dense"]
            out["dense_sent"][B] += sent["dense"]
        row = {"model": name, "batch_size": B, "steps_per_dispatch": _steps_per_dispatch(model),
               "ms_per_step": median(times[name]) * 1e3,
               "vs_dense": median(times[name]) / median(times["dense"]),
               "dense_steps_per_dispatch": _steps_per_dispatch(ref),
               "h2d_bytes_per_step": sent[name] / len(times[name]),
               "device_param_bytes": model.device_param_bytes, "cache": CACHE.get(name),
               "reread_fraction": cold.reread_fraction((name, B)) if before else None,
               "hit_rate": (tier.hits - hits0) / max(tier.tokens - tokens0, 1) if tier else None,
               "peak_rss_bytes": out["peak_rss_bytes"]}
        out["rows"].append(row)
        print(f"  {name:<20} batch {B:>3}: {row['ms_per_step']:8.3f} ms/step ({row['vs_dense']:.3f} x dense in the "
              f"same turns), {row['h2d_bytes_per_step']:,.0f} bytes/step host->device, peak RSS "
              f"{row['peak_rss_bytes'] / 2**20:,.0f} MiB")
        if profile_dir is not None:  # after the row's counts (hit rate, rereads) are taken
            template = random_state(cfgs["mole"], B, turns.prompt_len, turns.cache_len, seed=B)
            profile_turn(model, template, turns, Path(profile_dir) / f"{name}-batch{B}", before=before)
            if not (Path(profile_dir) / f"dense-batch{B}").exists():
                profile_turn(dense, template, turns, Path(profile_dir) / f"dense-batch{B}")
            del template
    return out


def _dense_rows(results: list[dict[str, Any]], batch_sizes: Sequence[int], K: int, peak: int | None) -> list[dict]:
    """The `dense` rows: Dense's times pooled over every model's turns with it (or Dense's own turns, when no
    model took turns with it)."""
    times = {B: [t for r in results for t in r["dense_times"][B]] for B in batch_sizes}
    sent = {B: sum(r["dense_sent"][B] for r in results) for B in batch_sizes}
    device_bytes = next(r["dense_device_param_bytes"] for r in results if r["dense_device_param_bytes"] is not None)
    return [{"model": "dense", "batch_size": B, "steps_per_dispatch": K, "ms_per_step": median(times[B]) * 1e3,
             "vs_dense": 1.0, "dense_steps_per_dispatch": K, "h2d_bytes_per_step": sent[B] / len(times[B]),
             "device_param_bytes": device_bytes, "cache": None, "reread_fraction": None, "hit_rate": None,
             "peak_rss_bytes": peak} for B in batch_sizes]


def _measure(cfgs: dict[str, ModelConfig], table: LookupTable, cold: ColdTable, batch_sizes: Sequence[int],
             turns: Turns, device_rows: int | None = None, models: Sequence[str] = DECODE_MODELS,
             profile_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per (model, batch size), every model in this process, one at a time, each with the one Dense.
    Dense's own turns run only when no chosen model takes turns with it."""
    K = turns.steps_per_dispatch
    dense = LanguageModel(cfgs["dense"], init_params(cfgs["dense"], seed=0), steps_per_dispatch=K)
    results = []
    for name in models:
        if name != "dense":
            results.append(_measure_model(name, cfgs, table, cold, batch_sizes, turns, device_rows, dense,
                                          profile_dir=profile_dir))
    if "dense" not in models:
        return [row for r in results for row in r["rows"]]
    if not any(r["dense_times"][batch_sizes[0]] for r in results):
        results.append(_measure_model("dense", cfgs, table, cold, batch_sizes, turns, device_rows, dense))
    return [row for r in results for row in r["rows"]] + _dense_rows(results, batch_sizes, K, peak_rss_bytes())


def _measure_isolated(models: Sequence[str], preset_size: str, dtype: str, table_dir: Path,
                      batch_sizes: Sequence[int], turns: Turns, device_rows: int | None,
                      profile_dir: str | Path | None = None) -> tuple[list[dict[str, Any]], dict]:
    """Each chosen model in a process of its own (bench/decode_worker.py; "dense": Dense alone). The rows, and the
    cold batched reads' floor of the first model that made such reads."""
    partnered = any(m != "dense" and m not in K1 for m in models)  # Dense's times come from its partners' turns
    job = {"preset_size": preset_size, "dtype": dtype, "table": str(table_dir), "batch_sizes": list(batch_sizes),
           "device_rows": device_rows, "dense_turns": not partnered,
           "profile_dir": None if profile_dir is None else str(profile_dir),
           "turns": {f.name: getattr(turns, f.name) for f in dataclasses.fields(Turns)
                     if f.name not in ("sampler", "text_N")}}
    results, floor = {}, {}
    for name in models:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", WORKER, json.dumps({**job, "model": name})],
                             capture_output=True, text=True)
        sys.stdout.write("".join(line + "\n" for line in out.stdout.splitlines()[:-1]))  # the worker's progress
        if out.returncode:
            raise RuntimeError(f"bench decode: the {name} process failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        results[name]["dense_times"] = {int(B): t for B, t in results[name]["dense_times"].items()}
        results[name]["dense_sent"] = {int(B): n for B, n in results[name]["dense_sent"].items()}
        floor = floor or results[name].pop("floor")
        print(f"  ({name}: its own process, {time.perf_counter() - t0:.0f} s, peak RSS "
              f"{results[name]['peak_rss_bytes'] / 2**20:,.0f} MiB)")
    rows = [row for name in models if name != "dense" for row in results[name]["rows"]]
    if "dense" in models:
        rows += _dense_rows(list(results.values()), batch_sizes, turns.steps_per_dispatch,
                            results["dense"]["peak_rss_bytes"])
    return rows, floor


def run_worker(job: dict[str, Any]) -> dict[str, Any]:
    """One model's rows in this process (bench/decode_worker.py): what `_measure_model` returns, with the cold
    batched reads' floor."""
    t = job["turns"]
    cfgs = _configs(job["preset_size"], job["dtype"], t["cache_len"])
    V = cfgs["mole"].vocab_size
    turns = Turns(**t, sampler=jax.device_put(make_sampler(1.0, SAMPLE_TOP_K, 1.0, V)), text_N=_held_out_text(V)[1])
    table, cold = open_lut(job["table"]), ColdTable(job["table"])
    out = _measure_model(job["model"], cfgs, table, cold, job["batch_sizes"], turns, job["device_rows"],
                         dense_turns=job.get("dense_turns", True), profile_dir=job.get("profile_dir"))
    return {**out, "floor": storage_floor(cold)}


def profile_turn(model: LanguageModel, template, turns: Turns, directory: Path, *,
                 before: Callable[[], Any] | None = None) -> Path:
    """A jax.profiler trace of a turn of two dispatches' worth of decode steps (at least 8, at most a timed turn
    and its warmup: what the KV cache holds) of a model that has run already (compiled: no compilation in the
    trace), taken apart from the timed turns so that the profiler does not slow them; `before` runs first, outside
    the trace (a cold turn's page-cache drop). Written in `directory` (TensorBoard's profile plugin reads
    directory/plugins/profile; the *.trace.json.gz there opens in ui.perfetto.dev). Returns `directory`."""
    if before is not None:
        before()
    directory.mkdir(parents=True, exist_ok=True)
    steps = min(max(2 * _steps_per_dispatch(model), 8), turns.warmup + turns.chunk)  # within the KV cache
    with jax.profiler.trace(str(directory)):
        with jax.profiler.TraceAnnotation(f"decode {directory.name}"):
            time_turn(model, template, steps, 0, sampler=turns.sampler, text_N=turns.text_N)
    return directory


def _steps_per_dispatch(model: LanguageModel) -> int:
    dec = model.decoder
    return dec.steps_per_dispatch if getattr(dec, "chunked", False) else 1


def _make_cold(model: LanguageModel, cold: ColdTable, label) -> None:
    """Before a cold turn: a mapped table's pages released from this process, then the files dropped from the page
    cache (a batched reader's reads are recorded under `label`)."""
    reader = getattr(model.decoder, "reader", None)
    if reader is not None:
        release_mapped(reader.stored.values())
        drop_page_cache(cold.root)
    else:
        cold.drop(label)


def time_against_dense(name: str, model: LanguageModel, dense: LanguageModel, template, turns: Turns, *,
                       before: Callable[[], Any] | None = None) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per step and bytes moved host->device of `model` and of Dense, in alternating turns (who goes
    first alternates too). Every round of turns samples from its own seed and reads its own stretch of
    `turns.text_N`, the same for both; `before` runs before each of the model's turns, outside the timing
    (dropping the page cache)."""
    times, sent = {name: [], "dense": []}, {name: 0, "dense": 0}
    for r in range(-(-turns.steps // turns.chunk)):
        n = min(turns.chunk, turns.steps - len(times[name]))
        for who, m in ((name, model), ("dense", dense))[::1 if r % 2 else -1]:
            if who == name and before is not None:
                before()
            t, b = time_turn(m, template, n, turns.warmup, sampler=turns.sampler, seed=r, text_N=turns.text_N)
            times[who] += t
            sent[who] += b
    return times, sent


def time_turn(model: LanguageModel, template, n: int, warmup: int, *, sampler=None, seed: int = 0,
              text_N: np.ndarray | None = None) -> tuple[list[float], int]:
    """`n` timed decode steps after `warmup` untimed ones, from a copy of `template` (greedy without a sampler,
    else sampled from `seed`; with `text_N`, fed a stretch of it chosen by `seed`): their seconds and the bytes
    they moved host->device. A chunked decoder's tokens arrive a chunk at a time (the first when the host has read
    the chunk): each of a chunk's steps is credited an equal share of the time since the previous chunk arrived."""
    dec = model.decoder
    state = _copy(template)
    if sampler is not None:
        state = state._replace(key=jax.random.key(seed))
    chunked = getattr(dec, "chunked", False)
    if chunked:
        text_SxB = None if text_N is None else _text_ids(text_N, warmup + n + 1, state.ids_Bx1.shape[0], seed, True)
        if text_SxB is not None:
            state = state._replace(ids_Bx1=text_SxB[0][:, None])
        loop = chunked_loop(dec, state, warmup + n + 1, sampler, sampler is None, forced_SxB=text_SxB)
    else:
        if text_N is not None:
            dec = _TextFed(dec, _text_ids(text_N, warmup + n + 1, state.ids_Bx1.shape[0], seed), state)
            state = dec.first(state)
        loop = decode_loop(dec, state, warmup + n + 1, sampler, sampler is None)
    stamps, sent = [], []
    for _ in loop:
        stamps.append(time.perf_counter())
        sent.append(dec.h2d_bytes)
    K = dec.steps_per_dispatch if chunked else 1
    starts = [0] + list(range(1, len(stamps), K))  # the prefill's token, then each dispatch's first token
    per_step: list[float] = []
    for s0, s1 in zip(starts, starts[1:]):
        if s1 > warmup:  # the time since the previous arrival, shared by the steps that arrived
            n1 = min(K, len(stamps) - s1)
            per_step += [(stamps[s1] - stamps[s0]) / n1] * n1
    return per_step, sent[-1] - sent[warmup]


def _text_ids(text_N: np.ndarray, num_steps: int, batch: int, seed: int, stacked: bool = False):
    """`num_steps` arrays [batch, 1] on the device (stacked: one array [num_steps, batch]), row b a stretch of text
    from its own start (drawn from `seed`): put before the timing, so that feeding them moves nothing."""
    starts_B = np.random.default_rng([seed, batch]).integers(0, text_N.size - num_steps, batch)
    ids_SxB = text_N[starts_B[None, :] + np.arange(num_steps)[:, None]]
    return jax.device_put(ids_SxB) if stacked else jax.device_put(list(ids_SxB[:, :, None]))


class _TextFed:
    """A decoder (decoder.StepDecoder) whose steps' next tokens are given text instead of the tokens they
    sampled. The host still waits for each step's own tokens where a decode reads them (after dispatching what
    needs no ids): the text is on the device in advance, and reading it alone would let the host run ahead."""

    def __init__(self, inner, text_S: list[jax.Array], state):
        self.inner, self.text_S, self._t, self._own = inner, text_S, 0, state.ids_Bx1

    def __getattr__(self, name):  # params, h2d_bytes, device_param_bytes, ...
        return getattr(self.inner, name)

    def first(self, state):
        return state._replace(ids_Bx1=self.text_S[0])

    def begin(self, state, sampler, greedy):
        pending = self.inner.begin(state, sampler, greedy)
        jax.block_until_ready(self._own)  # where decode_loop would wait for the step's tokens
        return pending

    def finish(self, pending, ids_B, sampler, greedy):
        state = self.inner.finish(pending, ids_B, sampler, greedy)
        self._t += 1
        self._own = state.ids_Bx1
        if self._t == len(self.text_S) - 1:  # the loop's last read: no begin() comes before it
            jax.block_until_ready(self._own)
        return state._replace(ids_Bx1=self.text_S[self._t])


def _summary(by: dict, batch_sizes: Sequence[int], floor: dict, lut_dtype: str) -> dict[str, Any]:
    """The ratios that summarise the run, printed and returned: those whose rows were measured (--models)."""
    def per_batch(fn, *need):
        if not all((m, B) in by for m in need for B in batch_sizes):
            return None
        return {B: fn(B) for B in batch_sizes}

    def vs_dense(model):
        return per_batch(lambda B: by[model, B]["vs_dense"], model)

    B0 = batch_sizes[0]
    summary = {
        # each against Dense in its own turns at the same steps per dispatch
        "mole-host / dense ms": vs_dense("mole-host"),
        "mole-host-k1 / dense-k1 ms (one step per dispatch)": vs_dense("mole-host-k1"),
        "dense-k1 / dense ms (what chunking saves)": vs_dense("dense-k1"),
        "mole-host-gather / dense ms (the host's round trip)": vs_dense("mole-host-gather"),
        "mole-storage (cold) / dense ms": vs_dense("mole-storage"),
        "mole-storage-warm / dense ms": vs_dense("mole-storage-warm"),
        "mole-storage-batched (cold) / dense ms": vs_dense("mole-storage-batched"),
        "mole-storage-batched (cold): rows re-read within a turn": per_batch(
            lambda B: by["mole-storage-batched", B]["reread_fraction"], "mole-storage-batched"),
        # each against Dense in its own turns: the ratio of two medians taken minutes apart would carry the drift
        "moe / moe-offload ms, each vs dense in its turns": per_batch(
            lambda B: by["moe", B]["vs_dense"] / by["moe-offload", B]["vs_dense"], "moe", "moe-offload"),
        "mole-host / dense device bytes": (
            by["mole-host", B0]["device_param_bytes"] / by["dense", B0]["device_param_bytes"]
            if ("mole-host", B0) in by and ("dense", B0) in by else None),
        "moe-offload / mole-host h2d bytes, as stored": per_batch(
            lambda B: by["moe-offload", B]["h2d_bytes_per_step"] / max(by["mole-host", B]["h2d_bytes_per_step"], 1),
            "moe-offload", "mole-host"),
        "device tier (mole-storage-tier): hit rate on held-out text": per_batch(
            lambda B: by["mole-storage-tier", B]["hit_rate"], "mole-storage-tier"),
        "mole-storage-tier (cold) / dense ms": vs_dense("mole-storage-tier"),
        f"moe-offload / mole-host h2d bytes, both {lut_dtype} (like for like; paper ~1,500x at 410M)": per_batch(
            lambda B: by["moe-offload", B]["h2d_bytes_per_step_as_lut_dtype"]
            / max(by["mole-host", B]["h2d_bytes_per_step"], 1), "moe-offload", "mole-host"),
        "peak RSS MiB (each model's own process when isolated)": {
            m: by[m, B0]["peak_rss_bytes"] / 2 ** 20 for m in DECODE_MODELS
            if (m, B0) in by and by[m, B0]["peak_rss_bytes"] is not None} or None,
    }
    summary = {k: v for k, v in summary.items() if v is not None}
    if floor:
        summary["cold batched storage rows/s / thread-pool pread floor"] = floor["storage_vs_pread"]
    print("\n".join(summary_lines(summary, floor)))
    return summary


def summary_lines(summary: dict[str, Any], floor: dict) -> list[str]:
    """The summary as printed (and as experiments/decode_report.py writes it): the cold reads' rows/s, then
    one line per ratio."""
    lines = []
    if floor:
        lines.append(f"cold storage reads: {floor['decode_rows_per_s']:,.0f} rows/s in the decode, "
                     f"{floor['tensorstore_replay_rows_per_s']:,.0f} replayed, pread floor "
                     f"{floor['pread_rows_per_s']:,.0f} rows/s ({floor['rows']:,} rows in {floor['reads']:,} reads)")
    for k, v in summary.items():
        lines.append(f"{k}: " + (", ".join((f"batch {B} {x:.3g}" if str(B).isdigit() else f"{B} {x:,.0f}")
                                           for B, x in v.items() if x is not None)
                                 if isinstance(v, dict) else f"{v:.4f}"))
    return lines


def _plot_decode(rows, batch_sizes, modeled_key, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install mole-jax[plot]); no plot", file=sys.stderr)
        return
    # measured: each model's ms/step over Dense's in the same turns (absolute times of turns minutes apart carry
    # the machine's drift); modeled: the paper's estimate; bytes: what a step moves host -> device, as stored
    panels = (("vs_dense", "ms/step vs Dense (same turns)", "measured", "linear"),
              (modeled_key, "ms / step", "modeled (paper method)", "log"),
              ("h2d_bytes_per_step", "bytes / step", "host -> device", "log"))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, (key, ylabel, title, yscale) in zip(axes, panels):
        for i, name in enumerate(DECODE_MODELS):
            if key == "h2d_bytes_per_step" and name in ("dense", "dense-k1", "moe", "mole-device"):
                continue  # nothing moves: no point on a log axis
            if not any(r["model"] == name for r in rows) or (key == modeled_key and any(
                    r[key] is None for r in rows if r["model"] == name)):
                continue  # not measured (--models), or no compute row to model it from
            ys = [next(r[key] for r in rows if r["model"] == name and r["batch_size"] == B) for B in batch_sizes]
            ax.plot(batch_sizes, ys, marker="o", label=name, color=f"C{i}")
        ax.set(xscale="log", yscale=yscale, xlabel="batch size", ylabel=ylabel, title=title)
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
