"""Paper Table 8: one trained MoLE-4E's lookup table stored as float32, bfloat16, float16, int8, NF4 and NF3: bytes
(and % of float16), reconstruction error against the float32 table, and validation loss through each table.

The model is quality.py's MoLE-4E (the same run, shared through --runs when the settings match). Each table is
converted from its final checkpoint (mole_jax.convert_to_lut) and scored through mole_jax.load(run, lut=table),
the inference path, on the run's validation windows; the training form is scored the same way for reference.

    python experiments/compression.py --scale small
    python experiments/compression.py --scale paper --data pile.bin --tokenizer neox/tokenizer.json --grad-accum 8
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lab import cli, paper, report, runs
from lab.report import Column

PAPER_NAMES = {"float16": "FP16", "nf4": "NF4", "nf3": "NF3"}


class Scoring(NamedTuple):
    """The validation windows every table is scored on, and the training form's loss on them."""

    tokens: Any  # the token stream the windows index
    windows: np.ndarray
    seq_len: int
    trained: float  # the training form's loss


def experiment(ctx: cli.Context):
    m = cli.model(ctx.family, "MoLE-4E")
    if ctx.args.plan:
        paper.plan(ctx, [m])
        return None
    run = runs.train(ctx, m)
    scoring = training_form(ctx, run)
    ids = error_rows(ctx, m)
    rows = measure(ctx, run, scoring, ids)
    published = compare(ctx, rows)
    return write_up(ctx, m, rows, scoring=scoring, ids=ids, published=published)


# Measure ------------------------------------------------------------------------------------------------------
def training_form(ctx: cli.Context, run: runs.Run) -> Scoring:
    from mole_jax import load  # jax: not at --help

    tokens, windows = runs.val_windows(ctx, run, ctx.scale.lut_eval_windows)
    seq_len = ctx.train_cfg.seq_len
    return Scoring(tokens, windows, seq_len, runs.scored_loss(load(run.path), tokens, windows, seq_len))


def error_rows(ctx: cli.Context, m: cli.Model) -> np.ndarray:
    """The vocabulary rows compared for reconstruction error: all, or the scale's number of them at random."""
    V, n = m.cfg.vocab_size, ctx.scale.error_rows
    return np.arange(V) if n is None or n >= V else np.sort(np.random.default_rng(0).choice(V, n, replace=False))


def measure(ctx: cli.Context, run: runs.Run, scoring: Scoring, ids: np.ndarray) -> list[dict]:
    """One row per storage scheme: the table's bytes, its rows' error against the float32 table's, and the
    validation loss through it."""
    from mole_jax import load  # jax: not at --help
    from mole_jax.lut import open_lut, read_info
    from mole_jax.schemes import SCHEMES

    rows, ref = [], None
    for scheme in SCHEMES:  # float32 first: the reference of the reconstruction error
        where = runs.lut_table(ctx, run, scheme)
        x = open_lut(where).rows(ids).astype(np.float64)
        ref = x if ref is None else ref
        lm = load(run.path, lut=where, lut_placement=ctx.scale.lut_placement)
        loss = runs.scored_loss(lm, scoring.tokens, scoring.windows, scoring.seq_len)
        rows.append(table_row(scheme, where, read_info(where), error=np.abs(x - ref), ref=ref, loss=loss,
                              trained=scoring.trained))
    return rows


def table_row(scheme: str, where: Path, info: dict, *, error: np.ndarray, ref: np.ndarray, loss: float,
              trained: float) -> dict:
    return {"scheme": scheme, "block": info["block"] or None, "table_bytes": info["nbytes"],
            "of_fp16": info["nbytes"] / info["fp16_nbytes"], "row_bytes": info["row_nbytes"],
            "max_abs_error": float(error.max()), "mean_abs_error": float(error.mean()),
            "rel_rms_error": float(np.sqrt(np.mean(error ** 2) / np.mean(ref ** 2))),
            "val_loss": loss, "vs_fp32_table": None, "vs_training_form": loss - trained, "table": str(where)}


# Rows ---------------------------------------------------------------------------------------------------------
def compare(ctx: cli.Context, rows: list[dict]) -> dict | None:
    """Each table's loss against the float32 table's (the first row), and the paper's Table 8 for the same scheme."""
    for r in rows:
        r["vs_fp32_table"] = r["val_loss"] - rows[0]["val_loss"]
    tables = paper.tables(ctx)
    published = tables.get("table8_lut_quantization_160M_MoLE4E") if tables else None
    if published:
        for r in rows:
            p = published.get(PAPER_NAMES.get(r["scheme"], ""), {})
            r.update(paper_size_gb=p.get("size_GB"), paper_per_token_kb=p.get("per_token_KB"),
                     paper_avg_accuracy=p.get("AVG"))
    return published


