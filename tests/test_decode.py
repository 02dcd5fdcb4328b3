"""Decoding: KV-cached generation against full passes, the LUT placements against the training-form model, the
MoE-offloading baseline against the resident MoE, no retracing, no implicit transfers, sampling, bad input."""

import json
import subprocess
import sys
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from conftest import prime_config, run_cli, write_hf_checkpoint
from mole_jax import checkpoint, decoder, hf, lut, row_sources
from mole_jax.config import MoleError
from mole_jax.convert import convert_to_lut
from mole_jax.decode import LanguageModel, load
from mole_jax.model import init_params
from mole_jax.sampling import Sampler, sample

PROMPTS = [[5, 17, 96, 0, 3, 3, 41], [88, 2], [60, 71, 9, 13, 13, 13, 2, 40, 1, 7, 77]]  # lengths 7, 2, 11
NEW = 12


def _save_run(path, cfg, params, **meta):
    mngr = checkpoint.manager(path / checkpoint.CHECKPOINTS, async_save=False)
    checkpoint.save(mngr, 0, params, checkpoint.step_meta(cfg, 0, **meta))
    mngr.close()
    checkpoint.write_json_atomic(path / checkpoint.RUN_FILE, {"model_config": cfg.to_dict(), **meta})
    return path


@pytest.fixture(scope="module")
def mole_run(tmp_path_factory):
    """A MoLE training-form run and its float32 table."""
    root = tmp_path_factory.mktemp("mole")
    cfg = prime_config("mole")
    run = _save_run(root / "run", cfg, init_params(cfg, seed=21))
    convert_to_lut(run, root / "lut32", dtype="float32", progress=False)
    return run, root / "lut32"


@pytest.fixture(scope="module")
def models(mole_run):
    """Models shared by the tests of this module (built on first use), so that their compiled steps are reused."""
    cache = {}

    def get(variant):
        if variant not in cache:
            if variant == "mole-train":
                cache[variant] = load(mole_run[0])
            elif variant.startswith("mole-"):  # e.g. mole-host-gather-split, mole-device-k1
                cache[variant] = load(mole_run[0], lut=mole_run[1], lut_placement=variant.split("-")[1],
                                      host_read="gather" if "-gather" in variant else "program",
                                      storage_read="batched" if "-batched" in variant else "auto",
                                      overlap=variant.endswith("-split"),
                                      steps_per_dispatch=1 if variant.endswith("-k1") else None)
            else:
                cfg = prime_config(variant.split("-")[0])
                cache[variant] = LanguageModel(cfg, init_params(cfg, seed=22), offload_experts=variant == "moe-offload")
        return cache[variant]

    return get


def _assert_cached_logits_match(model, prompts, new, logits, rtol=1e-5):
    """Each generated token's logits (from the KV cache) against one full pass over prompt + generated (the
    sequences right-padded into one batch: causal, so the padding changes nothing before it)."""
    seqs = [list(p) + ids[:-1] for p, ids in zip(prompts, new)]
    width = max(map(len, seqs))
    full = model.logits(np.array([s + [0] * (width - len(s)) for s in seqs]))
    for p, ids, got, f in zip(prompts, new, logits, full):
        assert len(ids) == len(got) > 0
        want = f[len(p) - 1:len(p) - 1 + len(ids)]
        assert np.all(np.isfinite(got))
        scale = np.abs(want).max()
        assert scale > 0.1
        np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)
        np.testing.assert_array_equal(np.argmax(want, axis=-1), ids)  # greedy picked the argmax of each


# Must show: greedy generation with the LUT == training form, token for token; cached == full logits -----------
@pytest.mark.parametrize("placement", ["device", "host", "device-k1", "host-k1", "storage", "storage-k1",
                                       "host-gather", "storage-batched", "storage-batched-split",
                                       "host-gather-split"])
def test_lut_generation_equals_training_form(models, placement):
    want = models("mole-train").generate(PROMPTS, NEW)
    model = models(f"mole-{placement}")
    assert "experts" not in model.params["blocks"][0] and "norm_expert" not in model.params["blocks"][0]
    got, logits = model.generate(PROMPTS, NEW, return_logits=True)
    assert got == want
    assert len(set(sum(got, []))) > NEW  # not a degenerate output
    _assert_cached_logits_match(model, PROMPTS, got, logits)


@pytest.mark.parametrize("kind", ["dense", "moe", "mole-train"])
def test_cached_logits_equal_full_sequence(models, kind):
    model = models(kind)
    new, logits = model.generate(PROMPTS, NEW, return_logits=True)
    _assert_cached_logits_match(model, PROMPTS, new, logits)


@pytest.mark.parametrize("kind", ["dense", "mole-storage-batched-split", "moe-offload"])
def test_batched_prompts_equal_each_alone(models, kind):
    model = models(kind)
    batched = model.generate(PROMPTS, NEW)
    assert batched == [model.generate(p, NEW) for p in PROMPTS]
    if kind == "dense":  # an int array of equal-length prompts works too
        arr = np.array([PROMPTS[0], PROMPTS[0][::-1]])
        assert model.generate(arr, 3) == [model.generate(list(row), 3) for row in arr]


