"""Paper Table 3: Dense vs MoE-10E vs MoLE-4E (and MoE-34E vs MoLE-16E) at equal activated parameters and equal
training tokens: validation loss and loss curves; zero-shot accuracy where lm-eval's tasks are available.

Every model gets the same recipe, seed and batch order (the scale's TrainConfig), so the same tokens in the same
order. Each MoLE is then re-parameterised into a float32 lookup table (convert_to_lut) and scored through it
(mole_jax.load(run, lut=...)): its validation loss must equal the training form's, since the table is exact.

    python experiments/quality.py --scale small                    # CPU; --with-16e adds MoE-34E / MoLE-16E
    python experiments/quality.py --scale paper --data pile.bin --tokenizer neox/tokenizer.json --grad-accum 8
"""

from __future__ import annotations

import functools
import sys

from lab import cli, paper, report, runs
from lab.report import Column

BASE = ("Dense", "MoE-10E", "MoLE-4E")
PAIR_16E = ("MoE-34E", "MoLE-16E")
COLORS = {"Dense": "black", "MoE-10E": "tab:blue", "MoLE-4E": "tab:red", "MoE-34E": "tab:cyan",
          "MoLE-16E": "tab:orange"}
ACCURACY_TABLE = "Zero-shot accuracy % (lm-eval, acc)"


def add_arguments(p):
    p.add_argument("--with-16e", action="store_true",
                   help="also train MoE-34E and MoLE-16E (always at --scale paper with --size 160m/410m)")
    p.add_argument("--tasks", nargs="*", default=None,
                   help="zero-shot tasks through lm-eval (default at --scale paper: the paper's eight; else none)")
    p.add_argument("--task-limit", type=int, default=None, help="examples per task (lm-eval --limit), for a quick look")
    p.add_argument("--task-path", default=None, help="a directory of lm-eval task YAMLs (lm-eval's --include_path)")


def labels(ctx: cli.Context) -> list[str]:
    pair = ctx.args.with_16e or (ctx.scale.accelerator and ctx.family != "1b")  # the paper has no 1B 16E/34E
    return [*BASE, *(PAIR_16E if pair else ())]


def zero_shot_tasks(ctx: cli.Context) -> list[str]:
    if ctx.args.tasks is not None:
        return ctx.args.tasks
    return list(paper.TASKS) if ctx.scale.accelerator else []


def experiment(ctx: cli.Context):
    models = [cli.model(ctx.family, label) for label in labels(ctx)]
    if ctx.args.plan:
        paper.plan(ctx, models)
        return None
    tasks = zero_shot_tasks(ctx)
    trained = [runs.train(ctx, m) for m in models]
    rows = [measure(ctx, run, tasks) for run in trained]
    published = compare(ctx, rows)
    return write_up(ctx, trained, rows, tasks=tasks, published=published)


# Measure ------------------------------------------------------------------------------------------------------
def measure(ctx: cli.Context, run: runs.Run, tasks: list[str]) -> dict:
    """One model's row: its training summary, validation loss, the MoLE's table check, zero-shot accuracy."""
    row = runs.training_summary(ctx, run)
    ev = runs.val_loss(ctx, run)
    row.update(val_loss=ev["loss"], val_perplexity=ev["perplexity"], val_tokens=ev["tokens"])
    if run.model.cfg.kind == "mole":
        row.update(lut_check(ctx, run))
    if tasks:
        scores = paper.zero_shot(run.path, tasks, limit=ctx.args.task_limit, include_path=ctx.args.task_path)
        row.update(zero_shot_avg=accuracy(scores)["AVG"], zero_shot=scores)
    return row


def lut_check(ctx: cli.Context, run: runs.Run) -> dict:
    """Score the MoLE through its float32 table and in training form, on the same windows by the same path."""
    from mole_jax import load  # jax: not at --help

    tokens, windows = runs.val_windows(ctx, run, ctx.scale.lut_eval_windows)
    table = runs.lut_table(ctx, run, "float32")
    seq_len = ctx.train_cfg.seq_len
    trained = runs.scored_loss(load(run.path), tokens, windows, seq_len)
    looked_up = runs.scored_loss(load(run.path, lut=table, lut_placement=ctx.scale.lut_placement), tokens, windows,
                                 seq_len)
    return {"val_loss_scored": trained, "val_loss_lut_fp32": looked_up, "lut_minus_training_form": looked_up - trained,
            "lut_windows": len(windows)}


