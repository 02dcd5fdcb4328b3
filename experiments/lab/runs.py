"""Training runs and what is measured on them: the script's data (tokenised once, shared by every run), run
directories named by a hash of (model, recipe, data), training through mole_jax's trainer or reusing a finished
run, validation loss, lookup tables converted from a run, and scoring through such a table.

Runs live under --runs as <scale>/<preset>-<hash>: scripts that need the same model trained the same way share one
run, an interrupted script resumes its runs, and any change of settings trains a new run instead of touching an
old one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lab.cli import Context, Model
from mole_jax import data as data_lib
from mole_jax.config import MoleError


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
    if ctx.prepared_data is None:
        items = ctx.args.data or []
        tokenizer = Path(ctx.args.tokenizer).expanduser().absolute() if ctx.args.tokenizer else None
        if tokenizer is not None and not tokenizer.is_file():
            raise MoleError(f"tokenizer file {tokenizer} does not exist")
        if len(items) == 1 and str(items[0]).endswith(".bin"):
            ctx.prepared_data = _token_file(Path(items[0]).expanduser().absolute(), tokenizer, vocab_size)
        else:
            source = _source(items, tokenizer, vocab_size)
            ctx.prepared_data = _cached_tokens(ctx.runs / "data", source, items, tokenizer)
    return ctx.prepared_data


def _token_file(path: Path, tokenizer: Path | None, vocab_size: int) -> Data:
    corpus = data_lib.open_corpus(str(path), vocab_size=vocab_size, tokenizer=tokenizer)
    desc = corpus.description
    return Data(path, tokenizer, desc, desc["fingerprint"])


def _source(items: list[str], tokenizer: Path | None, vocab_size: int) -> dict:
    """What identifies the script's text: its kind, the files with their sizes and times, tokenizer and vocabulary."""
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
    return source


def _cached_tokens(cache: Path, source: dict, items: list[str], tokenizer: Path | None) -> Data:
    """The source's tokens under cache/<key>/, tokenised there first unless a complete copy exists. Built in a
    temporary sibling and renamed, so a concurrent script keeps whichever copy finished first."""
    key = _digest(source)
    where = cache / key
    if not (where / "corpus.json").is_file():
        spec = None if source["kind"] == "default" else items[0] if source["kind"] == "hf" else items
        corpus = data_lib.open_corpus(spec, vocab_size=source["vocab_size"], tokenizer=tokenizer)
        tmp = where.with_name(where.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        big = corpus.tokenizer.get_vocab_size(with_added_tokens=True) > 1 << 16
        np.asarray(corpus.tokens, np.uint32 if big else np.uint16).tofile(
            tmp / ("tokens.u32.bin" if big else "tokens.bin"))
        corpus.tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "corpus.json").write_text(json.dumps({"source": source, "description": corpus.description},
                                                    indent=2) + "\n")
        if where.exists():
            shutil.rmtree(tmp)
        else:
            tmp.rename(where)
    record = json.loads((where / "corpus.json").read_text())
    return Data(next(where.glob("tokens*.bin")), where / "tokenizer.json", record["description"], key)


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


# Training -----------------------------------------------------------------------------------------------------
class Run(NamedTuple):
    model: Model
    path: Path
    wall_s: float | None  # training wall time of the invocation that finished the run
    reused: bool  # finished before this script started
    history: list[dict]  # metrics.jsonl


# TrainConfig fields added after runs were first cached: at these values they leave a run's key (and so its
# directory) as it was, so that finished runs are still found.
_KEY_OMITS = {"remat": "none", "schedule_steps": None, "trainable": "all"}


def run_dir(ctx: Context, m: Model) -> Path:
    tc, cfg = ctx.train_cfg, m.cfg.replace(dtype=ctx.dtype())
    recipe = {k: v for k, v in tc.to_dict().items() if k not in _KEY_OMITS or v != _KEY_OMITS[k]}
    key = _digest({"model": cfg.to_dict(), "train": recipe, "data": data(ctx, cfg.vocab_size).key})
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
    from mole_jax import checkpoint

    if not (path / checkpoint.RUN_FILE).is_file():
        return False
    try:
        return checkpoint.locate(path).step >= steps
    except MoleError:
        return False


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


# Evaluation ---------------------------------------------------------------------------------------------------
def val_loss(ctx: Context, run: Run) -> dict:
    """mole_jax.evaluate on the run's validation windows (all of them, or the scale's cap)."""
    from mole_jax.evaluation import evaluate

    return evaluate(run.path, split="val", max_windows=ctx.scale.eval_windows, devices=ctx.args.devices)


def val_windows(ctx: Context, run: Run, cap: int | None):
    """The run's validation windows (data.windows_for_split), at most `cap`, and the token stream they index."""
    from mole_jax import checkpoint

    info = checkpoint.read_run(run.path)
    d = data(ctx, run.model.cfg.vocab_size)
    corpus = data_lib.open_corpus(str(d.tokens), vocab_size=run.model.cfg.vocab_size)
    windows = data_lib.windows_for_split(corpus.tokens.size, ctx.train_cfg.seq_len,
                                         info["train_config"]["val_fraction"], "val")
    return corpus.tokens, windows[:cap] if cap else windows


def lut_table(ctx: Context, run: Run, scheme: str) -> Path:
    """The run's lookup table in `scheme` (RUN/luts/<scheme>), converted from its final checkpoint unless a complete
    table of that checkpoint is there (an interrupted conversion resumes)."""
    from mole_jax import checkpoint, convert_to_lut
    from mole_jax.lut import read_info

    where = run.path / "luts" / scheme
    step = checkpoint.locate(run.path).step
    if (where / "lut.json").is_file():
        try:
            info = read_info(where)
        except MoleError:  # a table of an older format: converted again below
            info = {"complete": False}
        if info["complete"] and info.get("source", {}).get("step") == step:
            return where
    print(f"[{ctx.name}] converting {run.model.label} to a {scheme} table", file=sys.stderr)
    convert_to_lut(run.path, where, scheme, overwrite=True, progress=ctx.progress)
    return where


def scored_loss(lm, tokens, windows, seq_len: int, batch: int = 8) -> float:
    """Mean next-token cross-entropy (nats) of a loaded LanguageModel over these windows, through its
    `token_logprobs` (the lm-eval adapter's scoring path: LUT rows fetched from the table for the inference form).
    Batches are padded to a fixed size so that the scoring function is traced once per table placement."""
    from mole_jax.evaluation import padded_batches

    V = lm.config.vocab_size
    total, count = 0.0, 0
    for padded_B, num_real in padded_batches(windows, batch):
        x = data_lib.read_windows(tokens, padded_B, seq_len, V)
        logp_BxT, _ = lm.token_logprobs(x[:, :-1], x[:, 1:])
        logp = np.asarray(logp_BxT, np.float64)[:num_real]
        total -= float(logp.sum())
        count += logp.size
    return total / count
