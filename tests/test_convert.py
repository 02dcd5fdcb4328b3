"""Conversion (convert.py): the table equals the experts, the LUT-fed inference form equals the training form,
bit-identity across device counts, processes and interruptions (SIGKILL), verification, bad input, and the CLI."""

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from flax import nnx

import reference
from conftest import prime_config, table_config, write_hf_checkpoint, xla_flags
from mole_jax import checkpoint, cli, hf, lut, lut_writer, schemes
from mole_jax.config import MoleError
from mole_jax.convert import convert_to_lut, verify_lut
from mole_jax.model import graphdef_and_shapes, init_params, without_routed_experts

ROOT = Path(__file__).resolve().parents[1]
CFG = table_config()  # V 97, L 2, N 32, d 16 (nf3 applies), F 37: shards of 16 rows fill whole pages (nf3: 32)
SHAPE = (CFG.num_layers, CFG.num_experts, CFG.d_model)


def _save(path: Path, cfg, params, **meta) -> Path:
    mngr = checkpoint.manager(path / checkpoint.CHECKPOINTS, async_save=False)
    checkpoint.save(mngr, 7, params, checkpoint.step_meta(cfg, 7, **meta))
    mngr.close()
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A training-form MoLE checkpoint (a run directory), its params and the reference table [V, L, N, D]."""
    root = tmp_path_factory.mktemp("convert")
    params = init_params(CFG, seed=3)
    table = reference.lut_table(hf.config_to_hf(CFG), hf.params_to_hf(CFG, params))
    return {"ckpt": _save(root / "run", CFG, params), "params": params, "table": table, "root": root}


def _files(lut_dir: Path) -> dict[str, bytes]:
    """Every stored array file (shards and zarr.json), by relative path: what bit-identity compares (not lut.json
    nor the converter's lut.lock)."""
    return {str(p.relative_to(lut_dir)): p.read_bytes() for p in sorted(lut_dir.rglob("*"))
            if p.is_file() and p.name not in ("lut.json", "lut.lock")}


@pytest.mark.parametrize("scheme", schemes.SCHEMES)
def test_table_equals_expert_outputs(run, tmp_path, scheme):
    out = convert_to_lut(run["ckpt"], tmp_path / "lut", scheme, shard_rows=32, progress=False)
    assert out == tmp_path / "lut"
    table = lut.open_lut(out, expect_fingerprint=lut.fingerprint(run["params"]))
    ref = run["table"]
    scale = np.abs(ref).max()
    ids = np.array([96, 0, 5, 5, 41, 17, 3, 95, 5])  # any order, duplicates
    rows = table.rows(ids)
    assert rows.shape == (9, *SHAPE) and rows.dtype == np.float32 and np.all(np.isfinite(rows))
    err = np.abs(rows - ref[ids])
    if scheme == "float32":
        assert err.max() <= 1e-6 * scale
        model = nnx.merge(graphdef_and_shapes(CFG)[0], run["params"])  # the training form's own experts
        np.testing.assert_allclose(rows, np.asarray(model.lut_rows(jnp.asarray(ids))), rtol=0, atol=1e-6 * scale)
    else:  # the scheme's rounding or quantisation bound around the exact value (+ float32 compute noise)
        assert np.all(err <= schemes.error_bound(ref[ids], scheme, table.block) + 1e-6 * scale), (err.max(), scheme)
    every = table.rows(np.arange(97))
    assert np.all(np.abs(every - ref) <= schemes.error_bound(ref, scheme, table.block) + 1e-6 * scale)
    assert table.meta["verification"]["ok"] and table.meta["source"]["step"] == 7


def test_inference_form_with_lut_rows_equals_training_form(run, tmp_path):
    table = lut.open_lut(convert_to_lut(run["ckpt"], tmp_path / "lut", "float32", progress=False))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 97, (3, 11)))
    train = nnx.merge(graphdef_and_shapes(CFG)[0], run["params"])(ids).logits_BxTxV
    rows = table.rows(np.asarray(ids).reshape(-1)).reshape(3, 11, *SHAPE)
    graphdef, _ = graphdef_and_shapes(CFG, with_experts=False)
    infer = nnx.merge(graphdef, without_routed_experts(run["params"]))(ids, lut_BxTxLxNxD=jnp.asarray(rows))
    train, infer = np.asarray(train), np.asarray(infer.logits_BxTxV)
    assert np.all(np.isfinite(infer)) and np.abs(train).max() > 0.1
    np.testing.assert_allclose(infer, train, rtol=0, atol=1e-5 * np.abs(train).max())


