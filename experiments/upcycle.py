"""Upcycling a trained Dense model into MoLE (beyond the paper; mole_jax/upcycling.py): from the same trained Dense
checkpoint, continue training for the same tokens (a) as Dense, (b) upcycled to MoLE-4E training only the new
parameters (--train new: routed experts, expert norms, routers; the backbone frozen), (c) upcycled to MoLE-4E
training everything (--train all). Validation loss, wall time, trained parameters, lookup-table size; (b) is also
converted to a float16 table and scored through it. With --inits, (b) runs once per initialisation of the new
parameters (the first is the one (c) uses).

Every continuation gets the same recipe from a fresh optimizer: the scale's, for --continue-steps steps at
--continue-lr, with the seed after the Dense run's (the same batches for every arm, in another order than the
Dense run's). The Dense model is the one quality.py trains (shared through --runs), or --dense CKPT, e.g. the
authors' released Dense model imported with `mole-jax import-hf`.

    python experiments/upcycle.py --scale small
    python experiments/upcycle.py --scale paper --dense runs/authors-dense-160m --data pile.bin \\
        --tokenizer neox/tokenizer.json --grad-accum 8
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

from lab import cli, paper, report, runs
from lab.report import Column
from mole_jax import data as data_lib
from mole_jax.config import MoleError

INITS = ("zero-down", "zero-down-router", "small-down")  # mole_jax.upcycling.INITS (that module imports jax)
CONTINUE_STEPS = {"tiny": 20, "small": 80, "paper": 5000}
# Dense, then the upcycled MoLE: --train all, and --train new by init (solid: the arms (a)-(c); dashed: the other inits)
COLORS = {"dense": "black", "all": "tab:blue", "zero-down": "tab:red", "zero-down-router": "tab:purple",
          "small-down": "tab:orange"}


def add_arguments(p):
    p.add_argument("--dense", default=None,
                   help="a trained Dense checkpoint to start from (default: train the scale's Dense, as quality.py)")
    p.add_argument("--continue-steps", type=int, default=None,
                   help=f"steps of every continuation (default: tiny {CONTINUE_STEPS['tiny']}, small "
                        f"{CONTINUE_STEPS['small']}, paper {CONTINUE_STEPS['paper']})")
    p.add_argument("--continue-lr", type=float, default=None, help="peak rate of the continuations (the scale's)")
    p.add_argument("--experts", type=int, default=4, help="routed experts of the upcycled MoLE (4)")
    p.add_argument("--new-lrs", default=[], type=lambda s: [float(v) for v in s.split(",")],
                   help="also run (b) at these peak rates, comma-separated (only the new parameters train, so a "
                        "higher rate than the backbone's may suit them)")
    p.add_argument("--step-iters", type=int, default=5,
                   help="timed steps per arm for the side-by-side step time of (a)-(c), 0: none (5)")
    p.add_argument("--inits", default=None, type=lambda s: s.split(","),
                   help=f"initialisations of the new parameters for (b), comma-separated, the first also for (c) "
                        f"(default at tiny/small: {','.join(INITS)}; at paper: zero-down)")


class Arm(NamedTuple):
    label: str
    kind: str  # "dense" (the Dense model continued) or "mole" (upcycled)
    trainable: str  # "all" | "new"
    init: str | None  # upcycling init
    lr: float | None = None  # peak rate, when not the continuation's


def arms(ctx: cli.Context) -> list[Arm]:
    inits = ctx.args.inits or (["zero-down"] if ctx.scale.accelerator else list(INITS))
    bad = [i for i in inits if i not in INITS]
    if bad or ctx.args.experts < 1 or any(lr <= 0 for lr in ctx.args.new_lrs):
        raise MoleError(f"--inits must name {', '.join(INITS)}, --experts and --new-lrs be positive: got {inits}, "
                        f"{ctx.args.experts}, {ctx.args.new_lrs}")
    tag = f"MoLE-{ctx.args.experts}E"
    return [Arm("Dense", "dense", "all", None), Arm(f"{tag} new", "mole", "new", inits[0]),
            Arm(f"{tag} all", "mole", "all", inits[0]),
            *[Arm(f"{tag} new ({init})", "mole", "new", init) for init in inits[1:]],
            *[Arm(f"{tag} new (lr {lr:g})", "mole", "new", inits[0], lr) for lr in ctx.args.new_lrs]]


def continuation(ctx: cli.Context):
    """The continuations' one recipe: the scale's, for --continue-steps at --continue-lr, the next seed."""
    tc, a = ctx.train_cfg, ctx.args
    steps = a.continue_steps or CONTINUE_STEPS[ctx.scale.name]
    return dataclasses.replace(tc, steps=steps, schedule_steps=None, peak_lr=a.continue_lr or tc.peak_lr,
                               seed=tc.seed + 1, eval_every=max(1, steps // 4), checkpoint_every=10 ** 9,
                               keep_checkpoints=1, log_every=max(1, min(tc.log_every, steps // 10)))


def experiment(ctx: cli.Context):
    dense_model = cli.model(ctx.family, "Dense")
    if ctx.args.plan:
        plan_ctx = dataclasses.replace(ctx, args=argparse.Namespace(**{**vars(ctx.args),
                                                                        "steps": continuation(ctx).steps}))
        paper.plan(plan_ctx, [dense_model, cli.model(ctx.family, f"MoLE-{ctx.args.experts}E")])
        return None
    start = starting_point(ctx, dense_model)
    rows, histories, trained = [], {}, []
    for arm in arms(ctx):
        run, step0 = continue_training(ctx, start, arm)
        rows.append(measure(ctx, start, arm, run, step0))
        histories[arm.label] = (run.history, step0, arm)
        trained.append((arm, run))
    if ctx.args.step_iters:
        for r, ms in zip(rows, step_times(ctx, trained[:3], ctx.args.step_iters)):
            r["step_ms"] = ms
    compare(rows)
    return write_up(ctx, start, rows, histories)


# Measure ------------------------------------------------------------------------------------------------------
class Start(NamedTuple):
    """The trained Dense checkpoint every arm starts from, and its validation loss."""

    path: Path
    step: int
    cfg: object  # ModelConfig
    fingerprint: str
    val_loss: float
    scored: float  # the same windows through `runs.scored_loss` (the path the arms' step-0 losses take)
    pretrained: runs.Run | None  # the Dense run trained here (None with --dense)


def starting_point(ctx: cli.Context, dense_model: cli.Model) -> Start:
    from mole_jax import checkpoint, load
    from mole_jax.evaluation import evaluate
    from mole_jax.upcycling import params_fingerprint

    pretrained = None if ctx.args.dense else runs.train(ctx, dense_model)
    path = Path(ctx.args.dense).expanduser().absolute() if ctx.args.dense else pretrained.path
    ref = checkpoint.locate(path)
    cfg, params = checkpoint.restore_params(ref.path, as_numpy=True)
    if cfg.kind != "dense":
        raise MoleError(f"--dense {path} holds a {cfg.kind} model, not a Dense one")
    d = runs.data(ctx, cfg.vocab_size)
    ev = evaluate(ref.path, data_source=str(d.tokens), seq_len=ctx.train_cfg.seq_len,
                  max_windows=ctx.scale.eval_windows, devices=ctx.args.devices)
    tokens, windows = val_windows(ctx, cfg.vocab_size)
    scored = runs.scored_loss(load(ref.path), tokens, windows, ctx.train_cfg.seq_len)
    return Start(ref.path, ref.step, cfg, params_fingerprint(params), ev["loss"], scored, pretrained)


def val_windows(ctx: cli.Context, vocab_size: int):
    """The validation windows of every run of the script (its data, seq_len and val_fraction), at most the scale's."""
    d = runs.data(ctx, vocab_size)
    corpus = data_lib.open_corpus(str(d.tokens), vocab_size=vocab_size)
    tc = ctx.train_cfg
    windows = data_lib.windows_for_split(corpus.tokens.size, tc.seq_len, tc.val_fraction, "val")
    return corpus.tokens, windows[:ctx.scale.eval_windows] if ctx.scale.eval_windows else windows


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def arm_dir(ctx: cli.Context, start: Start, arm: Arm) -> Path:
    d = runs.data(ctx, start.cfg.vocab_size)
    recipe = {k: v for k, v in arm._asdict().items() if v is not None or k != "lr"}  # keys of the runs before lr
    key = digest({"dense": start.fingerprint, "train": continuation(ctx).to_dict(), "arm": recipe,
                        "experts": ctx.args.experts, "data": d.key, "dtype": ctx.dtype()})
    slug = arm.label.lower().replace(" ", "-").replace("(", "").replace(")", "")
    return ctx.runs / ctx.scale.name / f"upcycle-{slug}-{key}"