def accuracy(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """{task label: acc %, ..., "AVG": their mean} of one model's lm-eval scores."""
    acc = {paper.TASK_LABELS.get(t, t): 100 * s.get("acc", float("nan")) for t, s in scores.items()}
    return {**acc, "AVG": sum(acc.values()) / len(acc)}


# Rows ---------------------------------------------------------------------------------------------------------
def compare(ctx: cli.Context, rows: list[dict]) -> dict | None:
    """Each row's loss against Dense's, and the paper's zero-shot average for the model of the same name; returns
    the paper's Table 3 rows at the comparable size (None without the paper's tables)."""
    for r in rows:
        r["vs_dense"] = r["val_loss"] - rows[0]["val_loss"]
    tables = paper.tables(ctx)
    if not tables:
        return None
    published = {label: tables["table3_main"].get(paper.size(ctx), {}).get(label) for label in labels(ctx)}
    for r in rows:
        r["paper_avg_accuracy"] = (published.get(r["model"]) or {}).get("AVG")
    return published


# Report -------------------------------------------------------------------------------------------------------
def write_up(ctx: cli.Context, trained: list[runs.Run], rows: list[dict], *, tasks: list[str],
             published: dict | None) -> dict:
    tc = ctx.train_cfg
    extra = [(ACCURACY_TABLE, accuracy_rows(ctx, rows, tasks, published), accuracy_columns(tasks))] if tasks else []
    draw = functools.partial(plot, trained=trained, tokens_per_step=tc.batch_size * tc.seq_len)
    return report.result("Quality at equal activated parameters (paper Table 3)", rows, columns(ctx, tasks, published),
                         draw, settings=settings(ctx, trained, tasks), notes=notes(ctx, rows, published),
                         paper=published, extra_tables=extra)


def notes(ctx: cli.Context, rows: list[dict], published: dict | None) -> list[str]:
    by = {r["model"]: r for r in rows}
    dense = by["Dense"]
    out = [f"Equal training tokens: every model saw {dense['train_tokens']:,} tokens in the same order "
           f"({dense['epochs']:.2f} epochs of the training windows"
           + (": later epochs repeat the same text)." if dense["epochs"] > 1 else ").")]
    for a, b in (("MoLE-4E", "Dense"), ("MoLE-4E", "MoE-10E"), ("MoLE-16E", "MoE-34E"), ("MoLE-16E", "MoLE-4E")):
        if a in by and b in by:
            d = by[a]["val_loss"] - by[b]["val_loss"]
            verdict = "lower (better)" if d < 0 else "higher (worse)" if d > 0 else "equal"
            out.append(f"{a} - {b}: {d:+.4f} nats of validation loss: {a}'s is {verdict}.")
    for r in rows:
        if "lut_minus_training_form" in r:
            out.append(f"{r['model']} through its float32 lookup table: validation loss {r['val_loss_lut_fp32']:.6f} "
                       f"vs {r['val_loss_scored']:.6f} in training form on the same {r['lut_windows']} windows "
                       f"(difference {r['lut_minus_training_form']:+.2e}): the re-parameterisation is exact up to "
                       "float32 rounding.")
    if published:
        out.append(f"paper avg accuracy: the paper's {paper.size(ctx)} zero-shot average (Table 3) for the model of "
                   "the same name, for the ordering only: our numbers are losses of far smaller models on far less "
                   "data.")
    return out


def columns(ctx: cli.Context, tasks: list[str], published: dict | None) -> list[Column]:
    cols = [Column("model", "model"), Column("preset", "preset"),
            Column("params_total", "total params", ",d"), Column("params_active", "active params", ",d"),
            Column("train_tokens", "train tokens", ",d"), Column("epochs", "epochs", ".2f"),
            Column("train_loss", "final train loss", ".4f"), Column("val_loss", "val loss", ".4f"),
            Column("vs_dense", "vs Dense", "+.4f"), Column("val_perplexity", "val ppl", ".2f"),
            Column("val_loss_lut_fp32", "val loss via fp32 LUT", ".4f"),
            Column("tokens_per_s", "train tokens/s", ",.0f"), Column("train_wall_s", "train wall s", ",.0f")]
    if tasks:
        cols.append(Column("zero_shot_avg", "zero-shot avg %", ".1f"))
    if published:
        cols.append(Column("paper_avg_accuracy", f"paper {paper.size(ctx)} avg acc %", ".1f"))
    return cols


def accuracy_names(tasks: list[str]) -> list[str]:
    return [paper.TASK_LABELS.get(t, t) for t in tasks] + ["AVG"]


def accuracy_rows(ctx: cli.Context, rows: list[dict], tasks: list[str], published: dict | None) -> list[dict]:
    """Our models' accuracy per task, then (with the paper's tables) the paper's for the models of the same names."""
    out = [{"model": r["model"], **accuracy(r["zero_shot"])} for r in rows]
    if published:
        size = paper.size(ctx)
        out += [{"model": f"paper {size} {label}", **{n: (published.get(label) or {}).get(n)
                                                      for n in accuracy_names(tasks)}} for label in labels(ctx)]
    return out


def accuracy_columns(tasks: list[str]) -> list[Column]:
    return [Column("model", "model"), *[Column(n, n, ".1f") for n in accuracy_names(tasks)]]


def settings(ctx: cli.Context, trained: list[runs.Run], tasks: list[str]) -> dict:
    tc = ctx.train_cfg
    d = runs.data(ctx, trained[0].model.cfg.vocab_size)
    return {"data": runs.describe_data(d),
            "recipe": f"{tc.steps} steps x {tc.batch_size} x {tc.seq_len} tokens, AdamW peak lr {tc.peak_lr:g}, "
                      f"warmup {tc.warmup_frac:.0%}, cosine to {tc.final_lr_frac:g}x, weight decay "
                      f"{tc.weight_decay:g}, clip {tc.grad_clip:g}, seed {tc.seed}, dtype {ctx.dtype()}",
            "validation": f"the runs' held-out {tc.val_fraction:.2%} of windows (mole_jax.evaluate)"
                          + (f", at most {ctx.scale.eval_windows}" if ctx.scale.eval_windows else ""),
            "zero-shot": ", ".join(tasks) if tasks else "not run at this scale (see docs/experiments.md)"}


# Plot ---------------------------------------------------------------------------------------------------------
def plot(fig, *, trained: list[runs.Run], tokens_per_step: int) -> None:
    """Training loss (smoothed) and validation loss against training tokens, epochs marked."""
    ax1, ax2 = fig.subplots(1, 2)
    for run in trained:
        c = COLORS.get(run.model.label)
        x, y = report.curve(run.history, "loss", tokens_per_step)
        ax1.plot([t / 1e6 for t in x], report.smooth(y), color=c, label=run.model.label)
        x, y = report.curve(run.history, "val_loss", tokens_per_step)
        ax2.plot([t / 1e6 for t in x], y, marker="o", color=c, label=run.model.label)
    mark_epochs(ax1, ax2, trained[0].history, tokens_per_step)
    ax1.set(xlabel="training tokens (M)", ylabel="train loss (nats, smoothed)", title="training loss")
    ax2.set(xlabel="training tokens (M)", ylabel="validation loss (nats)", title="validation loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    lo = min(min(report.curve(r.history, "val_loss", 1)[1] or [9e9]) for r in trained)
    first = max((report.curve(r.history, "val_loss", 1)[1] or [lo])[0] for r in trained)
    ax2.set_ylim(lo - 0.05 * (first - lo) - 0.01, first + 0.02)


def mark_epochs(ax1, ax2, history: list[dict], tokens_per_step: int) -> None:
    """A dotted line where the data starts repeating, on both axes; the epoch's number on the first."""
    log = [r for r in history if r.get("epoch")]
    if not log:
        return
    tokens_per_epoch = log[-1]["step"] * tokens_per_step / log[-1]["epoch"]
    for e in range(1, int(log[-1]["epoch"]) + 1):
        for ax in (ax1, ax2):
            ax.axvline(e * tokens_per_epoch / 1e6, color="gray", ls=":", lw=1)
        ax1.annotate(f"epoch {e + 1}", (e * tokens_per_epoch / 1e6, 1), xycoords=("data", "axes fraction"),
                     xytext=(3, -12), textcoords="offset points", fontsize=8, color="gray")


def main(argv=None) -> int:
    return cli.main("quality", __doc__, experiment, argv, add_arguments=add_arguments)


if __name__ == "__main__":
    sys.exit(main())
