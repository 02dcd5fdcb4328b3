"""The table format (lut.py): quantisation schemes and their bounds, storage, reading (through Tensorstore and
memory-mapped), bad input, and the import of the authors' inference form (model.moe_table.weight) into a table."""

import json
import subprocess
import sys
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import reference
from conftest import prime_config, table_config, write_hf_checkpoint
from mole_jax import checkpoint, hf, lut, lut_writer, schemes
from mole_jax.config import MoleError, get_preset
from mole_jax.model import graphdef_and_shapes

# QLoRA's NF4 levels (bitsandbytes, functional.py), as published.
QLORA_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def _rows(shape, seed=0):
    """Rows with expert vectors of very different magnitudes (as real tables have), and exact zeros."""
    rng = np.random.default_rng(seed)
    R, L, N, D = shape
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 2, (R, L, N, 1))
    x[0, 0, 0] = 0.0  # an all-zero vector: scale 0 must not divide by zero
    return x.astype(np.float32)


def test_nf_codebooks():
    np.testing.assert_allclose(schemes.NF_CODEBOOK["nf4"], QLORA_NF4, rtol=0, atol=1e-6)
    nf3 = schemes.NF_CODEBOOK["nf3"]
    assert nf3.shape == (8,) and nf3[0] == -1.0 and nf3[-1] == 1.0 and 0.0 in nf3
    assert np.all(np.diff(nf3) > 0)
    assert (nf3 > 0).sum() == 4 and (nf3 < 0).sum() == 3  # 2^(b-1) positive, 2^(b-1) - 1 negative, and zero
    # the documented bounds: half the widest gap
    assert abs(schemes.NF_HALF_GAP["nf4"] - 0.152) < 1e-3 and abs(schemes.NF_HALF_GAP["nf3"] - 0.2325) < 1e-3


@pytest.mark.parametrize("scheme", schemes.SCHEMES)
def test_quantisation_within_documented_bound(scheme):
    D = 40  # a multiple of 8, so nf3 applies; prime elsewhere
    x = _rows((13, 3, 5, D))
    block = schemes.default_block(scheme, D)
    stored = schemes.quantize(x, scheme, block)
    layout = schemes.Layout(scheme, 3, 5, D, block)
    for name, (shape, dt) in layout.arrays.items():
        assert stored[name].shape == (13, *shape) and stored[name].dtype == dt, name
    got = schemes.dequantize(stored, scheme)
    assert got.dtype == np.float32 and got.shape == x.shape and np.all(np.isfinite(got))
    err = np.abs(got.astype(np.float64) - x)
    bound = schemes.error_bound(x, scheme, block)
    assert np.all(err <= bound), np.max(err - bound)
    if scheme == "float32":
        np.testing.assert_array_equal(got, x)
    else:  # the bound is tight: some value comes close to it
        assert np.max(err / np.maximum(bound, 1e-30)) > 0.5
    assert np.all(got[0, 0, 0] == 0.0)


@pytest.mark.parametrize("scheme", schemes.SCHEMES)
def test_quantisation_on_device_gives_the_same_bits(scheme):
    """Conversion quantises on the accelerator and decoding dequantises there: both must equal numpy exactly."""
    x = _rows((7, 2, 3, 24), seed=1)
    block = schemes.default_block(scheme, 24)
    host = schemes.quantize(x, scheme, block)
    dev = jax.jit(lambda x: schemes.quantize(x, scheme, block, xp=jnp))(x)
    for name in host:
        np.testing.assert_array_equal(np.asarray(dev[name]).view(np.uint8), host[name].view(np.uint8), name)
    deq = jax.jit(lambda s: schemes.dequantize(s, scheme, xp=jnp))(host)
    np.testing.assert_array_equal(np.asarray(deq), schemes.dequantize(host, scheme))