def continue_training(ctx: cli.Context, start: Start, arm: Arm) -> tuple[runs.Run, float]:
    """The arm's run: its starting run directory (the Dense model copied, or upcycled), the validation loss of its
    step-0 model, then the continuation; a finished arm is reused, an interrupted one resumes."""
    from mole_jax import checkpoint, load, upcycle
    from mole_jax.train import train as train_run
    from mole_jax.upcycling import start_run, upcycled_config

    path, tc = arm_dir(ctx, start, arm), continuation(ctx)
    cfg = start.cfg if arm.kind == "dense" else upcycled_config(start.cfg, ctx.args.experts)
    info_file = path / "experiment.json"
    if not (path / checkpoint.RUN_FILE).is_file():
        if arm.kind == "dense":  # the Dense model copied into a run that starts from it, as an upcycle does
            _, params = checkpoint.restore_params(start.path, as_numpy=True)
            run_dir = checkpoint.locate(start.path).run_dir
            start_run(path, start.cfg, params, {"path": str(start.path), "step": start.step, "kind": "dense",
                                                "fingerprint": start.fingerprint, "num_experts": 0},
                      tokenizer=run_dir / checkpoint.TOKENIZER if run_dir else None)
        else:
            upcycle(start.path, path, num_experts=ctx.args.experts, init=arm.init)
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    if "val_loss_step0" not in info:
        tokens, windows = val_windows(ctx, cfg.vocab_size)
        info["val_loss_step0"] = runs.scored_loss(load(path), tokens, windows, tc.seq_len)
        checkpoint.write_json_atomic(info_file, info)
    reused = "train_wall_s" in info
    if not reused:
        print(f"[{ctx.name}] continuing {arm.label} for {tc.steps} steps into {path}", file=sys.stderr)
        d = runs.data(ctx, cfg.vocab_size)
        t0 = time.perf_counter()
        train_run(cfg.replace(dtype=ctx.dtype()), arm_recipe(tc, arm), out=path,
                  data_source=str(d.tokens), tokenizer=d.tokenizer, devices=ctx.args.devices,
                  preset=arm.label, progress=ctx.progress)
        info.update(train_wall_s=time.perf_counter() - t0, command=ctx.command)
        checkpoint.write_json_atomic(info_file, info)
    history = [json.loads(line) for line in (path / checkpoint.METRICS).read_text().splitlines() if line.strip()]
    run = runs.Run(cli.Model(arm.label, arm.label, cfg), path, info["train_wall_s"], reused, history)
    return run, info["val_loss_step0"]