def test_bfloat16_checkpoint_is_tabulated_in_float32(tmp_path):
    """Training in bf16 stores bf16 parameters; the table is still computed in float32 from them."""
    cfg = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
    params = init_params(cfg, seed=8)
    ckpt = _save(tmp_path / "bf16", cfg, params)
    table = lut.open_lut(convert_to_lut(ckpt, tmp_path / "lut", "float32", progress=False))
    as_f32 = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    ref = reference.lut_table(hf.config_to_hf(cfg), hf.params_to_hf(cfg, as_f32))
    np.testing.assert_allclose(table.rows(np.arange(97)), ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    assert table.fingerprint == lut.fingerprint(params)


@pytest.mark.parametrize("scheme", ["float32", "nf4"])
def test_one_device_equals_four_devices(run, tmp_path, scheme):
    assert len(jax.local_devices()) == 4
    kw = dict(shard_rows=16, batch_rows=4, progress=False)
    one = convert_to_lut(run["ckpt"], tmp_path / "one", scheme, devices=jax.local_devices()[:1], **kw)
    four = convert_to_lut(run["ckpt"], tmp_path / "four", scheme, **kw)
    assert lut.read_info(four)["last_run"]["devices_per_process"] == 4
    a, b = _files(one), _files(four)
    assert len(a) == (3 if scheme == "nf4" else 2) * (1 + 7)  # zarr.json and 7 shards per array, checksums too
    assert a == b


# Interruption: a conversion in a subprocess kills itself (SIGKILL, with writes in flight) ----------------------
KILLED = """
import os, signal, sys
from mole_jax import lut_writer
from mole_jax.convert import convert_to_lut

ckpt, out, when = sys.argv[1], sys.argv[2], sys.argv[3]
write_shard = lut_writer.TableWriter.write_shard

def write_and_maybe_die(self, i, stored):
    futures = write_shard(self, i, stored)
    print("shard", i, flush=True)
    if when.isdigit() and int(when) == i:
        os.kill(os.getpid(), signal.SIGKILL)  # this shard's write and others are still in flight
    return futures

def die(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # every shard written, verification done, not yet marked complete

lut_writer.TableWriter.write_shard = write_and_maybe_die
if when == "complete":
    lut_writer.TableWriter.mark_complete = die
convert_to_lut(ckpt, out, "nf4", shard_rows=16, batch_rows=2, progress=False)
"""


def _killed_run(ckpt, out, when) -> list[int]:
    r = subprocess.run([sys.executable, "-c", KILLED, str(ckpt), str(out), when], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    return [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("shard ")]


def test_kill_and_resume_is_bit_identical(run, tmp_path, monkeypatch):
    kw = dict(shard_rows=16, batch_rows=2, progress=False)
    reference_dir = convert_to_lut(run["ckpt"], tmp_path / "uninterrupted", "nf4", **kw)
    out = tmp_path / "lut"

    first = _killed_run(run["ckpt"], out, when="4")  # killed while writing: 7 shards of 16 rows
    assert first[-1] == 4
    with pytest.raises(MoleError, match="incomplete"):
        lut.open_lut(out)
    done = lut.read_info(out)["shards_written"]
    assert 0 < done < 7

    second = _killed_run(run["ckpt"], out, when="complete")  # the same command: only the missing shards
    assert len(second) == 7 - done and sorted(second) == second and second[-1] == 6
    assert lut.read_info(out)["shards_written"] == 7
    with pytest.raises(MoleError, match="incomplete"):
        lut.open_lut(out)

    computed = []
    write_shard = lut_writer.TableWriter.write_shard
    monkeypatch.setattr(lut_writer.TableWriter, "write_shard",
                        lambda self, i, stored: computed.append(i) or write_shard(self, i, stored))
    convert_to_lut(run["ckpt"], out, "nf4", **kw)  # third time: nothing left but verifying and completing
    assert computed == []
    assert lut.open_lut(out).meta["complete"]
    assert _files(out) == _files(reference_dir)
    assert not [p for p in out.rglob("*.__lock")]  # no leftovers of the killed writes


# Scale-out: two JAX processes (jax.distributed on localhost) split the shards ----------------------------------
DISTRIBUTED = """
import sys, time
import jax
ckpt, out, port, pid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
from mole_jax import lut_writer
from mole_jax.convert import convert_to_lut

write_shard = lut_writer.TableWriter.write_shard
def record(self, i, stored):
    print("shard", i, flush=True)
    return write_shard(self, i, stored)
lut_writer.TableWriter.write_shard = record

done_shards = lut_writer.TableWriter.done_shards
def late(self):  # process 1 lists the shards written only once process 0 has finished some
    deadline = time.monotonic() + 120
    while len(done_shards(self)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    done = done_shards(self)
    print("saw", len(done), flush=True)
    return done
if pid == 1:
    lut_writer.TableWriter.done_shards = late
convert_to_lut(ckpt, out, "float16", shard_rows=8, batch_rows=2, progress=False)
"""


def test_two_processes_write_their_own_shards(run, tmp_path):
    """The second process starts its work after the first has finished some shards: each still computes exactly
    its own (shard i belongs to process i % 2), and the table equals a single-process one bit for bit."""
    single = convert_to_lut(run["ckpt"], tmp_path / "single", "float16", shard_rows=8, batch_rows=2, progress=False)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(2)}
    procs = [subprocess.Popen([sys.executable, "-c", DISTRIBUTED, str(run["ckpt"]), str(tmp_path / "multi"),
                               str(port), str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT, env=env) for i in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    shards = [{int(line.split()[1]) for line in o.splitlines() if line.startswith("shard ")} for o, _ in outs]
    assert shards[0] and shards[1] and not shards[0] & shards[1] and shards[0] | shards[1] == set(range(13))
    assert shards[0] == set(range(0, 13, 2)) and shards[1] == set(range(1, 13, 2))
    saw = [int(line.split()[1]) for line in outs[1][0].splitlines() if line.startswith("saw ")]
    assert saw and saw[0] >= 3  # process 1 listed after process 0 had finished shards
    info = lut.read_info(tmp_path / "multi")
    assert info["complete"] and info["last_run"]["processes"] == 2
    assert _files(tmp_path / "multi") == _files(single)


# Verification ----------------------------------------------------------------------------------------------------
def test_verify_detects_a_corrupted_row(run, tmp_path):
    out = convert_to_lut(run["ckpt"], tmp_path / "lut", "float16", shard_rows=16, progress=False)
    report = verify_lut(out, run["ckpt"], rows=8, seed=0)
    assert report["ok"] and report["max_error_over_allowed"] <= 1.0 and report["rows"] >= 2
    payload = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(out / "payload")}}).result()
    payload[50].write(payload[50].read().result() * np.float16(1.01)).result()  # 1% off: beyond fp16 rounding
    sums = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(out / "checksums")}}).result()
    sums[50, 0].write(lut.row_checksums(payload[50:51].read().result())[0]).result()  # stored as if it were right
    from mole_jax.convert import _spot_ids

    seed = next(s for s in range(10_000) if 50 in _spot_ids(97, 16, s))  # random rows that include row 50
    report = verify_lut(out, run["ckpt"], rows=16, seed=seed)
    assert not report["ok"] and report["max_error_over_allowed"] > 1.0


