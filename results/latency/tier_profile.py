"""One-off profile behind docs/decoding.md's "Device tier" and "Per-step host cost" sections (issue 12, items 2-3).

    python results/latency/tier_profile.py [--preset-size small] [--json results/latency/tier_small.json]

A: where a mole-host step's fixed host cost goes (time.perf_counter around each part of Decoder.finish, replayed
   by hand): waiting for the step's ids, reading them, np.unique, the gather into staging, the put, the dispatch.
B: what a jitted call's dispatch costs per pytree leaf (a call that reads one leaf of N).
C: ms/step side by side, each variant in alternating turns with Dense: mole-host and mole-storage without and with
   a device tier (10% of the vocabulary by embedded-corpus counts, and 100%: every step hits; each with and
   without speculation).
D: the tier's hit rate on the embedded corpus: counts from its training windows, hits on its validation windows.
Random weights and a random table, as `bench decode`; the timed steps feed the model's own greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mole_jax import data
from mole_jax.bench.decode import _configs, _held_out_text, _random_table
from mole_jax.bench.tools import machine
from mole_jax.decode import LanguageModel
from mole_jax.decoder import decode_loop, random_state
from mole_jax.model import init_params
from mole_jax.row_sources import TableRows, tier_ids

PROMPT, STEPS, CHUNK, WARMUP = 512, 60, 10, 3
_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def med_us(xs):
    return round(statistics.median(xs) * 1e6, 1)


def breakdown(model: LanguageModel, cfg, B: int) -> dict:
    """Part A: one mole-host step at a time, each host-side part timed."""
    dec, src = model.decoder, model.decoder.source
    state = random_state(cfg, B, PROMPT, PROMPT + STEPS + 2, seed=B)
    parts = {k: [] for k in ("wait_ids", "read_ids", "unique", "gather", "put", "dispatch", "host_total", "step")}
    last = None
    for i in range(STEPS):
        t0 = time.perf_counter()
        jax.block_until_ready(state.ids_Bx1)
        t1 = time.perf_counter()
        ids_B = jax.device_get(state.ids_Bx1)[:, 0]
        t2 = time.perf_counter()
        unique_U, inverse = np.unique(ids_B, return_inverse=True)
        t3 = time.perf_counter()
        out = src.staging.buffer(B)
        src._read_into(unique_U, {k: v[:len(unique_U)] for k, v in out.items()})
        t4 = time.perf_counter()
        stored, index = src.transfers.put((out, inverse.reshape(B, 1).astype(np.int32)))
        t5 = time.perf_counter()
        state = dec._step(greedy=True, params=dec.params, cache=state.cache, ids_Bx1=state.ids_Bx1, pos_B=state.pos_B,
                          key=state.key, sampler=None, rows=TableRows(stored, index, src.scheme))
        t6 = time.perf_counter()
        if i >= WARMUP:
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t6 - t1)):
                parts[k].append(v)
            if last is not None:
                parts["step"].append(t0 - last)
        last = t0 if i >= WARMUP else None
    args = dict(params=dec.params, cache=state.cache, ids_Bx1=state.ids_Bx1, pos_B=state.pos_B, key=state.key,
                rows=TableRows(stored, index, src.scheme))
    leaves = {k: len(jax.tree.leaves(v)) for k, v in args.items()}
    return {"us_median": {k: med_us(v) for k, v in parts.items()}, "input_leaves": leaves,
            "input_leaves_total": sum(leaves.values())}


def dispatch_per_leaf() -> dict:
    """Part B: the dispatch of a jitted call that reads one of N small leaves, N = 1 .. 1000."""
    f = jax.jit(lambda xs: xs[0] + 1)
    out = {}
    for n in (1, 10, 100, 300, 1000):
        xs = [jnp.zeros((4,)) for _ in range(n)]
        jax.block_until_ready(f(xs))
        times = []
        for _ in range(200):
            t0 = time.perf_counter()
            y = f(xs)
            times.append(time.perf_counter() - t0)
            jax.block_until_ready(y)
        out[n] = med_us(times)
    return out


def turn(model: LanguageModel, template, n: int) -> tuple[list[float], int]:
    dec, stamps, sent = model.decoder, [], []
    for _ in decode_loop(dec, _copy(template), WARMUP + n + 1, None, True):
        stamps.append(time.perf_counter())
        sent.append(dec.h2d_bytes)
    return np.diff(stamps[WARMUP:]).tolist(), sent[-1] - sent[WARMUP]


def side_by_side(variants: dict, dense: LanguageModel, cfg, batch_sizes, prompts=None) -> list[dict]:
    """Part C: each variant in alternating turns with Dense (who goes first alternates). With `prompts` (Part E,
    a trained model): every turn decodes from the variant's own prefill of prompts[B], and `dense` is the baseline
    model given (its own prefill)."""
    rows = []
    for name, build in variants.items():
        model = build()
        for B in batch_sizes:
            if prompts is None:
                template = random_state(cfg, B, PROMPT, PROMPT + CHUNK + WARMUP + 2, seed=B)
            else:
                template = _prefilled(model, prompts[B])
                dense_template = _prefilled(dense, prompts[B])
            t = {"m": [], "d": []}
            sent, tier0 = 0, _tier_snapshot(model)
            redone0 = getattr(model.decoder, "redone", 0)
            for r in range(STEPS // CHUNK):
                for who, m in ((("m", model), ("d", dense))[::1 if r % 2 else -1]):
                    times, b = turn(m, template if prompts is None or who == "m" else dense_template, CHUNK)
                    t[who] += times
                    sent += b if who == "m" else 0
            row = {"variant": name, "batch_size": B, "ms_per_step": statistics.median(t["m"]) * 1e3,
                   "dense_ms_per_step": statistics.median(t["d"]) * 1e3,
                   "vs_dense": statistics.median(t["m"]) / statistics.median(t["d"]),
                   "h2d_bytes_per_step": sent / len(t["m"]), "device_param_bytes": model.device_param_bytes}
            tier1 = _tier_snapshot(model)
            if tier1 is not None:
                d = {k: tier1[k] - tier0[k] for k in tier1}
                steps = (STEPS // CHUNK) * (CHUNK + WARMUP)  # each turn finishes warmup + n steps
                row.update(hit_rate=d["hits"] / max(d["tokens"], 1), rows_fetched_per_step=d["rows_fetched"] / steps,
                           rows_sent_per_step=d["rows_sent"] / steps,
                           steps_redone=model.decoder.redone - redone0, steps_run=steps)
            rows.append(row)
            print(json.dumps(row))
        del model
    return rows


def _prefilled(model: LanguageModel, prompts_BxT: np.ndarray):
    B, T = prompts_BxT.shape
    return model.decoder.prefill(prompts_BxT, np.full(B, T, np.int32), 2 * T, 0, None, True)


def trained(run_dir: Path, batch_sizes) -> dict:
    """Part E: a trained MoLE run (its table, tokenizer and training corpus: the embedded one) decoding greedily
    from prompts of its validation windows, with a tier of 10% of the vocabulary ordered by its training windows'
    counts; the baseline is the table on the device."""
    from mole_jax.checkpoint import read_run
    from mole_jax.decode import load

    run = read_run(run_dir)
    V, seq_len = run["model_config"]["vocab_size"], run["train_config"]["seq_len"]
    tokens = data.open_corpus(None, vocab_size=V, tokenizer=run_dir / "tokenizer.json").tokens
    _, val = data.split_windows(tokens.size, seq_len, run["train_config"]["val_fraction"])
    counts_V = data.token_counts(tokens, V, seq_len=seq_len, exclude_windows=val)
    T = 32
    prompts = {B: np.stack([np.asarray(tokens[w * seq_len:w * seq_len + T]) for w in val[:B]]).astype(np.int32)
               for B in batch_sizes}
    lut = run_dir / "lut"
    tier = dict(device_rows=V // 10, token_counts=counts_V)
    variants = {"trained-host": lambda: load(run_dir, lut=lut, lut_placement="host"),
                "trained-host-tier10": lambda: load(run_dir, lut=lut, lut_placement="host", **tier),
                "trained-host-tier10-nospec": lambda: load(run_dir, lut=lut, lut_placement="host", speculate=False,
                                                           **tier),
                "trained-storage-tier10": lambda: load(run_dir, lut=lut, lut_placement="storage", **tier)}
    baseline = load(run_dir, lut=lut, lut_placement="device")
    return {"run": run.get("preset"), "vocab_size": V, "tier_rows": V // 10, "prompt_len": T,
            "baseline": "the same model with its table on the device",
            "rows": side_by_side(variants, baseline, None, batch_sizes, prompts)}


def _tier_snapshot(model):
    c = getattr(model.decoder, "tier_counts", None)
    return None if c is None else {"tokens": c.tokens, "hits": c.hits, "rows_fetched": c.rows_fetched,
                                   "rows_sent": c.rows_sent}


def corpus_hit_rate(V: int, fraction: float = 0.1, seq_len: int = 256) -> dict:
    """Part D: a tier of `fraction` of the vocabulary from the training windows' counts, hits on validation's."""
    counts_V, val_ids = _held_out_text(V, seq_len)
    out = {"vocab_size": V, "counted_tokens": int(counts_V.sum()), "held_out_tokens": int(val_ids.size),
           "distinct_ids_counted": int((counts_V > 0).sum())}
    for frac in (0.01, fraction, 0.25):
        tier = np.zeros(V, bool)
        tier[tier_ids(counts_V, max(1, int(V * frac)), V)] = True
        out[f"val_hit_rate_tier_{frac:g}"] = float(tier[val_ids].mean())
        # a batch-1 step needs nothing from the host when its one id hits; P(all of B ids hit), B = 8, as if
        # independent draws
        out[f"p_all_hit_batch8_tier_{frac:g}"] = float(tier[val_ids].mean() ** 8)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset-size", default="small")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--json", default=None)
    ap.add_argument("--trained", default=None, help="Part E only: a trained MoLE run directory with RUN_DIR/lut")
    a = ap.parse_args()
    if a.trained:
        out = trained(Path(a.trained), a.batch_sizes)
        if a.json:
            Path(a.json).write_text(json.dumps({"benchmark": "tier_profile_trained", "machine": machine(), **out,
                                                "command": "python results/latency/tier_profile.py --trained "
                                                           "RUN_DIR --batch-sizes " +
                                                           " ".join(map(str, a.batch_sizes))}, indent=2) + "\n")
        return
    cfgs = _configs(a.preset_size, "float32", PROMPT + STEPS + 2)
    mole, V = cfgs["mole"], cfgs["mole"].vocab_size
    counts_V = data.token_counts(data.open_corpus(None, vocab_size=V).tokens, V)
    tier10 = tier_ids(counts_V, V // 10, V)
    with tempfile.TemporaryDirectory() as tmp:
        table = _random_table(Path(tmp) / "lut", mole, "float16")
        params = init_params(mole, seed=2, with_experts=False)

        def lm(placement, **kw):
            return lambda: LanguageModel(mole, params, table=table, placement=placement, **kw)

        host = lm("host")()
        parts = {B: breakdown(host, mole, B) for B in a.batch_sizes}
        del host
        per_leaf = dispatch_per_leaf()
        dense = LanguageModel(cfgs["dense"], init_params(cfgs["dense"], seed=0))
        variants = {"mole-host": lm("host"), "mole-host-tier10": lm("host", tier_K=tier10),
                    "mole-host-tier10-nospec": lm("host", tier_K=tier10, speculate=False),
                    "mole-host-tier100": lm("host", tier_K=np.arange(V)),
                    "mole-host-tier100-nospec": lm("host", tier_K=np.arange(V), speculate=False),
                    "mole-storage": lm("storage"), "mole-storage-tier10": lm("storage", tier_K=tier10)}
        rows = side_by_side(variants, dense, mole, a.batch_sizes)
    payload = {"benchmark": "tier_profile", "machine": machine(), "preset_size": a.preset_size,
               "command": f"python results/latency/tier_profile.py --preset-size {a.preset_size}",
               "settings": {"prompt_len": PROMPT, "steps": STEPS, "chunk": CHUNK, "warmup": WARMUP,
                            "lut_dtype": "float16", "weights": "random", "tier10_rows": int(len(tier10))},
               "host_cost_breakdown": parts, "dispatch_us_by_leaves": per_leaf, "side_by_side": rows,
               "corpus_hit_rate": corpus_hit_rate(V)}
    print(json.dumps({k: payload[k] for k in ("host_cost_breakdown", "dispatch_us_by_leaves", "corpus_hit_rate")},
                     indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
