"""The sampler's top-k path (lax.top_k of a few candidates) against the full sort of the vocabulary: the same
kept tokens with the same probabilities, draws that follow them, and no sort of the vocabulary in it."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mole_jax.sampling import (GENERATE_CANDIDATES, Sampler, generation_sampler, make_sampler, probabilities, sample,
                               top_k_candidates)

V = 1000


def _logits(B=4, seed=0):
    # A peaked, realistic spread (a few likely tokens, a long tail), distinct values: no ties at a cutoff.
    return jnp.asarray(3.0 * np.random.default_rng(seed).standard_normal((B, V)), jnp.float32)


def _draws(logits, sampler, num_keys=1500):
    keys = jax.random.split(jax.random.key(7), num_keys)
    return np.asarray(jax.jit(jax.vmap(lambda k, s: sample(logits, k, s), in_axes=(0, None)))(keys, sampler))


def test_top_k_candidates():
    assert top_k_candidates(None, V) == 0 and top_k_candidates(V, V) == 0 and top_k_candidates(600, V) == 0
    assert [top_k_candidates(k, V) for k in (1, 2, 3, 40, 64, 65)] == [1, 2, 4, 64, 64, 128]


@pytest.mark.parametrize("t,k,p", [(1.0, 40, 1.0), (0.7, 50, 0.9), (1.3, 5, 0.5), (1.0, 1, 1.0), (2.0, 100, 0.999)])
def test_top_k_path_keeps_the_full_sort_distribution(t, k, p):
    logits = _logits(seed=k)
    fast = make_sampler(t, k, p, V)
    assert 0 < fast.candidates < V
    full = Sampler(fast.temperature, fast.top_k, fast.top_p)  # candidates 0: the whole vocabulary sorted
    p_fast, p_full = np.asarray(probabilities(logits, fast)), np.asarray(probabilities(logits, full))
    np.testing.assert_array_equal(p_fast > 0, p_full > 0)  # the same kept tokens
    np.testing.assert_allclose(p_fast, p_full, rtol=0, atol=1e-6)
    kept = (p_full > 0).sum(-1)
    assert np.all(kept <= k) and np.all(kept >= 1) and (k == 1 or kept.max() > 1)
    # the draws come from exactly that distribution
    draws = _draws(logits, fast, 4000)
    for row in range(logits.shape[0]):
        freq = np.bincount(draws[:, row], minlength=V) / len(draws)
        assert np.all(freq[p_full[row] == 0] == 0)
        np.testing.assert_allclose(freq, p_full[row], rtol=0, atol=0.035)


def test_full_sort_path_draws_from_its_probabilities():
    logits = _logits(B=2, seed=3)
    full = make_sampler(0.9, None, 0.8, V)
    probs, draws = np.asarray(probabilities(logits, full)), _draws(logits, full, 4000)
    for row in range(2):
        np.testing.assert_allclose(np.bincount(draws[:, row], minlength=V) / len(draws), probs[row], atol=0.035)


def _primitives(fn, *args) -> set[str]:
    """Every primitive in fn's jaxpr, nested calls included (as printed)."""
    return set(re.findall(r"= ([a-z_]+)\[", str(jax.make_jaxpr(fn)(*args))))


def test_top_k_path_sorts_nothing():
    logits, key = _logits(), jax.random.key(0)
    fast = _primitives(lambda l, k: sample(l, k, make_sampler(1.0, 40, 0.9, V)), logits, key)
    assert "top_k" in fast and "sort" not in fast
    assert "sort" in _primitives(lambda l, k: sample(l, k, make_sampler(1.0, None, 0.9, V)), logits, key)


def _fits_candidates(logits, t, k, p) -> bool:
    """Whether every row's cutoff lies among its GENERATE_CANDIDATES largest logits (numpy float64)."""
    x = np.asarray(logits, np.float64) / t
    if k is not None and k <= GENERATE_CANDIDATES:
        return True
    if k is not None and k < V:
        return False
    probs = np.exp(x - x.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return bool(np.all(np.sort(probs, -1)[:, ::-1][:, :GENERATE_CANDIDATES].sum(-1) >= p))


# (temperature, top_k, top_p, the cutoff among the candidates): top-k within them; a nucleus within them; a top-k
# beyond them; a nucleus beyond them (a hot temperature spreads the mass)
GENERATION_CASES = [(1.0, 40, 1.0, True), (0.7, None, 0.5, True), (1.0, 300, 0.9, False), (2.0, None, 0.999, False)]


@pytest.mark.parametrize("t,k,p,fits", GENERATION_CASES)
def test_generation_sampler_keeps_the_full_sort_distribution(t, k, p, fits):
    """One static form for every setting: the candidates when the cutoff lies among them, else the full sort."""
    logits = _logits(seed=11)
    assert _fits_candidates(logits, t, k, p) == fits  # the case is the one intended
    gen = generation_sampler(t, k, p, V, "cpu")
    assert gen.candidates == GENERATE_CANDIDATES and gen.fallback
    full = Sampler(gen.temperature, gen.top_k, gen.top_p)
    p_gen, p_full = np.asarray(probabilities(logits, gen)), np.asarray(probabilities(logits, full))
    np.testing.assert_array_equal(p_gen > 0, p_full > 0)
    np.testing.assert_allclose(p_gen, p_full, rtol=0, atol=1e-6)
    if fits:  # kept tokens within the candidates
        assert np.all((p_full > 0).sum(-1) <= GENERATE_CANDIDATES)


@pytest.mark.parametrize("case", [GENERATION_CASES[1], GENERATION_CASES[3]], ids=["candidates", "full-sort"])
def test_generation_sampler_draws_from_its_probabilities(case):
    t, k, p, _ = case
    logits = _logits(B=2, seed=11)
    gen = generation_sampler(t, k, p, V, "cpu")
    probs, draws = np.asarray(probabilities(logits, gen)), _draws(logits, gen, 4000)
    for row in range(2):
        freq = np.bincount(draws[:, row], minlength=V) / len(draws)
        assert np.all(freq[probs[row] == 0] == 0)
        np.testing.assert_allclose(freq, probs[row], rtol=0, atol=0.035)


def test_generation_sampler_sorts_only_in_its_fallback():
    logits, key = _logits(), jax.random.key(0)
    prims = _primitives(lambda x, k: sample(x, k, generation_sampler(1.0, 40, 0.9, V, "cpu")), logits, key)
    assert {"top_k", "cond", "sort"} <= prims  # the sort is the cond's other branch
    assert generation_sampler(1.0, 40, 0.9, V, "gpu").candidates == 0  # a predicate read on the host mid-step
    assert generation_sampler(1.0, 40, 0.9, 100, "cpu").candidates == 0  # a vocabulary within the candidates