def test_packing_round_trips_every_code():
    for scheme, bits in schemes.NF_BITS.items():
        codes = np.random.default_rng(0).integers(0, 2 ** bits, (3, 5, 48)).astype(np.uint8)
        packed = schemes._pack(codes, bits, np)
        assert packed.shape == (3, 5, 48 * bits // 8)
        np.testing.assert_array_equal(schemes._unpack(packed, bits, np), codes)


def test_bytes_match_the_paper():
    """Paper Table 8 (160M-4E): NF4 (block 768) keeps 25.3% of the fp16 bytes, NF3 (block 128) 19.5%."""
    cfg = get_preset("mole-4e-160m")
    fp16 = schemes.make_layout("float16", cfg).row_nbytes
    assert fp16 == 36864 * 2  # 72 KiB per token
    ratios = {s: schemes.make_layout(s, cfg).row_nbytes / fp16 for s in ("int8", "nf4", "nf3")}
    assert schemes.make_layout("nf4", cfg).block == 768 and schemes.make_layout("nf3", cfg).block == 128
    assert round(ratios["nf4"] * 100, 1) == 25.3 and round(ratios["nf3"] * 100, 1) == 19.5
    assert round(ratios["int8"] * 100, 1) == 50.3
    # other widths: the largest divisor of d not above the paper's block that fills whole bytes
    assert schemes.default_block("nf4", 1024) == 512 and schemes.default_block("nf3", 1024) == 128
    assert schemes.default_block("nf4", 22) == 22 and schemes.default_block("nf3", 40) == 40
    with pytest.raises(MoleError, match="divisible by 8"):
        schemes.default_block("nf3", 22)
    with pytest.raises(MoleError, match="must divide d_model"):
        schemes.make_layout("nf4", prime_config("mole"), block=4)


# A table written from host rows ------------------------------------------------------------------------------
CFG = table_config()  # 97 ids, 2 layers, 32 experts, d 16 (nf3 applies); shards of 32 rows fill whole pages
SHAPE = (CFG.num_layers, CFG.num_experts, CFG.d_model)
ROOT = Path(__file__).resolve().parents[1]


def _source(start, stop):
    return np.stack([_rows((1, *SHAPE), seed=v)[0] for v in range(start, stop)])


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    for scheme in schemes.SCHEMES:  # 4 shards: 32, 32, 32 and 1 rows
        lut_writer.write_table(root / scheme, CFG, scheme, _source, fingerprint="f" * 64, shard_rows=32)
    return root


@pytest.mark.parametrize("scheme", schemes.SCHEMES)
def test_rows_any_order_with_duplicates(tables, scheme):
    table = lut.open_lut(tables / scheme)
    assert table.shape == (97, *SHAPE) and table.scheme == scheme
    assert table.config == CFG and table.fingerprint == "f" * 64
    layout = schemes.make_layout(scheme, CFG)
    assert table.row_nbytes == layout.row_nbytes and table.nbytes == 97 * layout.row_nbytes
    ids = [96, 3, 3, 0, 41, 3, 95]
    source = _source(0, 97)
    want_stored = schemes.quantize(source[ids], scheme, layout.block)
    stored = table.read_stored(ids)
    assert set(stored) == set(layout.arrays)
    for name in stored:
        np.testing.assert_array_equal(stored[name].view(np.uint8), want_stored[name].view(np.uint8))
    rows = table.rows(ids)
    assert rows.dtype == np.float32 and rows.shape == (7, *SHAPE)
    np.testing.assert_array_equal(rows, schemes.dequantize(stored, scheme))
    assert np.all(np.abs(rows - source[ids]) <= schemes.error_bound(source[ids], scheme, layout.block))
    whole = table.read_all_stored()
    for name in whole:
        np.testing.assert_array_equal(whole[name][ids].view(np.uint8), stored[name].view(np.uint8))
    assert table.rows(np.array([], np.int64)).shape == (0, *SHAPE)


def test_files_are_shards_not_rows(tables):
    info = lut.read_info(tables / "nf4")
    assert info["num_shards"] == 4 and info["shards_written"] == 4 and info["complete"]
    files = [p for p in (tables / "nf4").rglob("*") if p.is_file()]
    assert len(files) == 1 + 3 * (1 + 4)  # lut.json; per array (payload, scales, checksums) zarr.json + 4 shards


@pytest.mark.parametrize("scheme", schemes.SCHEMES)
def test_shard_files_hold_raw_rows_in_order(tables, scheme):
    """Rows [i*S, (i+1)*S) of an array are bytes [0, S * row bytes) of its shard file i, a whole number of pages;
    the index (at the end) says so; `checksums` holds each row's crc32c per array."""
    import crc32c

    table = lut.open_lut(tables / scheme)
    whole = table.read_all_stored()
    sums = np.zeros((97, len(table.layout.arrays)), np.uint32)
    for col, (name, (shape, dt)) in enumerate(table.layout.arrays.items()):
        rb = lut.array_row_nbytes(shape, dt)
        assert (32 * rb) % 4096 == 0, (name, rb)
        for i in range(4):
            start, stop = table.shard_range(i)
            data = (tables / scheme / lut.shard_key(name, i, shape)).read_bytes()
            assert len(data) == (stop - start) * rb + 32 * 16 + 4
            assert data[:(stop - start) * rb] == whole[name][start:stop].tobytes()
            assert lut.index_problem(data[-(32 * 16 + 4):], stop - start, rb, 32) is None
        sums[:, col] = [crc32c.crc32c(whole[name][v].tobytes()) for v in range(97)]
    stored = tables / scheme / "checksums"
    assert json.loads((stored / "zarr.json").read_text())["shape"] == [97, len(table.layout.arrays)]
    import tensorstore as ts

    got = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(stored)}}).result().read().result()
    np.testing.assert_array_equal(got, sums)


