"""Decode memory: the prefill in bounded chunks of positions (the same tokens and logits as one pass, at every
placement), the bound on a chunk's rows, the peak resident memory of a long prompt batch against Dense's, and
`bench decode --models` (one process per model, each row's peak RSS recorded)."""

import json
import os
import resource
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from conftest import prime_config, run_cli
from mole_jax import checkpoint, decoder
from mole_jax.config import MoleError
from mole_jax.convert import convert_to_lut
from mole_jax.decode import LanguageModel, load
from mole_jax.model import init_params

PROMPTS = [[5, 17, 96, 0, 3, 3, 41], [88, 2], [60, 71, 9, 13, 13, 13, 2, 40, 1, 7, 77]]  # lengths 7, 2, 11: T = 16
NEW = 6


@pytest.fixture(scope="module")
def mole_run(tmp_path_factory):
    """A MoLE training-form run and its float32 table."""
    root = tmp_path_factory.mktemp("mole")
    cfg = prime_config("mole")
    mngr = checkpoint.manager(root / "run" / checkpoint.CHECKPOINTS, async_save=False)
    checkpoint.save(mngr, 0, init_params(cfg, seed=21), checkpoint.step_meta(cfg, 0))
    mngr.close()
    checkpoint.write_json_atomic(root / "run" / checkpoint.RUN_FILE, {"model_config": cfg.to_dict()})
    convert_to_lut(root / "run", root / "lut32", dtype="float32", progress=False)
    return root / "run", root / "lut32"


def _row_bytes(cfg) -> int:
    """A token's rows over every layer, dequantized (float32): what prefill_rows_bytes bounds per chunk."""
    return cfg.num_layers * cfg.num_experts * cfg.d_model * 4


def _load(mole_run, variant: str, **kw) -> LanguageModel:
    placement = variant.split("-")[0]
    return load(mole_run[0], lut=mole_run[1], lut_placement=placement,
                host_read="gather" if "gather" in variant else "program",
                storage_read="batched" if "batched" in variant or "tier" in variant else "auto",
                device_rows=20 if "tier" in variant else None, **kw)


@pytest.mark.parametrize("variant", ["storage", "device", "host", "storage-batched", "host-gather", "storage-tier"])
def test_chunked_prefill_equals_one_pass(mole_run, variant):
    """Prompts of 7, 2 and 11 tokens (16 positions) prefilled in chunks of 4 positions and of 1: the same greedy
    tokens, and the same logits to float32 rounding, as the whole prompt in one pass; each prompt's last position
    lies in another chunk. A table the host fetches for fetches each chunk's rows (batched reads, host gather,
    device tier)."""
    cfg = prime_config("mole")
    ref_tokens, ref_logits = _load(mole_run, "device").generate(PROMPTS, NEW, return_logits=True)
    assert ref_tokens == load(mole_run[0]).generate(PROMPTS, NEW)  # one pass: the training form's tokens
    for positions in (4, 1):
        model = _load(mole_run, variant, prefill_rows_bytes=_row_bytes(cfg) * 3 * positions)
        assert model.decoder.prefill_chunk_len(3, 16) == positions
        calls = []
        chunk = model.decoder._prefill_chunk
        model.decoder._prefill_chunk = lambda **kw: calls.append(kw["ids_BxC"].shape) or chunk(**kw)
        tokens, logits = model.generate(PROMPTS, NEW, return_logits=True)
        assert calls == [(3, positions)] * (16 // positions)
        assert tokens == ref_tokens
        for got, want in zip(logits, ref_logits):
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_chunked_prefill_with_a_shorter_last_chunk_fills_the_same_cache(mole_run):
    """12 positions in chunks of 8 (8 + 4): the KV cache and the first token's logits of one pass."""
    cfg = prime_config("mole")
    one, chunked = (_load(mole_run, "storage", prefill_rows_bytes=b) for b in (decoder.PREFILL_ROWS_BYTES,
                                                                               _row_bytes(cfg) * 2 * 8))
    ids_BxT = np.array([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], [9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4]], np.int32)
    lengths_B = np.array([12, 9], np.int32)
    assert chunked.decoder.prefill_chunk_len(2, 12) == 8 and one.decoder.prefill_chunk_len(2, 12) == 12
    want, got = (m.decoder.prefill(ids_BxT, lengths_B, 32, 0, None, True) for m in (one, chunked))
    np.testing.assert_array_equal(np.asarray(got.ids_Bx1), np.asarray(want.ids_Bx1))
    np.testing.assert_array_equal(np.asarray(got.pos_B), lengths_B)
    np.testing.assert_allclose(np.asarray(got.logits_BxV), np.asarray(want.logits_BxV), rtol=0, atol=1e-5)
    for a, b in zip(jax.tree.leaves(got.cache), jax.tree.leaves(want.cache)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)


