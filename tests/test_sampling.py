"""The sampler's top-k path (lax.top_k of a few candidates) against the full sort of the vocabulary: the same
kept tokens with the same probabilities, draws that follow them, and no sort of the vocabulary in it."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mole_jax.sampling import Sampler, make_sampler, probabilities, sample, top_k_candidates

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
