"""The paths the accelerator run times, each against the plain path on CPU: rematerialisation (same loss and
gradients, less kept for the backward pass), bfloat16 training with float32 master weights, pinned host staging
(the same bits), and what `auto` picks per backend for MoE and attention."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import prime_config
from mole_jax import checkpoint, layers, lut, row_sources, sharding
from mole_jax.config import REMAT_POLICIES, ConfigError, MoleError, TrainConfig
from mole_jax.convert import convert_to_lut
from mole_jax.decode import LanguageModel, load
from mole_jax.model import DECODE_ROWS, graphdef_and_shapes, init_params, moe_impl
from mole_jax.train_step import ShardedStep, TrainState, loss_fn, make_grad_fn, make_optimizer, make_train_step

B, T = 4, 13  # T + 1 = 14 tokens per row; no dimension equals the prime config's N = 5
T_TRAIN = 37  # B * T_TRAIN = 148 tokens, more than model.DECODE_ROWS: a training batch's MoE path
CAPACITY = 24  # MoLE dedup: room for every distinct id of the batch below (ids < 20)
PROMPTS = [[5, 17, 96, 0, 3, 3, 41], [88, 2], [60, 71, 9, 13, 13, 13, 2, 40, 1, 7, 77]]


def _tokens(cfg, seed=0, high=None, length=T):
    high = cfg.vocab_size if high is None else high
    return jnp.asarray(np.random.default_rng(seed).integers(0, high, (B, length + 1)), jnp.int32)


assert B * T_TRAIN > DECODE_ROWS


def _assert_trees_close(actual, expected, rtol):
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=0, atol=rtol * max(np.abs(b).max(), 1e-12))


# Rematerialisation ------------------------------------------------------------------------------------------------
CASES = {"dense": ("dense", 0), "moe": ("moe", 0), "mole-dedup": ("mole", CAPACITY)}


@pytest.fixture(scope="module")
def remat_cases():
    """Per case: the config, params, tokens, and the plain path's (loss, metrics) and gradients (built once)."""
    cache = {}

    def get(case):
        if case not in cache:
            kind, rows = CASES[case]
            cfg = prime_config(kind, num_layers=2)
            params, tokens = init_params(cfg, seed=31), _tokens(cfg, high=20, length=T_TRAIN)
            cache[case] = cfg, rows, params, tokens, jax.jit(make_grad_fn(cfg, dedup_rows=rows))(params, tokens)
        return cache[case]

    return get


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_remat_equals_plain_loss_and_grads(remat_cases, case, policy):
    cfg, rows, params, tokens, ((l0, m0), g0) = remat_cases(case)
    (l1, m1), g1 = jax.jit(make_grad_fn(cfg, dedup_rows=rows, remat=policy))(params, tokens)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert set(m1) == set(m0)
    for k in m0:
        np.testing.assert_allclose(m1[k], m0[k], rtol=1e-6, err_msg=k)
    _assert_trees_close(g1, g0, 1e-6)
    assert np.abs(np.asarray(g0["embed_VxD"])).max() > 0


def _residual_bytes(cfg, rows, params, tokens, policy) -> int:
    """Bytes the backward pass reads from the forward pass: the arrays that jax.vjp's closure holds."""
    graphdef, _ = graphdef_and_shapes(cfg)
    f = lambda p: loss_fn(p, graphdef, cfg, tokens, rows, remat=policy)[0]  # noqa: E731
    kept = jax.eval_shape(lambda p: jax.tree.leaves(jax.vjp(f, p)[1]), params)
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in kept)


@pytest.mark.parametrize("case", ["dense", "mole-dedup"])
def test_remat_policies_keep_less_for_the_backward_pass(remat_cases, case):
    """What each policy keeps between the forward and the backward pass: block < dots < none (the policy is really
    applied, and each keeps what its name says)."""
    cfg, rows, params, tokens, _ = remat_cases(case)
    kept = {p: _residual_bytes(cfg, rows, params, tokens, p) for p in REMAT_POLICIES}
    assert kept["block"] < kept["dots"] < kept["none"], kept