@pytest.mark.parametrize("scheme", ["bfloat16", "int8", "nf4"])
def test_quantized_tables_dequantize_on_device_like_on_host(mole_run, tmp_path, scheme):
    """The step dequantizes the stored rows on the device (schemes.dequantize with jax.numpy), layer by layer; the
    logits equal a full pass fed with the host's LookupTable.rows, and stay close to the float32 table's."""
    run, lut32 = mole_run
    convert_to_lut(run, tmp_path / scheme, dtype=scheme, progress=False)
    model = load(run, lut=tmp_path / scheme, lut_placement="storage")
    new, logits = model.generate(PROMPTS, 4, return_logits=True)
    _assert_cached_logits_match(model, PROMPTS, new, logits)
    exact = load(run, lut=lut32, lut_placement="device").logits(np.array(PROMPTS[2:]))
    err = np.abs(model.logits(np.array(PROMPTS[2:])) - exact).max() / np.abs(exact).max()
    assert 0 < err < {"bfloat16": 4e-3, "int8": 1e-2, "nf4": 0.1}[scheme], err  # measured 9e-4, 2e-3, 3e-2


def test_inference_form_import_uses_its_table_and_matches_reference(tmp_path):
    """The authors' inference form (model.moe_table.weight) imports to a run whose RUN_DIR/lut load() uses."""
    cfg = prime_config("mole")
    tensors = write_hf_checkpoint(tmp_path / "src", cfg, inference_form=True)
    hf.import_hf(tmp_path / "src", tmp_path / "run")
    model = load(tmp_path / "run", lut_placement="host")
    assert model.table is not None and model.placement == "host"
    new, logits = model.generate(PROMPTS, 4, return_logits=True)
    hf_cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    for p, ids, got in zip(PROMPTS, new, logits):
        ref = reference.forward(hf_cfg, tensors, np.array([p + ids[:-1]]))[0, len(p) - 1:]
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


# Must show: no retrace across steps, no implicit transfers ------------------------------------------------------
STEP_FUNCTIONS = ("_prefill", "_step", "_front", "_chunk")


@pytest.mark.parametrize("variant", ["dense", "moe", "mole-device", "mole-host", "mole-storage", "moe-offload",
                                     "mole-storage-batched-split", "mole-host-gather-tier", "mole-storage-tier-split"])
def test_step_traced_once_and_no_implicit_transfers(mole_run, monkeypatch, variant):
    """Generations of many steps, with other prompts of the same bucket and other sampling settings: each jitted
    function is traced at most twice, once for greedy decoding and once for sampling (the settings are device
    values); behind a device tier, twice per power-of-two number of missed rows (a step sends its misses' rows
    padded to one: at most 1, 2 or 4 rows for these 3 sequences, at most 64 for their 33 prompt positions), and
    split steps trace the step's rest besides the whole step (speculated and redone steps are whole). A chunk of
    steps is traced once for greedy decoding and once for sampling. Under transfer_guard("disallow") every
    transfer is an explicit device_put / device_get. (The offload baseline's per-layer functions are traced per
    number of experts moved; only its transfers are checked.)"""
    chex.clear_trace_counter()
    tier, split = "-tier" in variant, variant.endswith("-split")
    max_traces = ({"_prefill": 2 * 7, "_step": 2 * 3 * (1 + split), "_front": 2 * split, "_chunk": 0} if tier
                  else dict.fromkeys(STEP_FUNCTIONS, 2))
    for name in STEP_FUNCTIONS:
        monkeypatch.setattr(decoder, name, chex.assert_max_traces(getattr(decoder, name), n=max_traces[name]))
    if variant.startswith("mole"):
        model = load(mole_run[0], lut=mole_run[1], lut_placement=variant.split("-")[1],
                     host_read="gather" if "-gather" in variant else "program",
                     storage_read="batched" if "-batched" in variant else "auto", overlap=split,
                     device_rows=20 if tier else None)
    else:
        cfg = prime_config(variant.split("-")[0])
        model = LanguageModel(cfg, init_params(cfg, seed=24), offload_experts=variant == "moe-offload")
    other = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [4], [50, 51, 52]]
    with jax.transfer_guard("disallow"):
        first = model.generate(PROMPTS, 20)
        model.generate(other, 20)
        assert model.generate(PROMPTS, 20) == first
        a = model.generate(PROMPTS, 20, temperature=0.8, top_k=5, seed=1)
        model.generate(other, 20, temperature=1.3, top_p=0.9, seed=2)
        assert model.generate(PROMPTS, 20, temperature=0.8, top_k=5, seed=1) == a
    chex.clear_trace_counter()


def test_host_gather_moves_one_staging_buffer_per_step(mole_run):
    run, lut_dir = mole_run
    table = lut.open_lut(lut_dir)
    model = load(run, lut=table, lut_placement="host", host_read="gather")
    B = len(PROMPTS)
    transfers = model.decoder.transfers

    sizes = []
    real_put = transfers.put

    def counting_put(tree):
        sizes.append(row_sources.nbytes(tree))
        return real_put(tree)

    transfers.put = counting_put
    model.generate(PROMPTS, NEW)
    # prefill: ids/lengths/seed, then one batched read of the distinct prompt ids (padded to a power of two);
    # then exactly one put per decode step: B rows (distinct ids first, a fixed shape) and their inverse map
    distinct = len(set(sum(PROMPTS, [])))
    assert sizes[1] == row_sources.next_pow2(distinct) * table.row_nbytes + 4 * B * 16  # T bucket 16
    assert sizes[2:] == [B * table.row_nbytes + 4 * B] * (NEW - 1)


