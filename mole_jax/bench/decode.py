"""`mole-jax bench decode`: the paper's Figure 3 on this machine: decode ms/step and bytes moved per step of Dense,
MoE (resident and offloaded) and MoLE (its table on the device, in host RAM, on disk)."""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mole_jax.bench.tools import machine, median, print_table, write_json
from mole_jax.config import ModelConfig, MoleError, get_preset
from mole_jax.decode import LanguageModel
from mole_jax.decoder import decode_loop, random_state
from mole_jax.lut import LookupTable, open_lut
from mole_jax.lut_writer import write_table
from mole_jax.model import init_params

DECODE_FAMILIES = {"tiny": ("tiny-dense", "tiny-moe", "tiny-mole"), "small": ("small-dense", "small-moe", "small-mole"),
                   "160m": ("dense-160m", "moe-10e-160m", "mole-4e-160m"),
                   "410m": ("dense-410m", "moe-10e-410m", "mole-4e-410m")}
DECODE_MODELS = ("dense", "moe", "moe-offload", "mole-device", "mole-host", "mole-storage")

_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))  # steps donate the cache: each turn gets its own


@dataclasses.dataclass(frozen=True)
class Turns:
    """How the models take turns: `steps` timed steps per (model, batch size), in turns of `chunk`, each turn
    after `warmup` untimed steps, from a KV cache filled to `prompt_len` of `cache_len` positions."""
    steps: int
    chunk: int
    warmup: int
    prompt_len: int
    cache_len: int