def test_remat_unknown_policy_and_decoding_refuse():
    cfg = prime_config("dense")
    with pytest.raises(ConfigError, match="unknown remat policy 'full'"):
        make_grad_fn(cfg, remat="full")
    model = nnx.merge(graphdef_and_shapes(cfg)[0], init_params(cfg))
    with pytest.raises(ValueError, match="remat is for training"):
        model.forward(jnp.zeros((1, 3), jnp.int32), caches=model.init_cache(1, 8), remat="block")


def test_sharded_step_with_remat_equals_plain_on_two_devices():
    """The compiled, donated train step of `train` on 2 fake devices, MoLE with per-device dedup: one step with
    remat "block" gives the plain step's metrics and Adam moments (after one step, the clipped gradients)."""
    cfg = prime_config("mole", num_layers=1)
    mesh = sharding.make_mesh(2)
    tokens = np.random.default_rng(3).integers(0, 20, (8, 12)).astype(np.int32)
    out = {}
    for policy in ("none", "block"):
        tc = TrainConfig(steps=4, batch_size=8, seq_len=11, remat=policy)
        step = ShardedStep(cfg, tc, mesh, dedup_rows=20)
        state, batch = step.init_state(0), step.feed(lambda rows: tokens[rows])
        state, metrics = step.compile(state, batch)(state, batch)
        out[policy] = jax.device_get((state.opt_state, metrics))
    for k in ("loss", "grad_norm", "dedup_overflow"):
        np.testing.assert_allclose(out["block"][1][k], out["none"][1][k], rtol=1e-6, err_msg=k)
    assert out["none"][1]["dedup_overflow"] == 0  # the dedup path ran, per device
    _assert_trees_close(out["block"][0], out["none"][0], 1e-6)


# bfloat16 training, float32 master weights ----------------------------------------------------------------------
def _eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (jit, cond, custom derivatives, checkpoint)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def test_bfloat16_step_keeps_float32_master_weights():
    cfg32 = prime_config("mole", num_layers=2)
    cfg16 = cfg32.replace(dtype="bfloat16")
    assert cfg16.param_dtype == "float32"
    tc = TrainConfig(steps=4, batch_size=B, seq_len=T)
    tx = make_optimizer(tc)
    params, tokens = init_params(cfg16, seed=32), _tokens(cfg16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    floats = [x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)  # Adam's moments
    new, m16 = jax.jit(make_train_step(cfg16, tc, tx))(state, tokens[None])
    _, m32 = jax.jit(make_train_step(cfg32, tc, tx))(state, tokens[None])
    for tree in (new.params, new.opt_state):
        leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert all(x.dtype == jnp.float32 and np.all(np.isfinite(x)) for x in leaves)
    assert m16["loss"].dtype == jnp.float32 and np.isfinite(m16["loss"])
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=1e-2)  # bf16 keeps ~3 significant digits
    assert m16["loss"] != m32["loss"]  # it really ran in bfloat16
    np.testing.assert_allclose(m16["grad_norm"], m32["grad_norm"], rtol=5e-2)


@pytest.mark.parametrize("kind", ["moe", "mole"])
def test_bfloat16_compute_with_float32_softmax_router_and_loss(kind):
    """In the bfloat16 training loss: matmuls run in bfloat16, but every exp (attention's, the router's and the
    loss's softmax) reads float32, the router's logits come out of their matmul in float32, and the logits are
    float32."""
    cfg = prime_config(kind, dtype="bfloat16")
    graphdef, _ = graphdef_and_shapes(cfg)
    params, tokens = init_params(cfg, seed=33), _tokens(cfg)
    jaxpr = jax.make_jaxpr(lambda p: loss_fn(p, graphdef, cfg, tokens))(params).jaxpr
    eqns = list(_eqns(jaxpr))
    exps = [e for e in eqns if e.primitive.name == "exp"]
    assert exps and all(e.invars[0].aval.dtype == jnp.float32 for e in exps)
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert any(e.invars[0].aval.dtype == jnp.bfloat16 for e in dots)
    router = [e for e in dots if e.outvars[0].aval.shape[-1] == cfg.num_experts]
    assert len(router) == cfg.num_layers and all(e.outvars[0].aval.dtype == jnp.float32 for e in router)
    heads = [e for e in dots if e.outvars[0].aval.shape[-1] == cfg.vocab_size]
    assert heads and all(e.outvars[0].aval.dtype == jnp.float32 for e in heads)


