"""Training cost (beyond the paper): train-step time of MoLE-4E with deduplicated experts, without, and of Dense at
equal activated parameters, at several tokens per step.

MoLE's routed experts read the token embedding, a function of the token id alone, so a batch needs them once per
distinct id: dedup evaluates them on the batch's U distinct ids and gathers (exact; docs/training.md). A thin
layer over mole_jax.bench.bench_train (one jitted, sharded, donated train step per variant on the embedded
corpus; variants timed round-robin so that load drift hits them alike).

    python experiments/dedup.py --scale small          # CPU: small presets, 4k / 16k / 64k tokens per step
    python experiments/dedup.py --scale paper          # GPU/TPU: the 160M presets, 256k / 2M tokens per step
"""

from __future__ import annotations

import functools
import sys
from typing import NamedTuple

from lab import cli, report
from lab.report import Column
from mole_jax.config import presets


class Settings(NamedTuple):
    preset_size: str
    tokens_per_step: tuple[int, ...]
    seq_len: int
    micro_tokens: int
    iters: int


SETTINGS = {"tiny": Settings("tiny", (512,), 64, 512, 1),
            "small": Settings("small", (4096, 16384, 65536), 256, 16384, 3),
            "paper": Settings("160m", (262_144, 2_097_152), 2048, 65_536, 3)}
VARIANTS = {"dense": ("black", "-"), "mole-dedup": ("tab:red", "-"), "mole-plain": ("tab:red", "--")}
COLUMNS = [Column("model", "variant"), Column("tokens_per_step", "tokens/step", ",d"),
           Column("grad_accum", "micro-batches"), Column("step_ms", "step ms", ",.0f"),
           Column("tokens_per_s", "tokens/s", ",.0f"), Column("unique_fraction", "distinct ids / tokens", ".3f"),
           Column("dedup_rows", "U"), Column("fraction_of_peak", "of matmul peak", ".1%"),
           Column("step_time_vs_dense", "vs Dense", ".2f")]


def add_arguments(p):
    p.add_argument("--tokens", default=None, type=lambda s: tuple(int(v) for v in s.split(",")),
                   help="tokens per step, comma-separated (default: the scale's)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per variant after a warmup (default 3)")


def experiment(ctx: cli.Context):
    s = SETTINGS[ctx.scale.name]
    tokens = ctx.args.tokens or s.tokens_per_step
    iters = ctx.args.iters or s.iters
    rows = measure(ctx, s, tokens=tokens, iters=iters)
    return write_up(s, rows, tokens=tokens, iters=iters)


# Measure ------------------------------------------------------------------------------------------------------
def measure(ctx: cli.Context, s: Settings, *, tokens: tuple[int, ...], iters: int) -> list[dict]:
    """bench_train's rows: one per (variant, tokens per step)."""
    from mole_jax.bench.train import bench_train  # jax: not at --help

    if ctx.scale.accelerator:
        _paper_family(s.preset_size)
    return bench_train(preset_size=s.preset_size, tokens_per_step=tokens, seq_len=s.seq_len,
                       micro_tokens=s.micro_tokens, iters=iters, devices=ctx.args.devices)


def _paper_family(size: str) -> None:
    """bench_train compares the presets `{size}-dense` and `{size}-mole`, which the CPU families have; the paper's
    sizes are called dense-160m and mole-4e-160m, so give them those names too (in this process only)."""
    for kind, name in (("dense", f"dense-{size}"), ("mole", f"mole-4e-{size}")):
        presets.setdefault(f"{size}-{kind}", presets[name])


# Report -------------------------------------------------------------------------------------------------------
def write_up(s: Settings, rows: list[dict], *, tokens: tuple[int, ...], iters: int) -> dict:
    settings = {"models": f"{s.preset_size}-dense and {s.preset_size}-mole (MoLE-4E), equal activated parameters",
                "steps": f"sequences of {s.seq_len} tokens, micro-batches of at most {s.micro_tokens:,} tokens "
                         f"(accumulated), median of {iters} timed steps per variant",
                "machine": f"matmul peak {rows[0]['matmul_peak_flops_per_s'] / 1e9:,.1f} GFLOP/s measured in the "
                           "same run",
                "bench": "mole_jax.bench.bench_train (also `mole-jax bench train`)"}
    return report.result("Training cost: MoLE's deduplicated experts (beyond the paper)", rows, COLUMNS,
                         functools.partial(plot, rows=rows, tokens=tokens), settings=settings,
                         notes=notes(rows, tokens))


def notes(rows: list[dict], tokens: tuple[int, ...]) -> list[str]:
    by = {(r["model"], r["tokens_per_step"]): r for r in rows}
    out = [f"{t:,} tokens/step: MoLE-4E / Dense step time {by['mole-dedup', t]['step_time_vs_dense']:.2f}x with "
           f"dedup (experts on {by['mole-dedup', t]['unique_fraction']:.0%} of the tokens), "
           f"{by['mole-plain', t]['step_time_vs_dense']:.2f}x without" for t in tokens]
    out.append("Timing on a shared machine is noisy; the variants take turns so that drift affects them alike. "
               "Recorded figures come from a run on a quiet machine (docs/experiments.md and docs/training.md).")
    return out


# Plot ---------------------------------------------------------------------------------------------------------
def plot(fig, *, rows: list[dict], tokens: tuple[int, ...]) -> None:
    """Step time per variant against tokens per step, absolute and relative to Dense."""
    ax1, ax2 = fig.subplots(1, 2)
    by = {(r["model"], r["tokens_per_step"]): r for r in rows}
    for name, (color, ls) in VARIANTS.items():
        ax1.plot(tokens, [by[name, t]["step_ms"] for t in tokens], marker="o", color=color, ls=ls, label=name)
        ax2.plot(tokens, [by[name, t]["step_time_vs_dense"] for t in tokens], marker="o", color=color, ls=ls,
                 label=name)
    ax1.set(xlabel="tokens per step", ylabel="ms / step", title="train step time")
    report.log_y(ax1)
    ax2.set(xlabel="tokens per step", ylabel="step time / Dense's", title="relative to Dense")
    for ax in (ax1, ax2):
        report.log_x(ax, tokens)
        ax.grid(alpha=0.3)
        ax.legend()


def main(argv=None) -> int:
    return cli.main("dedup", __doc__, experiment, argv, training=False, add_arguments=add_arguments)


if __name__ == "__main__":
    sys.exit(main())
