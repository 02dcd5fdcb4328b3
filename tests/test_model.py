"""The models against the float64 numpy reference of the authors' code, and their internal equivalences. The
forward passes are jitted, as everywhere they run (one compilation instead of one per operation)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reference
from conftest import prime_config
from mole_jax import hf
from mole_jax.config import ConfigError, ModelConfig, get_preset, presets
from mole_jax.model import (Transformer, graphdef_and_shapes, init_params, per_expert_buffers,
                            without_routed_experts)

B, T = 3, 11


def _ids(cfg, seed=1, shape=(B, T)):
    return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size)


@functools.cache
def _forward(cfg, with_experts: bool):
    graphdef, _ = graphdef_and_shapes(cfg, with_experts=with_experts)
    return jax.jit(lambda params, ids, kw: nnx.merge(graphdef, params)(ids, **kw))


def _logits(cfg, params, ids, **kw):
    with_experts = "experts" in params["blocks"][0] or cfg.kind != "mole"
    return _forward(cfg, with_experts)(params, ids, kw).logits_BxTxV


def _assert_close(actual, expected, rtol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.all(np.isfinite(actual)), "non-finite values"
    scale = np.max(np.abs(expected))
    assert scale > 0.1, "test values too small to be meaningful"
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("kind", ["dense", "moe", "mole"])
def test_matches_numpy_reference(kind):
    cfg = prime_config(kind)
    params = init_params(cfg, seed=3)
    ids = _ids(cfg)
    ref = reference.forward(hf.config_to_hf(cfg), hf.params_to_hf(cfg, params), np.asarray(ids), top_k=cfg.top_k)
    _assert_close(_logits(cfg, params, ids), ref, 1e-5)


def test_partial_rotary_matches_reference():
    cfg = prime_config("mole", rotary_fraction=0.25, d_model=32, num_heads=2)  # head 16, rotate 4 dims
    params = init_params(cfg, seed=4)
    ids = _ids(cfg)
    hf_cfg = {**hf.config_to_hf(cfg.replace(rotary_fraction=1.0))}
    ref = reference.forward(hf_cfg, hf.params_to_hf(cfg, params), np.asarray(ids), rotary_fraction=0.25)
    _assert_close(_logits(cfg, params, ids), ref, 1e-5)
    full = _logits(cfg.replace(rotary_fraction=1.0), params, ids)
    assert np.max(np.abs(np.asarray(full) - ref)) > 1e-3  # the fraction really changes the model


@pytest.mark.parametrize("kind", ["dense", "moe", "mole"])
def test_causal(kind):
    """No logit depends on a later token: changing the token at t changes nothing before t, and does change t."""
    cfg = prime_config(kind)
    params = init_params(cfg, seed=5)
    ids = np.asarray(_ids(cfg))
    base = np.asarray(_logits(cfg, params, jnp.asarray(ids)))
    for t in (3, T - 1):
        changed = ids.copy()
        changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
        out = np.asarray(_logits(cfg, params, jnp.asarray(changed)))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert np.max(np.abs(out[:, t] - base[:, t])) > 1e-4


def test_causal_by_gradient():
    """nanodo's check: the loss at position t has zero gradient w.r.t. the input embeddings of later tokens."""
    cfg = prime_config("mole")
    graphdef, _ = graphdef_and_shapes(cfg)
    params = init_params(cfg, seed=6)
    ids = _ids(cfg)
    t = 4

    def loss_at_t(embed):
        p = {**params, "embed_VxD": embed}
        return nnx.merge(graphdef, p)(ids).logits_BxTxV[:, t].sum()

    grad = np.asarray(jax.jit(jax.grad(loss_at_t))(params["embed_VxD"]))
    later_only = set(np.asarray(ids[:, t + 1:]).ravel()) - set(np.asarray(ids[:, :t + 1]).ravel())
    assert later_only, "test needs tokens that occur only after t"
    for v in later_only:
        assert np.all(grad[v] == 0.0)
    assert np.any(grad[int(ids[0, 0])] != 0.0)


def test_mole_inference_form_equals_training_form():
    cfg = prime_config("mole")
    params = init_params(cfg, seed=7)
    graphdef, _ = graphdef_and_shapes(cfg)
    model = nnx.merge(graphdef, params)
    ids = _ids(cfg)
    rows_RxLxNxD = model.lut_rows(ids.reshape(-1))
    lut = rows_RxLxNxD.reshape(B, T, *rows_RxLxNxD.shape[1:])
    inference = _logits(cfg, without_routed_experts(params), ids, lut_BxTxLxNxD=lut)
    _assert_close(inference, model(ids).logits_BxTxV, 1e-5)
    # and the rows are the reference's re-parameterised table
    table = reference.lut_table(hf.config_to_hf(cfg), hf.params_to_hf(cfg, params))
    np.testing.assert_allclose(np.asarray(rows_RxLxNxD), table[np.asarray(ids).ravel()], rtol=0,
                               atol=1e-6 * np.abs(table).max())