def bench_decode(preset_size: str = "small", *, batch_sizes: Sequence[int] = (1, 8, 32), prompt_len: int = 512,
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
    if preset_size not in DECODE_FAMILIES:
        raise MoleError(f"unknown preset size {preset_size!r}: choose one of {', '.join(DECODE_FAMILIES)}")
    dtype = dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    turns = Turns(steps, chunk, warmup, prompt_len,
                   cache_len=prompt_len + warmup + chunk + 1)  # as the paper's HF cache: the positions in use
    cfgs = _configs(preset_size, dtype, turns.cache_len)
    modeled_key = f"modeled_ms_per_step_{link_gbps:g}gbps"
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        table = _random_table(Path(tmp) / "lut", cfgs["mole"], lut_dtype)
        rows = _measure(cfgs, table, batch_sizes, turns)
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
    summary = _summary(by, batch_sizes)
    print(f"(random weights and a random {lut_dtype} table; KV cache of {prompt_len} random positions; median of "
          f"{steps} steps per model in turns of {chunk}; {dtype} on {machine()['device']})")
    payload = {"benchmark": "decode", "machine": machine(), "rows": rows, "summary": summary,
               "settings": {"preset_size": preset_size, "models": dict(zip(("dense", "moe", "mole"),
                                                                            DECODE_FAMILIES[preset_size])),
                            "batch_sizes": list(batch_sizes), "prompt_len": prompt_len, "cache_len": turns.cache_len,
                            "steps": steps, "warmup": warmup, "chunk": chunk, "link_gbps": link_gbps,
                            "lut_dtype": lut_dtype, "dtype": dtype, "weights": "random",
                            "lut": "random rows of the right shape and scheme"}}
    write_json(json_path, payload)
    if plot_path:
        _plot_decode(rows, batch_sizes, modeled_key, plot_path)
    return payload


def _configs(preset_size: str, dtype: str, cache_len: int) -> dict[str, ModelConfig]:
    cfgs = {}
    for kind, name in zip(("dense", "moe", "mole"), DECODE_FAMILIES[preset_size]):
        c = get_preset(name)  # a longer context than the preset's is fine for timing: RoPE has no table
        cfgs[kind] = c.replace(dtype=dtype, param_dtype=dtype, max_seq_len=max(c.max_seq_len, cache_len))
    return cfgs


def _random_table(path: Path, mole: ModelConfig, lut_dtype: str) -> LookupTable:
    """A table of random rows of MoLE's shape, stored with `lut_dtype`, written to `path` and opened."""
    L, N, D = mole.num_layers, mole.num_experts, mole.d_model

    def random_rows(start, stop):  # row v is the same whenever asked for (the writer re-reads rows to verify)
        return np.stack([0.05 * np.random.default_rng(v).standard_normal((L, N, D), np.float32)
                         for v in range(start, stop)])

    t0 = time.perf_counter()
    write_table(path, mole, lut_dtype, random_rows, source={"random": "bench decode"})
    table = open_lut(path)
    print(f"random {lut_dtype} table {table.shape}, {table.nbytes / 2**20:.1f} MiB, "
          f"{table.row_nbytes:,} bytes/row, written in {time.perf_counter() - t0:.1f} s")
    return table


def _model_builders(cfgs: dict[str, ModelConfig], table: LookupTable) -> dict[str, Callable[[], LanguageModel]]:
    """Every model but Dense, built when its turn comes: a 160M MoLE table is 3.5 GiB per copy."""
    moe, mole = cfgs["moe"], cfgs["mole"]
    return {"moe": lambda: LanguageModel(moe, init_params(moe, seed=1)),
            "moe-offload": lambda: LanguageModel(moe, init_params(moe, seed=1), offload_experts=True),
            **{f"mole-{p}": (lambda p=p: LanguageModel(mole, init_params(mole, seed=2, with_experts=False),
                                                       table=table, placement=p))
               for p in ("device", "host", "storage")}}


def _measure(cfgs: dict[str, ModelConfig], table: LookupTable, batch_sizes: Sequence[int],
             turns: Turns) -> list[dict[str, Any]]:
    """One row per (model, batch size). Each model takes turns with Dense (its own ratio is then immune to a
    drifting machine load), one model at a time."""
    build = _model_builders(cfgs, table)
    dense = LanguageModel(cfgs["dense"], init_params(cfgs["dense"], seed=0))
    rows, dense_times, dense_sent = [], {B: [] for B in batch_sizes}, {B: 0 for B in batch_sizes}
    for name in DECODE_MODELS[1:]:
        model = build[name]()
        for B in batch_sizes:
            template = random_state(cfgs["mole"], B, turns.prompt_len, turns.cache_len, seed=B)  # one backbone
            times, sent = time_against_dense(name, model, dense, template, turns)
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
    return rows + [{"model": "dense", "batch_size": B, "ms_per_step": median(dense_times[B]) * 1e3,
                    "vs_dense": 1.0, "h2d_bytes_per_step": dense_sent[B] / len(dense_times[B]),
                    "device_param_bytes": dense.device_param_bytes} for B in batch_sizes]


def time_against_dense(name: str, model: LanguageModel, dense: LanguageModel, template,
                        turns: Turns) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per step and bytes moved host->device of `model` and of Dense, in alternating turns (who goes
    first alternates too)."""
    times, sent = {name: [], "dense": []}, {name: 0, "dense": 0}
    for r in range(-(-turns.steps // turns.chunk)):
        n = min(turns.chunk, turns.steps - len(times[name]))
        for who, m in ((name, model), ("dense", dense))[::1 if r % 2 else -1]:
            t, b = time_turn(m, template, n, turns.warmup)
            times[who] += t
            sent[who] += b
    return times, sent


def time_turn(model: LanguageModel, template, n: int, warmup: int) -> tuple[list[float], int]:
    """`n` timed decode steps after `warmup` untimed ones, from a copy of `template`: their seconds and the bytes
    they moved host->device."""
    dec = model.decoder
    stamps, sent = [], []
    for _ in decode_loop(dec, _copy(template), warmup + n + 1, None, True):
        stamps.append(time.perf_counter())
        sent.append(dec.h2d_bytes)
    return np.diff(stamps[warmup:]).tolist(), sent[-1] - sent[warmup]


def _summary(by: dict, batch_sizes: Sequence[int]) -> dict[str, Any]:
    """The ratios the issue sets goals for, printed and returned."""
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
    return summary


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
