"""`mole-jax quickstart`: the main job end to end on the embedded default corpus, in a few minutes on 2 CPU cores.

    1. train a small MoLE on real English (Python's own documentation: no download), resumable;
    2. re-parameterise it: every routed expert on every vocabulary id, into a Tensorstore LUT on disk;
    3. decode with the table offloaded (rows read from disk per step, experts never on the device);
    4. report: losses, LUT bytes on disk vs bytes resident on the device, decode ms/step vs the Dense equivalent.

Rerunning with the same OUT resumes training and reuses a finished table.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from mole_jax import checkpoint, lut, schemes
from mole_jax.bench.decode import Turns, time_against_dense, time_turn
from mole_jax.bench.tools import median, write_json
from mole_jax.config import MoleError, TrainConfig, get_preset, presets
from mole_jax.convert import convert_to_lut
from mole_jax.decode import LanguageModel, load
from mole_jax.decoder import DEFAULT_STEPS_PER_DISPATCH, random_state
from mole_jax.model import init_params, without_routed_experts
from mole_jax.row_sources import PLACEMENTS
from mole_jax.train import train

PROMPT = "The return statement"


def _dense_preset(preset: str) -> str | None:
    """The Dense model of a MoLE preset's activated size: small-mole -> small-dense, mole-4e-160m -> dense-160m."""
    name = preset[:-len("-mole")] + "-dense" if preset.endswith("-mole") else "dense-" + preset.split("-")[-1]
    return name if name in presets else None