# Pinned host staging ----------------------------------------------------------------------------------------------
def _pinned_or_skip():
    kinds = row_sources.memory_kinds(jax.devices()[0])
    if row_sources.PINNED_HOST not in kinds:
        pytest.skip(f"this JAX backend offers no {row_sources.PINNED_HOST!r} memory (memory kinds: {kinds})")


def test_transfers_modes_and_pinned_put_is_bit_exact():
    plain = row_sources.Transfers("off")
    assert plain.pinned is None and not plain.stages(1 << 20)
    auto = row_sources.Transfers()  # auto: staging only on accelerators
    assert (auto.pinned is not None) == (jax.default_backend() != "cpu" and row_sources.PINNED_HOST
                                         in row_sources.memory_kinds(jax.devices()[0]))
    with pytest.raises(MoleError, match="unknown pinned staging mode 'yes'"):
        row_sources.Transfers("yes")
    _pinned_or_skip()
    pinned = row_sources.Transfers("on")
    rng = np.random.default_rng(4)
    tree = ({"q": rng.integers(-128, 127, (6, 3, 5), dtype=np.int8), "scale": rng.standard_normal((6, 3)).astype(
        np.float16)}, rng.integers(0, 6, (2, 3)).astype(np.int32), np.int32(7))
    staged = pinned.stage(jax.tree.leaves(tree))
    assert all(x.sharding.memory_kind == row_sources.PINNED_HOST for x in staged)
    moved, reference = pinned.put(tree), plain.put(tree)
    assert pinned.bytes_sent == plain.bytes_sent == row_sources.nbytes(tree)
    for a, b, x in zip(jax.tree.leaves(moved), jax.tree.leaves(reference), jax.tree.leaves(tree), strict=True):
        assert a.sharding.memory_kind == b.sharding.memory_kind != row_sources.PINNED_HOST  # on the device
        assert a.dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(x))


def test_small_put_equals_device_put(monkeypatch):
    """A put of at most SMALL_PUT_MAX_BYTES goes through the shared jitted identity; a larger one through
    jax.device_put. Same values, dtypes and device either way, counted alike, and allowed under a
    transfer_guard("disallow") (the put is the explicit transfer)."""
    rng = np.random.default_rng(5)
    tree = ({"payload": rng.standard_normal((3, 2, 4)).astype(np.float16)}, rng.integers(0, 3, (3, 1)).astype(
        np.int32), np.int32(7))
    calls = []
    real = jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda *a, **k: calls.append(1) or real(*a, **k))
    for limit in (row_sources.SMALL_PUT_MAX_BYTES, 0):  # small path, then device_put for the same tree
        monkeypatch.setattr(row_sources, "SMALL_PUT_MAX_BYTES", limit)
        transfers = row_sources.Transfers("off")
        with jax.transfer_guard("disallow"):
            moved = transfers.put(tree)
        assert transfers.bytes_sent == row_sources.nbytes(tree) and len(calls) == (0 if limit else 1)
        for a, x in zip(jax.tree.leaves(moved), jax.tree.leaves(tree), strict=True):
            assert isinstance(a, jax.Array) and a.devices() == {jax.devices()[0]} and a.dtype == x.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(x))


@pytest.fixture(scope="module")
def mole_table(tmp_path_factory):
    """A MoLE run (prime dims) and its float16 table."""
    root = tmp_path_factory.mktemp("pinned")
    cfg = prime_config("mole")
    run = root / "run"
    mngr = checkpoint.manager(run / checkpoint.CHECKPOINTS, async_save=False)
    checkpoint.save(mngr, 0, init_params(cfg, seed=34), checkpoint.step_meta(cfg, 0))
    mngr.close()
    checkpoint.write_json_atomic(run / checkpoint.RUN_FILE, {"model_config": cfg.to_dict()})
    convert_to_lut(run, root / "lut16", dtype="float16", progress=False)
    return run, root / "lut16"