def test_inference_form_has_no_expert_weights():
    cfg = get_preset("tiny-mole")
    _, train_shapes = graphdef_and_shapes(cfg)
    _, infer_shapes = graphdef_and_shapes(cfg, with_experts=False)
    size = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
    dense = size(graphdef_and_shapes(get_preset("tiny-dense"))[1])
    assert size(infer_shapes) == dense + cfg.num_layers * cfg.d_model * cfg.num_experts  # dense + routers
    assert size(train_shapes) == cfg.param_counts()["total"]
    assert size(infer_shapes) == cfg.param_counts()["active"]


@pytest.mark.parametrize("capacity", [B * T, 12, 5])
def test_mole_dedup_equals_plain(capacity):
    """Dedup evaluates experts once per distinct id; with too small a capacity it falls back. Same logits and
    same gradients either way."""
    cfg = prime_config("mole")
    params = init_params(cfg, seed=8)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 14, (B, T)))  # ~14 distinct ids among 33 tokens
    graphdef, _ = graphdef_and_shapes(cfg)

    def loss(p, rows):
        return jnp.mean(nnx.merge(graphdef, p)(ids, dedup_rows=rows).logits_BxTxV ** 2)

    l0, g0 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, 0)
    l1, g1 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, capacity)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(np.abs(b).max(), 1e-12))


@pytest.mark.parametrize("impl", ["dense", "ragged", "grouped", "gather", "skip"])
def test_moe_implementations_agree(impl):
    cfg = prime_config("moe", moe_impl=impl)
    params = init_params(cfg, seed=9)
    ids = _ids(cfg)
    ref = reference.forward(hf.config_to_hf(cfg), hf.params_to_hf(cfg, params), np.asarray(ids), top_k=2)
    _assert_close(_logits(cfg, params, ids), ref, 1e-5)


@pytest.mark.parametrize("impl", ["auto", "gather", "skip"])
def test_moe_decode_sized_paths_match_reference(impl):
    """Few tokens (M*k <= N): most experts idle; the paths that run only the chosen experts."""
    cfg = prime_config("moe", num_experts=7, top_k=3, moe_impl=impl)
    params = init_params(cfg, seed=10)
    ids = _ids(cfg, shape=(1, 2))
    ref = reference.forward(hf.config_to_hf(cfg), hf.params_to_hf(cfg, params), np.asarray(ids), top_k=3)
    _assert_close(_logits(cfg, params, ids), ref, 1e-5)
    grads = jax.grad(lambda p: _logits(cfg, p, ids).sum())(params)  # differentiable like every other path
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_moe_per_expert_buffers_equal_stacked_and_copy_no_expert():
    """CPU decode: the resident MoE's experts as a buffer each give the same logits as the stacked weights (and
    the reference), and the compiled step no longer copies an expert's weights out of the stack."""
    cfg = prime_config("moe", num_experts=7, top_k=3)
    params = init_params(cfg, seed=10)
    split = per_expert_buffers(cfg, params, "cpu")
    assert len(split["blocks"][0]["experts"]["w_up_NxDxF"]) == 7
    ids = _ids(cfg, shape=(1, 2))
    np.testing.assert_array_equal(_logits(cfg, split, ids), _logits(cfg, params, ids))
    ref = reference.forward(hf.config_to_hf(cfg), hf.params_to_hf(cfg, params), np.asarray(ids), top_k=3)
    _assert_close(_logits(cfg, split, ids), ref, 1e-5)

    def expert_copies(p):
        hlo = _forward(cfg, True).lower(p, ids, {}).compile().as_text()
        shapes = (f"f32[{cfg.d_model},{cfg.expert_dim}]", f"f32[{cfg.expert_dim},{cfg.d_model}]")
        return sum(1 for line in hlo.splitlines() if "slice" in line and "fusion(" in line
                   and any(f"= {s}" in line for s in shapes))

    if jax.default_backend() == "cpu":
        assert expert_copies(params) > 0 and expert_copies(split) == 0
    assert per_expert_buffers(cfg, params, "gpu") is params
    assert per_expert_buffers(cfg.replace(moe_impl="gather"), params, "cpu") is params


def test_moe_skip_on_chosen_rows_equals_every_row():
    """skip's decode-sized form (each expert on the rows that chose it, in a few static bucket sizes) against the
    same experts on every row with zero gates (`mixed`) and skip's large-batch form, at several batch sizes."""
    from mole_jax.layers import Experts
    from mole_jax.model import route_top_k

    cfg = prime_config("moe", num_experts=7, top_k=2)
    experts = Experts(cfg, nnx.Rngs(3))
    for M in (1, 5, 40):
        x_MxD = jax.random.normal(jax.random.key(M), (M, cfg.d_model))
        expert_MxK, gates_MxK = route_top_k(x_MxD @ jax.random.normal(jax.random.key(0), (cfg.d_model, 7)), 2,
                                            jnp.float32)
        gates_MxN = jnp.zeros((M, 7)).at[jnp.arange(M)[:, None], expert_MxK].set(gates_MxK)
        want = experts.mixed(x_MxD, gates_MxN)
        _assert_close(experts.skip_idle(x_MxD, gates_MxN, row_buckets=True), want, 1e-6)
        _assert_close(experts.skip_idle(x_MxD, gates_MxN), want, 1e-6)


