"""A script's command line: the scales (tiny | small | paper), the models of the paper's names, the shared arguments,
the Context one invocation carries, and `main`, which parses, runs the experiment and writes its result."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from lab import report
from mole_jax.config import ModelConfig, MoleError, TrainConfig, get_preset

ROOT = Path(__file__).resolve().parents[2]
# The paper's published result tables (zero-shot accuracies; cited in the file's "source"), part of the repository.
PAPER_TABLES = ROOT / "experiments" / "paper_tables.json"
SCALES = ("tiny", "small", "paper")


class Scale(NamedTuple):
    """How big an experiment runs. `family` names the presets: tiny-*/small-* (config.py's CPU families) or the
    paper's 160m/410m; `train` is the one recipe every model of a comparison gets (same seed, order, tokens)."""

    name: str
    family: str
    train: TrainConfig
    eval_windows: int | None  # validation windows scored per model (None: the whole validation split)
    lut_eval_windows: int | None  # windows scored through a lookup table (and the training form, for comparison)
    error_rows: int | None  # table rows compared for reconstruction error (None: every vocabulary row)
    accelerator: bool  # meant for GPU/TPU: --data is required, bfloat16 compute
    lut_placement: str = "device"  # where a table lives while scored ("storage": rows read per batch, for tables
    #                                larger than device or host memory, e.g. 410M-16E in float32)


def scales() -> dict[str, Scale]:
    quiet = dict(checkpoint_every=10 ** 9, keep_checkpoints=1)  # the last step is always saved
    return {
        # CI smoke: seconds per model.
        "tiny": Scale("tiny", "tiny", TrainConfig(steps=40, batch_size=8, seq_len=64, peak_lr=3e-3, warmup_frac=0.05,
                                                  log_every=5, eval_every=20, eval_batches=4, **quiet),
                      eval_windows=64, lut_eval_windows=64, error_rows=None, accelerator=False),
        # The embedded English corpus with the 8,192-token BPE, seen a few times over. The paper's recipe otherwise,
        # with a warmup suited to a few hundred steps and the peak rate chosen on Dense alone (docs/experiments.md).
        "small": Scale("small", "small", TrainConfig(steps=240, batch_size=16, seq_len=256, peak_lr=1e-3,
                                                     warmup_frac=0.05, log_every=5, eval_every=40, eval_batches=8,
                                                     checkpoint_every=80, keep_checkpoints=1),
                       eval_windows=None, lut_eval_windows=None, error_rows=None, accelerator=False),
        # The paper's recipe (its appendix): 50,000 steps x 1,024 x 2,048 tokens, peak lr 6e-4 (160M). A sliver
        # of the data is held out, of which 1,024 windows are scored.
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
    cfg: ModelConfig


def model(family: str, label: str, **changes) -> Model:
    """The model of the paper's name `label` ("Dense", "MoE-10E", "MoE-34E", "MoLE-4E", "MoLE-<N>E") in a preset
    family. The CPU families have Dense/MoE-10E/MoLE-4E presets (tiny-dense, tiny-moe, tiny-mole); the other expert
    counts are those presets with `num_experts` changed, exactly as the paper's 34E/16E differ from its 10E/4E."""
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
        _training_arguments(p)
    return p


def _training_arguments(p: argparse.ArgumentParser) -> None:
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


@dataclasses.dataclass
class Context:
    """One script invocation: its arguments, scale, training recipe, and the data it has prepared so far."""

    name: str
    args: argparse.Namespace
    scale: Scale
    argv: list[str]
    started: float = dataclasses.field(default_factory=time.perf_counter)
    prepared_data: Any = None  # runs.Data, once runs.data has tokenised the script's data

    @property
    def family(self) -> str:
        """The preset family: the scale's, or at paper scale the --size asked for."""
        if not self.scale.accelerator:
            return self.scale.family
        return getattr(self.args, "size", None) or self.scale.family

    @property
    def train_cfg(self) -> TrainConfig:
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
        import jax  # not at --help

        return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def main(name: str, description: str, experiment: Callable[[Context], dict | None],
         argv: Sequence[str] | None = None, *, training: bool = True,
         add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse, run `experiment(ctx) -> result` (report.result, or None when there is nothing to write), write and
    print it. Bad input (MoleError) is one line on stderr and exit code 2, as for the mole-jax command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser(name, description, training=training)
    if add_arguments:
        add_arguments(p)
    args = p.parse_args(argv)
    ctx = Context(name, args, scales()[args.scale], argv)
    try:
        if training and args.scale == "paper" and not args.data and not args.plan:
            raise MoleError("--scale paper trains on your data: pass --data (e.g. the Pile tokenized to a .bin with "
                            "experiments/prepare_data.py) and --tokenizer (GPT-NeoX-20B's tokenizer.json)")
        _need_matplotlib()
        res = experiment(ctx)
        if res is not None:
            report.write_result(ctx, res)
    except MoleError as e:
        print(f"{p.prog}: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{p.prog}: interrupted (rerun the same command to resume its training runs)", file=sys.stderr)
        return 130
    return 0


def _need_matplotlib() -> None:
    try:
        import matplotlib
    except ImportError:
        raise MoleError("the experiment scripts plot their results: pip install 'mole-jax[plot]'") from None
    matplotlib.use("Agg")
