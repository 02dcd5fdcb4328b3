"""Sampling against an independent float64 reference written here from the rule the code documents (temperature;
top-k keeps every token whose logit reaches the k-th largest; top-p then keeps a token when the probability mass
of the strictly more likely tokens, renormalised over the top-k, is below top_p; the kept tokens renormalised):
`probabilities` equals it for both sampler forms and every path (candidates, full sort, generation_sampler's
fallback); the draws of `sample` follow it in total variation within a bound set by the number of draws; and the
same check rejects deliberately wrong rules. Also: the top-k path sorts nothing."""

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


# The reference -------------------------------------------------------------------------------------------------
def reference(logits, t, k, p, *, top_p_over_vocab=False, mass_with_self=False, k_offset=0):
    """What sampling with (temperature t, top_k k, top_p p) draws from, numpy float64 [B, V], from the logits.
    The flags make it deliberately wrong, to show that the checks below tell the difference:
    top_p_over_vocab: top-p reads probabilities normalised over the whole vocabulary, not over the top-k;
    mass_with_self: top-p keeps a token while the mass INCLUDING it is below top_p (the most likely one always);
    k_offset: top-k keeps the k + k_offset largest."""
    x = np.asarray(logits, np.float64) / t
    B, n = x.shape
    k = min(max((k or n) + k_offset, 1), n)
    p = 1.0 if p is None else float(p)
    out = np.zeros_like(x)
    for b in range(B):
        w = np.exp(x[b] - x[b].max())
        in_k = x[b] >= np.sort(x[b])[::-1][k - 1]  # ties with the k-th largest are kept
        q = w / (w.sum() if top_p_over_vocab else w[in_k].sum())
        before = ((x[b][None, :] > x[b][:, None]) & in_k[None, :]) @ q  # the mass of strictly more likely tokens
        if mass_with_self:
            before = before + q
            before[np.argmax(x[b])] = 0.0
        keep = in_k & ((before < p) | (p >= 1.0))
        out[b, keep] = w[keep] / w[keep].sum()
    return out


def top_p_margin(logits, t, k, p) -> float:
    """How far the nucleus rule's decisions are from flipping: min over the top-k tokens of |mass before - top_p|
    (float32 arithmetic in the code may differ from float64 here by ~1e-7)."""
    if p is None or p >= 1:
        return np.inf
    x = np.asarray(logits, np.float64) / t
    margins = []
    for row in x:
        kk = min(k or row.size, row.size)
        in_k = row >= np.sort(row)[::-1][kk - 1]
        w = np.exp(row - row.max()) * in_k
        q = w / w.sum()
        before = ((row[None, :] > row[:, None]) & in_k[None, :]) @ q
        margins.append(np.abs(before[in_k] - p).min())
    return float(min(margins))


def _sampler(form: str, t, k, p, vocab_size: int) -> Sampler:
    if form == "make":
        return make_sampler(t, k, p, vocab_size)
    return generation_sampler(t, k, p, vocab_size, "cpu")


def test_reference_follows_the_documented_rule():
    """The reference on a hand-checked row: probabilities 0.4, 0.3, 0.2, 0.1 (logits = their logs)."""
    x = np.log([[0.1, 0.4, 0.2, 0.3]])
    np.testing.assert_allclose(reference(x, 1.0, None, None), [[0.1, 0.4, 0.2, 0.3]])
    np.testing.assert_allclose(reference(x, 1.0, 2, None), [[0, 4 / 7, 0, 3 / 7]])  # the 2 largest, renormalised
    # top-p 0.7: 0.4 (before 0) and 0.3 (before 0.4) kept; 0.2 (before 0.7, not < 0.7) dropped
    np.testing.assert_allclose(reference(x, 1.0, None, 0.7 + 1e-9), [[0, 4 / 9, 2 / 9, 3 / 9]])
    np.testing.assert_allclose(reference(x, 1.0, None, 0.7 - 1e-9), [[0, 4 / 7, 0, 3 / 7]])
    # top-k 3, then top-p over the renormalised 4/9, 3/9, 2/9: at 0.5 the second is kept (4/9 < 0.5); at 0.75 the
    # third is not (7/9), though it would be over the whole vocabulary (0.7 < 0.75)
    np.testing.assert_allclose(reference(x, 1.0, 3, 0.5), [[0, 4 / 7, 0, 3 / 7]])
    np.testing.assert_allclose(reference(x, 1.0, 3, 0.75), [[0, 4 / 7, 0, 3 / 7]])
    np.testing.assert_allclose(reference(x, 1.0, 3, 0.75, top_p_over_vocab=True), [[0, 4 / 9, 2 / 9, 3 / 9]])
    np.testing.assert_allclose(reference(x, 1.0, None, 0.5, mass_with_self=True), [[0, 1, 0, 0]])
    np.testing.assert_allclose(reference(x, 1.0, 2, None, k_offset=-1), [[0, 1, 0, 0]])
    # temperature 2 flattens: probabilities proportional to sqrt(p)
    s = np.sqrt([0.1, 0.4, 0.2, 0.3])
    np.testing.assert_allclose(reference(x, 2.0, None, None), [s / s.sum()])
    # ties at the k-th largest are all kept
    np.testing.assert_allclose(reference(np.log([[0.4, 0.2, 0.2, 0.2]]), 1.0, 2, None), [[0.4, 0.2, 0.2, 0.2]])