def _spy_on_staging(transfers) -> list[str]:
    kinds, stage = [], transfers.stage

    def spying(arrays):
        out = stage(arrays)
        kinds.extend(x.sharding.memory_kind for x in out)
        return out

    transfers.stage = spying
    return kinds


@pytest.fixture(scope="module")
def plain_tokens(mole_table):
    """Greedy tokens at the host placement without pinned staging."""
    model = load(mole_table[0], lut=mole_table[1], lut_placement="host", overlap=False)
    model.decoder.transfers.set_pinned("off")
    return model.generate(PROMPTS, 6)


@pytest.mark.parametrize("placement", ["host", "storage"])
def test_pinned_rows_equal_plain(mole_table, placement):
    _pinned_or_skip()
    table = lut.open_lut(mole_table[1])
    fetched = dict(host_read="gather") if placement == "host" else dict(storage_read="batched")  # the host's puts
    sources = {mode: row_sources.row_source(table, placement, row_sources.Transfers(mode), **fetched)
               for mode in ("on", "off")}
    ids = np.array([[5, 17, 96, 5], [0, 3, 3, 41]])
    unique = np.unique(ids)  # 6 distinct ids in 8 rows: the last 2 are unused padding
    want = table.read_stored(unique)
    for mode, source in sources.items():
        rows = jax.device_get(source.fetch(ids, 8))
        np.testing.assert_array_equal(unique[rows.index_BxT], ids)
        for k in want:
            assert rows.stored[k].dtype == want[k].dtype
            np.testing.assert_array_equal(rows.stored[k][:len(unique)], want[k], err_msg=mode)


@pytest.mark.parametrize("placement,overlap", [("host", False), ("host", True), ("storage", True)])
def test_pinned_greedy_tokens_equal_plain(mole_table, plain_tokens, placement, overlap):
    """Every put of the generation staged in pinned host memory (the step split around the fetch, or not): the
    same tokens as without."""
    _pinned_or_skip()
    model = load(mole_table[0], lut=mole_table[1], lut_placement=placement, overlap=overlap, host_read="gather",
                 storage_read="batched")
    model.decoder.transfers.set_pinned("on")
    kinds = _spy_on_staging(model.decoder.transfers)
    assert model.generate(PROMPTS, 6) == plain_tokens
    assert kinds and set(kinds) == {row_sources.PINNED_HOST}


def test_pinned_expert_offloading_equals_plain():
    _pinned_or_skip()
    cfg = prime_config("moe")
    params = init_params(cfg, seed=35)
    out = {}
    for mode in ("on", "off"):
        model = LanguageModel(cfg, params, offload_experts=True)
        model.decoder.transfers.set_pinned(mode)
        out[mode] = model.generate(PROMPTS, 6), model.h2d_bytes
    assert out["on"] == out["off"]


# What `auto` picks, per backend -------------------------------------------------------------------------------------
def test_auto_picks_per_backend():
    cfg = prime_config("moe")  # N = 5
    assert moe_impl(cfg, 1000, "cpu") == "grouped"  # training-sized: top_k experts per token, not every expert
    assert moe_impl(cfg, DECODE_ROWS * cfg.top_k, "cpu") == "skip"  # decode-sized: only the chosen experts run
    assert moe_impl(cfg, 1000, "cpu", split=True) == "dense"  # one buffer per expert (CPU inference): read in place
    assert moe_impl(cfg, 1000, "tpu") == "ragged"  # training: grouped matmuls, lax.ragged_dot's on TPU
    assert moe_impl(cfg, 1000, "gpu") == "grouped"  # batched GEMMs over tiles on GPU
    assert moe_impl(cfg, 4, "gpu") == moe_impl(cfg, 5, "tpu") == "gather"  # decode-sized: the chosen experts only
    assert moe_impl(cfg.replace(moe_impl="dense"), 4, "gpu") == "dense"
    pick = layers.attention_impl
    assert pick(None, backend="gpu", dtype=jnp.bfloat16, head_dim=64) == "cudnn"
    assert pick("auto", backend="gpu", dtype=jnp.float16, head_dim=128) == "cudnn"
    assert pick(None, backend="gpu", dtype=jnp.float32, head_dim=64) == "xla"  # cuDNN's kernel is half precision
    assert pick(None, backend="gpu", dtype=jnp.bfloat16, head_dim=11) == "xla"
    assert pick(None, backend="tpu", dtype=jnp.bfloat16, head_dim=64) == "xla"
    assert pick(None, backend="cpu", dtype=jnp.bfloat16, head_dim=64) == "xla"
    assert pick("xla", backend="gpu", dtype=jnp.bfloat16, head_dim=64) == "xla"


