"""Paper Figure 3: decode ms/step against batch size for Dense, MoE (experts resident), MoE with expert offloading
and MoLE with its lookup table on the device, in host RAM and on disk, with the bytes each moves host -> device
per step and the paper's modeled time (compute + bytes over a 16 GB/s link).

A thin layer over mole_jax.bench.bench_decode (random weights and a random table of the right shape: a step's cost
does not depend on the values; models of equal activated size take turns so that load drift hits them alike). From
the bytes the offloaded MoE moves, the experts it loads per layer per step, against the paper's counts.

    python experiments/latency.py --scale small        # the small presets on this machine's CPU
    python experiments/latency.py --scale paper        # the paper's 410M models, on a GPU
"""

from __future__ import annotations

import functools
import sys
from typing import NamedTuple

from lab import cli, paper, report
from lab.report import Column
from mole_jax.config import ModelConfig, get_preset


class Settings(NamedTuple):
    preset_size: str
    batch_sizes: tuple[int, ...]
    prompt_len: int
    steps: int
    warmup: int
    chunk: int
    steps_per_dispatch: int = 16  # bench decode's default; tiny: 2, so that its few steps are whole chunks


SETTINGS = {"tiny": Settings("tiny", (1, 4), 32, 4, 2, 2, steps_per_dispatch=2),
            "small": Settings("small", (1, 8, 32), 512, 50, 3, 10),
            "paper": Settings("410m", (1, 8, 32), 512, 50, 3, 10)}  # the paper's Figure 3: 410M, prompt 512
MODELS = ("dense", "moe", "moe-offload", "mole-device", "mole-host", "mole-storage")
STYLE = {"dense": ("black", "-"), "moe": ("tab:blue", "-"), "moe-offload": ("tab:blue", "--"),
         "mole-device": ("tab:red", "-"), "mole-host": ("tab:red", "--"), "mole-storage": ("tab:red", ":")}


def add_arguments(p):
    p.add_argument("--batch-sizes", default=None, type=lambda s: tuple(int(v) for v in s.split(",")),
                   help="decode batch sizes (default: 1,8,32; tiny 1,4)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per model and batch size (default 50)")
    p.add_argument("--link-gbps", type=float, default=16.0, help="host->device link of the modeled time (16: PCIe)")
    p.add_argument("--lut-dtype", default="float16", help="table scheme (the paper stores float16)")


def experiment(ctx: cli.Context):
    s = SETTINGS[ctx.scale.name]
    batch_sizes = ctx.args.batch_sizes or s.batch_sizes
    payload, moe = measure(ctx, s, batch_sizes)
    rows = make_rows(payload, moe, modeled_key=f"modeled_ms_per_step_{ctx.args.link_gbps:g}gbps")
    published = compare(ctx, rows)
    return write_up(ctx, payload, rows, batch_sizes=batch_sizes, published=published)


# Measure ------------------------------------------------------------------------------------------------------
def measure(ctx: cli.Context, s: Settings, batch_sizes: tuple[int, ...]) -> tuple[dict, ModelConfig]:
    """bench_decode's payload, and the config of the MoE it offloads (to count the experts its bytes hold)."""
    from mole_jax.bench.decode import DECODE_FAMILIES, bench_decode  # jax: not at --help

    workdir = ctx.runs / "tmp"
    workdir.mkdir(parents=True, exist_ok=True)
    payload = bench_decode(preset_size=s.preset_size, batch_sizes=batch_sizes, prompt_len=s.prompt_len,
                           link_gbps=ctx.args.link_gbps, steps=ctx.args.steps or s.steps, warmup=s.warmup,
                           chunk=s.chunk, lut_dtype=ctx.args.lut_dtype, steps_per_dispatch=s.steps_per_dispatch,
                           models=MODELS, workdir=workdir)
    return payload, get_preset(DECODE_FAMILIES[s.preset_size][1])


# Rows ---------------------------------------------------------------------------------------------------------
def make_rows(payload: dict, moe: ModelConfig, *, modeled_key: str) -> list[dict]:
    """bench_decode's rows with the modeled time under one name, and for the offloaded MoE the experts it loads per
    layer per step: the bytes it moves beyond what Dense sends (its token ids, if any) over one expert's bytes."""
    expert_bytes = 2 * moe.d_model * moe.expert_dim * (2 if payload["settings"]["dtype"] != "float32" else 4)
    by = {(r["model"], r["batch_size"]): r for r in payload["rows"]}
    rows = []
    for r in payload["rows"]:
        row = {k: r[k] for k in ("model", "batch_size", "ms_per_step", "vs_dense", "h2d_bytes_per_step",
                                 "device_param_bytes", "compute_ms_per_step", modeled_key)}
        row["modeled_ms_per_step"] = row.pop(modeled_key)
        if r["model"] == "moe-offload":
            extra = r["h2d_bytes_per_step"] - by["dense", r["batch_size"]]["h2d_bytes_per_step"]
            row["experts_loaded_per_layer"] = extra / expert_bytes / moe.num_layers
        rows.append(row)
    return rows