def test_verify_refuses_a_table_of_other_parameters(run, tmp_path):
    out = convert_to_lut(run["ckpt"], tmp_path / "lut", "int8", shard_rows=16, progress=False)
    other = _save(tmp_path / "other", CFG, init_params(CFG, seed=4))
    with pytest.raises(MoleError, match="different parameters"):
        verify_lut(out, other)


# Bad input -------------------------------------------------------------------------------------------------------
def test_bad_checkpoints(run, tmp_path):
    dense = _save(tmp_path / "dense", prime_config("dense"), init_params(prime_config("dense")))
    moe = _save(tmp_path / "moe", prime_config("moe"), init_params(prime_config("moe")))
    write_hf_checkpoint(tmp_path / "hf", prime_config("mole"), inference_form=True)
    inference = hf.import_hf(tmp_path / "hf", tmp_path / "inference")
    nf3_odd = _save(tmp_path / "d22", prime_config("mole"), init_params(prime_config("mole")))
    cases = [(dense, "float16", "holds a dense model"), (moe, "float16", "holds a moe model"),
             (tmp_path / "missing", "float16", "does not exist"), (inference, "float16", "inference form"),
             (nf3_odd, "nf3", "divisible by 8"), (run["ckpt"], "int4", "unknown table dtype")]
    for i, (ckpt, scheme, msg) in enumerate(cases):
        with pytest.raises(MoleError, match=msg):
            convert_to_lut(ckpt, tmp_path / f"out{i}", scheme, progress=False)
        assert not (tmp_path / f"out{i}").exists(), msg


