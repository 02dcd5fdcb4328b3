"""`mole-jax bench train`: the train-step time of Dense and of MoLE with and without dedup, side by side."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax

from mole_jax import data, sharding
from mole_jax.bench.tools import block, machine, matmul_peak_flops, median, print_table, write_json
from mole_jax.config import MoleError, ModelConfig, TrainConfig, apply_overrides, get_preset
from mole_jax.train_step import ShardedStep, choose_dedup_rows, train_flops_per_token

# --set fields that only the MoLE variants take: Dense has no routed experts.
EXPERT_FIELDS = ("num_experts", "expert_dim", "top_k")


def bench_train(preset_size: str = "small", *, tokens_per_step: Sequence[int] = (4096, 16384, 65536),
                seq_len: int = 256, micro_tokens: int = 16384, iters: int = 3, dtype: str = "auto",
                devices: int | None = None, json_path: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Train-step time of {size}-dense, {size}-mole with dedup and {size}-mole without (equal activated size),
    side by side in one run, at several tokens per step (micro-batches of at most `micro_tokens`, accumulated).
    Every variant is the jitted, sharded, donated step that training runs (train_step.ShardedStep) on windows of
    the embedded English corpus (tokenised by a BPE of the preset's vocabulary). The three variants of a step size
    are timed in turn, round-robin, `iters` times after a warmup, so that a machine whose load drifts slows them
    alike; the row holds the median. Achieved FLOP/s count the model's matmuls analytically
    (train_step.train_flops_per_token; with dedup the experts on the rows they actually run on), against a matmul
    peak measured in the same run. overrides: ModelConfig fields (`--set`, config.parse_overrides) applied to both
    presets, except EXPERT_FIELDS, which only the MoLE variants take."""
    overrides = dict(overrides or {})
    if dtype == "auto":
        dtype = overrides.get("dtype") or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    overrides["dtype"] = dtype
    dense = apply_overrides(get_preset(f"{preset_size}-dense"),
                            {k: v for k, v in overrides.items() if k not in EXPERT_FIELDS})
    mole = apply_overrides(get_preset(f"{preset_size}-mole"), overrides)
    if seq_len > mole.max_seq_len:
        raise MoleError(f"sequence length {seq_len} exceeds the model's maximum of {mole.max_seq_len}")
    mesh = sharding.make_mesh(devices)
    corpus = data.open_corpus(None, vocab_size=mole.vocab_size)
    train_windows, _ = data.split_windows(corpus.tokens.size, seq_len, 0.0)
    peak = matmul_peak_flops(dtype)
    rows: list[dict[str, Any]] = []
    for tokens in tokens_per_step:
        tc = _train_config(tokens, seq_len, micro_tokens, mesh.size)
        batches = data.Batches(corpus.tokens, train_windows, seq_len=seq_len, batch_size=tc.batch_size, seed=0,
                               vocab_size=mole.vocab_size)
        dedup_rows = choose_dedup_rows(batches, tc.grad_accum, mesh.size, mole.vocab_size)["rows"]
        variants = {"dense": _Variant(dense, tc, mesh, batches, 0),
                    "mole-dedup": _Variant(mole, tc, mesh, batches, dedup_rows),
                    "mole-plain": _Variant(mole, tc, mesh, batches, 0)}
        for name, secs in _time_round_robin(variants, iters).items():
            rows.append({"model": name, "preset": f"{preset_size}-{name.split('-')[0]}",
                         **variants[name].row(median(secs), peak)})
            print(f"  {name} at {tokens} tokens/step: {rows[-1]['step_ms']:.0f} ms", file=sys.stderr)
        del variants
    for r in rows:
        base = next(d for d in rows if d["model"] == "dense" and d["tokens_per_step"] == r["tokens_per_step"])
        r["step_time_vs_dense"] = r["step_ms"] / base["step_ms"]
    info = {**machine(), "overrides": {k: v for k, v in overrides.items() if k != "dtype"}}
    _print_report(rows, tokens_per_step, f"{preset_size}-dense vs {preset_size}-mole, {dtype}, seq_len {seq_len}, "
                  f"{info['device_count']} x {info['device']} (host: {info['host_cpu']}, {info['host_cores']} "
                  f"cores); matmul peak {peak / 1e9:.1f} GFLOP/s")
    write_json(json_path, [{**r, **info} for r in rows])
    return rows