def _reference_attention(q, k, v):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = np.einsum("bthk,bshk->bhts", q, k) / math.sqrt(q.shape[-1])
    scores = np.where(np.tril(np.ones(scores.shape[-2:], bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhts,bshk->bthk", probs / probs.sum(-1, keepdims=True), v)


def test_attention_auto_and_its_fallback_match_reference(monkeypatch):
    """`auto` against a float64 reference; and when it picks cuDNN where cuDNN refuses the call while tracing
    (here: CPU), the XLA kernel runs instead, with the same result."""
    q, k, v = (jax.random.normal(key, (2, 9, 3, 8)) for key in jax.random.split(jax.random.key(0), 3))
    want = _reference_attention(q, k, v)
    auto = jax.jit(lambda q, k, v: layers.causal_attention(q, k, v, "auto"))
    np.testing.assert_allclose(auto(q, k, v), want, rtol=0, atol=1e-5)
    monkeypatch.setattr(layers, "attention_impl", lambda requested, **_: "cudnn")
    refused = jax.jit(lambda q, k, v: layers.causal_attention(q, k, v, None))
    np.testing.assert_allclose(refused(q, k, v), want, rtol=0, atol=1e-5)


def _moe_grads(impl: str):
    cfg = prime_config("moe", num_layers=1, moe_impl=impl)
    graphdef = graphdef_and_shapes(cfg)[0]  # the blocks read moe_impl from their graph definition
    params, tokens = init_params(cfg, seed=36), _tokens(cfg, length=T_TRAIN)
    return jax.jit(jax.grad(lambda p: loss_fn(p, graphdef, cfg, tokens)[0]))(params)


@pytest.fixture(scope="module")
def dense_moe_grads():
    return _moe_grads("dense")


@pytest.mark.parametrize("impl", ["ragged", "grouped", "gather", "skip"])
def test_moe_implementations_have_the_dense_paths_gradients(dense_moe_grads, impl):
    """Training differentiates the MoE implementation `auto` picks: every one against the plain (dense) path."""
    _assert_trees_close(_moe_grads(impl), dense_moe_grads, 1e-5)


@pytest.mark.parametrize("tile", [1, 3, 8, 64])
def test_grouped_experts_any_tile_equal_dense(tile):
    """Tiles of one expert's rows: an expert over several tiles, partly filled tiles, idle experts, empty tiles."""
    cfg = prime_config("moe", num_experts=7, top_k=3)
    experts = nnx.merge(graphdef_and_shapes(cfg)[0], init_params(cfg, seed=37)).blocks[0].experts
    x_MxD = jax.random.normal(jax.random.key(1), (23, cfg.d_model))
    expert_MxK = jnp.asarray(np.random.default_rng(5).choice(6, (23, 3), replace=True), jnp.int32)  # 6 idle
    gates_MxK = jax.random.uniform(jax.random.key(2), (23, 3))
    gates_MxN = jnp.zeros((23, 7)).at[jnp.arange(23)[:, None], expert_MxK].add(gates_MxK)
    want = experts.mixed(x_MxD, gates_MxN)
    got = jax.jit(lambda x: experts.grouped(x, expert_MxK, gates_MxK, tile))(x_MxD)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()))
