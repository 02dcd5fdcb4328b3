"""EleutherAI lm-evaluation-harness adapter: the paper's zero-shot evaluation (ARC-C, ARC-E, BoolQ, HellaSwag,
PIQA, RACE, SIQA, LAMBADA) for any mole-jax checkpoint, with or without its LUT.

Registered as model "mole_jax" whenever lm-eval is installed and mole_jax is imported. From Python:

    import lm_eval, mole_jax
    lm_eval.simple_evaluate(model="mole_jax", model_args="path=runs/mole,lut=runs/mole/lut", tasks=["piqa"])

From the shell (lm-eval's own CLI, with our model registered first):

    python -m mole_jax.harness run --model mole_jax --model_args path=runs/mole --tasks piqa lambada_openai

Scoring is batched and jitted with lengths bucketed to powers of two, so a whole task compiles a handful of
shapes; only per-token log-probabilities and greedy flags come back to the host, never [B, T, V] logits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from mole_jax.config import MoleError

MIN_BUCKET = 16


def _bucket(n: int, cap: int) -> int:
    return min(cap, max(MIN_BUCKET, 1 << (n - 1).bit_length()))


@register_model("mole_jax", "mole-jax")
class MoleJaxLM(TemplateLM):
    """lm-eval model. model_args: path=<checkpoint or run dir> [lut=<LUT dir>] [placement=device|host|storage]
    [tokenizer=<tokenizer.json>] [batch_size=N] [max_length=T]."""

    def __init__(self, path: str, lut: str | None = None, placement: str = "host", tokenizer: str | None = None,
                 batch_size: int | str = 16, max_length: int | None = None, **_ignored):
        super().__init__()
        from tokenizers import Tokenizer

        from mole_jax.decode import load

        self.model = load(path, lut=lut, lut_placement=placement) if lut else load(path)
        tok_path = Path(tokenizer) if tokenizer else self.model.tokenizer_path
        if tok_path is None or not Path(tok_path).is_file():
            raise MoleError(f"no tokenizer for {path}: pass tokenizer=<tokenizer.json>")
        self.tokenizer = Tokenizer.from_file(str(tok_path))
        self.batch_size = 16 if batch_size in ("auto", None) else int(batch_size)
        self.max_length = int(max_length or self.model.config.max_seq_len)
        eot = self.tokenizer.token_to_id("<|endoftext|>")
        self._eot = 0 if eot is None else eot

    # TemplateLM plumbing ---------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    # Scoring ---------------------------------------------------------------------------------------------------
    def _score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum log p(continuation | context), continuation is greedy)."""
        rows = []
        for ctx, cont in pairs:
            if not cont:
                raise MoleError("lm-eval asked to score an empty continuation")
            whole = (ctx + cont)[-(self.max_length + 1):]  # keep the right end, as lm-eval's HF model does
            rows.append((whole[:-1], whole[1:], min(len(cont), len(whole) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="mole_jax scoring"):
            idx = order[start:start + self.batch_size]
            T = _bucket(max(len(rows[i][0]) for i in idx), self.max_length)
            B = self.batch_size if len(order) > self.batch_size else len(idx)
            inputs = np.zeros((B, T), np.int32)
            targets = np.zeros((B, T), np.int32)
            for r, i in enumerate(idx):
                inp, tgt, _ = rows[i]
                inputs[r, :len(inp)], targets[r, :len(tgt)] = inp, tgt
            logp_BxT, greedy_BxT = self.model.token_logprobs(inputs, targets)
            for r, i in enumerate(idx):
                inp, _, n = rows[i]
                span = slice(len(inp) - n, len(inp))
                results[i] = (float(logp_BxT[r, span].sum()), bool(greedy_BxT[r, span].all()))
        return results  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        out = self._score([(ctx, cont) for _, ctx, cont in requests], disable_tqdm)
        for (key, _, _), res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        results = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="mole_jax rolling"):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(lp for lp, _ in self._score(windows, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="mole_jax generate"):
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            ctx = (self.tok_encode(context) or [self.prefix_token_id])[-(self.max_length - max_new):]
            new_ids = self.model.generate([ctx], max_new_tokens=max_new, temperature=temperature,
                                          eos_id=self.eot_token_id)[0]
            text = self.tok_decode(new_ids)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with the mole_jax model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
