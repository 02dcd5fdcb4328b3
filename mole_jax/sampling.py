"""Sampling and the per-step decoding state, on the device.

A decode step ends with `advance`: sample the next token of every sequence from the step's logits (greedy, or
temperature / top-k / top-p with a device-side key) and carry everything the next step needs in a DecodeState.

Top-k and top-p keep every token whose logit reaches a cutoff; only the cutoff needs the largest logits in order.
`lax.top_k` of a static number of candidates C gives them without sorting the vocabulary, and the token is drawn
among those candidates (a [B, C] draw: the [B, V] random draw costs more than the sort on CPU). The candidates hold
every kept token when the cutoff lies among them (top_k < C, or without top-k the candidates' probability reaches
top_p) and the last candidate falls below it (no token tied with the cutoff is left out); otherwise only the whole
vocabulary sorted finds them, and a lax.cond sends the step there. Two forms:
- `make_sampler`: C is the power of two above top_k (a new C is a new trace);
- `generation_sampler`: C fixed (GENERATE_CANDIDATES), so that one trace serves every top_k and top_p
  (LanguageModel.generate); on GPU always the full sort (no conditional in the step).
Both keep the same tokens with the same probabilities as the full sort (`probabilities`, tests/test_sampling.py); a
draw from the same key picks among them differently.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mole_jax.layers import KVCache

GENERATE_CANDIDATES = 128  # generation_sampler's C: covers the usual top_k settings (40, 50, 100)


@partial(jax.tree_util.register_dataclass, data_fields=("temperature", "top_k", "top_p"),
         meta_fields=("candidates",))
@dataclasses.dataclass(frozen=True)
class Sampler:
    """Sampling settings as device scalars, so that changing them does not retrace the step."""

    temperature: jax.Array  # float32, > 0 (temperature 0 is the static greedy path)
    top_k: jax.Array  # int32 in [1, V]; V keeps every token
    top_p: jax.Array  # float32 in (0, 1]; 1 keeps every token
    candidates: int = 0  # static: C < V, the largest logits the cutoff is looked for among; 0: all V, sorted


def top_k_candidates(top_k: int | None, vocab_size: int) -> int:
    """Sampler.candidates for a top_k setting: the power of two above top_k (one more candidate than kept tokens
    shows whether the k-th largest logit ties beyond them), or 0 (the whole vocabulary sorted) when there is no
    top-k or the power of two reaches the vocabulary."""
    if top_k is None or top_k >= vocab_size:
        return 0
    c = 1 << int(top_k).bit_length()
    return c if c < vocab_size else 0


def make_sampler(temperature: float, top_k: int | None, top_p: float | None, vocab_size: int) -> Sampler:
    """A Sampler of host scalars (device_put it before use); temperature must be > 0."""
    k = min(top_k or vocab_size, vocab_size)
    return Sampler(np.float32(temperature), np.int32(k), np.float32(top_p or 1.0),
                   candidates=top_k_candidates(top_k, vocab_size))


def generation_sampler(temperature: float, top_k: int | None, top_p: float | None, vocab_size: int,
                       backend: str) -> Sampler:
    """A Sampler of host scalars whose static part is the same for every setting: one trace of the decode step.
    On GPU the full sort (the check would be a conditional, whose predicate XLA's GPU backend reads on the host in
    the middle of the step); elsewhere the C = GENERATE_CANDIDATES largest logits, falling back to the full sort
    for a row whose cutoff lies beyond them."""
    C = GENERATE_CANDIDATES if backend != "gpu" and GENERATE_CANDIDATES < vocab_size else 0
    return Sampler(np.float32(temperature), np.int32(min(top_k or vocab_size, vocab_size)),
                   np.float32(top_p or 1.0), candidates=C)


def _cutoff(desc_BxC: jax.Array, sampler: Sampler, lse_V_Bx1: jax.Array | None = None) -> jax.Array:
    """The smallest logit kept [B, 1], from the C largest logits in descending order. The probabilities top-p
    reads are normalised over the top-k kept tokens: those among the C when top_k <= C (exact unless the k-th
    largest ties beyond them, which `_kept` checks); with lse_V_Bx1 (the log-normaliser of the whole vocabulary)
    and top_k > C, every token (only exact for top_k = V)."""
    kth_Bx1 = desc_BxC[:, jnp.clip(sampler.top_k, 1, desc_BxC.shape[-1]) - 1][:, None]
    desc_BxC = jnp.where(desc_BxC < kth_Bx1, -jnp.inf, desc_BxC)
    lse_Bx1 = jax.nn.logsumexp(desc_BxC, axis=-1, keepdims=True)
    if lse_V_Bx1 is not None:
        lse_Bx1 = jnp.where(sampler.top_k <= desc_BxC.shape[-1], lse_Bx1, lse_V_Bx1)
    probs_BxC = jnp.exp(desc_BxC - lse_Bx1)
    mass_before_BxC = jnp.cumsum(probs_BxC, axis=-1) - probs_BxC  # of the strictly more likely tokens
    keep_BxC = (desc_BxC > -jnp.inf) & ((mass_before_BxC < sampler.top_p) | (sampler.top_p >= 1.0))
    return jnp.min(jnp.where(keep_BxC, desc_BxC, jnp.inf), axis=-1, keepdims=True)


class _Kept(NamedTuple):
    logits: jax.Array  # the tempered logits with every token below the cutoff at -inf: [B, C] or [B, V]
    ids: jax.Array | None  # [B, C] the candidates' token ids; None: `logits` spans the vocabulary


def _kept(logits_BxV: jax.Array, sampler: Sampler, then: Callable[[_Kept], jax.Array]) -> jax.Array:
    """then(the kept tokens of the tempered logits): from the C candidates when they hold every kept token, else
    from the whole vocabulary sorted (a runtime choice, lax.cond)."""
    logits_BxV = logits_BxV / sampler.temperature
    V, C = logits_BxV.shape[-1], sampler.candidates

    def full_sort():
        cutoff_Bx1 = _cutoff(-jnp.sort(-logits_BxV, axis=-1), sampler)
        return then(_Kept(jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV), None))

    if not 0 < C < V:
        return full_sort()
    desc_BxC, ids_BxC = jax.lax.top_k(logits_BxV, C)
    lse_V_Bx1 = jax.nn.logsumexp(logits_BxV, axis=-1, keepdims=True)
    cutoff_Bx1 = _cutoff(desc_BxC, sampler, lse_V_Bx1)

    def candidates():
        return then(_Kept(jnp.where(desc_BxC < cutoff_Bx1, -jnp.inf, desc_BxC), ids_BxC))

    # The cutoff is among the candidates when top_k <= C, or without top-k (top_k = V) when their probability
    # reaches top_p; they hold every token reaching it when the last one falls below it (else a tie runs on).
    mass_B = jnp.sum(jnp.exp(desc_BxC - lse_V_Bx1), axis=-1)
    found_B = (sampler.top_k <= C) | ((sampler.top_k >= V) & (mass_B >= sampler.top_p))
    fits = jnp.all(found_B & (desc_BxC[:, -1] < cutoff_Bx1[:, 0]))
    return jax.lax.cond(fits, candidates, full_sort)


def sample(logits_BxV: jax.Array, key: jax.Array, sampler: Sampler | None) -> jax.Array:
    """Next token per row: argmax when `sampler` is None, else temperature, top-k then top-p (nucleus) sampling."""
    if sampler is None:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

    def draw(kept: _Kept) -> jax.Array:
        choice_B = jax.random.categorical(key, kept.logits, axis=-1)
        if kept.ids is not None:
            choice_B = jnp.take_along_axis(kept.ids, choice_B[:, None], axis=-1)[:, 0]
        return choice_B.astype(jnp.int32)

    return _kept(logits_BxV, sampler, draw)


def probabilities(logits_BxV: jax.Array, sampler: Sampler) -> jax.Array:
    """What `sample` draws each row's token from: float32 [B, V], zero outside the kept tokens."""
    def spread(kept: _Kept) -> jax.Array:
        probs = jax.nn.softmax(kept.logits, axis=-1)
        if kept.ids is None:
            return probs
        return jnp.zeros(logits_BxV.shape, probs.dtype).at[jnp.arange(len(kept.ids))[:, None], kept.ids].set(probs)

    return _kept(logits_BxV, sampler, spread)


class DecodeState(NamedTuple):
    """Everything a decode step carries, on the device."""

    ids_Bx1: jax.Array  # the tokens sampled last, fed next
    pos_B: jax.Array  # their positions
    cache: list[KVCache]
    key: jax.Array
    logits_BxV: jax.Array  # what ids_Bx1 were sampled from (float32)


def advance(logits_BxV, cache, key, sampler: Sampler | None, next_pos_B) -> DecodeState:
    """The state after a step: the next tokens sampled from `logits_BxV` (greedy when `sampler` is None)."""
    key, sub = jax.random.split(key)
    return DecodeState(sample(logits_BxV, sub, sampler)[:, None], next_pos_B, cache, key, logits_BxV)


def positions(start_B: jax.Array, T: int) -> jax.Array:
    """[B, T] positions of T consecutive tokens per sequence, from each sequence's start."""
    return start_B[:, None] + jnp.arange(T, dtype=jnp.int32)