# probabilities() against the reference ---------------------------------------------------------------------------
# (name, temperature, top_k, top_p, seed of _logits); the last two put the cutoff beyond generation_sampler's
# GENERATE_CANDIDATES (a top-k beyond them; a nucleus beyond them at a hot temperature): its full-sort fallback.
# The seeds keep every top-p decision more than 1e-5 from flipping (top_p_margin).
EXACT_CASES = [("top-k", 1.0, 40, None, 0), ("top-k-1", 1.0, 1, None, 1), ("top-p", 1.0, None, 0.9, 4),
               ("both", 0.7, 50, 0.9, 2), ("both-narrow", 1.3, 5, 0.5, 3), ("temperature", 1.5, None, None, 5),
               ("cold-top-p", 0.5, None, 0.95, 6), ("top-k-beyond-candidates", 1.0, 300, 0.9, 7),
               ("nucleus-beyond-candidates", 2.0, None, 0.99, 9)]


@pytest.mark.parametrize("form", ["make", "generation"])
@pytest.mark.parametrize("name,t,k,p,seed", EXACT_CASES, ids=[c[0] for c in EXACT_CASES])
def test_probabilities_equal_the_reference(form, name, t, k, p, seed):
    logits = _logits(seed=seed)
    assert top_p_margin(logits, t, k, p) > 1e-5  # no decision within float32 rounding of flipping
    want = reference(logits, t, k, p)
    sampler = _sampler(form, t, k, p, V)
    got = np.asarray(probabilities(logits, sampler), np.float64)
    np.testing.assert_array_equal(got > 0, want > 0)  # the same kept tokens
    assert np.abs(got - want).max() <= 1e-6
    kept = (want > 0).sum(-1)
    if k is not None:
        assert np.all(kept <= k) and np.all(kept >= 1) and (k == 1 or kept.max() > 1)
    if name.endswith("beyond-candidates"):  # the case is the one intended: the candidates cannot find the cutoff
        assert form == "make" or sampler.candidates == GENERATE_CANDIDATES
        assert (k or 0) > GENERATE_CANDIDATES or kept.min() > GENERATE_CANDIDATES


def test_the_cases_exercise_every_rule():
    """Each wrong rule changes some case of EXACT_CASES by far more than the 1e-6 the comparison allows, so that
    test_probabilities_equal_the_reference would fail for a sampler that followed it."""
    for wrong in (dict(top_p_over_vocab=True), dict(mass_with_self=True), dict(k_offset=1), dict(k_offset=-1)):
        worst = max(np.abs(reference(_logits(seed=seed), t, k, p, **wrong)
                           - reference(_logits(seed=seed), t, k, p)).max() for _, t, k, p, seed in EXACT_CASES)
        assert worst > 1e-3, wrong


def _tied_logits():
    """Integer logits (exact at temperatures 0.5 and 1): one token at 5, two at 4, three at 3, the rest below 0."""
    rng = np.random.default_rng(5)
    x = np.round(-3 + rng.standard_normal(V)).clip(max=-1)
    x[:6] = [5, 4, 4, 3, 3, 3]
    return jnp.asarray(x[rng.permutation(V)][None], jnp.float32)


