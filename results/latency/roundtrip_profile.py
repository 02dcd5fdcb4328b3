"""Where mole-host's time over Dense goes, and what the alternatives to the host round trip buy, side by side in one
process (round robin, 10 steps a turn after 3 untimed, every step fed held-out text as `bench decode` does),
batch 1 / 8 / 32:

    dense               Dense: step t+1 dispatched before the host reads step t's tokens
    dense-sync          Dense made to wait for each step's tokens before dispatching the next (bench decode's row):
                        the host round trip alone
    mole-device-sync    MoLE with its table on the device, made to wait the same way: the round trip of MoLE's step
    mole-host           the table in host RAM, the decoder's default: block 0's front half dispatched before the
                        host reads the ids, then the fetch (wait, gather, put) and the rest of the step
    mole-host-one-call  the same in one jitted call per step (`overlap=False`): wait, gather, put, dispatch
    mole-host-in-call   one call whose rows are passed to the step's own call (moved in its dispatch), no own put
    mole-host-callback  the gather inside the step (`jax.pure_callback` on the ids): no host round trip between steps
    mole-host-tier      a device tier of 10% of the vocabulary (bench decode's), steps not speculated split (default)
    mole-host-tier-one-call  the same, every step not speculated in one call

    python results/latency/roundtrip_profile.py [--preset-size small] [--rounds 20] [--variants a,b,...] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mole_jax import decoder as decoder_lib
from mole_jax.bench import decode as bench
from mole_jax.bench.decode import SAMPLE_TOP_K, _configs, _held_out_text, _random_table, _Synced, time_turn
from mole_jax.bench.tools import machine, median
from mole_jax.decode import LanguageModel
from mole_jax.decoder import Pending, random_state
from mole_jax.model import graphdef_and_shapes, init_params
from mole_jax.row_sources import TableRows, nbytes, tier_ids
from mole_jax.sampling import make_sampler

PROMPT, WARMUP, CHUNK = 512, 3, 10


class _InCall:
    """mole-host whose step's rows stay host arrays until the step's own call moves them (counted here)."""

    def __init__(self, inner):
        self.inner, self._step = inner, inner._step
        transfers = inner.transfers

        def count_only(tree):
            transfers.bytes_sent += nbytes(tree)
            return tree

        transfers.put = count_only

        def step(**kwargs):
            with jax.transfer_guard_host_to_device("allow"):
                return self._step(**kwargs)

        inner._step = step

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _callback_step(graphdef, gather, form, scheme, *, greedy, params, cache, ids_Bx1, pos_B, key, sampler):
    B = ids_Bx1.shape[0]
    shapes = {k: jax.ShapeDtypeStruct((B, *shape), dt) for k, (shape, dt) in form.items()}
    stored = jax.pure_callback(gather, shapes, ids_Bx1[:, 0])
    rows = TableRows(stored, jnp.arange(B, dtype=jnp.int32)[:, None], scheme)
    return decoder_lib._step(graphdef, greedy=greedy, params=params, cache=cache, ids_Bx1=ids_Bx1, pos_B=pos_B,
                             key=key, sampler=sampler, rows=rows)


class _Callback:
    """mole-host whose step gathers its own rows through a host callback on its ids: dispatched like Dense."""

    def __init__(self, inner):
        self.inner, self.sent = inner, 0
        source = inner.source

        def gather(ids_B):
            out = {k: np.take(v, ids_B, axis=0) for k, v in source.stored.items()}
            self.sent += nbytes(out)
            return out

        graphdef, _ = graphdef_and_shapes(inner.config, with_experts=False)
        self._step = jax.jit(partial(_callback_step, graphdef, gather, source.staging.form, source.scheme),
                             static_argnames=("greedy",), donate_argnames=("cache",))

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def h2d_bytes(self):
        return self.sent

    def begin(self, state, sampler, greedy):
        return Pending(self._step(greedy=greedy, params=self.inner.params, cache=state.cache,
                                  ids_Bx1=state.ids_Bx1, pos_B=state.pos_B, key=state.key, sampler=sampler))

    def finish(self, pending, ids_B, sampler, greedy):
        return pending.state


def _wrapped(model: LanguageModel, wrap) -> LanguageModel:
    model.decoder = wrap(model.decoder)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset-size", default="small")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--variants", default=None, help="comma-separated; default: all (dense always)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--workdir", default=None, help="where the random table is written (160M: 3.5 GiB)")
    a = ap.parse_args()
    cfgs = _configs(a.preset_size, "float32", PROMPT + WARMUP + CHUNK + 1)
    dense_cfg, mole = cfgs["dense"], cfgs["mole"]
    sampler = jax.device_put(make_sampler(1.0, SAMPLE_TOP_K, 1.0, mole.vocab_size))
    counts_V, text = _held_out_text(mole.vocab_size)
    tier_K = tier_ids(counts_V, bench._tier_rows(mole.vocab_size, None), mole.vocab_size)
    out = {"benchmark": "roundtrip_profile", "machine": machine(),
           "command": "python results/latency/roundtrip_profile.py " + " ".join(sys.argv[1:]),
           "step_ms": {}, "vs_dense": {}}
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        table = _random_table(Path(tmp) / "lut", mole, "float16")

        def mole_model(placement, **kw):
            return LanguageModel(mole, init_params(mole, seed=2, with_experts=False), table=table,
                                 placement=placement, **kw)

        build = {"dense-sync": lambda: _wrapped(LanguageModel(dense_cfg, init_params(dense_cfg, seed=0)), _Synced),
                 "mole-device-sync": lambda: _wrapped(mole_model("device"), _Synced),
                 "mole-host": lambda: mole_model("host"),
                 "mole-host-one-call": lambda: mole_model("host", overlap=False),
                 "mole-host-in-call": lambda: _wrapped(mole_model("host", overlap=False), _InCall),
                 "mole-host-callback": lambda: _wrapped(mole_model("host"), _Callback),
                 "mole-host-tier": lambda: mole_model("host", tier_K=tier_K),
                 "mole-host-tier-one-call": lambda: mole_model("host", tier_K=tier_K, overlap=False)}
        names = a.variants.split(",") if a.variants else list(build)
        unknown = set(names) - set(build)
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}: choose from {', '.join(build)}")
        models = {"dense": LanguageModel(dense_cfg, init_params(dense_cfg, seed=0)),
                  **{name: build[name]() for name in names}}
        for B in (1, 8, 32):
            template = random_state(mole, B, PROMPT, PROMPT + WARMUP + CHUNK + 1, seed=B)
            secs = {k: [] for k in models}
            for r in range(a.rounds):
                for name, model in list(models.items())[::1 if r % 2 else -1]:
                    secs[name] += time_turn(model, template, CHUNK, WARMUP, sampler=sampler, seed=r,
                                            text_N=text)[0]
            ms = {k: median(v) * 1e3 for k, v in secs.items()}
            out["step_ms"][B] = ms
            out["vs_dense"][B] = {k: v / ms["dense"] for k, v in ms.items()}
            print(f"batch {B}: " + ", ".join(f"{k} {v:.3f} ms ({out['vs_dense'][B][k]:.3f}x)" for k, v in ms.items()),
                  flush=True)
    out["settings"] = {"preset_size": a.preset_size, "prompt_len": PROMPT, "rounds": a.rounds, "chunk": CHUNK,
                       "warmup": WARMUP, "steps_per_model": a.rounds * CHUNK,
                       "order": "round robin, reversed every other round"}
    if a.json:  # runs accumulate: the spread between runs is part of the finding
        path = Path(a.json)
        runs = json.loads(path.read_text())["runs"] if path.exists() else []
        path.write_text(json.dumps({"benchmark": "roundtrip_profile", "runs": runs + [out]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