def test_moe_offload_equals_resident_and_counts_moves(models):
    resident, offload = models("moe"), models("moe-offload")
    cfg = resident.config
    assert offload.generate(PROMPTS, NEW) == resident.generate(PROMPTS, NEW)
    d = offload.decoder
    expert_bytes = 2 * cfg.d_model * cfg.expert_dim * 4
    assert d.expert_bytes == expert_bytes
    # batch 1: after each step a layer keeps the top_k experts it used; the next step moves only new choices
    moved, nbytes = d.experts_moved, d.h2d_bytes
    out = offload.generate(PROMPTS[0], NEW)
    assert out == resident.generate(PROMPTS[0], NEW)
    assert all(len(r) <= cfg.top_k for r in d.resident)
    per_step_max = cfg.num_layers * cfg.top_k
    assert 0 < d.experts_moved - moved <= per_step_max * NEW + cfg.num_layers * cfg.num_experts
    sent = d.h2d_bytes - nbytes
    assert sent >= (d.experts_moved - moved) * expert_bytes
    assert sent - (d.experts_moved - moved) * expert_bytes < 4096  # the rest is ids and prompts
    assert offload.device_param_bytes < resident.device_param_bytes


# Sampling -------------------------------------------------------------------------------------------------------
def _sampler(t=1.0, k=10**9, p=1.0, V=6):
    return Sampler(np.float32(t), np.int32(min(k, V)), np.float32(p))


def test_sample_restricts_to_top_k_and_top_p():
    logits = np.log(np.array([[0.05, 0.4, 0.1, 0.3, 0.15, 0.0001]], np.float32))
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.jit(jax.vmap(lambda k, s: sample(logits, k, s)[0], in_axes=(0, None)))
    assert int(sample(logits, keys[0], None)[0]) == 1  # greedy
    counts = np.bincount(np.asarray(draw(keys, _sampler())), minlength=6) / len(keys)
    np.testing.assert_allclose(counts, [0.05, 0.4, 0.1, 0.3, 0.15, 0.0], atol=0.03)
    assert set(np.asarray(draw(keys, _sampler(k=2)))) == {1, 3}
    assert set(np.asarray(draw(keys, _sampler(k=1)))) == {1}
    assert set(np.asarray(draw(keys, _sampler(p=0.65)))) == {1, 3}  # 0.4 + 0.3 reaches 0.65
    assert set(np.asarray(draw(keys, _sampler(p=0.7001)))) == {1, 3, 4}
    assert set(np.asarray(draw(keys, _sampler(k=3, p=0.99)))) == {1, 3, 4}
    cold = np.bincount(np.asarray(draw(keys, _sampler(t=0.25))), minlength=6) / len(keys)
    assert cold[1] > 0.7  # low temperature sharpens


def test_sampled_generation_is_seeded(models):
    model = models("dense")
    a = model.generate(PROMPTS, 16, temperature=1.0, seed=3)
    assert a == model.generate(PROMPTS, 16, temperature=1.0, seed=3)
    assert a != model.generate(PROMPTS, 16, temperature=1.0, seed=4)
    assert model.generate(PROMPTS, 8, temperature=1.0, top_k=1) == model.generate(PROMPTS, 8)


def test_eos_stops_each_sequence(models):
    model = models("dense")
    full = model.generate(PROMPTS, NEW)
    eos = full[0][4]
    got = model.generate(PROMPTS, NEW, eos_id=eos)
    for f, g in zip(full, got):
        assert g == (f[:f.index(eos)] if eos in f else f)
    steps = list(model.stream(PROMPTS, NEW, eos_id=eos))
    assert [t for t in (s[0] for s in steps) if t is not None] == got[0]


# The loop on the device: K steps per dispatch -------------------------------------------------------------------
def _with_k(mole_run, variant, K):
    if variant.startswith("mole"):
        return load(mole_run[0], lut=mole_run[1], lut_placement=variant.split("-")[1], steps_per_dispatch=K)
    cfg = prime_config(variant)
    return LanguageModel(cfg, init_params(cfg, seed=22), steps_per_dispatch=K)


@pytest.mark.parametrize("variant", ["dense", "moe", "mole-device", "mole-host", "mole-storage"])
def test_chunked_generation_equals_one_step_per_dispatch(mole_run, variant):
    """Greedy tokens and their logits, and sampled tokens from the same seed, are the same whether a dispatch runs
    one step, 5 (not a divisor of the steps) or the default number."""
    by_k = {K: _with_k(mole_run, variant, K) for K in (1, 5, None)}
    assert by_k[None].decoder.steps_per_dispatch == decoder.DEFAULT_STEPS_PER_DISPATCH > NEW
    want, want_logits = by_k[1].generate(PROMPTS, NEW, return_logits=True)
    sampled = by_k[1].generate(PROMPTS, NEW, temperature=0.9, top_k=7, seed=3)
    assert len(set(sum(sampled, []))) > NEW and sampled != want
    for K, model in by_k.items():
        got, logits = model.generate(PROMPTS, NEW, return_logits=True)
        assert got == want, K
        for a, b in zip(logits, want_logits):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
        assert model.generate(PROMPTS, NEW, temperature=0.9, top_k=7, seed=3) == sampled, K


def test_eos_inside_a_chunk_stops_there(mole_run):
    """An eos in the middle of a chunk stops its sequence exactly where a step-by-step decode stops it; once every
    sequence has stopped, the chunk ends and no further token is yielded."""
    one, chunked = _with_k(mole_run, "mole-host", 1), _with_k(mole_run, "mole-host", 8)
    full = one.generate(PROMPTS, NEW)
    eos = full[1][5]  # a token inside the first chunk of 8 steps
    want = one.generate(PROMPTS, NEW, eos_id=eos)
    assert chunked.generate(PROMPTS, NEW, eos_id=eos) == want
    for f, g in zip(full, want):
        assert g == (f[:f.index(eos)] if eos in f else f)
    steps = list(chunked.stream(PROMPTS[1], NEW, eos_id=eos))
    assert len(steps) == full[1].index(eos) + 1 < NEW and steps[-1] == [None]


