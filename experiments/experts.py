"""Paper Table 6: MoLE with N = 2, 4, 8, 16 routed experts (and Dense, the baseline): validation loss.

The experts are the MoLE-4E preset's with `num_experts` changed, so the activated parameters stay those of Dense
(plus N router columns per layer) while the trained parameters and the lookup table grow with N. Every model gets
the same recipe, seed and batch order; Dense and MoLE-4E are the very runs quality.py trains (shared through
--runs when the settings match).

    python experiments/experts.py --scale small
    python experiments/experts.py --scale paper --data pile.bin --tokenizer neox/tokenizer.json --grad-accum 8
"""

from __future__ import annotations

import functools
import sys
from typing import NamedTuple

from lab import cli, paper, report, runs
from lab.report import Column
from mole_jax.config import MoleError

EXPERTS = (2, 4, 8, 16)


class Published(NamedTuple):
    """The paper's 160M zero-shot averages: Table 6's by expert count, Table 3's for Dense."""

    by_experts: dict  # "N" -> {"AVG": ...}
    dense_avg: float


def add_arguments(p):
    p.add_argument("--experts", default=",".join(map(str, EXPERTS)), type=lambda s: [int(n) for n in s.split(",")],
                   help="routed expert counts, comma-separated (default 2,4,8,16; the paper also has 32)")


def experiment(ctx: cli.Context):
    if any(n < 1 for n in ctx.args.experts):
        raise MoleError(f"--experts must be positive counts, got {ctx.args.experts}")
    models = [cli.model(ctx.family, "Dense")] + [cli.model(ctx.family, f"MoLE-{n}E") for n in ctx.args.experts]
    if ctx.args.plan:
        paper.plan(ctx, models)
        return None
    trained = [runs.train(ctx, m) for m in models]
    rows = [measure(ctx, run) for run in trained]
    published = compare(ctx, rows)
    return write_up(ctx, models, rows, published)


# Measure ------------------------------------------------------------------------------------------------------
def measure(ctx: cli.Context, run: runs.Run) -> dict:
    """One model's row: training summary, validation loss, and its table's size in float16."""
    row = runs.training_summary(ctx, run)
    ev = runs.val_loss(ctx, run)
    cfg = run.model.cfg
    row.update(val_loss=ev["loss"], val_perplexity=ev["perplexity"],
               lut_row_bytes_fp16=2 * cfg.lut_row_size or None,
               lut_bytes_fp16=2 * cfg.vocab_size * cfg.lut_row_size or None,
               num_experts=cfg.num_experts or None)
    return row


# Rows ---------------------------------------------------------------------------------------------------------
def compare(ctx: cli.Context, rows: list[dict]) -> Published | None:
    """Each row's loss against Dense's (the first row), and the paper's average for the same N where it has one."""
    for r in rows:
        r["vs_dense"] = r["val_loss"] - rows[0]["val_loss"]
    tables = paper.tables(ctx)
    by_experts = tables.get("table6_num_experts_160M") if tables else None
    if not by_experts:
        return None
    published = Published(by_experts, tables["table3_main"]["160M"]["Dense"]["AVG"])
    for r in rows:
        r["paper_avg_accuracy"] = (published.dense_avg if r["kind"] == "dense" else
                                   (by_experts.get(str(r["num_experts"])) or {}).get("AVG"))
    return published


# Report -------------------------------------------------------------------------------------------------------
def write_up(ctx: cli.Context, models: list[cli.Model], rows: list[dict], published: Published | None) -> dict:
    return report.result("Number of routed experts (paper Table 6)", rows, columns(published),
                         functools.partial(plot, rows=rows, published=published),
                         settings=settings(ctx, models), notes=notes(rows, published),
                         paper=published.by_experts if published else None)


