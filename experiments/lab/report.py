"""Writing an experiment's result: the table as markdown and JSON, the plot as PNG, and the plot helpers the scripts
share. An experiment returns `result(...)`; `write_result` turns it into <out>/<name>_<scale>.md/.json/.png."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence


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


def write_result(ctx, res: dict) -> dict[str, Path]:
    """<out>/<name>_<scale>.md, .json and .png (`ctx` is a cli.Context), each written to a temporary name and renamed
    into place (an interrupted script leaves the previous complete result, never half of a new one); the table is
    printed."""
    from mole_jax.bench.tools import machine as describe_machine  # jax: not at --help

    ctx.out.mkdir(parents=True, exist_ok=True)
    stem = f"{ctx.name}_{ctx.scale.name}"
    paths = {ext: ctx.out / f"{stem}.{ext}" for ext in ("md", "json", "png")}
    wall = time.perf_counter() - ctx.started
    machine = describe_machine()
    tmp_png = _draw(res, paths["png"])
    text = _markdown(ctx, res, wall=wall, machine=machine, png_name=paths["png"].name)
    payload = {"experiment": ctx.name, "scale": ctx.scale.name, "title": res["title"], "command": ctx.command,
               "wall_seconds": wall, "machine": machine, "settings": res["settings"], "rows": res["rows"],
               "extra_tables": {t: rows for t, rows, _ in res["extra_tables"]}, "notes": res["notes"],
               "paper": res["paper"], "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_atomic(paths["json"], json.dumps(payload, indent=2, default=_jsonable) + "\n")
    _write_atomic(paths["md"], text)
    tmp_png.replace(paths["png"])
    print(text)
    print(f"[{ctx.name}] wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return paths


def _draw(res: dict, png: Path) -> Path:
    """The result's plot, saved beside `png` under a temporary name (renamed by the caller once all is written)."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=res["figsize"])
    res["plot"](fig)
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return tmp


def _markdown(ctx, res: dict, *, wall: float, machine: dict, png_name: str) -> str:
    reused = any(r.get("reused_run") for r in res["rows"])
    header = [f"# {res['title']} (--scale {ctx.scale.name})", "",
              f"Command: `{ctx.command}`  ",
              f"Wall time: {wall:,.0f} s on {machine['device_count']} x {machine['device']} ({machine['backend']}, "
              f"jax {machine['jax']})" + ("; training runs marked reused were trained by an earlier invocation "
                                          "(their training time is their own)" if reused else "")]
    header += [f"- {k}: {v}" for k, v in res["settings"].items()]
    body = [markdown_table(res["rows"], res["columns"])]
    for title, rows, columns in res["extra_tables"]:
        body += ["", f"### {title}", "", markdown_table(rows, columns)]
    if res["notes"]:
        body += ["", *[f"- {n}" for n in res["notes"]]]
    body += ["", f"![{ctx.name}]({png_name})", ""]
    return "\n".join(header + [""] + body)


def _write_atomic(path: Path, content: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(content)
    tmp.replace(path)


def _jsonable(x):
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):  # numpy scalars
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# Plot helpers -----------------------------------------------------------------------------------------------------
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
