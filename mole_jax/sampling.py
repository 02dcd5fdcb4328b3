"""Sampling and the per-step decoding state, on the device.

A decode step ends with `advance`: sample the next token of every sequence from the step's logits (greedy, or
temperature / top-k / top-p with a device-side key) and carry everything the next step needs in a DecodeState.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mole_jax.layers import KVCache


class Sampler(NamedTuple):
    """Sampling settings as device scalars, so that changing them does not retrace the step."""

    temperature: jax.Array  # float32, > 0 (temperature 0 is the static greedy path)
    top_k: jax.Array  # int32 in [1, V]; V keeps every token
    top_p: jax.Array  # float32 in (0, 1]; 1 keeps every token


def sample(logits_BxV: jax.Array, key: jax.Array, sampler: Sampler | None) -> jax.Array:
    """Next token per row: argmax when `sampler` is None, else temperature, top-k then top-p (nucleus) sampling."""
    if sampler is None:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    V = logits_BxV.shape[-1]
    logits_BxV = logits_BxV / sampler.temperature
    desc_BxV = -jnp.sort(-logits_BxV, axis=-1)
    kth_Bx1 = desc_BxV[:, jnp.clip(sampler.top_k, 1, V) - 1][:, None]
    desc_BxV = jnp.where(desc_BxV < kth_Bx1, -jnp.inf, desc_BxV)
    probs_BxV = jax.nn.softmax(desc_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # of the strictly more likely tokens
    keep_BxV = (desc_BxV > -jnp.inf) & ((mass_before_BxV < sampler.top_p) | (sampler.top_p >= 1.0))
    cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, desc_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


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