def test_prefill_chunk_len_bounds_the_rows_of_a_chunk(mole_run):
    """The positions per chunk: a power of two within the prompt, the most whose rows (every layer, float32) fit
    the bound, one when not even one position per prompt fits; a model without a table never chunks; a bound
    that is not a positive integer is one line."""
    cfg = prime_config("mole")
    per_token = _row_bytes(cfg)
    for budget in (1, per_token * 5, 64 << 10, 1 << 20):
        dec = _load(mole_run, "device", prefill_rows_bytes=budget).decoder
        for B in (1, 3, 8, 64):
            for T in (8, 16, 1024):
                C = dec.prefill_chunk_len(B, T)
                assert 1 <= C <= T and C & (C - 1) == 0
                assert B * C * per_token <= budget or C == 1
                assert C == T or B * 2 * C * per_token > budget  # the largest that fits
    assert load(mole_run[0]).decoder.prefill_chunk_len(64, 1024) == 1024  # training form: no table, no chunks
    for bad in (0, -1, 1.5, True):
        with pytest.raises(MoleError, match="prefill rows bytes must be a positive integer") as e:
            _load(mole_run, "device", prefill_rows_bytes=bad)
        assert "\n" not in str(e.value)


RSS_CHILD = textwrap.dedent("""
    import gc, json, sys
    from pathlib import Path
    import numpy as np
    from mole_jax.bench.decode import _random_table
    from mole_jax.config import ModelConfig
    from mole_jax.decode import LanguageModel
    from mole_jax.lut import open_lut
    from mole_jax.model import init_params

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) << 10

    table_dir, B, T = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    shape = dict(vocab_size=4096, num_layers=8, d_model=128, num_heads=2, ffn_dim=256, max_seq_len=2 * T)
    dense = ModelConfig(kind="dense", **shape)
    mole = ModelConfig(kind="mole", expert_dim=256, num_experts=4, **shape)
    _random_table(table_dir, mole, "float16")
    prompts = np.random.default_rng(0).integers(0, shape["vocab_size"], (B, T))
    out = {}
    for name, budget in (("dense", None), ("chunked", 4 << 20), ("one_pass", 1 << 40)):
        if budget is None:
            model = LanguageModel(dense, init_params(dense, seed=0))
        else:
            model = LanguageModel(mole, init_params(mole, seed=1, with_experts=False), table=open_lut(table_dir),
                                  placement="storage", prefill_rows_bytes=budget)
        model.generate(prompts, 2)  # compiles
        model.decoder.release_mapped()
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # the peak resident set starts again from here
        before = status("VmRSS")
        model.generate(prompts, 2)
        out[name] = status("VmHWM") - before
        del model
        gc.collect()
    print(json.dumps(out))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak resident set reset: Linux /proc only")
def test_storage_decode_of_a_long_prompt_batch_peaks_near_dense(tmp_path):
    """8 prompts of 256 tokens (2,048 positions), 8 layers, a 32 MiB float16 table mapped from storage: the peak
    resident memory the generation adds (after a first run that compiled it) stays within 40 MiB of Dense's
    with the prefill in chunks of 4 MiB of rows; in one pass it holds every position's rows of every layer
    (64 MiB of float32 and their float16 gathers) and the pages they mapped, and does not. One process, each
    model measured from a reset of the peak (/proc/self/clear_refs), every allocation of 64 KiB or more its own
    mapping (MALLOC_MMAP_THRESHOLD_), so that memory freed is memory returned."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", RSS_CHILD, str(tmp_path / "lut"), "8", "256"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    growth = {k: v / 2 ** 20 for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}
    assert growth["chunked"] <= growth["dense"] + 40, growth
    assert growth["one_pass"] > growth["chunked"] + 30, growth  # what the chunks save: the test can fail


def test_bench_decode_models_each_in_its_own_process(tmp_path):
    """`bench decode --models dense,mole-storage`: exactly those rows, each model measured in a process of its own
    (a peak resident memory per model, the model's: not this process's), the summary only of what was measured;
    an unknown name is one line listing the names (exit 2)."""
    from mole_jax.bench.decode import DECODE_MODELS

    status, out, err = run_cli("bench", "decode", "--preset-size", "tiny", "--models", "dense,mole-storage",
                               "--batch-sizes", "1", "--steps", "2", "--warmup", "2", "--prompt-len", "8",
                               "--steps-per-dispatch", "2", "--isolate", "--workdir", tmp_path,
                               "--json", tmp_path / "d.json")
    assert status == 0, err
    doc = json.loads((tmp_path / "d.json").read_text())
    rows = doc["rows"]
    assert [(r["model"], r["batch_size"]) for r in rows] == [("dense", 1), ("mole-storage", 1)]
    assert doc["settings"]["isolate"] is True and doc["settings"]["rows"] == ["dense", "mole-storage"]
    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for r in rows:
        assert 100 << 20 < r["peak_rss_bytes"] != mine  # a JAX process's, each its own
        assert r["ms_per_step"] > 0
    storage = rows[1]
    assert storage["cache"] == "cold" and storage["vs_dense"] > 0 and storage["compute_ms_per_step"] is None
    assert set(doc["summary"]) == {"mole-storage (cold) / dense ms",
                                   "peak RSS MiB (each model's own process when isolated)"}
    assert "mole-storage" in out and "its own process" in out
    status, _, err = run_cli("bench", "decode", "--preset-size", "tiny", "--models", "dense,mole-strage")
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "unknown model 'mole-strage'" in lines[0], err
    assert all(m in lines[0] for m in DECODE_MODELS) and "Traceback" not in err


# The host placement's load: the table read sequentially into aligned buffers, every row checked ----------------
def _sharded_table(path, scheme: str):
    """A table of random rows in 3 shards: 2 of the fewest rows that fill whole pages, and a shorter last one."""
    from mole_jax import lut, schemes
    from mole_jax.lut_writer import write_table

    cfg = prime_config("mole")
    S = lut.page_rows(schemes.make_layout(scheme, cfg))
    cfg = cfg.replace(vocab_size=2 * S + 75)
    rows = np.random.default_rng(3).standard_normal((cfg.vocab_size, cfg.num_layers, cfg.num_experts,
                                                     cfg.d_model)).astype(np.float32)
    write_table(path, cfg, scheme, lambda a, b: rows[a:b], shard_rows=S, source={"test": "sequential load"})
    return path


@pytest.mark.parametrize("scheme", ["float16", "int8"])
def test_sequential_load_equals_the_stored_table(tmp_path, monkeypatch, scheme):
    """read_all_into: the stored arrays bit for bit (payload, and scales for int8), in page-aligned buffers, read
    in pieces of a few rows (a shard takes many reads, each checked while the next is read) and of the default
    size; the host placement on CPU aliases them (nothing copied)."""
    from mole_jax import lut, row_sources

    table = lut.open_lut(_sharded_table(tmp_path / "t", scheme))
    assert table.num_shards == 3
    want = table.read_all_stored()
    for piece in (3 * table.row_nbytes, lut.SEQUENTIAL_PIECE):
        monkeypatch.setattr(lut, "SEQUENTIAL_PIECE", piece)
        got = table.read_all_into(row_sources._aligned_empty)
        assert set(got) == set(want) == set(table.layout.arrays)
        for name in want:
            assert got[name].ctypes.data % 4096 == 0
            np.testing.assert_array_equal(got[name].view(np.uint8), want[name].view(np.uint8))
    transfers = row_sources.Transfers()
    stored = row_sources.in_host_ram(table, transfers)
    assert transfers.bytes_sent == table.nbytes
    for name, a in stored.items():
        assert a.unsafe_buffer_pointer() % 4096 == 0
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), want[name].view(np.uint8))


