"""Paper Table 6: MoLE with N = 2, 4, 8, 16 routed experts (and Dense, the baseline): validation loss.

The experts are the MoLE-4E preset's with `num_experts` changed, so the activated parameters stay those of Dense
(plus N router columns per layer) while the trained parameters and the lookup table grow with N. Every model gets
the same recipe, seed and batch order; Dense and MoLE-4E are the very runs quality.py trains (shared through
--runs when the settings match).

    python experiments/experts.py --scale small
    python experiments/experts.py --scale paper --data pile.bin --tokenizer neox/tokenizer.json --grad-accum 8
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Column  # noqa: E402

EXPERTS = (2, 4, 8, 16)


def add_arguments(p):
    p.add_argument("--experts", default=",".join(map(str, EXPERTS)), type=lambda s: [int(n) for n in s.split(",")],
                   help="routed expert counts, comma-separated (default 2,4,8,16; the paper also has 32)")


def experiment(ctx: common.Context):
    from mole_jax import MoleError

    if any(n < 1 for n in ctx.args.experts):
        raise MoleError(f"--experts must be positive counts, got {ctx.args.experts}")
    models = [common.model(ctx.family, "Dense")] + [common.model(ctx.family, f"MoLE-{n}E") for n in ctx.args.experts]
    if ctx.args.plan:
        common.plan(ctx, models)
        return None
    runs = [common.train(ctx, m) for m in models]
    rows = []
    for run in runs:
        row = common.training_summary(ctx, run)
        ev = common.val_loss(ctx, run)
        cfg = run.model.cfg
        row.update(val_loss=ev["loss"], val_perplexity=ev["perplexity"],
                   lut_row_bytes_fp16=2 * cfg.lut_row_size or None,
                   lut_bytes_fp16=2 * cfg.vocab_size * cfg.lut_row_size or None,
                   num_experts=cfg.num_experts or None)
        rows.append(row)
    dense = rows[0]["val_loss"]
    for r in rows:
        r["vs_dense"] = r["val_loss"] - dense

    tables = common.paper_tables(ctx)
    paper = tables.get("table6_num_experts_160M") if tables else None
    if paper:
        dense_paper = tables["table3_main"]["160M"]["Dense"]["AVG"]
        for r in rows:
            r["paper_avg_accuracy"] = dense_paper if r["kind"] == "dense" else (paper.get(str(r["num_experts"]))
                                                                                or {}).get("AVG")
    moles = rows[1:]
    notes = [f"Equal training tokens: each model saw {rows[0]['train_tokens']:,} tokens in the same order "
             f"({rows[0]['epochs']:.2f} epochs of the training windows).",
             "Validation loss by N: " + ", ".join(f"N={r['num_experts']} {r['val_loss']:.4f}" for r in moles)
             + f" (Dense {dense:.4f}).",
             "Monotone in N (each N at least as good as the one before): "
             + ("yes" if all(b["val_loss"] <= a["val_loss"] for a, b in zip(moles, moles[1:])) else "no") + "."]
    if paper:
        notes.append("paper avg acc: the paper's 160M zero-shot averages (Table 6; Dense from Table 3), for the trend "
                     "only.")
    columns = [Column("model", "model"), Column("num_experts", "N"), Column("params_total", "total params", ",d"),
               Column("params_active", "active params", ",d"),
               Column("lut_row_bytes_fp16", "LUT bytes/token fp16", ",d"),
               Column("lut_bytes_fp16", "LUT bytes fp16", ",d"), Column("val_loss", "val loss", ".4f"),
               Column("vs_dense", "vs Dense", "+.4f"), Column("val_perplexity", "val ppl", ".2f"),
               Column("train_wall_s", "train wall s", ",.0f")]
    if paper:
        columns.append(Column("paper_avg_accuracy", "paper 160M avg acc %", ".1f"))

    def plot(fig):
        ax1, ax2 = fig.subplots(1, 2)
        ns = [r["num_experts"] for r in moles]
        ax1.plot(ns, [r["val_loss"] for r in moles], marker="o", color="tab:red", label="MoLE-NE")
        ax1.axhline(dense, color="black", ls="--", label="Dense")
        ax1.set(xlabel="routed experts N", ylabel="validation loss (nats)", title="validation loss vs routed experts")
        common.log_x(ax1, ns)
        ax1.legend()
        ax1.grid(alpha=0.3)
        if paper:
            pn = sorted(int(n) for n in paper)
            ax2.plot(pn, [paper[str(n)]["AVG"] for n in pn], marker="s", color="tab:gray", label="paper MoLE (160M)")
            ax2.axhline(tables["table3_main"]["160M"]["Dense"]["AVG"], color="black", ls="--", label="paper Dense")
            ax2.set(xlabel="routed experts N", ylabel="zero-shot avg accuracy %",
                    title="the paper's Table 6 (160M, for the trend)")
            common.log_x(ax2, pn)
            ax2.legend()
        else:
            ax2.bar([str(r["num_experts"]) for r in moles], [r["lut_bytes_fp16"] / 2 ** 20 for r in moles],
                    color="tab:red")
            ax2.set(xlabel="routed experts N", ylabel="MiB", title="lookup table size (float16)")
        ax2.grid(alpha=0.3)

    tc = ctx.train_cfg
    settings = {"data": common.describe_data(common.data(ctx, models[0].cfg.vocab_size)),
                "recipe": f"{tc.steps} steps x {tc.batch_size} x {tc.seq_len} tokens, peak lr {tc.peak_lr:g}, seed "
                          f"{tc.seed}, dtype {ctx.dtype()} (as quality.py)",
                "models": f"{common.model(ctx.family, 'MoLE-4E').name} with num_experts = "
                          f"{', '.join(map(str, ctx.args.experts))}, and {models[0].name}"}
    return common.result("Number of routed experts (paper Table 6)", rows, columns, plot, settings=settings,
                         notes=notes, paper=paper)


def main(argv=None) -> int:
    return common.main("experts", __doc__, experiment, argv, add_arguments=add_arguments)


if __name__ == "__main__":
    sys.exit(main())