def arm_recipe(tc, arm: Arm):
    return dataclasses.replace(tc, trainable=arm.trainable, peak_lr=arm.lr or tc.peak_lr)


def step_times(ctx: cli.Context, trained: list[tuple[Arm, runs.Run]], iters: int) -> list[float]:
    """Median ms of one training step of each arm (its model, --train mode and dedup capacity), compiled and timed
    side by side, round-robin after a warmup, on the continuation's first batch: what the runs' own wall times
    (trained one after another on a shared machine) cannot compare."""
    import jax
    import numpy as np

    from mole_jax import checkpoint, sharding
    from mole_jax.train_step import ShardedStep

    tc, mesh = continuation(ctx), sharding.make_mesh(ctx.args.devices)
    V = trained[0][1].model.cfg.vocab_size
    corpus = data_lib.open_corpus(str(runs.data(ctx, V).tokens), vocab_size=V)
    windows, _ = data_lib.split_windows(corpus.tokens.size, tc.seq_len, tc.val_fraction)
    batches = data_lib.Batches(corpus.tokens, windows, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=tc.seed,
                               vocab_size=V)
    timed = []
    for arm, run in trained:
        step = ShardedStep(run.model.cfg.replace(dtype=ctx.dtype()), arm_recipe(tc, arm), mesh,
                           dedup_rows=checkpoint.read_run(run.path)["dedup"]["rows"])
        state, batch = step.init_state(tc.seed), step.feed(lambda rows: batches.batch(0, rows))
        compiled = step.compile(state, batch)
        state, metrics = compiled(state, batch)  # the step's time does not depend on the parameters' values
        jax.block_until_ready(metrics)
        timed.append([compiled, state, batch, []])
    for _ in range(iters):
        for t in timed:
            t0 = time.perf_counter()
            t[1], metrics = t[0](t[1], t[2])
            jax.block_until_ready(metrics)
            t[3].append(1000 * (time.perf_counter() - t0))
    return [float(np.median(t[3])) for t in timed]


