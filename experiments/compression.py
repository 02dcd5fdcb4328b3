"""Paper Table 8: one trained MoLE-4E's lookup table stored as float32, bfloat16, float16, int8, NF4 and NF3: bytes
(and % of float16), reconstruction error against the float32 table, and validation loss through each table.

The model is quality.py's MoLE-4E (the same run, shared through --runs when the settings match). Each table is
converted from its final checkpoint (mole_jax.convert_to_lut) and scored through mole_jax.load(run, lut=table),
the inference path, on the run's validation windows; the training form is scored the same way for reference.

    python experiments/compression.py --scale small
    python experiments/compression.py --scale paper --data pile.bin --tokenizer neox/tokenizer.json --grad-accum 8
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Column  # noqa: E402

PAPER_NAMES = {"float16": "FP16", "nf4": "NF4", "nf3": "NF3"}


def experiment(ctx: common.Context):
    import numpy as np

    import mole_jax
    from mole_jax import lut

    m = common.model(ctx.family, "MoLE-4E")
    if ctx.args.plan:
        common.plan(ctx, [m])
        return None
    run = common.train(ctx, m)
    seq_len = ctx.train_cfg.seq_len
    tokens, windows = common.val_windows(ctx, run, ctx.scale.lut_eval_windows)
    trained = common.scored_loss(mole_jax.load(run.path), tokens, windows, seq_len)
    V = m.cfg.vocab_size
    n = ctx.scale.error_rows
    ids = np.arange(V) if n is None or n >= V else np.sort(np.random.default_rng(0).choice(V, n, replace=False))

    rows, ref = [], None
    for scheme in lut.SCHEMES:  # float32 first: the reference of the reconstruction error
        where = common.lut_table(ctx, run, scheme)
        info = lut.read_info(where)
        x = lut.open_lut(where).rows(ids).astype(np.float64)
        if ref is None:
            ref = x
        err = np.abs(x - ref)
        loss = common.scored_loss(mole_jax.load(run.path, lut=where, lut_placement=ctx.scale.lut_placement), tokens,
                                  windows, seq_len)
        rows.append({"scheme": scheme, "block": info["block"] or None, "table_bytes": info["nbytes"],
                     "of_fp16": info["nbytes"] / info["fp16_nbytes"], "row_bytes": info["row_nbytes"],
                     "max_abs_error": float(err.max()), "mean_abs_error": float(err.mean()),
                     "rel_rms_error": float(np.sqrt(np.mean(err ** 2) / np.mean(ref ** 2))),
                     "val_loss": loss, "vs_fp32_table": None, "vs_training_form": loss - trained,
                     "table": str(where)})
    for r in rows:
        r["vs_fp32_table"] = r["val_loss"] - rows[0]["val_loss"]

    tables = common.paper_tables(ctx)
    paper = tables.get("table8_lut_quantization_160M_MoLE4E") if tables else None
    if paper:
        for r in rows:
            p = paper.get(PAPER_NAMES.get(r["scheme"], ""), {})
            r.update(paper_size_gb=p.get("size_GB"), paper_per_token_kb=p.get("per_token_KB"),
                     paper_avg_accuracy=p.get("AVG"))
    by = {r["scheme"]: r for r in rows}
    notes = [f"Scored on {len(windows)} validation windows of {seq_len} tokens through each table "
             f"(mole_jax.load(run, lut=table)); the training form scores {trained:.6f} on the same windows.",
             f"Reconstruction error against the float32 table over {len(ids):,} of {V:,} vocabulary rows.",
             f"float32 table vs training form: {by['float32']['vs_training_form']:+.2e} nats (exact up to float32 "
             "rounding); " + ", ".join(f"{s} {by[s]['vs_fp32_table']:+.1e}" for s in lut.SCHEMES[1:])
             + " nats vs the float32 table."]
    if paper:
        notes.append("paper: Table 8 (160M MoLE-4E): table size, bytes per token and zero-shot average; its 25.3% "
                     "(NF4) and 19.5% (NF3) of fp16 are at d = 768, where the blocks are 768 and 128.")
    columns = [Column("scheme", "scheme"), Column("block", "block"), Column("table_bytes", "table bytes", ",d"),
               Column("of_fp16", "of fp16", ".1%"), Column("row_bytes", "bytes/token", ",d"),
               Column("max_abs_error", "max abs err", ".3g"), Column("mean_abs_error", "mean abs err", ".3g"),
               Column("rel_rms_error", "rel RMS err", ".3g"), Column("val_loss", "val loss", ".5f"),
               Column("vs_fp32_table", "vs fp32 table", "+.1e")]
    if paper:
        columns += [Column("paper_size_gb", "paper GB", ".1f"), Column("paper_per_token_kb", "paper KB/token", "g"),
                    Column("paper_avg_accuracy", "paper avg acc %", ".1f")]

    def plot(fig):
        ax1, ax2 = fig.subplots(1, 2)
        xs = np.arange(len(rows))
        deltas = [r["vs_fp32_table"] for r in rows]
        ax1.bar(xs, deltas, color=["tab:gray" if d <= 0 else "tab:red" for d in deltas])
        for x, r in zip(xs, rows):
            ax1.annotate(f"{r['of_fp16']:.0%}", (x, r["vs_fp32_table"]), ha="center", fontsize=8,
                         textcoords="offset points", xytext=(0, 3 if r["vs_fp32_table"] >= 0 else -11))
        ax1.axhline(0, color="black", lw=0.8)
        ax1.set_xticks(xs, [r["scheme"] for r in rows])
        ax1.set(ylabel="val loss - float32 table's (nats)",
                title="loss through each table (labels: bytes as % of float16)")
        ax1.margins(y=0.15)
        ax1.grid(alpha=0.3, axis="y")
        quant = [r for r in rows if r["scheme"] != "float32"]
        xs = np.arange(len(quant))
        ax2.bar(xs - 0.2, [r["mean_abs_error"] for r in quant], 0.4, label="mean |error|")
        ax2.bar(xs + 0.2, [r["max_abs_error"] for r in quant], 0.4, label="max |error|")
        ax2.set_xticks(xs, [r["scheme"] for r in quant])
        ax2.set(yscale="log", ylabel="vs the float32 table", title="reconstruction error")
        ax2.legend()
        ax2.grid(alpha=0.3, axis="y")

    tc = ctx.train_cfg
    settings = {"model": f"{m.name} ({m.label}), {tc.steps} steps x {tc.batch_size} x {tc.seq_len} tokens as "
                         "quality.py",
                "data": common.describe_data(common.data(ctx, V)),
                "table": f"[V, L, N, d] = [{V}, {m.cfg.num_layers}, {m.cfg.num_experts}, {m.cfg.d_model}]; blocks: "
                         "int8 one scale per expert vector, nf4/nf3 the library's defaults (lut.default_block)"}
    return common.result("Lookup-table compression (paper Table 8)", rows, columns, plot, settings=settings,
                         notes=notes, paper=paper)


def main(argv=None) -> int:
    return common.main("compression", __doc__, experiment, argv)


if __name__ == "__main__":
    sys.exit(main())