# At temperature 1 the head's probabilities are 0.37 (the 5), 0.14 each (the 4s), 0.05 each (the 3s), the tail's
# 0.20; over the top 6 tokens 0.47, 0.17, 0.06. top-k 5 and 6: the k-th largest is a 3, so all three 3s are kept.
# Top-p 0.45 (and top-k 5 with top-p 0.6): the first 4 has 0.37 (0.47) before it, the second one 0.51 (0.64) in
# sorted order, yet both are kept: the rule reads the mass of STRICTLY more likely tokens. Top-p 0.97: the cutoff is
# deep in the tail's tied values (the full-sort fallback). Top-k 4 (make_sampler: 8 candidates) keeps the 3s at
# ranks 4 to 6. Top-k 7: the 7th largest is the tail's top value, -1, which 67 tokens share, beyond make_sampler's 8
# candidates; top-k 100: a -2, which ranks 74 to 315 share, beyond both forms' 128. There the last candidate ties
# with the cutoff, which sends the step to the full sort.
TIED_CASES = [(1.0, 5, None), (1.0, 6, None), (1.0, None, 0.45), (1.0, 5, 0.6), (0.5, None, 0.8),
              (0.5, 5, 0.999), (1.0, None, 0.97), (1.0, 4, None), (1.0, 7, None), (1.0, 100, None)]


@pytest.mark.parametrize("form,t,k,p", [(f, *c) for f in ("make", "generation") for c in TIED_CASES])
def test_ties_at_the_cutoff_are_kept_together(form, t, k, p):
    logits = _tied_logits()
    assert top_p_margin(logits, t, k, p) > 1e-5
    want = reference(logits, t, k, p)
    got = np.asarray(probabilities(logits, _sampler(form, t, k, p, V)), np.float64)
    np.testing.assert_array_equal(got > 0, want > 0)
    assert np.abs(got - want).max() <= 1e-6
    row = np.asarray(logits)[0]
    assert row[want[0] > 0].min() not in row[want[0] == 0]  # a tie is kept whole or dropped whole


def test_top_k_candidates():
    assert top_k_candidates(None, V) == 0 and top_k_candidates(V, V) == 0 and top_k_candidates(600, V) == 0
    assert [top_k_candidates(k, V) for k in (1, 2, 3, 40, 63, 64)] == [2, 4, 4, 64, 64, 128]


# Draws against the reference -------------------------------------------------------------------------------------
DRAWS = 40_000
DELTA = 1e-6  # the chance that a correct sampler fails one row's check


def tv_bound(kept: int, n: int) -> float:
    """A bound on the total variation between n draws' frequencies and the distribution they come from, over
    `kept` tokens: E[TV] <= 1/2 sum_i sqrt(p_i / n) <= 1/2 sqrt(kept / n) (Cauchy-Schwarz), and TV moves by at most
    1/n per draw, so it exceeds its mean by t with probability <= exp(-2 n t^2) (McDiarmid): t for DELTA."""
    return 0.5 * np.sqrt(kept / n) + np.sqrt(np.log(1 / DELTA) / (2 * n))


def follows(freq_V: np.ndarray, probs_V: np.ndarray, n: int) -> tuple[bool, float, float]:
    """The draw check: (passes, total variation, bound) of the frequencies against a claimed distribution."""
    tv = 0.5 * np.abs(freq_V - probs_V).sum()
    bound = tv_bound(int((probs_V > 0).sum()), n)
    return tv <= bound, tv, bound


def _draw_logits():
    """[2, 256]: twenty likely tokens falling by 0.25 in logit, under a flat tail of 236 (row 0: heavy, about 3/4
    of the mass, so that top-k keeps a small share of the vocabulary; row 1: light). Shuffled ids."""
    rows = []
    for seed, tail_at in ((1, -1.0), (2, -4.5)):
        rng = np.random.default_rng(seed)
        x = np.concatenate([2.0 - 0.25 * np.arange(20) + 0.05 * rng.standard_normal(20),
                            tail_at + 0.3 * rng.standard_normal(236)])
        rows.append(x[rng.permutation(x.size)])
    return jnp.asarray(np.stack(rows), jnp.float32)


DRAW_CASES = {"top-k": (1.0, 6, None), "both": (0.8, 12, 0.7), "top-p": (1.0, None, 0.8),
              "fallback": (1.0, 200, 0.9)}  # top_k 200 > GENERATE_CANDIDATES: generation_sampler's full sort
WRONG_RULES = {"top-p over the vocabulary": dict(top_p_over_vocab=True),
               "top-p mass with self": dict(mass_with_self=True),
               "top-k + 1": dict(k_offset=1), "top-k - 1": dict(k_offset=-1)}