def _decode_timings(models: dict[str, LanguageModel], dense: LanguageModel | None, cfg, steps: int) -> dict:
    """ms/step of each model, and against Dense, measured as `mole-jax bench decode` does: from one KV cache state,
    compiled before the timing, batch 1, each model taking turns with Dense (a drifting load slows both alike)."""
    K = DEFAULT_STEPS_PER_DISPATCH
    chunk = max(K, steps // 4 // K * K)  # whole dispatches of K steps
    prompt_len = min(64, cfg.max_seq_len - chunk - K - 1)
    turns = Turns(steps=steps, chunk=chunk, warmup=K, prompt_len=prompt_len, cache_len=prompt_len + K + chunk + 1,
                  steps_per_dispatch=K)
    state = random_state(cfg, 1, turns.prompt_len, turns.cache_len)
    ms, vs_dense, dense_s = {}, {}, []
    for name, model in models.items():
        if dense is None:
            times = time_turn(model, state, steps, turns.warmup)[0]
        else:
            both, _ = time_against_dense(name, model, dense, state, turns)
            times, dense_s = both[name], dense_s + both["dense"]
            vs_dense[name] = median(times) / median(both["dense"])
        ms[name] = median(times) * 1e3
    if dense_s:
        ms["dense"] = median(dense_s) * 1e3
    return {"ms_per_step": ms, "vs_dense": vs_dense,
            "method": f"batch 1, {K} steps per dispatch (the table's rows read by the step itself), KV cache of "
                      f"{turns.prompt_len} positions, median of {steps} steps per model in "
                      f"turns of {chunk} against Dense, compiled before timing"}


def _table(lut_dir: Path, run: Path, dtype: str, params, progress: bool) -> lut.LookupTable:
    """The run's table: reuse a finished one built from these weights, else convert (resuming an interrupted
    conversion of the same weights, replacing a table of older weights)."""
    try:
        return lut.open_lut(lut_dir, expect_fingerprint=lut.fingerprint(params))
    except MoleError:
        convert_to_lut(run, lut_dir, dtype=dtype, overwrite=True, progress=progress)
        return lut.open_lut(lut_dir)


def check_settings(out: Path, *, preset: str, table_dtype: str, placement: str, prompt: str,
                   **sizes: int) -> None:
    """Every setting, before anything is trained or written: a bad one found after training would leave a
    half-made OUT behind. sizes: the counts (steps, batch_size, ...), each a positive integer."""
    if get_preset(preset).kind != "mole":
        mole = ", ".join(name for name, cfg in presets.items() if cfg.kind == "mole")
        raise MoleError(f"{preset} is a {get_preset(preset).kind} model; quickstart needs a MoLE preset: {mole}")
    schemes.check_scheme(table_dtype)
    if placement not in PLACEMENTS:
        raise MoleError(f"unknown LUT placement {placement!r}: use one of {', '.join(PLACEMENTS)}")
    if not isinstance(prompt, str) or not prompt:
        raise MoleError(f"the prompt must be non-empty text, got {prompt!r}")
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise MoleError(f"{name} must be a positive integer, got {value!r}")
    if out.exists() and not out.is_dir():
        raise MoleError(f"{out} is a file, not a directory")


def run(out: str | Path = "runs/quickstart", *, preset: str = "small-mole", steps: int = 120, batch_size: int = 16,
        seq_len: int = 128, table_dtype: str = "float16", placement: str = "storage", prompt: str = PROMPT,
        max_new_tokens: int = 40, timing_steps: int = 128, progress: bool = True) -> dict:
    out = Path(out).expanduser().absolute()
    check_settings(out, preset=preset, table_dtype=table_dtype, placement=placement, prompt=prompt, steps=steps,
                   batch_size=batch_size, seq_len=seq_len, max_new_tokens=max_new_tokens, timing_steps=timing_steps)
    mole_cfg = get_preset(preset)
    dense_name = _dense_preset(preset)
    dense_cfg = None if dense_name is None else get_preset(dense_name)
    run_dir, lut_dir = out / "mole", out / "mole" / checkpoint.LUT

    print(f"[1/4] training {preset} for {steps} steps of {batch_size}x{seq_len} tokens on the embedded corpus")
    tc = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, checkpoint_every=steps,
                     eval_every=max(1, steps // 4), log_every=max(1, steps // 12), peak_lr=2e-3, warmup_frac=0.05)
    result = train(mole_cfg, tc, out=run_dir, preset=preset, progress=progress)
    metrics = _read_metrics(run_dir)  # the whole run's log, also when this call only resumed a finished run
    losses = [m["loss"] for m in metrics if "loss" in m]
    val_losses = [m["val_loss"] for m in metrics if "val_loss" in m]

    print(f"[2/4] converting the routed experts into a {table_dtype} lookup table at {lut_dir}")
    _, trained = checkpoint.restore_params(run_dir)
    table = _table(lut_dir, run_dir, table_dtype, trained, progress)

    print(f"[3/4] generating with the table on {placement} (experts never reach the device)")
    model = load(run_dir, lut=table, lut_placement=placement)
    # Sampled (seeded, so a rerun prints the same): greedy decoding of a model this small loops on newlines.
    text = model.generate_text(prompt, max_new_tokens, temperature=0.7, top_k=40, seed=0)
    print("    (sampled: temperature 0.7, top-k 40, seed 0)")
    print("\n".join(f"    | {line}" for line in f"{prompt}{text}".rstrip().splitlines()))

    print("[4/4] measuring decode ms/step against the Dense model of the same activated size")
    models = {f"mole-lut-{placement}": model}
    if placement != "host":
        models["mole-lut-host"] = load(run_dir, lut=table, lut_placement="host")
    # random weights: a step's cost does not depend on them
    dense = None if dense_cfg is None else LanguageModel(dense_cfg, init_params(dense_cfg))
    timings = _decode_timings(models, dense, mole_cfg, timing_steps)
    device_bytes = {name: m.device_param_bytes for name, m in {**models, "dense": dense}.items() if m is not None}
    # What the training form would keep on the device: every parameter, the routed experts included.
    device_bytes["mole-experts-on-device"] = sum(int(x.nbytes) for x in jax.tree.leaves(trained))
    inference_params = without_routed_experts(trained)

    report = {
        "run_dir": str(run_dir), "lut_dir": str(lut_dir), "steps": result.step,
        "first_loss": losses[0], "final_loss": losses[-1], "val_loss": val_losses[-1] if val_losses else None,
        "prompt": prompt, "generated": text,
        "lut_bytes_on_disk": table.nbytes, "lut_row_bytes": table.row_nbytes, "lut_scheme": table.scheme,
        "device_param_bytes": device_bytes, **timings,
        "inference_form_params": sum(int(np.size(x)) for x in jax.tree.leaves(inference_params)),
    }
    _print_report(report, dense=dense_cfg is not None, placement=placement)
    write_json(out / "report.json", report)
    print(f"report written to {out / 'report.json'}")
    return report


def _read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / checkpoint.METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def _print_report(r: dict, *, dense: bool, placement: str) -> None:
    print("\nquickstart report")
    val = f"  (validation {r['val_loss']:.3f})" if r["val_loss"] is not None else ""
    print(f"  training loss      {r['first_loss']:.3f} -> {r['final_loss']:.3f} after {r['steps']} steps{val}")
    print(f"  LUT on disk        {_mib(r['lut_bytes_on_disk'])} ({r['lut_scheme']}), "
          f"{r['lut_row_bytes'] / 1024:.1f} KiB per token row")
    dev = r["device_param_bytes"]
    print(f"  device-resident    MoLE with its LUT offloaded {_mib(dev[f'mole-lut-{placement}'])}, "
          f"MoLE with experts {_mib(dev['mole-experts-on-device'])}"
          + (f", Dense {_mib(dev['dense'])}" if dense else ""))
    ratios = r["vs_dense"]
    print("  decode ms/step     " + ", ".join(
        f"{k} {v:.2f}" + (f" ({ratios[k]:.2f}x dense)" if k in ratios else "") for k, v in r["ms_per_step"].items()))
    print(f"                     ({r['method']})")