def compare(ctx: cli.Context, rows: list[dict]) -> dict | None:
    """The paper's experts loaded per layer per step (410M MoE-10E) beside ours, where the paper's tables are."""
    tables = paper.tables(ctx)
    published = tables.get("figure3_avg_experts_loaded_per_layer_per_step_410M") if tables else None
    if published:
        for row in rows:
            if row["model"] == "moe-offload":
                row["paper_experts_loaded_per_layer"] = published["MoE-10E"].get(str(row["batch_size"]))
    return published


# Report -------------------------------------------------------------------------------------------------------
def write_up(ctx: cli.Context, payload: dict, rows: list[dict], *, batch_sizes: tuple[int, ...],
             published: dict | None) -> dict:
    link = ctx.args.link_gbps
    st = payload["settings"]
    settings = {"models": f"{', '.join(st['models'].values())} (equal activated size), random weights, {st['dtype']}",
                "decode": f"KV cache of {st['prompt_len']} positions, median of {st['steps']} steps per model and "
                          f"batch size in turns of {st['chunk']}, {st['lut_dtype']} table",
                "bench": "mole_jax.bench.bench_decode (also `mole-jax bench decode`)"}
    return report.result("Decode latency vs batch size (paper Figure 3)", rows, columns(link, published),
                         functools.partial(plot, rows=rows, batch_sizes=batch_sizes, link_gbps=link),
                         settings=settings, notes=notes(payload["summary"], link, published), paper=published,
                         figsize=(15, 4.2))


def notes(summary: dict, link_gbps: float, published: dict | None) -> list[str]:
    out = [f"{k}: " + (", ".join(f"batch {b} {v:.3g}" for b, v in x.items()) if isinstance(x, dict) else f"{x:.4f}")
           for k, x in summary.items()]
    out.append(f"modeled = the same model with nothing to move (dense, moe, mole-device) + bytes moved per step "
               f"over {link_gbps:g} GB/s: the paper's estimate (it did not measure transfers).")
    out.append("Timing on a shared machine is noisy; the models take turns so that drift affects them alike. "
               "Recorded figures come from a run on a quiet machine (docs/experiments.md).")
    if published:
        out.append("paper experts/layer: the paper's average MoE-10E experts loaded per layer per step (410M, "
                   "Figure 3), against ours from the offloaded MoE's bytes.")
    return out


def columns(link_gbps: float, published: dict | None) -> list[Column]:
    cols = [Column("model", "model"), Column("batch_size", "batch"), Column("ms_per_step", "ms/step", ".3f"),
            Column("vs_dense", "vs dense", ".3f"), Column("h2d_bytes_per_step", "h2d bytes/step", ",.0f"),
            Column("modeled_ms_per_step", f"modeled ms ({link_gbps:g} GB/s)", ".3f"),
            Column("device_param_bytes", "device bytes", ",d"),
            Column("experts_loaded_per_layer", "experts/layer/step", ".2f")]
    if published:
        cols.append(Column("paper_experts_loaded_per_layer", "paper experts/layer/step", ".1f"))
    return cols


# Plot ---------------------------------------------------------------------------------------------------------
def plot(fig, *, rows: list[dict], batch_sizes: tuple[int, ...], link_gbps: float) -> None:
    """Measured and modeled ms/step and host -> device bytes per step against batch size, one line per model."""
    axes = fig.subplots(1, 3)
    by = {(r["model"], r["batch_size"]): r for r in rows}
    for name in MODELS:
        color, ls = STYLE[name]
        pts = [by[name, b] for b in batch_sizes]
        for ax, key in zip(axes, ("ms_per_step", "modeled_ms_per_step", "h2d_bytes_per_step")):
            ys = [max(p[key], 1.0) if key == "h2d_bytes_per_step" else p[key] for p in pts]
            ax.plot(batch_sizes, ys, marker="o", color=color, ls=ls, label=name)
    for ax, (ylabel, title) in zip(axes, (("ms / step", "measured"),
                                          ("ms / step", f"modeled ({link_gbps:g} GB/s link)"),
                                          ("bytes / step (1 = none)", "host -> device per step"))):
        ax.set(xlabel="batch size", ylabel=ylabel, title=title, yscale="log")
        report.log_x(ax, batch_sizes)
        ax.grid(alpha=0.3)
    report.log_y(axes[0])
    report.log_y(axes[1])
    axes[0].legend(fontsize=8)


def main(argv=None) -> int:
    return cli.main("latency", __doc__, experiment, argv, training=False, add_arguments=add_arguments)


if __name__ == "__main__":
    sys.exit(main())
