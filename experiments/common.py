"""What every experiment script shares: arguments and scales, the data (prepared once, shared by every run), training
through `mole_jax.train`, evaluation, the paper's numbers, and writing a result as markdown + JSON + PNG.

A script is `python experiments/<name>.py --scale tiny|small|paper [--out DIR] [--data PATH ...]`. Its training runs
live under `--runs` (default runs/experiments), one directory per (model, training settings, data), named by a hash
of all three: scripts that need the same model trained the same way share one run (experts.py reuses quality.py's
Dense and MoLE-4E, compression.py its MoLE-4E), an interrupted script resumes its runs, and any change of settings
trains a new run instead of touching an old one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

ROOT = Path(__file__).resolve().parents[1]
# The paper's result tables, when this checkout sits beside the project's shared reference material; optional.
PAPER_TABLES = ROOT.parent / "shared" / "reference" / "paper_tables.json"
SCALES = ("tiny", "small", "paper")
PAPER_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "race", "social_iqa", "lambada_openai")
TASK_LABELS = {"arc_challenge": "ARC-C", "arc_easy": "ARC-E", "boolq": "BoolQ", "hellaswag": "HellaSwag",
               "piqa": "PIQA", "race": "RACE", "social_iqa": "SIQA", "lambada_openai": "LAMBADA"}


class Scale(NamedTuple):
    """How big an experiment runs. `family` names the presets: tiny-*/small-* (config.py's CPU families) or the
    paper's 160m/410m; `train` is the one recipe every model of a comparison gets (same seed, order, tokens)."""

    name: str
    family: str
    train: Any  # mole_jax.TrainConfig
    eval_windows: int | None  # validation windows scored per model (None: the whole validation split)
    lut_eval_windows: int | None  # windows scored through a lookup table (and the training form, for comparison)
    error_rows: int | None  # table rows compared for reconstruction error (None: every vocabulary row)
    accelerator: bool  # meant for GPU/TPU: --data is required, bfloat16 compute
    lut_placement: str = "device"  # where a table lives while scored ("storage": rows read per batch, for tables
    #                                larger than device or host memory, e.g. 410M-16E in float32 is 79 GB)


def scales() -> dict[str, Scale]:
    from mole_jax import TrainConfig

    quiet = dict(checkpoint_every=10 ** 9, keep_checkpoints=1)  # the last step is always saved
    return {
        # CI smoke: seconds per model.
        "tiny": Scale("tiny", "tiny", TrainConfig(steps=40, batch_size=8, seq_len=64, peak_lr=3e-3, warmup_frac=0.05,
                                                  log_every=5, eval_every=20, eval_batches=4, **quiet),
                      eval_windows=64, lut_eval_windows=64, error_rows=None, accelerator=False),
        # The embedded English corpus (~400k tokens with the 8,192-token BPE): 4,096 tokens per step, 240 steps =
        # 0.98 M tokens, ~2.6 epochs of the training windows. The paper's recipe otherwise, with a warmup suited to
        # a few hundred steps and the peak rate chosen on Dense alone (150 steps: 1e-3 beat 3e-3 by 0.36 nats).
        "small": Scale("small", "small", TrainConfig(steps=240, batch_size=16, seq_len=256, peak_lr=1e-3,
                                                     warmup_frac=0.05, log_every=5, eval_every=40, eval_batches=8,
                                                     checkpoint_every=80, keep_checkpoints=1),
                       eval_windows=None, lut_eval_windows=None, error_rows=None, accelerator=False),
        # The paper's recipe (mole.md section 4): 50,000 steps x 1,024 x 2,048 tokens = 105 B tokens, peak lr 6e-4
        # (160M). A sliver of the data is held out: 0.05% of 100 B tokens is 50 M tokens, of which 1,024 windows
        # (2 M tokens) are scored.
        "paper": Scale("paper", "160m", TrainConfig(steps=50_000, batch_size=1024, seq_len=2048, peak_lr=6e-4,
                                                    warmup_frac=0.01, log_every=50, eval_every=1000, eval_batches=8,
                                                    val_fraction=0.0005, checkpoint_every=1000, keep_checkpoints=2),
                       eval_windows=1024, lut_eval_windows=128, error_rows=4096, accelerator=True,
                       lut_placement="storage"),
    }


# Models -------------------------------------------------------------------------------------------------------
class Model(NamedTuple):
    label: str  # the paper's name: Dense, MoE-10E, MoLE-4E, MoE-34E, MoLE-16E, MoLE-2E, ...
    name: str  # the preset (or preset + change) it is, recorded as the run's preset
    cfg: Any  # mole_jax.ModelConfig


def model(family: str, label: str, **changes) -> Model:
    """The model of the paper's name `label` ("Dense", "MoE-10E", "MoE-34E", "MoLE-4E", "MoLE-<N>E") in a preset
    family. The CPU families have Dense/MoE-10E/MoLE-4E presets (tiny-dense, tiny-moe, tiny-mole); the other expert
    counts are those presets with `num_experts` changed, exactly as the paper's 34E/16E differ from its 10E/4E."""
    from mole_jax import get_preset

    kind, _, experts = label.lower().partition("-")
    n = int(experts[:-1]) if experts else 0
    if family in ("tiny", "small"):
        base = get_preset(f"{family}-{kind}")
        name = f"{family}-{kind}" if n in (0, base.num_experts) else f"{family}-{kind}-{n}e"
    else:
        base = get_preset({"dense": f"dense-{family}", "moe": f"moe-10e-{family}", "mole": f"mole-4e-{family}"}[kind])
        name = f"{kind}-{n}e-{family}" if n else f"dense-{family}"  # the paper's names (not all are presets)
    return Model(label, name, base.replace(num_experts=n or base.num_experts, **changes))


# Arguments ----------------------------------------------------------------------------------------------------
def parser(name: str, description: str, *, training: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"experiments/{name}.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", required=True, choices=SCALES,
                   help="tiny: CI smoke (seconds); small: CPU, minutes per model; paper: the paper's recipe, GPU/TPU")
    p.add_argument("--out", default=f"results/{name}",
                   help=f"directory for {name}_<scale>.md/.json/.png (default results/{name})")
    p.add_argument("--runs", default="runs/experiments",
                   help="training runs, shared by the scripts: the same model trained the same way is trained once")
    p.add_argument("--devices", type=int, default=None, help="devices to use (default: all)")
    p.add_argument("--paper-tables", default=str(PAPER_TABLES),
                   help="the paper's result tables (JSON); skipped when the file does not exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if training:
        p.add_argument("--data", nargs="+", default=None,
                       help="training text (files/directories), a .bin token file or hf:NAME, as for mole-jax train "
                            "(default: the embedded English corpus; required at --scale paper)")
        p.add_argument("--tokenizer", default=None,
                       help="tokenizer.json (paper: GPT-NeoX-20B's; default: a BPE trained on the text)")
        p.add_argument("--size", default="160m", choices=["160m", "410m", "1b"],
                       help="--scale paper: the paper's model size (160m; 410m and 1b train at peak lr 3e-4)")
        p.add_argument("--steps", type=int, default=None, help="override the scale's optimizer steps")
        p.add_argument("--lr", type=float, default=None, help="override the scale's peak learning rate")
        p.add_argument("--grad-accum", type=int, default=None,
                       help="micro-batches per step (paper scale: the 1,024 x 2,048-token batch in pieces that fit)")
        p.add_argument("--seed", type=int, default=None, help="override the seed (initialisation and batch order)")
        p.add_argument("--plan", action="store_true",
                       help="print the models, their sizes, training FLOPs and estimated accelerator-hours; no run")
        p.add_argument("--peak-tflops", type=float, default=989.0,
                       help="--plan: accelerator peak in TFLOP/s (989: H100 SXM bf16 dense)")
        p.add_argument("--mfu", type=float, default=0.4, help="--plan: model FLOPs utilisation assumed (0.4)")
    return p


@dataclasses.dataclass
class Context:
    """One script invocation: its arguments, scale, training recipe, and what it has measured so far."""

    name: str
    args: argparse.Namespace
    scale: Scale
    argv: list[str]
    started: float = dataclasses.field(default_factory=time.perf_counter)
    _data: Data | None = None

    @property
    def family(self) -> str:
        """The preset family: the scale's, or at paper scale the --size asked for."""
        return getattr(self.args, "size", None) or self.scale.family if self.scale.accelerator else self.scale.family

    @property
    def train_cfg(self):
        tc, a = self.scale.train, self.args
        if self.family in ("410m", "1b"):
            tc = dataclasses.replace(tc, peak_lr=3e-4)  # the paper's rate at 410M and 1B
        changes = {k: v for k, v in (("steps", getattr(a, "steps", None)), ("peak_lr", getattr(a, "lr", None)),
                                     ("grad_accum", getattr(a, "grad_accum", None)),
                                     ("seed", getattr(a, "seed", None))) if v is not None}
        return dataclasses.replace(tc, **changes)

    @property
    def progress(self) -> bool:
        return not self.args.no_progress and sys.stderr.isatty()

    @property
    def runs(self) -> Path:
        return Path(self.args.runs).expanduser().absolute()

    @property
    def out(self) -> Path:
        return Path(self.args.out).expanduser().absolute()

    @property
    def command(self) -> str:
        return shlex.join(["python", f"experiments/{self.name}.py", *self.argv])

    def dtype(self) -> str:
        """Compute dtype: float32 on CPU (no fast bf16, and the scales compare at float32), bfloat16 elsewhere."""
        import jax

        return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def main(name: str, description: str, experiment: Callable[[Context], dict], argv: Sequence[str] | None = None, *,
         training: bool = True, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse, run `experiment(ctx) -> result`, write and print it. Bad input (MoleError) is one line on stderr and
    exit code 2, as for the mole-jax command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser(name, description, training=training)
    if add_arguments:
        add_arguments(p)
    args = p.parse_args(argv)
    from mole_jax import MoleError

    ctx = Context(name, args, scales()[args.scale], argv)
    try:
        if training and args.scale == "paper" and not args.data and not args.plan:
            raise MoleError("--scale paper trains on your data: pass --data (e.g. the Pile tokenized to a .bin with "
                            "experiments/prepare_data.py) and --tokenizer (GPT-NeoX-20B's tokenizer.json)")
        _need_matplotlib()
        result = experiment(ctx)
        if result is not None:
            write_result(ctx, result)
    except MoleError as e:
        print(f"{p.prog}: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{p.prog}: interrupted (rerun the same command to resume its training runs)", file=sys.stderr)
        return 130
    return 0


def _need_matplotlib() -> None:
    from mole_jax import MoleError

    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        raise MoleError("the experiment scripts plot their results: pip install 'mole-jax[plot]'") from None


# Data ---------------------------------------------------------------------------------------------------------
class Data(NamedTuple):
    """The token stream every run of a script trains on: a token file (memory-mapped by each run) and its tokenizer."""

    tokens: Path  # .bin
    tokenizer: Path | None
    description: dict  # the source as mole_jax.data describes it (kind, paths, num_tokens, fingerprint, tokenizer)
    key: str  # identifies the token stream (part of every run's hash)


def data(ctx: Context, vocab_size: int) -> Data:
    """Tokenise the script's data once into runs/data/<key>/ (a .bin and its tokenizer.json) so that each of its
    runs memory-maps the same tokens instead of re-reading and re-tokenising the text. A .bin given with --data is
    used as it is. The cache key is the source (paths with sizes and modification times, the tokenizer's bytes, the
    vocabulary, and for the embedded corpus the Python version that supplies it), so a second script reuses it."""
    if ctx._data is not None:
        return ctx._data
    import numpy as np

    from mole_jax import MoleError
    from mole_jax import data as data_lib

    items = ctx.args.data or []
    tokenizer = Path(ctx.args.tokenizer).expanduser().absolute() if ctx.args.tokenizer else None
    if tokenizer is not None and not tokenizer.is_file():
        raise MoleError(f"tokenizer file {tokenizer} does not exist")
    if len(items) == 1 and str(items[0]).endswith(".bin"):
        path = Path(items[0]).expanduser().absolute()
        corpus = data_lib.open_corpus(str(path), vocab_size=vocab_size, tokenizer=tokenizer)
        desc = corpus.description
        ctx._data = Data(path, tokenizer, desc, desc["fingerprint"])
        return ctx._data
    source = {"vocab_size": vocab_size, "tokenizer": _file_digest(tokenizer) if tokenizer else "trained-bpe"}
    if not items or items == ["default"]:
        source.update(kind="default", python=sys.version.split()[0])
    elif len(items) == 1 and str(items[0]).startswith("hf:"):
        source.update(kind="hf", name=items[0])
    else:
        paths = [Path(p).expanduser().absolute() for p in items]
        for p in paths:
            if not p.exists():
                raise MoleError(f"data path {p} does not exist")
        files = data_lib.text_files(paths)
        source.update(kind="text", files=[[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    key = _digest(source)
    where = ctx.runs / "data" / key
    if not (where / "corpus.json").is_file():
        corpus = data_lib.open_corpus(None if source["kind"] == "default" else
                                      (items[0] if source["kind"] == "hf" else items),
                                      vocab_size=vocab_size, tokenizer=tokenizer)
        tmp = where.with_name(where.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        big = corpus.tokenizer.get_vocab_size(with_added_tokens=True) > 1 << 16
        np.asarray(corpus.tokens, np.uint32 if big else np.uint16).tofile(tmp / ("tokens.u32.bin" if big else
                                                                                 "tokens.bin"))
        corpus.tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "corpus.json").write_text(json.dumps({"source": source, "description": corpus.description},
                                                    indent=2) + "\n")
        if where.exists():  # another process finished first: keep its copy
            import shutil

            shutil.rmtree(tmp)
        else:
            tmp.rename(where)
    record = json.loads((where / "corpus.json").read_text())
    tokens = next(where.glob("tokens*.bin"))
    ctx._data = Data(tokens, where / "tokenizer.json", record["description"], key)
    return ctx._data


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def describe_data(d: Data) -> str:
    desc = d.description
    src = {"default": "the embedded English corpus (Python's documentation)", "tokens": "a token file",
           "hf": "a Hugging Face dataset", "text": "text files"}.get(desc["kind"], desc["kind"])
    tok = desc.get("tokenizer") or {}
    how = f", {tok.get('source', '?')} tokenizer of {tok.get('vocab_size', '?'):,} tokens" if tok else ""
    return f"{desc['num_tokens']:,} tokens of {src}{how}"


# Training and evaluation ------------------------------------------------------------------------------------------
class Run(NamedTuple):
    model: Model
    path: Path
    wall_s: float | None  # training wall time of the invocation that finished the run
    reused: bool  # finished before this script started
    history: list[dict]  # metrics.jsonl


def run_dir(ctx: Context, m: Model) -> Path:
    tc, cfg = ctx.train_cfg, m.cfg.replace(dtype=ctx.dtype())
    key = _digest({"model": cfg.to_dict(), "train": tc.to_dict(), "data": data(ctx, cfg.vocab_size).key})
    return ctx.runs / ctx.scale.name / f"{m.name}-{key}"


def train(ctx: Context, m: Model) -> Run:
    """Train `m` with the scale's recipe on the script's data, or reuse the finished run of the same settings."""
    from mole_jax import checkpoint
    from mole_jax.train import train as train_run

    tc, cfg = ctx.train_cfg, m.cfg.replace(dtype=ctx.dtype())
    d = data(ctx, cfg.vocab_size)
    path = run_dir(ctx, m)
    timing = path / "experiment.json"
    reused = _finished(path, tc.steps)
    if not reused:
        print(f"[{ctx.name}] training {m.label} ({m.name}) for {tc.steps} steps into {path}", file=sys.stderr)
        t0 = time.perf_counter()
        train_run(cfg, tc, out=path, data_source=str(d.tokens), tokenizer=d.tokenizer, devices=ctx.args.devices,
                  preset=m.name, progress=ctx.progress)
        checkpoint.write_json_atomic(timing, {"train_wall_s": time.perf_counter() - t0, "command": ctx.command})
    history = [json.loads(line) for line in (path / checkpoint.METRICS).read_text().splitlines() if line.strip()]
    wall = json.loads(timing.read_text())["train_wall_s"] if timing.is_file() else None
    return Run(m, path, wall, reused, history)


def _finished(path: Path, steps: int) -> bool:
    from mole_jax import MoleError, checkpoint

    if not (path / checkpoint.RUN_FILE).is_file():
        return False
    try:
        return checkpoint.locate(path).step >= steps
    except MoleError:
        return False


def val_loss(ctx: Context, run: Run) -> dict:
    """mole_jax.evaluate on the run's validation windows (all of them, or the scale's cap)."""
    from mole_jax import evaluate

    return evaluate(run.path, split="val", max_windows=ctx.scale.eval_windows, devices=ctx.args.devices)


def training_summary(ctx: Context, run: Run) -> dict:
    """Sizes, tokens, epochs and throughput of a finished run."""
    tc = ctx.train_cfg
    counts = run.model.cfg.param_counts()
    last = run.history[-1] if run.history else {}
    rates = [r["tokens_per_s"] for r in run.history if r.get("tokens_per_s") and r["step"] > tc.log_every]
    return {"model": run.model.label, "preset": run.model.name, "kind": run.model.cfg.kind,
            "num_experts": run.model.cfg.num_experts, "params_total": counts["total"],
            "params_active": counts["active"], "steps": tc.steps, "train_tokens": tc.steps * tc.batch_size * tc.seq_len,
            "epochs": last.get("epoch"), "train_loss": last.get("loss"),
            "tokens_per_s": float(sorted(rates)[len(rates) // 2]) if rates else None,
            "train_wall_s": run.wall_s, "reused_run": run.reused, "run": str(run.path)}


def val_windows(ctx: Context, run: Run, cap: int | None):
    """The run's validation windows (data.windows_for_split), at most `cap`, and the token stream they index."""
    from mole_jax import checkpoint
    from mole_jax import data as data_lib

    info = checkpoint.read_run(run.path)
    tc = ctx.train_cfg
    d = data(ctx, run.model.cfg.vocab_size)
    corpus = data_lib.open_corpus(str(d.tokens), vocab_size=run.model.cfg.vocab_size)
    windows = data_lib.windows_for_split(corpus.tokens.size, tc.seq_len, info["train_config"]["val_fraction"], "val")
    return corpus.tokens, windows[:cap] if cap else windows


def lut_table(ctx: Context, run: Run, scheme: str) -> Path:
    """The run's lookup table in `scheme` (RUN/luts/<scheme>), converted from its final checkpoint unless a complete
    table of that checkpoint is there (an interrupted conversion resumes)."""
    from mole_jax import checkpoint, convert_to_lut
    from mole_jax.lut import read_info

    where = run.path / "luts" / scheme
    step = checkpoint.locate(run.path).step
    if (where / "lut.json").is_file():
        info = read_info(where)
        if info["complete"] and info.get("source", {}).get("step") == step:
            return where
    print(f"[{ctx.name}] converting {run.model.label} to a {scheme} table", file=sys.stderr)
    convert_to_lut(run.path, where, scheme, overwrite=True, progress=ctx.progress)
    return where


def scored_loss(lm, tokens, windows, seq_len: int, batch: int = 8) -> float:
    """Mean next-token cross-entropy (nats) of a loaded LanguageModel over these windows, through its
    `token_logprobs` (the lm-eval adapter's scoring path: LUT rows fetched from the table for the inference form).
    Batches are padded to a fixed size so that the scoring function is traced once per table placement."""
    import numpy as np

    from mole_jax import data as data_lib

    V = lm.config.vocab_size
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        chunk = windows[i:i + batch]
        padded = np.concatenate([chunk, np.full(batch - len(chunk), chunk[0])])
        x = data_lib.read_windows(tokens, padded, seq_len, V)
        logp_BxT, _ = lm.token_logprobs(x[:, :-1], x[:, 1:])
        logp = np.asarray(logp_BxT, np.float64)[:len(chunk)]
        total -= float(logp.sum())
        count += logp.size
    return total / count


# The paper's numbers ----------------------------------------------------------------------------------------------
def paper_tables(ctx: Context) -> dict | None:
    p = Path(ctx.args.paper_tables).expanduser()
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"[{ctx.name}] ignoring unreadable paper tables {p}: {e}", file=sys.stderr)
        return None


def paper_size(ctx: Context) -> str:
    """The paper's model size the comparison maps to: the family at paper scale, else 160M (the paper's smallest,
    closest in spirit to the CPU presets)."""
    return ctx.family.upper() if ctx.scale.accelerator else "160M"


# Zero-shot accuracy -------------------------------------------------------------------------------------------
def zero_shot(run_path: Path, tasks: Sequence[str], lut: Path | None = None, batch_size: int = 16,
              limit: int | None = None, include_path: str | None = None) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness on `tasks` through the `mole_jax` adapter (mole_jax.harness): {task: {metric: value}}.
    lm-eval's own tasks download their data from the Hugging Face hub unless it is cached; `include_path` adds a
    directory of task YAMLs (e.g. over local JSON lines files)."""
    from mole_jax import MoleError

    try:
        import lm_eval
        from lm_eval.tasks import TaskManager

        import mole_jax.harness  # noqa: F401  (registers the "mole_jax" model)
    except ImportError:
        raise MoleError("zero-shot accuracy needs lm-eval: pip install 'mole-jax[eval]'") from None
    model_args = f"path={run_path}" + (f",lut={lut}" if lut else "")
    out = lm_eval.simple_evaluate(model="mole_jax", model_args=model_args, tasks=list(tasks), limit=limit,
                                  batch_size=batch_size, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=include_path))
    results = {}
    for task in tasks:
        r = out["results"].get(task, {})
        results[task] = {k.split(",")[0]: float(v) for k, v in r.items()
                         if k.split(",")[0] in ("acc", "acc_norm") and isinstance(v, (int, float))}
    return results


# Planning ---------------------------------------------------------------------------------------------------------
def plan(ctx: Context, models: Sequence[Model]) -> None:
    """Print what a script would train: sizes, tokens, matmul FLOPs (train.train_flops_per_token: forward x 3, the
    experts on every token, i.e. without dedup) and the accelerator-hours at the given peak and MFU: an estimate."""
    from mole_jax import bench
    from mole_jax.train import train_flops_per_token

    tc = ctx.train_cfg
    tokens = tc.steps * tc.batch_size * tc.seq_len
    peak = ctx.args.peak_tflops * 1e12 * ctx.args.mfu
    rows = []
    for m in models:
        c = m.cfg.param_counts()
        flops = train_flops_per_token(m.cfg, tc.seq_len) * tokens
        rows.append({"model": m.label, "preset": m.name, "params_total": f"{c['total'] / 1e6:,.1f}M",
                     "params_active": f"{c['active'] / 1e6:,.1f}M", "train_tokens": f"{tokens / 1e9:,.3g}B",
                     "train_PFLOP": flops / 1e15, "accelerator_hours": flops / peak / 3600})
    print(f"{ctx.name} at --scale {ctx.scale.name}: {tc.steps:,} steps x {tc.batch_size:,} x {tc.seq_len:,} tokens; "
          f"estimate at {ctx.args.peak_tflops:g} TFLOP/s peak and {ctx.args.mfu:.0%} MFU (an estimate, not a "
          "measurement)")
    bench.print_table(rows, list(rows[0]), file=sys.stdout)


# Writing results --------------------------------------------------------------------------------------------------
class Column(NamedTuple):
    key: str
    header: str
    fmt: str = ""  # format spec for numbers, e.g. ".4f", ",.0f", ".1%"


def fmt(value, spec: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and spec:
        return format(value, spec)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    lines = ["| " + " | ".join(c.header for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c.key), c.fmt) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def result(title: str, rows: list[dict], columns: Sequence[Column], plot: Callable[[Any], None], *,
           settings: dict | None = None, notes: Sequence[str] = (), paper: Any = None,
           extra_tables: Sequence[tuple[str, list[dict], Sequence[Column]]] = (),
           figsize: tuple[float, float] = (11, 4.2)) -> dict:
    """What an experiment returns: written by write_result. `plot(fig)` draws into a matplotlib figure."""
    return {"title": title, "rows": rows, "columns": columns, "plot": plot, "settings": settings or {},
            "notes": list(notes), "paper": paper, "extra_tables": list(extra_tables), "figsize": figsize}


def write_result(ctx: Context, res: dict) -> dict[str, Path]:
    """<out>/<name>_<scale>.md, .json and .png, each written to a temporary name and renamed into place (an
    interrupted script leaves the previous complete result, never half of a new one); the table is printed."""
    import matplotlib.pyplot as plt

    from mole_jax import bench

    ctx.out.mkdir(parents=True, exist_ok=True)
    stem = f"{ctx.name}_{ctx.scale.name}"
    paths = {ext: ctx.out / f"{stem}.{ext}" for ext in ("md", "json", "png")}
    wall = time.perf_counter() - ctx.started
    machine = bench.machine()
    fig = plt.figure(figsize=res["figsize"])
    res["plot"](fig)
    fig.tight_layout()
    tmp_png = paths["png"].with_name(paths["png"].name + ".tmp.png")
    fig.savefig(tmp_png, dpi=110)
    plt.close(fig)

    reused = any(r.get("reused_run") for r in res["rows"])
    header = [f"# {res['title']} (--scale {ctx.scale.name})", "",
              f"Command: `{ctx.command}`  ",
              f"Wall time: {wall:,.0f} s on {machine['device_count']} x {machine['device']} ({machine['backend']}, "
              f"jax {machine['jax']})" + ("; training runs marked reused were trained by an earlier invocation "
                                          "(their training time is their own)" if reused else "")]
    for k, v in res["settings"].items():
        header.append(f"- {k}: {v}")
    body = [markdown_table(res["rows"], res["columns"])]
    for title, rows, columns in res["extra_tables"]:
        body += ["", f"### {title}", "", markdown_table(rows, columns)]
    if res["notes"]:
        body += ["", *[f"- {n}" for n in res["notes"]]]
    body += ["", f"![{ctx.name}]({paths['png'].name})", ""]
    text = "\n".join(header + [""] + body)
    payload = {"experiment": ctx.name, "scale": ctx.scale.name, "title": res["title"], "command": ctx.command,
               "wall_seconds": wall, "machine": machine, "settings": res["settings"], "rows": res["rows"],
               "extra_tables": {t: rows for t, rows, _ in res["extra_tables"]}, "notes": res["notes"],
               "paper": res["paper"], "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for ext, content in (("json", json.dumps(payload, indent=2, default=_jsonable) + "\n"), ("md", text)):
        tmp = paths[ext].with_name(paths[ext].name + ".tmp")
        tmp.write_text(content)
        tmp.replace(paths[ext])
    tmp_png.replace(paths["png"])
    print(text)
    print(f"[{ctx.name}] wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return paths


def _jsonable(x):
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):  # numpy scalars
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def log_x(ax, ticks: Sequence[float], labels: Sequence[str] | None = None) -> None:
    """A log x axis with exactly these ticks labelled (no 2x10^0 minor labels)."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log")
    ax.set_xticks(list(ticks), list(labels) if labels is not None else [f"{t:,g}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())


def log_y(ax) -> None:
    """A log y axis ticked at 1, 2, 5 x 10^k with plain numbers (readable when it spans less than a decade)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.6g}"))
    ax.yaxis.set_minor_locator(NullLocator())


def curve(history: Sequence[dict], key: str, tokens_per_step: int) -> tuple[list[float], list[float]]:
    """(tokens seen, value) of a metric in a run's log."""
    pts = [(r["step"] * tokens_per_step, r[key]) for r in history if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def smooth(values: Sequence[float], weight: float = 0.6) -> list[float]:
    """An exponential moving average, debiased (TensorBoard's smoothing): noisy training losses, readable."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** (i + 1)))
    return out