@pytest.mark.parametrize("variant", ["dense", "mole-device", "mole-host", "mole-storage"])
def test_no_transfer_inside_or_between_chunks(mole_run, variant):
    """After the prefill and the loop's constants, chunks of steps are dispatched back to back under
    transfer_guard("disallow_explicit"): no host -> device transfer per step and no device -> host transfer
    inside a chunk, explicit or not. The tokens read afterwards are generate's."""
    model = _with_k(mole_run, variant, 4)
    dec = model.decoder
    want = model.generate(PROMPTS[:1], 13)
    state = dec.prefill(np.array([PROMPTS[0] + [PROMPTS[0][0]]]), np.array([len(PROMPTS[0])], np.int32), 32, 0,
                        None, True)
    carry, chunks = dec.start(state, 13, None), []
    with jax.transfer_guard("disallow_explicit"):
        for _ in range(3):
            carry = dec.chunk(carry, None, True)
            chunks.append(carry.ids_KxB)
    got = [int(jax.device_get(state.ids_Bx1)[0, 0])] + np.concatenate(jax.device_get(chunks))[:, 0].tolist()
    assert got == want[0]


def test_host_read_by_per_row_slices_equals_training_form(mole_run, models, monkeypatch):
    """The accelerators' in-program read, forced on CPU: the table in pinned_host memory, each token's row a
    dynamic slice moved to device memory (unrolled for a step, in a loop for a long prefill or for scoring)."""
    monkeypatch.setattr(row_sources, "host_table", partial(row_sources.host_table, slices=True))
    model = load(mole_run[0], lut=mole_run[1], lut_placement="host")
    reader = model.decoder.reader
    assert reader.slices and not model.decoder.fetching
    assert {v.sharding.memory_kind for v in reader.stored.values()} == {row_sources.PINNED_HOST}
    train = models("mole-train")
    assert model.generate(PROMPTS, NEW) == train.generate(PROMPTS, NEW)
    long = [list(range(1, 60)), [7, 8]]  # 2 x 64 prompt positions: the prefill slices its rows in a loop
    assert 2 * 64 > row_sources.UNROLLED_SLICES
    assert model.generate(long, 5) == train.generate(long, 5)
    ids = np.array([PROMPTS[2], PROMPTS[2][::-1]])
    for got, want in zip(model.token_logprobs(ids[:, :-1], ids[:, 1:]), train.token_logprobs(ids[:, :-1], ids[:, 1:])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


def test_backend_without_in_program_read_falls_back_once_with_a_warning(mole_run, models, monkeypatch):
    """A backend that cannot compile the in-program host read: the host placement gathers on the host instead,
    says so once (naming the backend and JAX version), and decodes the same tokens."""
    monkeypatch.setattr(row_sources, "host_table", lambda *a, **k: None)
    monkeypatch.setattr(row_sources, "in_program_slices_compile", lambda device: "refused by this test")
    row_sources._warn_no_program_read.cache_clear()
    with pytest.warns(UserWarning, match=rf"cpu backend \(jax {jax.__version__}\) cannot run the host placement's "
                                         r"in-program read \(refused by this test\)") as caught:
        model = load(mole_run[0], lut=mole_run[1], lut_placement="host")
        load(mole_run[0], lut=mole_run[1], lut_placement="host")
    assert len(caught) == 1
    row_sources._warn_no_program_read.cache_clear()
    assert model.decoder.fetching and isinstance(model.decoder.source, row_sources.HostRows)
    assert model.generate(PROMPTS, NEW) == models("mole-train").generate(PROMPTS, NEW)


def test_mapped_storage_aliases_the_files(mole_run, models):
    """The storage placement on CPU: the step's table operand is the files' mapping itself (its buffer is the
    mapped address: nothing copied), no row is put by the host, and the tokens are the training form's."""
    model = load(mole_run[0], lut=mole_run[1], lut_placement="storage")
    dec = model.decoder
    assert not dec.fetching and dec.reader is not None and not dec.reader.slices
    table = lut.open_lut(mole_run[1])
    for name, arr in dec.reader.stored.items():
        assert arr.unsafe_buffer_pointer() % 64 == 0
        np.testing.assert_array_equal(np.asarray(arr), table.read_all_stored()[name])
    mapped = table.mapped_stored(verify=False)["payload"]
    aliased = jax.device_put(mapped)
    assert aliased.unsafe_buffer_pointer() == mapped.ctypes.data
    sent = model.h2d_bytes
    assert model.generate(PROMPTS, NEW) == models("mole-train").generate(PROMPTS, NEW)
    assert dec.transfers.bytes_sent - sent < 1024  # the prompts and the loop's constants, no rows


def test_mapping_a_table_that_is_not_local_is_one_clear_error(mole_run, tmp_path):
    """A table on a kvstore that cannot be mapped (memory://), asked to be mapped: one line naming it."""
    import tensorstore as ts
    from mole_jax.lut_writer import write_table

    cfg = prime_config("mole")
    rows = np.random.default_rng(0).standard_normal((cfg.vocab_size, cfg.num_layers, cfg.num_experts,
                                                     cfg.d_model)).astype(np.float32)
    write_table("memory://bench/t/", cfg, "float16", lambda a, b: rows[a:b], source={"test": "memory"})
    table = lut.open_lut("memory://bench/t/")
    assert row_sources.storage_read_for(table, jax.devices()[0], "auto") == "batched"
    with pytest.raises(MoleError, match="cannot be memory-mapped") as e:
        LanguageModel(cfg, init_params(cfg, with_experts=False), table=table, placement="storage",
                      storage_read="mapped")
    assert "\n" not in str(e.value)
    del ts


def test_bad_steps_per_dispatch_is_one_clear_error(mole_run):
    for bad in (0, -2, 1.5, True, "4"):
        with pytest.raises(MoleError, match="steps per dispatch must be a positive integer") as e:
            load(mole_run[0], lut=mole_run[1], lut_placement="host", steps_per_dispatch=bad)
        assert "\n" not in str(e.value)
    status, out, err = run_cli("generate", str(mole_run[0]), "--prompt-ids", "5,6", "--steps-per-dispatch", "0")
    assert status == 2 and len(err.strip().splitlines()) == 1 and "steps per dispatch" in err, err


# Text ---------------------------------------------------------------------------------------------------------
def test_generate_text_and_cli_streaming(tmp_path):
    from mole_jax.data import train_tokenizer

    docs = ["the cat sat on the mat. the dog sat on the log. " * 20, "a mole digs under the garden. " * 20]
    tok = train_tokenizer(docs, 300)
    cfg = prime_config("mole", vocab_size=300)
    run = _save_run(tmp_path / "run", cfg, init_params(cfg, seed=28))
    tok.save(str(run / checkpoint.TOKENIZER))
    model = load(run)
    text = model.generate_text("the cat", 10)
    ids = model.generate(model.encode("the cat"), 10, eos_id=model.eos_id)
    assert isinstance(text, str) and text == model.decode(ids)
    r = subprocess.run([sys.executable, "-m", "mole_jax.cli", "generate", str(run), "--prompt", "the cat",
                        "--max-new-tokens", "10"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "the cat" + text + "\n"


def test_cli_prompt_ids(mole_run, models):
    run, lut_dir = mole_run
    want = models("mole-train").generate(PROMPTS[2], 6)
    r = subprocess.run([sys.executable, "-m", "mole_jax.cli", "generate", str(run), "--lut", str(lut_dir),
                        "--placement", "storage", "--prompt-ids", ",".join(map(str, PROMPTS[2])),
                        "--max-new-tokens", "6"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(t) for t in want]


# Must show: bad input, one clear line each ------------------------------------------------------------------
def test_bad_input_raises_one_clear_error(mole_run, models, tmp_path):
    run, lut_dir = mole_run
    model = models("mole-host")
    ctx = model.config.max_seq_len
    cases = [
        (lambda: model.generate([], 4), "the prompt is empty"),
        (lambda: model.generate([[1, 2], []], 4), "prompt 1 is empty"),
        (lambda: model.generate(np.zeros((2, 0), np.int32), 4), "empty"),
        (lambda: model.generate([1] * (ctx + 1), 4), f"exceeds the model's context of {ctx}"),
        (lambda: model.generate([1] * (ctx - 2), 4), f"plus 4 new tokens exceeds the model's context of {ctx}"),
        (lambda: model.generate([[1, 2], [3, 97]], 4), r"token id 97 is outside the vocabulary \[0, 97\)"),
        (lambda: model.generate([-1, 2], 4), "token id -1 is outside the vocabulary"),
        (lambda: model.generate([1.5, 2.0], 4), "must be integers"),
        (lambda: model.generate([1, 2], 0), "max_new_tokens must be a positive integer"),
        (lambda: model.generate([1, 2], 4, temperature=-1.0), "temperature must be >= 0"),
        (lambda: model.generate([1, 2], 4, temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
        (lambda: model.generate([1, 2], 4, eos_id=97), "eos_id 97 is outside the vocabulary"),
        (lambda: model.generate_text("hello", 4), "has no tokenizer"),
        (lambda: load(run, lut=lut_dir, lut_placement="gpu"), "unknown LUT placement 'gpu'"),
        (lambda: load(run, lut=tmp_path / "nope"), "not found"),
    ]
    # a table built from another checkpoint
    cfg = prime_config("mole")
    other = _save_run(tmp_path / "other", cfg, init_params(cfg, seed=99))
    cases.append((lambda: load(other, lut=lut_dir), "was built from another checkpoint"))
    dense_cfg = prime_config("dense")
    dense = _save_run(tmp_path / "dense", dense_cfg, init_params(dense_cfg))
    cases.append((lambda: load(dense, lut=lut_dir), "only for MoLE"))
    cases.append((lambda: load(dense, offload_experts=True), "offloading is the MoE baseline"))
    # an inference-form checkpoint whose table is missing
    write_hf_checkpoint(tmp_path / "src", cfg, inference_form=True)
    hf.import_hf(tmp_path / "src", tmp_path / "inf")
    import shutil

    shutil.rmtree(tmp_path / "inf" / checkpoint.LUT)
    cases.append((lambda: load(tmp_path / "inf"), "inference form and needs its lookup table"))
    for fn, msg in cases:
        with pytest.raises(MoleError, match=msg) as e:
            fn()
        assert "\n" not in str(e.value), msg

    for args, msg in [([str(run), "--prompt-ids", "1,2,97"], "outside the vocabulary"),
                      ([str(other), "--lut", str(lut_dir), "--prompt-ids", "1,2"], "another checkpoint"),
                      ([str(tmp_path / "inf"), "--prompt-ids", "1,2"], "needs its lookup table"),
                      ([str(run), "--prompt", "hi"], "has no tokenizer"),
                      ([str(run), "--prompt-ids", "1,x"], "--prompt-ids")]:
        status, _, err = run_cli("generate", *args)
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and msg in lines[0] and "Traceback" not in err, err


# The benchmark runs (timings are for `mole-jax bench decode`, never asserted here) ----------------------------
def test_bench_decode_runs(tmp_path):
    from mole_jax.bench import bench_decode
    from mole_jax.bench.decode import CACHE, DECODE_MODELS

    out = bench_decode(preset_size="tiny", batch_sizes=(1,), prompt_len=16, steps=4, warmup=2, chunk=2,
                       device_rows=64, steps_per_dispatch=2, isolate=False, workdir=tmp_path,
                       json_path=tmp_path / "decode.json")
    saved = json.loads((tmp_path / "decode.json").read_text())
    assert saved["settings"]["device_rows"] == 64  # --device-rows: the tier rows' tier
    rows = saved["rows"]
    assert rows == out["rows"]
    host = saved["machine"]  # enough to tell two machines' figures apart
    assert host["backend"] == "cpu" and host["host_cpu"] and host["host_cores"] >= 1
    models = ["dense", "dense-k1", "moe", "moe-offload", "mole-device", "mole-host", "mole-host-k1",
              "mole-host-gather", "mole-storage", "mole-storage-warm", "mole-storage-batched", "mole-storage-tier"]
    assert [(r["model"], r["batch_size"]) for r in rows] == [(m, 1) for m in DECODE_MODELS]
    assert set(models) <= set(DECODE_MODELS)
    by = {(r["model"], r["batch_size"]): r for r in rows}
    for r in rows:
        assert r["ms_per_step"] > 0 and r["modeled_ms_per_step_16gbps"] >= r["compute_ms_per_step"]
        assert r["cache"] == CACHE.get(r["model"]) and "reread_fraction" in r
    assert by["mole-storage", 1]["cache"] == "cold" and by["mole-storage-warm", 1]["cache"] == "warm"
    assert saved["settings"]["isolate"] is False and saved["settings"]["rows"] == list(DECODE_MODELS)
    peaks = [by[m, 1]["peak_rss_bytes"] for m in DECODE_MODELS[1:]]  # one process: its running peak
    assert all(p > 0 for p in peaks) and peaks == sorted(peaks) and by["dense", 1]["peak_rss_bytes"] >= peaks[-1]
    assert by["mole-host", 1]["cache"] is None and by["dense", 1]["cache"] is None
    assert by["dense", 1]["h2d_bytes_per_step"] == 0 and by["mole-device", 1]["h2d_bytes_per_step"] == 0
    k = {m: by[m, 1]["steps_per_dispatch"] for m in models}  # chunked where the program reads every row
    assert k == {**dict.fromkeys(models, 2), **dict.fromkeys(("dense-k1", "mole-host-k1", "moe-offload",
                                                              "mole-host-gather", "mole-storage-batched",
                                                              "mole-storage-tier"), 1)}
    assert by["mole-host-k1", 1]["dense_steps_per_dispatch"] == 1 and by["mole-host", 1]["dense_steps_per_dispatch"] == 2
    assert by["mole-storage", 1]["h2d_bytes_per_step"] == by["mole-host", 1]["h2d_bytes_per_step"]
    assert by["moe-offload", 1]["h2d_bytes_per_step"] > 10 * by["mole-host", 1]["h2d_bytes_per_step"] > 0
    assert by["moe-offload", 1]["h2d_bytes_per_step_as_lut_dtype"] == by["moe-offload", 1]["h2d_bytes_per_step"] / 2
    assert abs(by["mole-host", 1]["device_param_bytes"] / by["dense", 1]["device_param_bytes"] - 1) < 0.02
    # the cold rows were read from dropped files, every read recorded and replayed against the pread floor
    storage = out["storage"]
    assert storage["cold_check"]["dropped_bytes"] > 0
    assert storage["floor"]["rows"] >= 4 and storage["floor"]["pread_rows_per_s"] > 0
    assert 0 <= by["mole-storage-batched", 1]["reread_fraction"] < 1
    # text, not random ids: a tier of 64 of 512 ids (12.5%) holds most of what held-out text reads
    assert 0.4 < by["mole-storage-tier", 1]["hit_rate"] <= 1 and by["mole-host", 1]["hit_rate"] is None
    status, _, err = run_cli("bench", "decode", "--preset-size", "tiny", "--device-rows", "0")
    assert status == 2 and len(err.strip().splitlines()) == 1 and "--device-rows must be a positive" in err


def test_bench_feeds_held_out_text():
    """bench decode's steps read text: each step's next tokens are the given stretch (not what the step sampled),
    and the decode still yields one step's tokens per step."""
    from mole_jax.bench.decode import _text_ids, _TextFed
    from mole_jax.config import get_preset

    cfg = get_preset("tiny-dense")
    model = LanguageModel(cfg, init_params(cfg, seed=0))
    template = decoder.random_state(cfg, 3, 8, 16, seed=0)
    text_N = np.arange(100, 160, dtype=np.int32)
    fed = _TextFed(model.decoder, _text_ids(text_N, 6, 3, seed=5), template)
    ids_SxB = np.stack([ids for ids, _ in decoder.decode_loop(fed, fed.first(template), 6, None, True)])
    starts_B = ids_SxB[0] - 100
    assert np.array_equal(ids_SxB, 100 + starts_B[None, :] + np.arange(6)[:, None])  # consecutive text per row
    assert len(set(starts_B.tolist())) > 1 and fed.h2d_bytes == model.decoder.h2d_bytes


def test_bench_feeds_held_out_text_inside_chunks():
    """A chunked decode fed text on the device: after each step the next input is the text's token, whatever the
    step sampled, with one step or three per dispatch alike; other text gives other tokens."""
    from mole_jax.bench.decode import _text_ids
    from mole_jax.config import get_preset

    cfg = get_preset("tiny-dense")
    template = decoder.random_state(cfg, 3, 8, 16, seed=0)
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))  # steps donate the cache
    text_N = np.arange(100, 160, dtype=np.int32)
    got = {}
    for K, seed in ((1, 5), (3, 5), (3, 6)):
        model = LanguageModel(cfg, init_params(cfg, seed=0), steps_per_dispatch=K)
        text_SxB = _text_ids(text_N, 7, 3, seed=seed, stacked=True)
        state = copy(template)._replace(ids_Bx1=text_SxB[0][:, None])
        got[K, seed] = np.stack([ids for ids, _ in decoder.chunked_loop(model.decoder, state, 7, None, True,
                                                                        forced_SxB=text_SxB)])
    assert got[1, 5].shape == (7, 3)
    np.testing.assert_array_equal(got[1, 5], got[3, 5])
    assert not np.array_equal(got[3, 5][1:], got[3, 6][1:])


def test_row_byte_ranges_hold_the_stored_rows(mole_run):
    """The pread floor reads the right bytes: each row's range in its shard file holds the row's stored bytes (raw,
    in row order)."""
    from mole_jax.bench.storage import ColdTable, RowRanges
    from mole_jax.bench.tools import PreadPool

    cold = ColdTable(mole_run[1])
    ids = np.array([0, 5, cold.shape[0] - 1, 3])
    ranges, pool = RowRanges(cold.table, cold.root), PreadPool(workers=4)
    try:
        got = pool.read(ranges(ids))
    finally:
        pool.close()
    stored = cold.read_stored(ids)
    i = 0
    for name in cold.layout.arrays:
        for r in range(len(ids)):
            want = stored[name][r].tobytes()
            assert got[i] == want
            i += 1
    assert cold.drop("x") > 0 and cold.read_stored(ids[:2])["payload"].shape[0] == 2
    assert cold.reread_fraction("x") == 0.0



# A device tier of the most frequent ids in front of host or storage rows -----------------------------------------
def _tier_missing_late_ids(prompt, generated):
    """Token counts whose top ids are the prompt's and the first half of the generation's: a tier of exactly those
    rows hits at the start and misses some later generated ids (a miss in the middle of a generation)."""
    early = set(prompt) | set(generated[:len(generated) // 2])
    late_misses = [i for i, t in enumerate(generated[:-1]) if t not in early]  # the last token is never fed back
    assert late_misses and late_misses[0] > 0, (early, generated)
    counts = np.zeros(prime_config("mole").vocab_size, np.int64)
    counts[sorted(early)] = 1000 - np.arange(len(early))
    return counts, len(early)


@pytest.mark.parametrize("placement,speculate,overlap", [("host", True, True), ("host", False, False),
                                                         ("storage", True, False), ("storage", False, True)])
def test_device_tier_generation_equals_other_placements(mole_run, models, placement, speculate, overlap):
    """Greedy tokens with a tier that misses some generated ids equal the untiered placement's (batch 1 and batched),
    the logits agree, and the tier counts its hits, the rows it fetched and the steps it redid; with speculation
    or not, each with split steps (the default) or whole ones."""
    run, lut_dir = mole_run
    plain = models(f"mole-{placement}")
    want_one, want_logits = plain.generate(PROMPTS[2], NEW, return_logits=True)
    counts, K = _tier_missing_late_ids(PROMPTS[2], want_one)
    model = load(run, lut=lut_dir, lut_placement=placement, device_rows=K, token_counts=counts, speculate=speculate,
                 overlap=overlap, host_read="gather")
    dec = model.decoder
    assert dec.split == overlap
    np.testing.assert_array_equal(dec.source.ids_K, np.flatnonzero(counts))
    with jax.transfer_guard("disallow"):  # the missed rows' puts are explicit too
        got_one, got_logits = model.generate(PROMPTS[2], NEW, return_logits=True)
    assert got_one == want_one
    np.testing.assert_allclose(got_logits, want_logits, rtol=0, atol=1e-6 * np.abs(want_logits).max())
    c = dec.tier_counts
    assert 0 < c.hits < c.tokens and c.rows_fetched > 0 and c.fetches > 0
    assert (dec.redone > 0) == speculate  # a step dispatched after all-hit steps met a miss and was redone
    assert model.device_param_bytes == plain.device_param_bytes + K * lut.open_lut(lut_dir).row_nbytes + 4 * 97
    assert model.generate(PROMPTS, NEW) == models("mole-train").generate(PROMPTS, NEW)
    ids = np.array([PROMPTS[2], PROMPTS[2][::-1]])  # scoring reads the tier too
    for got, want in zip(model.token_logprobs(ids[:, :-1], ids[:, 1:]), plain.token_logprobs(ids[:, :-1], ids[:, 1:])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


def test_speculation_stops_when_it_keeps_failing(mole_run, models, monkeypatch):
    """A tier without id 41, whose generation alternates 57 and 41: every speculation after a 57 would be redone.
    Always speculating redoes each of those steps; the decoder's policy stops once its estimate of success falls
    below SPECULATE_MIN_SUCCESS (one failure early, two once the alternation starts: the estimate then stays down,
    as every all-hit step is followed by a miss). Tokens equal the host placement's."""
    run, lut_dir = mole_run
    want = models("mole-host").generate(PROMPTS[0], 40)
    V = prime_config("mole").vocab_size
    counts = np.ones(V, np.int64)
    counts[41] = 0  # a tier of every other id
    fails = sum(a != 41 and b == 41 for a, b in zip(want[:-2], want[1:-1]))  # hit, then miss, among the fed ids
    assert fails >= 5, want
    redone = {}
    for min_success in (0.0, decoder.SPECULATE_MIN_SUCCESS):
        monkeypatch.setattr(decoder, "SPECULATE_MIN_SUCCESS", min_success)
        model = load(run, lut=lut_dir, lut_placement="host", host_read="gather", device_rows=V - 1,
                     token_counts=counts)
        assert model.generate(PROMPTS[0], 40) == want
        redone[min_success] = model.decoder.redone
        assert 0 < model.decoder.speculation_success < 1
    assert redone[0.0] == fails and redone[decoder.SPECULATE_MIN_SUCCESS] <= 3


def test_device_tier_covering_every_id_moves_nothing_per_step(mole_run, models):
    """A tier of the whole vocabulary: after the prompts, no step moves a byte, and the tokens are unchanged;
    every transfer is explicit."""
    run, lut_dir = mole_run
    model = load(run, lut=lut_dir, lut_placement="storage", device_rows=10**6)  # clipped to the vocabulary
    assert len(model.decoder.source.ids_K) == 97
    want = models("mole-storage").generate(PROMPTS, NEW)
    sent = []
    with jax.transfer_guard("disallow"):
        for _ in model.stream(PROMPTS, NEW):
            sent.append(model.h2d_bytes)
        assert model.generate(PROMPTS, NEW) == want
    assert len(set(sent)) == 1  # nothing after the prefill's ids and lengths
    c = model.decoder.tier_counts
    assert c.hits == c.tokens > 0 and c.rows_fetched == c.rows_sent == 0


def test_token_counts_and_tier_order(mole_run, tmp_path):
    """Counts over the training windows' input positions (validation windows excluded), read in chunks, against a
    plain count; the tier takes the most frequent ids (ties: the lower id), from RUN_DIR/token_counts.npy by
    default and the lowest ids without counts; bad tier settings raise one clear line."""
    from mole_jax.data import TOKEN_COUNTS, split_windows, token_counts

    tokens = np.random.default_rng(0).zipf(1.3, 5000).clip(max=96).astype(np.uint16)
    train, val = split_windows(tokens.size, 32, 0.1)
    want = np.bincount(np.concatenate([tokens[w * 32:(w + 1) * 32] for w in train]), minlength=97)
    np.testing.assert_array_equal(token_counts(tokens, 97, seq_len=32, exclude_windows=val, chunk=1000), want)
    np.testing.assert_array_equal(row_sources.tier_ids(np.array([3, 9, 9, 0, 4]), 3, 5), [1, 2, 4])
    np.testing.assert_array_equal(row_sources.tier_ids(None, 3, 5), [0, 1, 2])
    table = lut.open_lut(mole_run[1])
    np.save(tmp_path / TOKEN_COUNTS, want)
    np.testing.assert_array_equal(row_sources.device_tier(table, tmp_path, device_rows=5),
                                  np.sort(np.argsort(-want, kind="stable")[:5]))
    assert len(row_sources.device_tier(table, None, device_tier_bytes=3 * table.row_nbytes + 1)) == 3
    run, lut_dir = mole_run
    for kw, msg in [(dict(device_rows=0), "at least one row"),
                    (dict(device_rows=2, device_tier_bytes=10**6), "not both"),
                    (dict(device_tier_bytes=10), "at least one row"),
                    (dict(device_rows=4, token_counts=np.ones(5)), r"token counts have shape \(5,\)"),
                    (dict(device_rows=4, lut_placement="device"), "a device tier fronts rows that the host fetches"),
                    (dict(device_rows=4), "host placement's rows are read by the step itself")]:
        with pytest.raises(MoleError, match=msg) as e:
            load(run, lut=lut_dir, **{"lut_placement": "host", **kw})
        assert "\n" not in str(e.value)
    with pytest.raises(MoleError, match="pass lut=LUT_DIR"):
        load(run, device_rows=4)


def test_cli_generate_with_a_device_tier(mole_run, models):
    run, lut_dir = mole_run
    status, out, err = run_cli("generate", str(run), "--lut", str(lut_dir), "--placement", "storage",
                               "--device-rows", "20", "--prompt-ids", "5,17,96", "--max-new-tokens", "6")
    assert status == 0, err
    assert [int(t) for t in out.split()] == models("mole-storage").generate([5, 17, 96], 6)
    assert "behind a device tier of 20 rows, hit rate" in err
    status, _, err = run_cli("generate", str(run), "--lut", str(lut_dir), "--device-tier-mb", "0.000001",
                             "--prompt-ids", "5")
    assert status == 2 and "at least one row" in err and len(err.strip().splitlines()) == 1