def measure(ctx: cli.Context, start: Start, arm: Arm, run: runs.Run, step0: float) -> dict:
    """One arm's row: sizes, what trained, the continuation's tokens and time, validation losses, the table."""
    tc = continuation(ctx)
    counts = run.model.cfg.param_counts()
    new_params = counts["total"] - start.cfg.param_counts()["total"]
    rates = [r["tokens_per_s"] for r in run.history if r.get("tokens_per_s") and r["step"] > tc.log_every]
    row = {"model": arm.label, "kind": arm.kind, "trainable": arm.trainable, "init": arm.init,
           "peak_lr": arm.lr or tc.peak_lr,
           "params_total": counts["total"], "params_active": counts["active"],
           "trained_params": new_params if arm.trainable == "new" else counts["total"],
           "train_tokens": tc.steps * tc.batch_size * tc.seq_len, "steps": tc.steps,
           "epochs_at_end": run.history[-1].get("epoch") if run.history else None,
           "train_loss": run.history[-1].get("loss") if run.history else None,
           "val_loss_step0": step0, "val_loss": runs.val_loss(ctx, run)["loss"],
           "train_wall_s": run.wall_s, "tokens_per_s": float(sorted(rates)[len(rates) // 2]) if rates else None,
           "reused_run": run.reused, "run": str(run.path)}
    row["vs_start"] = row["val_loss"] - start.val_loss
    if arm.kind == "mole":
        row["lut_bytes_fp16"] = 2 * run.model.cfg.vocab_size * run.model.cfg.lut_row_size
        if arm == arms(ctx)[1]:
            row.update(table_check(ctx, run))
    return row


def table_check(ctx: cli.Context, run: runs.Run) -> dict:
    """The arm's float16 table: its bytes on disk, and the validation loss through it against the training form's
    on the same windows by the same scoring path."""
    from mole_jax import load
    from mole_jax.lut import read_info

    tokens, windows = val_windows(ctx, run.model.cfg.vocab_size)
    table = runs.lut_table(ctx, run, "float16")
    seq_len = ctx.train_cfg.seq_len
    return {"lut_nbytes": read_info(table)["nbytes"],
            "val_loss_scored": runs.scored_loss(load(run.path), tokens, windows, seq_len),
            "val_loss_lut_fp16": runs.scored_loss(load(run.path, lut=table, lut_placement=ctx.scale.lut_placement),
                                                  tokens, windows, seq_len)}


# Rows ---------------------------------------------------------------------------------------------------------
def compare(rows: list[dict]) -> None:
    for r in rows:
        r["vs_dense"] = r["val_loss"] - rows[0]["val_loss"]
        if r.get("step_ms"):
            r["step_vs_dense"] = r["step_ms"] / rows[0]["step_ms"]


# Report -------------------------------------------------------------------------------------------------------
def write_up(ctx: cli.Context, start: Start, rows: list[dict], histories: dict) -> dict:
    tc = continuation(ctx)
    start_row = {"model": "Dense (start)", "kind": "dense", "params_total": start.cfg.param_counts()["total"],
                 "params_active": start.cfg.param_counts()["active"], "val_loss": start.val_loss,
                 "val_loss_scored": start.scored, "run": str(start.path)}
    draw = functools.partial(plot, histories=histories, start=start.val_loss,
                             tokens_per_step=tc.batch_size * tc.seq_len)
    return report.result("Upcycling a trained Dense model into MoLE", [start_row, *rows], columns(), draw,
                         settings=settings(ctx, start), notes=notes(ctx, start, rows))


def notes(ctx: cli.Context, start: Start, rows: list[dict]) -> list[str]:
    dense, new, full = rows[0], rows[1], rows[2]
    out = [f"Equal training tokens: every continuation saw {dense['train_tokens']:,} tokens in the same order, from "
           f"the same Dense checkpoint (step {start.step}, validation loss {start.val_loss:.4f}), each with a fresh "
           "optimizer and the same learning-rate schedule."]
    for r in (new, full, *rows[3:]):
        d = r["val_loss"] - dense["val_loss"]
        out.append(f"{r['model']} - Dense continued: {d:+.4f} nats of validation loss "
                   f"({'lower: better' if d < 0 else 'higher: worse' if d > 0 else 'equal'}); step 0 "
                   f"{r['val_loss_step0']:.6f} vs the Dense model's {start.scored:.6f} on the same windows.")
    news = [r for r in rows if r["trainable"] == "new" and r["kind"] == "mole"]
    inits = sorted((r for r in news if r["peak_lr"] == new["peak_lr"]), key=lambda r: r["val_loss"])
    out.append("Initialisations under --train new, by validation loss: "
               + ", ".join(f"{r['init']} {r['val_loss']:.4f}" for r in inits) + f"; best: {inits[0]['init']}.")
    if len({r["peak_lr"] for r in news}) > 1:
        out.append(f"Peak rates under --train new ({new['init']}), by validation loss: " + ", ".join(
            f"{r['peak_lr']:g} {r['val_loss']:.4f}" for r in sorted(news, key=lambda r: r["val_loss"])
            if r["init"] == new["init"]) + ".")
    if new.get("step_ms") and full.get("step_ms"):
        out.append(f"Step time side by side (median ms): Dense {dense['step_ms']:,.0f}, {new['model']} "
                   f"{new['step_ms']:,.0f} ({new['step_vs_dense']:.2f}x), {full['model']} {full['step_ms']:,.0f} "
                   f"({full['step_vs_dense']:.2f}x). The runs' own wall times were taken one after another on a "
                   "shared machine and do not compare.")
    if "val_loss_lut_fp16" in new:
        out.append(f"{new['model']} through its float16 table ({new['lut_nbytes']:,} bytes): validation loss "
                   f"{new['val_loss_lut_fp16']:.6f} vs {new['val_loss_scored']:.6f} in training form; served with "
                   "the table, it is the Dense backbone plus routers on the device.")
    return out


def columns() -> list[Column]:
    return [Column("model", "model"), Column("trainable", "trains"), Column("init", "init"),
            Column("params_total", "total params", ",d"), Column("params_active", "active params", ",d"),
            Column("trained_params", "trained params", ",d"), Column("train_tokens", "tokens", ",d"),
            Column("val_loss_step0", "val loss step 0", ".4f"), Column("val_loss", "val loss", ".4f"),
            Column("vs_dense", "vs Dense continued", "+.4f"), Column("vs_start", "vs start", "+.4f"),
            Column("lut_bytes_fp16", "table bytes fp16", ",d"),
            Column("val_loss_lut_fp16", "val loss via fp16 table", ".4f"),
            Column("step_ms", "step ms", ",.0f"), Column("step_vs_dense", "step x Dense", ".2f"),
            Column("train_wall_s", "train wall s", ",.0f")]


def settings(ctx: cli.Context, start: Start) -> dict:
    tc = continuation(ctx)
    d = runs.data(ctx, start.cfg.vocab_size)
    return {"data": runs.describe_data(d),
            "start": (f"{start.path} (step {start.step}; quality.py's Dense run)" if start.pretrained else
                      f"{start.path} (step {start.step}; --dense)"),
            "continuation": f"{tc.steps} steps x {tc.batch_size} x {tc.seq_len} tokens, AdamW peak lr {tc.peak_lr:g}, "
                            f"warmup {tc.warmup_frac:.0%}, cosine to {tc.final_lr_frac:g}x, seed {tc.seed}, dtype "
                            f"{ctx.dtype()}, a fresh optimizer for every arm",
            "validation": f"the held-out {tc.val_fraction:.2%} of windows (mole_jax.evaluate)"
                          + (f", at most {ctx.scale.eval_windows}" if ctx.scale.eval_windows else "")}


# Plot ---------------------------------------------------------------------------------------------------------
def plot(fig, *, histories: dict, start: float, tokens_per_step: int) -> None:
    """Validation loss and training loss (smoothed) against the continuation's tokens."""
    ax1, ax2 = fig.subplots(1, 2)
    for i, (label, (history, step0, arm)) in enumerate(histories.items()):
        c = COLORS["dense" if arm.kind == "dense" else "all" if arm.trainable == "all" else arm.init]
        ls = "-" if i < 3 else "--"
        x, y = report.curve(history, "val_loss", tokens_per_step)
        ax1.plot([0] + [t / 1e6 for t in x], [step0] + y, marker="o", ls=ls, color=c, label=label)
        x, y = report.curve(history, "loss", tokens_per_step)
        ax2.plot([t / 1e6 for t in x], report.smooth(y), ls=ls, color=c, label=label)
    ax1.axhline(start, color="gray", ls=":", lw=1, label="Dense at the start")
    ax1.set(xlabel="continuation tokens (M)", ylabel="validation loss (nats)", title="validation loss")
    ax2.set(xlabel="continuation tokens (M)", ylabel="train loss (nats, smoothed)", title="training loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def main(argv=None) -> int:
    return cli.main("upcycle", __doc__, experiment, argv, add_arguments=add_arguments)


if __name__ == "__main__":
    sys.exit(main())