def notes(rows: list[dict], published: Published | None) -> list[str]:
    dense, moles = rows[0], rows[1:]
    out = [f"Equal training tokens: each model saw {dense['train_tokens']:,} tokens in the same order "
           f"({dense['epochs']:.2f} epochs of the training windows).",
           "Validation loss by N: " + ", ".join(f"N={r['num_experts']} {r['val_loss']:.4f}" for r in moles)
           + f" (Dense {dense['val_loss']:.4f}).",
           "Monotone in N (each N at least as good as the one before): "
           + ("yes" if all(b["val_loss"] <= a["val_loss"] for a, b in zip(moles, moles[1:])) else "no") + "."]
    if published:
        out.append("paper avg acc: the paper's 160M zero-shot averages (Table 6; Dense from Table 3), for the trend "
                   "only.")
    return out


def columns(published: Published | None) -> list[Column]:
    cols = [Column("model", "model"), Column("num_experts", "N"), Column("params_total", "total params", ",d"),
            Column("params_active", "active params", ",d"),
            Column("lut_row_bytes_fp16", "LUT bytes/token fp16", ",d"),
            Column("lut_bytes_fp16", "LUT bytes fp16", ",d"), Column("val_loss", "val loss", ".4f"),
            Column("vs_dense", "vs Dense", "+.4f"), Column("val_perplexity", "val ppl", ".2f"),
            Column("train_wall_s", "train wall s", ",.0f")]
    if published:
        cols.append(Column("paper_avg_accuracy", "paper 160M avg acc %", ".1f"))
    return cols


def settings(ctx: cli.Context, models: list[cli.Model]) -> dict:
    tc = ctx.train_cfg
    return {"data": runs.describe_data(runs.data(ctx, models[0].cfg.vocab_size)),
            "recipe": f"{tc.steps} steps x {tc.batch_size} x {tc.seq_len} tokens, peak lr {tc.peak_lr:g}, seed "
                      f"{tc.seed}, dtype {ctx.dtype()} (as quality.py)",
            "models": f"{cli.model(ctx.family, 'MoLE-4E').name} with num_experts = "
                      f"{', '.join(map(str, ctx.args.experts))}, and {models[0].name}"}


# Plot ---------------------------------------------------------------------------------------------------------
def plot(fig, *, rows: list[dict], published: Published | None) -> None:
    """Validation loss against N (Dense as a line); beside it the paper's trend, or without it our table sizes."""
    ax1, ax2 = fig.subplots(1, 2)
    moles = rows[1:]
    ns = [r["num_experts"] for r in moles]
    ax1.plot(ns, [r["val_loss"] for r in moles], marker="o", color="tab:red", label="MoLE-NE")
    ax1.axhline(rows[0]["val_loss"], color="black", ls="--", label="Dense")
    ax1.set(xlabel="routed experts N", ylabel="validation loss (nats)", title="validation loss vs routed experts")
    report.log_x(ax1, ns)
    ax1.legend()
    ax1.grid(alpha=0.3)
    if published:
        plot_paper_trend(ax2, published)
    else:
        ax2.bar([str(r["num_experts"]) for r in moles], [r["lut_bytes_fp16"] / 2 ** 20 for r in moles],
                color="tab:red")
        ax2.set(xlabel="routed experts N", ylabel="MiB", title="lookup table size (float16)")
    ax2.grid(alpha=0.3)


def plot_paper_trend(ax, published: Published) -> None:
    pn = sorted(int(n) for n in published.by_experts)
    ax.plot(pn, [published.by_experts[str(n)]["AVG"] for n in pn], marker="s", color="tab:gray",
            label="paper MoLE (160M)")
    ax.axhline(published.dense_avg, color="black", ls="--", label="paper Dense")
    ax.set(xlabel="routed experts N", ylabel="zero-shot avg accuracy %",
           title="the paper's Table 6 (160M, for the trend)")
    report.log_x(ax, pn)
    ax.legend()


def main(argv=None) -> int:
    return cli.main("experts", __doc__, experiment, argv, add_arguments=add_arguments)


if __name__ == "__main__":
    sys.exit(main())