def _train_config(tokens: int, seq_len: int, micro_tokens: int, num_devices: int) -> TrainConfig:
    """A step of `tokens` tokens in micro-batches of at most `micro_tokens`, split over the devices."""
    micro = min(tokens, micro_tokens) // seq_len
    if tokens % seq_len or micro % num_devices or tokens // seq_len % micro:
        raise MoleError(f"{tokens} tokens per step do not split into micro-batches of {micro} sequences of "
                        f"{seq_len} tokens over {num_devices} devices")
    return TrainConfig(steps=1000, batch_size=tokens // seq_len, seq_len=seq_len, grad_accum=tokens // seq_len // micro)


def _time_round_robin(variants: dict[str, _Variant], iters: int) -> dict[str, list[float]]:
    """Seconds per step of each variant, the variants in turn: a warmup round, then `iters` timed rounds."""
    secs: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(1 + iters):
        for name, variant in variants.items():
            t = variant.time_one()
            if i:  # the first round is the warmup
                secs[name].append(t)
    return secs


def _print_report(rows: list[dict[str, Any]], tokens_per_step: Sequence[int], title: str) -> None:
    print(f"bench train: {title}")
    print_table(rows, ["model", "tokens_per_step", "grad_accum", "step_ms", "tokens_per_s", "unique_fraction",
                       "dedup_rows", "achieved_flops_per_s", "fraction_of_peak", "step_time_vs_dense"])
    for tokens in tokens_per_step:
        r = {x["model"]: x["step_time_vs_dense"] for x in rows if x["tokens_per_step"] == tokens}
        print(f"{tokens:>7} tokens/step: MoLE/Dense step time {r['mole-dedup']:.2f}x with dedup, "
              f"{r['mole-plain']:.2f}x without")


class _Variant:
    """One variant of bench_train: the compiled train step with its own state (donated and replaced at every
    call), always on the run's first batch."""

    def __init__(self, cfg: ModelConfig, tc: TrainConfig, mesh, batches: data.Batches, dedup_rows: int):
        self.cfg, self.tc, self.mesh, self.dedup_rows = cfg, tc, mesh, dedup_rows
        step = ShardedStep(cfg, tc, mesh, dedup_rows=dedup_rows)
        self.state = step.init_state(seed=0)
        self.batch = step.feed(lambda rows: batches.batch(0, rows))
        self.compiled = step.compile(self.state, self.batch)
        self.metrics = None

    def time_one(self) -> float:
        t0 = time.perf_counter()
        self.state, self.metrics = self.compiled(self.state, self.batch)
        block(self.metrics)
        return time.perf_counter() - t0

    def row(self, secs: float, peak: float) -> dict[str, Any]:
        metrics = jax.device_get(self.metrics)
        tc, tokens = self.tc, self.tc.batch_size * self.tc.seq_len
        unique = float(metrics["unique_fraction"]) if self.cfg.kind == "mole" else None
        expert_rows = 1.0  # per token; with dedup the experts run on the U rows of each device's share
        if self.dedup_rows:
            overflow = float(metrics["dedup_overflow"])  # shares that took the per-token path
            share = tokens // tc.grad_accum // self.mesh.size
            expert_rows = (1 - overflow) * self.dedup_rows / share + overflow
        flops = train_flops_per_token(self.cfg, tc.seq_len, expert_rows) * tokens
        return {"tokens_per_step": tokens, "batch_size": tc.batch_size, "grad_accum": tc.grad_accum,
                "seq_len": tc.seq_len, "step_ms": secs * 1e3, "tokens_per_s": tokens / secs,
                "unique_fraction": unique, "dedup_rows": self.dedup_rows if self.cfg.kind == "mole" else None,
                "flops_per_step": flops, "achieved_flops_per_s": flops / secs, "matmul_peak_flops_per_s": peak,
                "fraction_of_peak": flops / secs / peak, "loss": float(metrics["loss"])}
