"""Sampling and the per-step decoding state, on the device.

A decode step ends with `advance`: sample the next token of every sequence from the step's logits (greedy, or
temperature / top-k / top-p with a device-side key) and carry everything the next step needs in a DecodeState.

Top-k and top-p keep every token whose logit reaches a cutoff; only the cutoff needs the largest logits in order.
With top-k, `lax.top_k` of a static number of candidates (the top_k setting rounded up to a power of two, so
changing top_k rarely retraces) gives them without sorting the vocabulary, and the token is drawn among those
candidates (a [B, C] draw: the [B, V] random draw costs more than the sort on CPU). Without top-k, top-p needs the
whole vocabulary sorted. Both paths keep the same tokens with the same probabilities (`probabilities`,
tests/test_sampling.py); a draw from the same key picks among them differently.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mole_jax.layers import KVCache


@partial(jax.tree_util.register_dataclass, data_fields=("temperature", "top_k", "top_p"),
         meta_fields=("candidates",))
@dataclasses.dataclass(frozen=True)
class Sampler:
    """Sampling settings as device scalars, so that changing them does not retrace the step."""

    temperature: jax.Array  # float32, > 0 (temperature 0 is the static greedy path)
    top_k: jax.Array  # int32 in [1, V]; V keeps every token
    top_p: jax.Array  # float32 in (0, 1]; 1 keeps every token
    candidates: int = 0  # static: top_k <= candidates < V, the largest logits the cutoff is found among; 0: all V


def top_k_candidates(top_k: int | None, vocab_size: int) -> int:
    """Sampler.candidates for a top_k setting: top_k rounded up to a power of two, or 0 (the whole vocabulary
    sorted) when there is no top-k or the power of two reaches the vocabulary."""
    if top_k is None or top_k >= vocab_size:
        return 0
    c = 1 << max(0, int(top_k) - 1).bit_length()
    return c if c < vocab_size else 0


def make_sampler(temperature: float, top_k: int | None, top_p: float | None, vocab_size: int) -> Sampler:
    """A Sampler of host scalars (device_put it before use); temperature must be > 0."""
    k = min(top_k or vocab_size, vocab_size)
    return Sampler(np.float32(temperature), np.int32(k), np.float32(top_p or 1.0),
                   candidates=top_k_candidates(top_k, vocab_size))


def _cutoff(desc_BxC: jax.Array, sampler: Sampler) -> jax.Array:
    """The smallest logit kept [B, 1], from the C largest logits in descending order (C >= top_k)."""
    kth_Bx1 = desc_BxC[:, jnp.clip(sampler.top_k, 1, desc_BxC.shape[-1]) - 1][:, None]
    desc_BxC = jnp.where(desc_BxC < kth_Bx1, -jnp.inf, desc_BxC)
    probs_BxC = jax.nn.softmax(desc_BxC, axis=-1)
    mass_before_BxC = jnp.cumsum(probs_BxC, axis=-1) - probs_BxC  # of the strictly more likely tokens
    keep_BxC = (desc_BxC > -jnp.inf) & ((mass_before_BxC < sampler.top_p) | (sampler.top_p >= 1.0))
    return jnp.min(jnp.where(keep_BxC, desc_BxC, jnp.inf), axis=-1, keepdims=True)


def _kept(logits_BxV: jax.Array, sampler: Sampler) -> tuple[jax.Array, jax.Array | None]:
    """The tempered logits with every token below the cutoff at -inf: [B, C] candidates and their ids (top-k
    path), or [B, V] and None."""
    logits_BxV = logits_BxV / sampler.temperature
    if 0 < sampler.candidates < logits_BxV.shape[-1]:
        desc_BxC, ids_BxC = jax.lax.top_k(logits_BxV, sampler.candidates)
        return jnp.where(desc_BxC < _cutoff(desc_BxC, sampler), -jnp.inf, desc_BxC), ids_BxC
    cutoff_Bx1 = _cutoff(-jnp.sort(-logits_BxV, axis=-1), sampler)
    return jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV), None


def sample(logits_BxV: jax.Array, key: jax.Array, sampler: Sampler | None) -> jax.Array:
    """Next token per row: argmax when `sampler` is None, else temperature, top-k then top-p (nucleus) sampling."""
    if sampler is None:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    kept, ids_BxC = _kept(logits_BxV, sampler)
    choice_B = jax.random.categorical(key, kept, axis=-1)
    if ids_BxC is not None:
        choice_B = jnp.take_along_axis(ids_BxC, choice_B[:, None], axis=-1)[:, 0]
    return choice_B.astype(jnp.int32)


def probabilities(logits_BxV: jax.Array, sampler: Sampler) -> jax.Array:
    """What `sample` draws each row's token from: float32 [B, V], zero outside the kept tokens."""
    kept, ids_BxC = _kept(logits_BxV, sampler)
    probs = jax.nn.softmax(kept, axis=-1)
    if ids_BxC is None:
        return probs
    return jnp.zeros(logits_BxV.shape, probs.dtype).at[jnp.arange(len(ids_BxC))[:, None], ids_BxC].set(probs)


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