def test_moe_aux_losses():
    cfg = prime_config("moe")
    graphdef, _ = graphdef_and_shapes(cfg)
    out = _forward(cfg, True)(init_params(cfg), _ids(cfg), {})
    assert set(out.aux) == {"balance", "router_z"}
    assert 1.0 <= float(out.aux["balance"]) <= cfg.num_experts  # N * sum f_i P_i is 1 when perfectly balanced
    assert float(out.aux["router_z"]) > 0
    # uniform router -> balance exactly 1 when the assignments are uniform too is not guaranteed; check a bound
    for kind in ("dense", "mole"):
        c = prime_config(kind)
        assert _forward(c, True)(init_params(c), _ids(c), {}).aux == {}


@pytest.mark.parametrize("kind", ["dense", "moe", "mole"])
def test_kv_cache_matches_full_sequence(kind):
    """Prefill a prefix into the cache, then feed one token at a time: the logits equal the full pass."""
    cfg = prime_config(kind)
    params = init_params(cfg, seed=11)
    forward = _forward(cfg, True)
    ids = _ids(cfg)
    full = forward(params, ids, {}).logits_BxTxV
    cache = nnx.merge(graphdef_and_shapes(cfg)[0], params).init_cache(B, 16)
    out = forward(params, ids[:, :5], {"cache": cache})
    steps = [out.logits_BxTxV]
    cache = out.cache
    for t in range(5, T):
        pos = jnp.full((B, 1), t, jnp.int32)
        out = forward(params, ids[:, t:t + 1], {"positions_BxT": pos, "cache": cache})
        steps.append(out.logits_BxTxV)
        cache = out.cache
    _assert_close(jnp.concatenate(steps, axis=1), full, 1e-5)


def test_bfloat16_close_to_float32():
    cfg = prime_config("mole")
    params = init_params(cfg, seed=12)
    ids = _ids(cfg)
    f32 = np.asarray(_logits(cfg, params, ids))
    bf16 = np.asarray(_logits(cfg.replace(dtype="bfloat16"), params, ids))
    assert bf16.dtype == np.float32 and np.all(np.isfinite(bf16))
    err = np.max(np.abs(bf16 - f32)) / np.max(np.abs(f32))
    assert err < 5e-2, err  # bf16 has 8 bits of mantissa (~4e-3 per op), through 3 layers
    assert err > 0  # it really ran in bf16


def test_presets_match_paper_table2():
    expected_total = {"dense-160m": 0.16e9, "mole-4e-160m": 0.39e9, "moe-10e-160m": 0.39e9,
                      "moe-34e-160m": 1.07e9, "mole-16e-160m": 1.07e9, "dense-410m": 0.41e9,
                      "moe-10e-410m": 1.21e9, "mole-4e-410m": 1.21e9, "moe-34e-410m": 3.63e9,
                      "mole-16e-410m": 3.63e9, "dense-1b": 1.01e9, "moe-10e-1b": 3.16e9, "mole-4e-1b": 3.16e9}
    for name, total in expected_total.items():
        got = presets[name].param_counts()["total"]
        assert abs(got - total) / total < 0.03, (name, got)
    # equal activated size within each CPU family; LUT row sizes of the paper
    for size in ("tiny", "small"):
        active = [presets[f"{size}-{k}"].param_counts()["active"] for k in ("dense", "moe", "mole")]
        assert max(active) / min(active) < 1.02
    assert presets["mole-4e-160m"].lut_row_size == 36864 and presets["mole-16e-410m"].lut_row_size == 393216


def test_config_rejects_nonsense():
    with pytest.raises(ConfigError, match="kind"):
        ModelConfig(kind="gpt", vocab_size=10, num_layers=1, d_model=8, num_heads=2, ffn_dim=8)
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(kind="dense", vocab_size=10, num_layers=1, d_model=9, num_heads=2, ffn_dim=8)
    with pytest.raises(ConfigError, match="top_k"):
        prime_config("moe", top_k=9)
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("mole-99e")
    assert ModelConfig.from_dict(presets["small-mole"].to_dict()) == presets["small-mole"]


def test_transformer_module_direct_use():
    """The NNX module is usable directly, as in the Flax examples."""
    cfg = get_preset("tiny-moe")
    model = Transformer(cfg, nnx.Rngs(0))
    out = model(jnp.zeros((2, 8), jnp.int32))
    assert out.logits_BxTxV.shape == (2, 8, cfg.vocab_size) and out.logits_BxTxV.dtype == jnp.float32
