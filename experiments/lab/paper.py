"""The paper's side of a comparison: its result tables (printed beside ours when the file is there), its zero-shot
tasks scored through lm-eval and the mole_jax adapter, and the --plan estimate of what training at its scale costs."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Sequence

from lab.cli import Context, Model
from mole_jax.config import MoleError

TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "race", "social_iqa", "lambada_openai")
TASK_LABELS = {"arc_challenge": "ARC-C", "arc_easy": "ARC-E", "boolq": "BoolQ", "hellaswag": "HellaSwag",
               "piqa": "PIQA", "race": "RACE", "social_iqa": "SIQA", "lambada_openai": "LAMBADA"}


def tables(ctx: Context) -> dict | None:
    """The paper's result tables (--paper-tables), or None when the file is absent or unreadable."""
    p = Path(ctx.args.paper_tables).expanduser()
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"[{ctx.name}] ignoring unreadable paper tables {p}: {e}", file=sys.stderr)
        return None


def size(ctx: Context) -> str:
    """The paper's model size the comparison maps to: the family at paper scale, else 160M (the paper's smallest,
    closest in spirit to the CPU presets)."""
    return ctx.family.upper() if ctx.scale.accelerator else "160M"


def zero_shot(run_path: Path, tasks: Sequence[str], *, lut: Path | None = None, batch_size: int = 16,
              limit: int | None = None, include_path: str | None = None) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness on `tasks` through the `mole_jax` adapter (mole_jax.harness): {task: {metric: value}}.
    lm-eval's own tasks download their data from the Hugging Face hub unless it is cached; `include_path` adds a
    directory of task YAMLs (e.g. over local JSON lines files)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager

        import mole_jax.harness  # noqa: F401  (registers the "mole_jax" model)
    except ImportError:
        raise MoleError("zero-shot accuracy needs lm-eval: pip install 'mole-jax[eval]'") from None
    model_args = f"path={run_path}" + (f",lut={lut}" if lut else "")
    out = lm_eval.simple_evaluate(model="mole_jax", model_args=model_args, tasks=list(tasks), limit=limit,
                                  batch_size=batch_size, bootstrap_iters=0,
                                  task_manager=_task_manager(TaskManager, include_path, tuple(tasks)))
    results = {}
    for task in tasks:
        r = out["results"].get(task, {})
        results[task] = {k.split(",")[0]: float(v) for k, v in r.items()
                         if k.split(",")[0] in ("acc", "acc_norm") and isinstance(v, (int, float))}
    return results



@functools.lru_cache(maxsize=4)
def _task_manager(task_manager_cls, include_path: str | None, tasks: tuple[str, ...]):
    """One TaskManager per process and task set: building lm-eval's index of its own few thousand task YAMLs
    takes seconds, so it is built once, and not at all when `include_path` holds every requested task."""
    if include_path is not None:
        local = task_manager_cls(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return task_manager_cls(include_path=include_path)


def plan(ctx: Context, models: Sequence[Model]) -> None:
    """Print what a script would train: sizes, tokens, matmul FLOPs (train_flops_per_token: forward x 3, the experts
    on every token, i.e. without dedup) and the accelerator-hours at the given peak and MFU: an estimate."""
    from mole_jax.bench.tools import print_table  # jax: not at --help
    from mole_jax.train_step import train_flops_per_token

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
    print_table(rows, list(rows[0]), file=sys.stdout)
