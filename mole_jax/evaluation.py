"""Evaluation: mean next-token cross-entropy of a model over windows of a corpus.

    evaluate(RUN_DIR, data_source=..., split="val")   loss (nats), perplexity, tokens of a checkpoint
    Evaluator(cfg, mesh, param_shardings, batch, seq_len).loss(params, tokens, windows)   what the train loop uses
    padded_batches(windows, batch)                     fixed-size batches of window indices, the last one padded

Batches have a fixed size (the last one padded) so that a scoring function compiles once; the padding is then
left out of the sums.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mole_jax import checkpoint, data, sharding
from mole_jax.config import ModelConfig, MoleError, TrainConfig
from mole_jax.model import graphdef_and_shapes
from mole_jax.train_step import Feeder, cross_entropy_BxT


def padded_batches(windows: np.ndarray, batch: int) -> Iterator[tuple[np.ndarray, int]]:
    """Yields (padded_B, num_real) for consecutive batches of `windows` (window indices, as data.read_windows
    takes them): padded_B holds exactly `batch` indices, the first `num_real` of them real, the rest repeats of the
    batch's first window (valid data, so the padded rows compute finite values). Score all B rows, keep the first
    num_real: e.g. `logp_BxT[:num_real]`, or a weight `np.arange(batch) < num_real`."""
    for start in range(0, len(windows), batch):
        chunk = np.asarray(windows[start:start + batch])
        yield np.concatenate([chunk, np.full(batch - chunk.size, chunk[0], chunk.dtype)]), int(chunk.size)


def make_eval_step(cfg: ModelConfig) -> Callable:
    """(params, tokens_BxT1, weight_B) -> (sum of token cross-entropies, tokens counted); weight 0 marks padding.
    Forward only, so MoLE's dedup would save little: plain per-token experts."""
    graphdef, _ = graphdef_and_shapes(cfg)

    def eval_step(params, tokens_BxT1, weight_B):
        logits = nnx.merge(graphdef, params)(tokens_BxT1[:, :-1]).logits_BxTxV
        ce_BxT = cross_entropy_BxT(logits, tokens_BxT1[:, 1:])
        return jnp.sum(ce_BxT * weight_B[:, None]), jnp.sum(weight_B) * ce_BxT.shape[1]

    return eval_step


class Evaluator:
    """Mean next-token cross-entropy over a list of windows, in sharded batches (the last one padded)."""

    def __init__(self, cfg: ModelConfig, mesh: Mesh, param_shardings, batch: int, seq_len: int):
        self.cfg, self.seq_len = cfg, seq_len
        self.batch = max(mesh.size, batch // mesh.size * mesh.size)
        self.feed = Feeder(mesh, 1, self.batch, seq_len)
        self.weight_sharding = NamedSharding(mesh, P(sharding.BATCH_AXES))
        eval_step = make_eval_step(cfg)
        self.step = jax.jit(lambda params, x_1xBxT1, w_B: eval_step(params, x_1xBxT1[0], w_B),
                            in_shardings=(param_shardings, self.feed.sharding, self.weight_sharding))

    def loss(self, params, tokens: np.ndarray, windows: np.ndarray) -> float:
        total, count = self.totals(params, tokens, windows)
        return total / count

    def totals(self, params, tokens: np.ndarray, windows: np.ndarray) -> tuple[float, int]:
        """(sum of token cross-entropies, tokens) over `windows`; batches are dispatched before any is read."""
        sums = []
        for padded_B, num_real in padded_batches(windows, self.batch):
            weight_B = (np.arange(self.batch) < num_real).astype(np.float32)
            x = self.feed(lambda rows, p=padded_B: data.read_windows(tokens, p[rows], self.seq_len,
                                                                     self.cfg.vocab_size))
            w = jax.make_array_from_process_local_data(self.weight_sharding, weight_B[self.feed.local_rows],
                                                       (self.batch,))
            sums.append(self.step(params, x, w))
        sums = jax.device_get(sums)
        return float(sum(np.float64(s) for s, _ in sums)), int(sum(int(c) for _, c in sums))


def evaluate(run_dir: str | Path, *, data_source=None, split: str = "val", batch_size: int | None = None,
             seq_len: int | None = None, devices: int | None = None, max_windows: int | None = None,
             tokenizer=None) -> dict:
    """Mean next-token cross-entropy (nats), perplexity and token count of a checkpoint on a split of a corpus.

    run_dir: a run directory (its latest step), or any checkpoint `mole_jax.load` accepts. data_source: default:
    the run's own data. split: "val" / "train" (the run's deterministic split) or "all" (every window).
    The windows are the run's: seq_len + 1 tokens at stride seq_len. tokenizer: what reads text data (a
    tokenizer.json, a directory holding one, or a tokenizers.Tokenizer; default: the run's tokenizer.json)."""
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("devices", devices),
                        ("max_windows", max_windows)):  # None is the default; 0 is an error, not the default
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise MoleError(f"{name} must be a positive integer, got {value!r}")
    ref = checkpoint.locate(run_dir)
    if not checkpoint.read_meta(run_dir).get("has_experts", True):
        raise MoleError(f"{ref.path} is MoLE's inference form: evaluate the training-form checkpoint")
    run = checkpoint.read_run(ref.run_dir) if ref.run_dir else {}
    tc = TrainConfig.from_dict(run.get("train_config", {}))
    cfg = checkpoint.model_config(run_dir)
    seq_len = seq_len or tc.seq_len
    if seq_len > cfg.max_seq_len:
        raise MoleError(f"sequence length {seq_len} exceeds the model's maximum of {cfg.max_seq_len}")
    corpus = _open_run_corpus(run_dir, ref, run, data_source, cfg.vocab_size, tokenizer)
    windows = data.windows_for_split(corpus.tokens.size, seq_len, tc.val_fraction, split)
    if max_windows:
        windows = windows[:max_windows]
    if not windows.size:
        raise MoleError(f"the data has no complete window of {seq_len + 1} tokens")
    mesh = sharding.make_mesh(devices)
    _, params = checkpoint.restore_params(ref.path, shardings=sharding.param_shardings(cfg, mesh))
    evaluator = Evaluator(cfg, mesh, jax.tree.map(lambda x: x.sharding, params),
                          batch_size or tc.batch_size // tc.grad_accum, seq_len)
    total, count = evaluator.totals(params, corpus.tokens, windows)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count, "split": split,
            "windows": int(windows.size), "step": ref.step, "seq_len": seq_len, "checkpoint": str(ref.path)}


def _open_run_corpus(run_dir, ref: checkpoint.StepDir, run: dict, data_source, vocab_size: int,
                     tokenizer=None) -> data.Corpus:
    """The corpus to evaluate on (default: the run's own data), tokenised with `tokenizer`, else the run's."""
    if tokenizer is not None:
        tokenizer = data.resolve_tokenizer(tokenizer, vocab_size)
    elif ref.run_dir and (ref.run_dir / checkpoint.TOKENIZER).is_file():
        tokenizer = ref.run_dir / checkpoint.TOKENIZER
    if data_source is None:
        if "data" not in run:
            raise MoleError(f"{run_dir} records no training data: pass the data to evaluate on")
        data_source = data.recorded_source(run["data"])
    if tokenizer is None and not data.is_token_source(data_source):
        raise MoleError(f"{run_dir} has no tokenizer.json, so it can only be evaluated on a token file (.bin)")
    return data.open_corpus(data_source, vocab_size=vocab_size, tokenizer=tokenizer)