def test_host_placement_load_generates_the_training_form_tokens(mole_run):
    model = load(mole_run[0], lut=mole_run[1], lut_placement="host")
    assert model.generate(PROMPTS, NEW) == load(mole_run[0]).generate(PROMPTS, NEW)


def test_sequential_load_refuses_a_flipped_byte_and_a_missing_shard(tmp_path, monkeypatch):
    """A byte flipped in a row of a later piece of a later shard, and a missing shard file: one line naming the
    shard and the row (or the file), with many pieces per shard or one."""
    from mole_jax import lut

    damaged = _sharded_table(tmp_path / "damaged", "float16")
    table = lut.open_lut(damaged)
    S = table.shard_rows
    row = 2 * S + 40  # shard 2, its 41st row
    path = damaged / lut.shard_key("payload", 2, table.layout.arrays["payload"][0])
    data = bytearray(path.read_bytes())
    data[40 * table.row_nbytes + 7] ^= 0x10
    path.write_bytes(bytes(data))
    for piece in (4 * table.row_nbytes, lut.SEQUENTIAL_PIECE):
        monkeypatch.setattr(lut, "SEQUENTIAL_PIECE", piece)
        with pytest.raises(MoleError, match=rf"shard 2 \(payload/c/2/0/0/0, rows {2 * S}\.\.{2 * S + 74}\): row "
                                            f"{row} does not match its checksum") as e:
            lut.open_lut(damaged).read_all_into(np.empty)
        assert "\n" not in str(e.value)
    (damaged / lut.shard_key("payload", 0, table.layout.arrays["payload"][0])).unlink()
    with pytest.raises(MoleError, match="is not whole: shard file payload/c/0") as e:
        table.read_all_into(np.empty)
    assert "\n" not in str(e.value)