@pytest.mark.parametrize("scheme", schemes.SCHEMES)
def test_mapped_rows_equal_tensorstore_reads(tables, scheme):
    table = lut.open_lut(tables / scheme)
    for verify in (True, False):
        mapped = table.mapped_stored(verify=verify)
        whole = table.read_all_stored()
        assert set(mapped) == set(table.layout.arrays)
        for name, (shape, dt) in table.layout.arrays.items():
            a = mapped[name]
            assert a.shape == (97, *shape) and a.dtype == dt and a.flags.c_contiguous
            assert not a.flags.writeable and a.ctypes.data % 4096 == 0  # page-aligned: 64-byte aligned and more
            np.testing.assert_array_equal(a.view(np.uint8), whole[name].view(np.uint8))
            with pytest.raises(ValueError):
                a[0] = 0  # the mapping is read-only: numpy refuses to write
            with pytest.raises(ValueError):
                a.flags.writeable = True
    ids = [96, 31, 32, 0, 64, 32]  # across the shards' boundaries
    stored = table.read_stored(ids)
    for name in stored:
        np.testing.assert_array_equal(mapped[name][ids].view(np.uint8), stored[name].view(np.uint8))
    np.testing.assert_array_equal(schemes.dequantize({k: v[ids] for k, v in mapped.items()}, scheme), table.rows(ids))


def test_mapped_arrays_outlive_the_table_and_alias_in_jax(tables):
    table = lut.open_lut(tables / "float16")
    payload = table.mapped_stored()["payload"]
    want = table.read_all_stored()["payload"]
    del table
    view = payload[40:50]
    del payload  # the views keep the mapping
    np.testing.assert_array_equal(view.view(np.uint8), want[40:50].view(np.uint8))
    put = jax.device_put(view)  # zero-copy on the CPU backend: the device buffer is the mapping
    assert put.unsafe_buffer_pointer() == view.ctypes.data
    gathered = jax.jit(lambda t, i: t[i])(put, jnp.array([9, 0, 3]))
    np.testing.assert_array_equal(np.asarray(gathered).view(np.uint16), want[[49, 40, 43]].view(np.uint16))


MAPPED_RSS = """
import gc
import sys
import jax
import jax.numpy as jnp
import numpy as np
from mole_jax import lut

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

table = lut.open_lut(sys.argv[1])
verify = sys.argv[2] == "verify"
jax.device_put(np.zeros(4096, np.float32)).block_until_ready()  # the backend up before measuring
shape = jax.ShapeDtypeStruct(table.layout.arrays["payload"][0], np.float32)
ids = jnp.array([5, 4000, 16000])
full = (table.shape[0], *shape.shape)
gather = jax.jit(lambda t, i: t[i]).lower(jax.ShapeDtypeStruct(full, np.float32), ids).compile()
warm = jax.device_put(np.zeros(full, np.float32))
gather(warm, ids).block_until_ready()  # its first run too
del warm
gc.collect()
before = rss()
payload = table.mapped_stored(verify=verify)["payload"]
on_device = jax.device_put(payload)
rows = np.asarray(gather(on_device, ids))
after = rss()
assert on_device.unsafe_buffer_pointer() == payload.ctypes.data
print(after - before, table.nbytes, int(rows.view(np.uint32).sum() % 1000003))
"""


