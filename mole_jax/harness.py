"""EleutherAI lm-evaluation-harness adapter: the paper's zero-shot evaluation (ARC-C, ARC-E, BoolQ, HellaSwag,
PIQA, RACE, SIQA, LAMBADA) for any mole-jax checkpoint, Dense, MoE or MoLE, with or without its LUT.

Registered as lm-eval model "mole_jax" (alias "mole-jax") whenever lm-eval is installed and mole_jax is imported
(a lazy registry entry: this module is imported only when lm-eval asks for the model). From Python:

    import lm_eval, mole_jax
    lm_eval.simple_evaluate(model="mole_jax", model_args="path=runs/mole,lut=runs/mole/lut", tasks=["piqa"])

From the shell: lm-eval's own CLI, with our model registered first (lm-eval 0.4 has no plugin entry point for
models, so a bare `lm-eval` does not know "mole_jax"):

    python -m mole_jax.harness run --model mole_jax --model_args path=runs/mole --tasks piqa --batch_size 32

model_args: path=<checkpoint: run, checkpoints or step directory> [lut=<LUT dir>] [placement=host|device|storage]
[tokenizer=<tokenizer.json>] [batch_size=N] [max_length=T] [seed=S].

Scoring (loglikelihood, loglikelihood_rolling) runs `LanguageModel.token_logprobs`: batches of similar lengths,
padded to power-of-two lengths (and a fixed batch size), so a whole task compiles a handful of shapes; one batch is
in flight while the host builds the next; only per-token log-probabilities and greedy flags come back to the host,
never [B, T, V] logits. Generation (generate_until) runs the KV-cached batched decoder and stops a sequence at the
first of its stop strings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import deque
from typing import Any, Iterable

import jax
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from mole_jax import checkpoint
from mole_jax.config import MoleError
from mole_jax.data import EOS, check_tokenizer, load_tokenizer
from mole_jax.decode import load

log = logging.getLogger(__name__)

MIN_BUCKET = 16  # shortest padded length: below it, padding costs less than another compile
DEFAULT_BATCH = 16  # for batch_size "auto" (lm-eval's default from Python is None, from its CLI 1)
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default


def bucket(n: int, cap: int) -> int:
    """The padded length of a batch whose longest sequence has n tokens: the next power of two, within the
    context."""
    return min(cap, max(MIN_BUCKET, 1 << (n - 1).bit_length()))


def _batch_size(value) -> int:
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise MoleError(f"batch_size must be a positive integer or 'auto', got {value!r}") from None
    if size < 1:
        raise MoleError(f"batch_size must be a positive integer or 'auto', got {value!r}")
    return size


class MoleJaxLM(TemplateLM):
    """lm-eval model over `mole_jax.load`. model_args:

    path        checkpoint: a run directory (its latest step), a checkpoints directory or a step directory
    lut         MoLE only: a lookup table directory; the model then runs in inference form (the routed experts
                never reach the device), and the table must have been built from this checkpoint
    placement   where the table lives: host (RAM, default), device (accelerator memory) or storage (disk)
    tokenizer   a tokenizer.json (default: the run's own RUN_DIR/tokenizer.json)
    batch_size  sequences per jitted call (default 16; "auto" is 16)
    max_length  context used for scoring (default and maximum: the model's max_seq_len)
    seed        for sampled generation (do_sample=True); greedy generation ignores it
    lm-eval also passes `device` and `max_batch_size` to every model: JAX picks the device (JAX_PLATFORMS,
    CUDA_VISIBLE_DEVICES), so `device` is not used, and there is no automatic batch size search.
    """

    def __init__(self, path: str | None = None, lut: str | None = None, placement: str = "host",
                 tokenizer: str | None = None, batch_size: int | str | None = None, max_length: int | None = None,
                 seed: int = 0, max_batch_size: int | None = None, device: str | None = None):
        super().__init__()

        if path is None:
            raise MoleError("model_args needs path=<checkpoint or run directory>")
        _check_device(device)
        # lm-eval's argument parser turns "123" into an int: paths are strings again here
        self.model = load(str(path), lut=None if lut is None else str(lut), lut_placement=str(placement))
        cfg = self.model.config
        if tokenizer is not None:
            self.tokenizer = load_tokenizer(str(tokenizer))
        elif self.model.tokenizer is not None:
            self.tokenizer = self.model.tokenizer
        else:
            raise MoleError(f"{path} has no tokenizer (RUN_DIR/tokenizer.json): pass tokenizer=<tokenizer.json>")
        check_tokenizer(self.tokenizer, cfg.vocab_size)
        eot = self.tokenizer.token_to_id(EOS)
        if eot is None:
            raise MoleError(f"the tokenizer has no {EOS} token, which lm-eval needs as the context of an empty "
                            "prompt and of a document's first token")
        self._eot = eot
        self.batch_size = _batch_size(batch_size)
        self.max_length = cfg.max_seq_len if max_length is None else int(max_length)
        if not 1 < self.max_length <= cfg.max_seq_len:
            raise MoleError(f"max_length must be in [2, {cfg.max_seq_len}] (the model's context), got {max_length}")
        self.seed = int(seed)
        self._generate_calls = 0

    # TemplateLM plumbing ---------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def tokenizer_name(self) -> str:
        return "mole_jax"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # Scoring ---------------------------------------------------------------------------------------------------
    def _score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = False,
               desc: str = "mole_jax loglikelihood") -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum of log p(continuation | context), whether every continuation
        token is the greedy choice). A pair longer than max_length + 1 keeps its right end, as lm-eval's HF model
        does: the continuation is scored with as much context as fits."""
        rows = []
        for ctx, cont in pairs:
            if not cont:
                raise MoleError("lm-eval asked to score an empty continuation")
            if not ctx:
                raise MoleError("lm-eval asked to score a continuation without context")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            rows.append((whole[:-1], whole[1:], min(len(cont), len(whole) - 1)))
        if not rows:
            return []
        # Longest first: similar lengths share a batch (less padding), and a batch too large for the device fails
        # at once, not at the end of a long run.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        # A fixed batch size (the last batch padded with empty rows), so each length bucket compiles once.
        B = min(self.batch_size, len(order))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        in_flight: deque = deque()

        def read(idx, logp_BxT, greedy_BxT):
            logp_BxT, greedy_BxT = np.asarray(logp_BxT), np.asarray(greedy_BxT)
            for r, i in enumerate(idx):
                inp, _, n = rows[i]
                span = slice(len(inp) - n, len(inp))
                results[i] = (float(logp_BxT[r, span].astype(np.float64).sum()), bool(greedy_BxT[r, span].all()))
            bar.update(len(idx))

        bar = tqdm(total=len(rows), disable=disable_tqdm, desc=desc)
        for start in range(0, len(order), B):
            idx = order[start:start + B]
            T = bucket(len(rows[idx[0]][0]), self.max_length)
            inputs_BxT = np.zeros((B, T), np.int32)
            targets_BxT = np.zeros((B, T), np.int32)
            for r, i in enumerate(idx):
                inp, tgt, _ = rows[i]
                inputs_BxT[r, :len(inp)], targets_BxT[r, :len(tgt)] = inp, tgt
            in_flight.append((idx, *self.model.token_logprobs(inputs_BxT, targets_BxT)))
            if len(in_flight) > 1:  # read the previous batch while this one runs
                read(*in_flight.popleft())
        while in_flight:
            read(*in_flight.popleft())
        bar.close()
        return results  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = self._score([(ctx, cont) for _, ctx, cont in requests], disable_tqdm)
        for (key, _, _), res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood (perplexity tasks): lm-eval's disjoint rolling windows of max_length
        predicted tokens, the first conditioned on the end-of-text token, each later one on as much preceding text
        as fits. The windows of every request are scored together, in full batches."""
        texts = [req.args[0] for req in requests]
        windows, owner = [], []
        for i, text in enumerate(texts):
            for w in get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                               max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        totals = np.zeros(len(texts), np.float64)
        for i, (logp, _) in zip(owner, self._score(windows, disable_tqdm, desc="mole_jax loglikelihood_rolling")):
            totals[i] += logp
        out = [float(t) for t in totals]
        for text, total in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    # Generation ------------------------------------------------------------------------------------------------
    def _generation_settings(self, gen_kwargs: dict | None) -> dict[str, Any]:
        kwargs = dict(gen_kwargs or {})
        unknown = sorted(set(kwargs) - set(GEN_KWARGS))
        if unknown:
            raise MoleError(f"unsupported generation arguments {unknown}: mole_jax supports {', '.join(GEN_KWARGS)}")
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [s for s in until if s]
        max_new = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        if not 1 <= max_new < self.max_length:
            raise MoleError(f"max_gen_toks must be in [1, {self.max_length}) (the context), got {max_new}")
        sampled = bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature", 1.0)) > 0
        return {"until": until, "max_new": max_new,
                "temperature": float(kwargs.get("temperature", 1.0)) if sampled else 0.0,
                "top_k": kwargs.get("top_k") if sampled else None, "top_p": kwargs.get("top_p") if sampled else None}

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with do_sample, sampled) continuations, each cut before the first of its `until` strings
        and stopped at the end-of-text token. Requests with the same settings are batched, longest contexts first;
        a batch stops as soon as every sequence has produced a stop string."""
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(args)
        bar = tqdm(total=len(args), disable=disable_tqdm, desc="mole_jax generate_until")
        for idx in groups.values():
            settings = self._generation_settings(args[idx[0]][1])
            keep = self.max_length - settings["max_new"]
            prompts = {i: (self.tok_encode(args[i][0]) or [self.prefix_token_id])[-keep:] for i in idx}
            idx = sorted(idx, key=lambda i: -len(prompts[i]))
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                for i, text in zip(chunk, self._generate_batch([prompts[i] for i in chunk], settings)):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", args[i], text)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    def _generate_batch(self, prompts: list[list[int]], settings: dict[str, Any]) -> list[str]:
        self._generate_calls += 1
        new: list[list[int]] = [[] for _ in prompts]
        texts = ["" for _ in prompts]
        done = [False] * len(prompts)
        steps = self.model.stream(prompts, settings["max_new"], temperature=settings["temperature"],
                                  top_k=settings["top_k"], top_p=settings["top_p"], eos_id=self.eot_token_id,
                                  seed=self.seed + self._generate_calls)
        for step in steps:
            for b, token in enumerate(step):
                if done[b]:
                    continue
                if token is None:  # end of text
                    done[b] = True
                    continue
                new[b].append(token)
                texts[b] = self.tok_decode(new[b])
                done[b] = _cut(texts[b], settings["until"]) != texts[b]
            if all(done):
                steps.close()
                break
        return [_cut(t, settings["until"]) for t in texts]


def _cut(text: str, until: list[str]) -> str:
    """The text before the earliest occurrence of any stop string."""
    ends = [text.find(s) for s in until if s in text]
    return text[:min(ends)] if ends else text


def _check_device(device: str | None) -> None:
    """lm-eval passes a torch device name (its CLI's default is cuda:0); JAX chooses its own device."""
    if device is None:
        return
    wanted = str(device).split(":")[0].lower()
    if {"cuda": "gpu", "rocm": "gpu"}.get(wanted, wanted) != jax.default_backend():
        log.info("lm-eval's device %r is not used: JAX runs on %s (choose with JAX_PLATFORMS)", device,
                 jax.default_backend())


def _check_checkpoint_first(argv: list[str]) -> None:
    """A missing checkpoint fails at once: lm-eval would first build its task index (seconds) and only then make
    the model. The model makes the same check again."""
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # only the two flags; lm-eval parses the rest
    peek.add_argument("--model")
    peek.add_argument("--model_args", default="")
    args, _ = peek.parse_known_args(argv)
    if args.model not in ("mole_jax", "mole-jax"):
        return
    model_args = dict(kv.split("=", 1) for kv in args.model_args.split(",") if "=" in kv)
    if "path" in model_args:
        checkpoint.locate(model_args["path"])


def main(argv: list[str] | None = None) -> int:
    """lm-eval's CLI (`lm-eval run ...`, `lm-eval ls tasks`, ...) with the mole_jax model registered."""
    from lm_eval.__main__ import cli_evaluate  # lm-eval's registry, and "mole_jax" in it, are loaded by now

    argv = list(sys.argv[1:] if argv is None else argv)
    sys.argv = ["python -m mole_jax.harness", *argv]
    try:
        _check_checkpoint_first(argv)
        cli_evaluate()
    except MoleError as e:
        print("mole-jax: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