def test_non_finite_or_out_of_range_experts(tmp_path):
    params = init_params(CFG, seed=3)
    params["blocks"][1]["experts"]["w_down_NxFxD"] = params["blocks"][1]["experts"]["w_down_NxFxD"].at[2, 0, 0].set(
        np.nan)
    ckpt = _save(tmp_path / "nan", CFG, params)
    with pytest.raises(MoleError, match="not finite"):
        convert_to_lut(ckpt, tmp_path / "lut", "float32", progress=False)
    with pytest.raises(MoleError, match="incomplete"):
        lut.open_lut(tmp_path / "lut")
    params = init_params(CFG, seed=3)
    params["blocks"][0]["experts"]["w_down_NxFxD"] = params["blocks"][0]["experts"]["w_down_NxFxD"] * 1e6
    ckpt = _save(tmp_path / "huge", CFG, params)
    with pytest.raises(MoleError, match="beyond float16's range"):
        convert_to_lut(ckpt, tmp_path / "lut16", "float16", progress=False)
    assert lut.open_lut(convert_to_lut(ckpt, tmp_path / "lutbf16", "bfloat16", progress=False)).scheme == "bfloat16"


def test_existing_tables_and_destinations(run, tmp_path):
    out = convert_to_lut(run["ckpt"], tmp_path / "lut", "float16", shard_rows=16, progress=False)
    before = lut.open_lut(out).rows([1, 2])
    other = _save(tmp_path / "other", CFG, init_params(CFG, seed=5))
    for ckpt in (run["ckpt"], other):
        with pytest.raises(MoleError, match="already holds a complete table"):
            convert_to_lut(ckpt, out, "float16", progress=False)
    np.testing.assert_array_equal(lut.open_lut(out).rows([1, 2]), before)
    convert_to_lut(other, out, "int8", overwrite=True, progress=False)
    replaced = lut.open_lut(out)
    assert replaced.scheme == "int8" and replaced.fingerprint != lut.fingerprint(run["params"])
    assert np.abs(replaced.rows([1, 2]) - before).max() > 1e-3

    # an interrupted conversion of other parameters is not silently mixed with this one
    meta = json.loads((out / "lut.json").read_text())
    (out / "lut.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(MoleError, match="interrupted conversion with other parameters"):
        convert_to_lut(run["ckpt"], out, "float16", progress=False)

    (tmp_path / "a_file").write_text("x")
    (tmp_path / "not_a_table").mkdir()
    (tmp_path / "not_a_table" / "notes.txt").write_text("mine")
    for dest, msg in [(tmp_path / "a_file" / "lut", "is not a directory"), (tmp_path / "a_file", "not a directory"),
                      (tmp_path / "not_a_table", "not a mole-jax lookup table")]:
        with pytest.raises(MoleError, match=msg):
            convert_to_lut(run["ckpt"], dest, "float16", progress=False)
    assert (tmp_path / "not_a_table" / "notes.txt").read_text() == "mine"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(MoleError, match="not writable"):
            convert_to_lut(run["ckpt"], locked / "lut", "float16", progress=False)
    if Path("/sys/kernel").is_dir():  # sysfs refuses new directories, even to root
        with pytest.raises(MoleError, match="cannot create|not writable"):
            convert_to_lut(run["ckpt"], "/sys/mole-jax-test-lut", "float16", progress=False)


def test_memory_kvstore_destination(run):
    url = f"memory://{uuid.uuid4().hex}/lut/"
    assert convert_to_lut(run["ckpt"], url, "bfloat16", progress=False) == url
    table = lut.open_lut(url)
    ref = run["table"][[4, 90]]
    assert np.all(np.abs(table.rows([4, 90]) - ref) <= schemes.error_bound(ref, "bfloat16") + 1e-6 * np.abs(ref).max())


# CLI -------------------------------------------------------------------------------------------------------------
def test_cli_convert_info_verify(run, tmp_path, capsys):
    out = tmp_path / "lut"
    assert cli.main(["convert", str(run["ckpt"]), str(out), "--dtype", "nf4", "--shard-rows", "32",
                     "--checksum", "--no-progress"]) == 0
    assert "nf4" in capsys.readouterr().out
    assert cli.main(["lut", "info", str(out)]) == 0
    text = capsys.readouterr().out
    for field in ("[97, 2, 32, 16]", "nf4 (block 16)", "row bytes", "4 of 4 written", lut.fingerprint(run["params"]),
                  "complete     yes"):
        assert field in text, (field, text)
    assert lut.read_info(out)["checksum"] is True
    assert cli.main(["lut", "verify", str(out), str(run["ckpt"]), "--rows", "4", "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip().endswith("ok")
    assert cli.main(["convert", str(run["ckpt"]), str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]

    meta = json.loads((out / "lut.json").read_text())
    (out / "lut.json").write_text(json.dumps({**meta, "complete": False}))
    assert cli.main(["lut", "info", str(out)]) == 0
    assert "complete     NO" in capsys.readouterr().out
    assert cli.main(["lut", "verify", str(out), str(run["ckpt"])]) == 2
    assert "incomplete" in capsys.readouterr().err


def test_cli_verify_failure_exits_2_in_one_line(run, tmp_path):
    out = convert_to_lut(run["ckpt"], tmp_path / "lut", "float16", progress=False)
    other = _save(tmp_path / "other", CFG, init_params(CFG, seed=6))
    r = subprocess.run([sys.executable, "-m", "mole_jax.cli", "lut", "verify", str(out), str(other)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "different parameters" in lines[0]


def test_bench_convert_reports_what_the_issue_asks(tmp_path):
    """Not a timed test: the benchmark runs end to end on a tiny model and its JSON holds the required fields."""
    from mole_jax.bench import bench_convert
    from mole_jax.config import ModelConfig
    from mole_jax.convert import flops_per_row

    result = bench_convert(preset="tiny-mole", vocab_sizes=[256, 512], json_path=tmp_path / "b.json")
    saved = json.loads((tmp_path / "b.json").read_text())
    for key in ("flops", "seconds", "achieved_flops_per_s", "matmul_peak_flops_per_s", "bytes_written",
                "peak_rss_bytes", "fraction_of_peak"):
        assert saved[key] > 0, key
    assert saved["flops"] == 512 * flops_per_row(ModelConfig.from_dict({**saved["model"], "vocab_size": 512}))
    assert result["fraction_of_peak"] == pytest.approx(saved["achieved_flops_per_s"] / saved["matmul_peak_flops_per_s"])
    assert [(r["vocab_size"], r["destination"]) for r in saved["runs"]] == [(256, "file"), (512, "file"),
                                                                            (512, "memory")]
    assert [r["batch"] for r in saved["row_reads"]] == [1, 8, 32]
    assert [r["scheme"] for r in saved["schemes"]] == list(schemes.SCHEMES)