@pytest.mark.parametrize("verify", ["verify", "structure"])
def test_mapping_a_table_keeps_it_out_of_resident_memory(tmp_path, verify):
    """64 MiB of rows, mapped (verify: every row read once and checked) and put on the CPU device: the process's
    resident memory grows by far less than the table (its pages stay in the page cache, not the process)."""
    cfg = table_config(vocab_size=16384)
    rows = np.arange(16384 * 2 * 32 * 16, dtype=np.float32).reshape(16384, 2, 32, 16) % 1021
    lut_writer.write_table(tmp_path / "big", cfg, "float32", lambda a, b: rows[a:b], fingerprint="b" * 64,
                           shard_rows=4096)
    r = subprocess.run([sys.executable, "-c", MAPPED_RSS, str(tmp_path / "big"), verify], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    grown, nbytes, check = map(int, r.stdout.split())
    # Each row read may map a whole large folio of the page cache (up to 2 MiB on kernels with large folios for
    # files): 3 rows, a few MiB at most, whatever the table's size.
    assert nbytes == 64 << 20 and grown < nbytes // 4, (grown, nbytes)
    assert check == int(rows[[5, 4000, 16000]].view(np.uint32).sum() % 1000003)


def test_shard_rows_must_fill_whole_pages(tmp_path):
    with pytest.raises(MoleError, match=r"shard_rows 3 makes payload shards of 6,144 bytes, not a whole number "
                                        r"of 4096-byte pages .* use a multiple of 2, or at least the vocabulary"):
        lut_writer.write_table(tmp_path / "a", CFG, "float16", _source, fingerprint="f" * 64, shard_rows=3)
    assert not (tmp_path / "a" / "payload").exists()
    with pytest.raises(MoleError, match=r"shard_rows 16 makes payload shards of 6,144 bytes.*multiple of 32"):
        lut_writer.write_table(tmp_path / "b", CFG, "nf3", _source, fingerprint="f" * 64, shard_rows=16)
    for bad in (0, -4, 2.5):
        with pytest.raises(MoleError, match="shard_rows must be a positive integer"):
            lut_writer.write_table(tmp_path / "c", CFG, "float16", _source, fingerprint="f" * 64, shard_rows=bad)
    odd = _rows((97, 3, 5, 24))  # rows of 3 * 5 * 24 bytes + 15 scales: no shard of < 97 rows fills pages
    one = lut_writer.write_table(tmp_path / "d", prime_config("mole", d_model=24), "int8", lambda a, b: odd[a:b],
                                 shard_rows=97)  # one shard: any size
    assert one and lut.read_info(tmp_path / "d")["num_shards"] == 1
    single = lut.open_lut(tmp_path / "d")
    for name, a in single.mapped_stored().items():
        np.testing.assert_array_equal(a.view(np.uint8), single.read_all_stored()[name].view(np.uint8))
    for preset in ("mole-4e-160m", "mole-16e-410m"):
        cfg = get_preset(preset)
        for scheme in schemes.SCHEMES:
            layout = schemes.make_layout(scheme, cfg)
            rows = lut_writer.default_shard_rows(layout, cfg.vocab_size)
            assert lut.shard_rows_problem(layout, cfg.vocab_size, rows) is None, (preset, scheme, rows)
            assert rows * layout.row_nbytes <= 2 * lut_writer.SHARD_TARGET_BYTES


def test_bad_row_ids(tables):
    table = lut.open_lut(tables / "float16")
    for ids, msg in [([0, 97], "outside the table's vocabulary"), ([-1], "outside"), ([1.0, 2.0], "integers"),
                     ([[1, 2]], "1-D"), ([True], "integers")]:
        with pytest.raises(MoleError, match=msg):
            table.rows(ids)
        with pytest.raises(MoleError, match=msg):
            table.read_stored(ids)


def test_open_refuses_what_is_not_a_usable_table(tables, tmp_path):
    with pytest.raises(MoleError, match="does not exist"):
        lut.open_lut(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoleError, match="not a mole-jax lookup table"):
        lut.open_lut(tmp_path / "empty")
    with pytest.raises(MoleError, match="different parameters"):
        lut.open_lut(tables / "int8", expect_fingerprint="0" * 64)
    assert lut.open_lut(tables / "int8", expect_fingerprint="f" * 64).scheme == "int8"

    import shutil
    for name, change, msg in [("future", {"format_version": 4}, "format version 4; this mole-jax reads version 3"),
                              ("interrupted", {"complete": False}, "incomplete")]:
        shutil.copytree(tables / "int8", tmp_path / name)
        meta = json.loads((tmp_path / name / "lut.json").read_text())
        (tmp_path / name / "lut.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(MoleError, match=msg):
            lut.open_lut(tmp_path / name)
    assert lut.read_info(tmp_path / "interrupted")["complete"] is False  # info still describes it
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "lut.json").write_text("{not json")
    with pytest.raises(MoleError, match="not valid JSON"):
        lut.open_lut(tmp_path / "garbage")


def test_memory_kvstore_and_url_locations():
    url = f"memory://{uuid.uuid4().hex}/table/"  # the memory kvstore lives as long as the process
    lut_writer.write_table(url, CFG, "nf4", _source, fingerprint="a" * 64, shard_rows=32)
    table = lut.open_lut(url)
    assert table.path == url and table.scheme == "nf4"
    np.testing.assert_array_equal(table.rows([5, 6]),
                                  schemes.dequantize(schemes.quantize(_source(5, 7), "nf4", 16), "nf4"))
    assert table.check_shard(0) is None and table.check_structure() is None
    with pytest.raises(MoleError, match=f"table {url} cannot be memory-mapped: it is on a 'memory' kvstore"):
        table.mapped_stored()
    with pytest.raises(MoleError, match="not a mole-jax lookup table"):
        lut.open_lut(url.replace("/table/", "/other/"))
    with pytest.raises(MoleError, match="already holds a complete table"):  # the same store as a JSON spec
        lut_writer.write_table({"driver": "memory", "path": url[len("memory://"):].rstrip("/")}, CFG, "nf4", _source,
                        fingerprint="b" * 64)


def test_fingerprint_covers_exactly_the_table_inputs():
    from mole_jax.model import init_params

    cfg = prime_config("mole")
    params = init_params(cfg, seed=0)
    fp = lut.fingerprint(params)
    assert len(fp) == 64 and fp == lut.fingerprint(jax.tree.map(np.asarray, params))
    assert fp == lut.fingerprint(lut.table_inputs(params))
    other = jax.tree.map(lambda x: x, params)
    other["blocks"][2]["attn"]["wq_DxHxK"] = other["blocks"][2]["attn"]["wq_DxHxK"] + 1  # not a table input
    assert lut.fingerprint(other) == fp
    for path in [("embed_VxD",), ("blocks", 1, "norm_expert", "scale_D"), ("blocks", 2, "experts", "w_down_NxFxD")]:
        changed = jax.tree.map(lambda x: x, params)
        node = changed
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = node[path[-1]].at[(0,) * node[path[-1]].ndim].add(1e-3)
        assert lut.fingerprint(changed) != fp, path
    with pytest.raises(MoleError, match="no routed experts"):
        lut.fingerprint(init_params(prime_config("dense")))


# The authors' inference form ---------------------------------------------------------------------------------
IDS = np.array([[5, 17, 96, 0, 3, 3, 41], [88, 2, 2, 60, 71, 9, 13]], np.int32)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_import_inference_form_table(tmp_path, dtype):
    cfg = prime_config("mole")
    tensors = write_hf_checkpoint(tmp_path / "src", cfg, inference_form=True, dtype=dtype)
    hf.import_hf(tmp_path / "src", tmp_path / "run")
    meta = checkpoint.read_meta(tmp_path / "run")
    assert meta["has_experts"] is False
    source = tensors[hf.MOE_TABLE]  # [V, L*N*d] in its own dtype
    table = lut.open_lut(tmp_path / "run" / checkpoint.LUT, expect_fingerprint=meta["lut_fingerprint"])
    assert table.scheme == np.dtype(dtype).name and table.shape == (97, 3, 5, 22)
    payload = table.read_all_stored()["payload"]
    np.testing.assert_array_equal(payload.reshape(97, -1).view(np.uint8), source.view(np.uint8))
    ids = IDS.reshape(-1)
    np.testing.assert_array_equal(table.rows(ids), source[ids].astype(np.float32).reshape(-1, 3, 5, 22))
    layout = schemes.make_layout(table.scheme, cfg)
    assert meta["lut_fingerprint"] == lut.table_fingerprint({"payload": source.reshape(97, 3, 5, 22)}, layout)

    # the inference-form model fed with the table's rows gives the reference's logits
    _, params = checkpoint.restore_params(tmp_path / "run", with_experts=False)
    graphdef, _ = graphdef_and_shapes(cfg, with_experts=False)
    rows = jnp.asarray(table.rows(ids).reshape(*IDS.shape, 3, 5, 22))
    logits = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(IDS), lut_BxTxLxNxD=rows).logits_BxTxV)
    ref = reference.forward(hf.config_to_hf(cfg), {k: v.astype(np.float32) for k, v in tensors.items()}, IDS)
    assert np.all(np.isfinite(logits))
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_import_rejects_a_misshapen_table(tmp_path):
    from safetensors.numpy import save_file

    cfg = prime_config("mole")
    tensors = write_hf_checkpoint(tmp_path / "src", cfg, inference_form=True)
    tensors[hf.MOE_TABLE] = tensors[hf.MOE_TABLE][:, :-1].copy()
    save_file(tensors, str(tmp_path / "src" / "model.safetensors"))
    with pytest.raises(MoleError, match="model.moe_table.weight' has shape"):
        hf.import_hf(tmp_path / "src", tmp_path / "run")
    assert not (tmp_path / "run").exists()