# Where each wrong rule must differ materially (and be caught): a top-k case, and top-k with top-p.
MATERIAL = {("top-k", "top-k + 1"), ("top-k", "top-k - 1"), ("both", "top-p over the vocabulary"),
            ("both", "top-p mass with self")}


@pytest.mark.parametrize("form", ["make", "generation"])
@pytest.mark.parametrize("case", list(DRAW_CASES))
def test_draws_follow_the_reference_and_wrong_rules_fail(form, case):
    t, k, p = DRAW_CASES[case]
    logits = _draw_logits()
    sampler = _sampler(form, t, k, p, logits.shape[-1])
    if case == "fallback" and form == "generation":
        assert sampler.candidates == GENERATE_CANDIDATES < k  # the cutoff lies beyond the candidates
    assert top_p_margin(logits, t, k, p) > 1e-5
    want = reference(logits, t, k, p)
    assert np.abs(np.asarray(probabilities(logits, sampler), np.float64) - want).max() <= 1e-6
    keys = jax.random.split(jax.random.key(7), DRAWS)
    draws = np.asarray(jax.jit(jax.vmap(lambda key, s: sample(logits, key, s), in_axes=(0, None)))(keys, sampler))
    assert draws.shape == (DRAWS, 2)
    report = []
    for row in range(2):
        freq = np.bincount(draws[:, row], minlength=logits.shape[-1]) / DRAWS
        ok, tv, bound = follows(freq, want[row], DRAWS)
        report.append(f"{form:10s} {case:8s} row {row}: correct rule TV {tv:.4f} <= {bound:.4f}")
        assert ok, report[-1]
        for rule, flags in WRONG_RULES.items():
            wrong = reference(logits, t, k, p, **flags)[row]
            gap = 0.5 * np.abs(wrong - want[row]).sum()
            # Material: farther from the sampler's distribution than both checks' slack together, so that a
            # sampler following this rule would fail the check against the correct one, and conversely.
            material = gap > tv_bound(int((want[row] > 0).sum()), DRAWS) + tv_bound(int((wrong > 0).sum()), DRAWS)
            if (case, rule) in MATERIAL and row == 0:
                assert material, (case, rule, gap)  # the logits tell this rule apart
            if material:
                ok_wrong, tv_wrong, bound_wrong = follows(freq, wrong, DRAWS)
                report.append(f"    wrong rule {rule:26s}: TV {tv_wrong:.4f} > {bound_wrong:.4f} (rules differ "
                              f"by {gap:.4f}) -> check fails")
                assert not ok_wrong, report[-1]
    print("\n" + "\n".join(report))


# No sort of the vocabulary on the top-k path ------------------------------------------------------------------------
def _primitives(fn, *args) -> set[str]:
    """Every primitive in fn's jaxpr, nested calls included (as printed)."""
    return set(re.findall(r"= ([a-z_]+)\[", str(jax.make_jaxpr(fn)(*args))))


def _unconditional(fn, *args) -> set[str]:
    """The primitives fn runs whatever its data: every equation's, nested jit calls included, but not those of a
    cond's branches."""
    def walk(jaxpr) -> set[str]:
        names = set()
        for e in jaxpr.eqns:
            names.add(e.primitive.name)
            if e.primitive.name != "cond":
                for value in e.params.values():
                    sub = getattr(value, "jaxpr", value)  # a ClosedJaxpr's Jaxpr, or a Jaxpr
                    if hasattr(sub, "eqns"):
                        names |= walk(sub)
        return names

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("form", ["make", "generation"])
def test_the_candidates_path_sorts_only_in_its_fallback(form):
    logits, key = _logits(), jax.random.key(0)
    sampler = _sampler(form, 1.0, 40, 0.9, V)
    prims = _primitives(lambda x, k: sample(x, k, sampler), logits, key)
    assert {"top_k", "cond", "sort"} <= prims and "sort" not in _unconditional(lambda x, k: sample(x, k, sampler),
                                                                          logits, key)
    assert "sort" in _unconditional(lambda l, k: sample(l, k, make_sampler(1.0, None, 0.9, V)), logits, key)
    assert generation_sampler(1.0, 40, 0.9, V, "gpu").candidates == 0  # a predicate read on the host mid-step
    assert generation_sampler(1.0, 40, 0.9, 100, "cpu").candidates == 0  # a vocabulary within the candidates