# Report -------------------------------------------------------------------------------------------------------
def write_up(ctx: cli.Context, m: cli.Model, rows: list[dict], *, scoring: Scoring, ids: np.ndarray,
             published: dict | None) -> dict:
    tc, cfg = ctx.train_cfg, m.cfg
    V = cfg.vocab_size
    settings = {"model": f"{m.name} ({m.label}), {tc.steps} steps x {tc.batch_size} x {tc.seq_len} tokens as "
                         "quality.py",
                "data": runs.describe_data(runs.data(ctx, V)),
                "table": f"[V, L, N, d] = [{V}, {cfg.num_layers}, {cfg.num_experts}, {cfg.d_model}]; blocks: "
                         "int8 one scale per expert vector, nf4/nf3 the library's defaults (schemes.default_block)"}
    return report.result("Lookup-table compression (paper Table 8)", rows, columns(published),
                         functools.partial(plot, rows=rows), settings=settings,
                         notes=notes(rows, scoring=scoring, ids=ids, vocab_size=V, published=published),
                         paper=published)


def notes(rows: list[dict], *, scoring: Scoring, ids: np.ndarray, vocab_size: int,
          published: dict | None) -> list[str]:
    by = {r["scheme"]: r for r in rows}
    out = [f"Scored on {len(scoring.windows)} validation windows of {scoring.seq_len} tokens through each table "
           f"(mole_jax.load(run, lut=table)); the training form scores {scoring.trained:.6f} on the same windows.",
           f"Reconstruction error against the float32 table over {len(ids):,} of {vocab_size:,} vocabulary rows.",
           f"float32 table vs training form: {by['float32']['vs_training_form']:+.2e} nats (exact up to float32 "
           "rounding); " + ", ".join(f"{r['scheme']} {r['vs_fp32_table']:+.1e}" for r in rows[1:])
           + " nats vs the float32 table."]
    if published:
        out.append("paper: Table 8 (160M MoLE-4E): table size, bytes per token and zero-shot average; its 25.3% "
                   "(NF4) and 19.5% (NF3) of fp16 are at d = 768, where the blocks are 768 and 128.")
    return out


def columns(published: dict | None) -> list[Column]:
    cols = [Column("scheme", "scheme"), Column("block", "block"), Column("table_bytes", "table bytes", ",d"),
            Column("of_fp16", "of fp16", ".1%"), Column("row_bytes", "bytes/token", ",d"),
            Column("max_abs_error", "max abs err", ".3g"), Column("mean_abs_error", "mean abs err", ".3g"),
            Column("rel_rms_error", "rel RMS err", ".3g"), Column("val_loss", "val loss", ".5f"),
            Column("vs_fp32_table", "vs fp32 table", "+.1e")]
    if published:
        cols += [Column("paper_size_gb", "paper GB", ".1f"), Column("paper_per_token_kb", "paper KB/token", "g"),
                 Column("paper_avg_accuracy", "paper avg acc %", ".1f")]
    return cols


# Plot ---------------------------------------------------------------------------------------------------------
def plot(fig, *, rows: list[dict]) -> None:
    """The loss through each table against the float32 table's, and the quantised tables' reconstruction error."""
    ax1, ax2 = fig.subplots(1, 2)
    plot_losses(ax1, rows)
    quant = [r for r in rows if r["scheme"] != "float32"]
    xs = np.arange(len(quant))
    ax2.bar(xs - 0.2, [r["mean_abs_error"] for r in quant], 0.4, label="mean |error|")
    ax2.bar(xs + 0.2, [r["max_abs_error"] for r in quant], 0.4, label="max |error|")
    ax2.set_xticks(xs, [r["scheme"] for r in quant])
    ax2.set(yscale="log", ylabel="vs the float32 table", title="reconstruction error")
    ax2.legend()
    ax2.grid(alpha=0.3, axis="y")


def plot_losses(ax, rows: list[dict]) -> None:
    xs = np.arange(len(rows))
    deltas = [r["vs_fp32_table"] for r in rows]
    ax.bar(xs, deltas, color=["tab:gray" if d <= 0 else "tab:red" for d in deltas])
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['of_fp16']:.0%}", (x, r["vs_fp32_table"]), ha="center", fontsize=8,
                    textcoords="offset points", xytext=(0, 3 if r["vs_fp32_table"] >= 0 else -11))
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(xs, [r["scheme"] for r in rows])
    ax.set(ylabel="val loss - float32 table's (nats)", title="loss through each table (labels: bytes as % of float16)")
    ax.margins(y=0.15)
    ax.grid(alpha=0.3, axis="y")


def main(argv=None) -> int:
    return cli.main("compression", __doc__, experiment, argv)


if __name__ == "__main__":
    sys.exit(main())
