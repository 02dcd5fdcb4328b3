"""MoE's auxiliary losses against a float64 numpy restatement of their formulas (OLMoE / Switch):
balance = N * sum_i f_i * P_i, f_i the share of the top-k assignments that go to expert i, P_i the mean router
probability of expert i; router z-loss = mean over tokens of logsumexp(router logits)^2. Per layer (model.moe_aux,
on random logits of several N and top_k), and as a training step reports them: averaged over the layers
(Layers.__call__) and over the micro-batches of gradient accumulation (make_train_step)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import prime_config
from mole_jax import model as model_lib
from mole_jax.config import TrainConfig
from mole_jax.model import graphdef_and_shapes, init_params, moe_aux, route_top_k
from mole_jax.train_step import TrainState, loss_fn, make_optimizer, make_train_step

RTOL = 1e-6


def aux_reference(logits_MxN, top_k: int) -> dict[str, float]:
    """The formulas in float64, from the router logits alone (its own top-k choice)."""
    x = np.asarray(logits_MxN, np.float64)
    M, N = x.shape
    chosen_MxK = np.argsort(-x, axis=-1, kind="stable")[:, :top_k]
    f_N = np.bincount(chosen_MxK.ravel(), minlength=N) / (M * top_k)
    probs_MxN = np.exp(x - x.max(-1, keepdims=True))
    probs_MxN /= probs_MxN.sum(-1, keepdims=True)
    P_N = probs_MxN.mean(0)
    lse_M = x.max(-1) + np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1))
    return {"balance": float(N * np.sum(f_N * P_N)), "router_z": float(np.mean(lse_M ** 2))}


def test_reference_on_hand_checked_values():
    # two tokens, two experts, top-1: both pick expert 0 -> f = (1, 0); P = mean of softmax rows
    x = np.array([[1.0, 0.0], [2.0, 0.0]])
    s = 1 / (1 + np.exp(-x[:, 0]))  # softmax's first column
    got = aux_reference(x, 1)
    assert got["balance"] == pytest.approx(2 * s.mean(), rel=1e-12)
    assert got["router_z"] == pytest.approx(np.mean(np.log(np.exp(x).sum(-1)) ** 2), rel=1e-12)
    # uniform logits and every expert chosen (top_k = N): balance exactly 1
    assert aux_reference(np.zeros((3, 4)), 4)["balance"] == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("N,top_k", [(2, 1), (4, 1), (5, 2), (8, 2), (8, 3), (16, 4), (6, 6)])
@pytest.mark.parametrize("skew", [0.0, 2.0])
def test_moe_aux_equals_the_formulas(N, top_k, skew):
    """Random logits (M = 300 tokens); with skew, a bias toward the first experts makes the routing unbalanced, so
    that the balance term is far from 1 and a wrong f or P shows."""
    rng = np.random.default_rng(1000 * N + 10 * top_k + int(skew))
    logits = (1.5 * rng.standard_normal((300, N)) + skew * np.linspace(1, 0, N) + 0.7).astype(np.float32)
    expert_MxK, _ = route_top_k(jnp.asarray(logits), top_k, jnp.float32)  # the model's routing
    got = jax.jit(moe_aux)(jnp.asarray(logits), expert_MxK)
    want = aux_reference(logits, top_k)
    for key in ("balance", "router_z"):
        assert float(got[key]) == pytest.approx(want[key], rel=RTOL), key
    if skew and top_k < N:
        assert want["balance"] > 1.1  # the case is unbalanced, as intended


def _tokens(cfg, shape, seed=2):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, shape), jnp.int32)


def _captured_router_logits(cfg, params, tokens_BxT1, monkeypatch) -> list[np.ndarray]:
    """Each layer's router logits [M, N] in a forward pass, run eagerly with model.moe_aux wrapped to record its
    input (its output is the model's own)."""
    seen = []

    def recording(logits_MxN, expert_MxK):
        seen.append(np.asarray(logits_MxN))
        return moe_aux(logits_MxN, expert_MxK)

    graphdef, _ = graphdef_and_shapes(cfg)
    with monkeypatch.context() as m:
        m.setattr(model_lib, "moe_aux", recording)
        nnx.merge(graphdef, params)(tokens_BxT1[:, :-1])
    assert len(seen) == cfg.num_layers
    return seen


def _layer_mean_reference(per_layer_logits, top_k) -> dict[str, float]:
    refs = [aux_reference(x, top_k) for x in per_layer_logits]
    return {k: float(np.mean([r[k] for r in refs])) for k in ("balance", "router_z")}


@pytest.mark.parametrize("N,top_k", [(5, 2), (7, 1), (4, 3)])
def test_training_metrics_are_the_layer_means(N, top_k, monkeypatch):
    """loss_fn's metrics (what the training loop logs for each step) and the objective it differentiates."""
    cfg = prime_config("moe", num_experts=N, top_k=top_k)
    params = init_params(cfg, seed=3)
    tokens = _tokens(cfg, (4, 38))  # 4 x 37 = 148 tokens: the MoE's training path, as in a training step
    want = _layer_mean_reference(_captured_router_logits(cfg, params, tokens, monkeypatch), top_k)
    graphdef, _ = graphdef_and_shapes(cfg)
    objective, metrics = jax.jit(lambda p, t: loss_fn(p, graphdef, cfg, t))(params, tokens)
    for key in ("balance", "router_z"):
        assert float(metrics[key]) == pytest.approx(want[key], rel=RTOL), key
    expected = float(metrics["loss"]) + cfg.moe_balance_coef * want["balance"] + cfg.moe_z_coef * want["router_z"]
    assert float(objective) == pytest.approx(expected, rel=RTOL)
    # the layers differ: a mean over layers is not any one layer's value
    per_layer = [aux_reference(x, top_k)["router_z"] for x in _captured_router_logits(cfg, params, tokens,
                                                                                       monkeypatch)]
    assert max(per_layer) - min(per_layer) > 1e-3 * want["router_z"]


def test_train_step_metrics_average_layers_and_micro_batches(monkeypatch):
    """make_train_step with 2 micro-batches (gradient accumulation): the reported values are the mean over the
    micro-batches of each one's mean over layers."""
    cfg = prime_config("moe")
    tc = TrainConfig(steps=3, batch_size=8, seq_len=37)
    tx = make_optimizer(tc)
    params = init_params(cfg, seed=4)
    tokens_AxBxT1 = _tokens(cfg, (2, 4, 38), seed=5)
    per_micro = [_layer_mean_reference(_captured_router_logits(cfg, params, tokens_AxBxT1[a], monkeypatch),
                                       cfg.top_k) for a in range(2)]
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    _, metrics = jax.jit(make_train_step(cfg, tc, tx))(state, tokens_AxBxT1)
    for key in ("balance", "router_z"):
        want = np.mean([m[key] for m in per_micro])
        assert float(metrics[key]) == pytest.approx(want, rel=RTOL), key
