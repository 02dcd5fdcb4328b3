"""Conversion in memory bounded by one layer (convert.py reads the experts a layer at a time): peak RSS does not
grow with the number of layers, the table equals the existing all-layers-at-once computation bit for bit at any
buffer size, the step rows follow the shapes, and SIGTERM/SIGINT stop `mole-jax convert` at a step boundary with
a table that the same command completes bit for bit; a checkpoint written by two processes converts to the same
table as one written by one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_cli, table_config, xla_flags
from mole_jax import checkpoint, convert, lut, lut_writer, schemes
from mole_jax.config import ModelConfig, MoleError
from mole_jax.convert import convert_to_lut
from mole_jax.model import graphdef_and_shapes, init_params

ROOT = Path(__file__).resolve().parents[1]
CFG = table_config()  # V 97, L 2, N 32, d 16, F 37


def _save(path: Path, cfg, params) -> Path:
    mngr = checkpoint.manager(path / checkpoint.CHECKPOINTS, async_save=False)
    checkpoint.save(mngr, 1, params, checkpoint.step_meta(cfg, 1))
    mngr.close()
    return path


def _files(lut_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(lut_dir)): p.read_bytes() for p in sorted(lut_dir.rglob("*"))
            if p.is_file() and p.name not in ("lut.json", "lut.lock")}


def _all_layers_at_once(ckpt, cfg: ModelConfig, scheme: str, batch_rows: int) -> dict[str, np.ndarray]:
    """The table as the plain computation gives it: every parameter restored at once, Transformer.lut_rows of all
    layers in one jitted call per `batch_rows` ids (one device, as many rows as the conversion's steps), quantised
    on the host."""
    inputs = convert.restore_table_inputs(ckpt, cfg)
    fn = jax.jit(convert.lut_rows_fn(cfg))
    block = schemes.make_layout(scheme, cfg).block
    parts = []
    with jax.default_matmul_precision("highest"):
        for s in range(0, cfg.vocab_size, batch_rows):
            ids = np.minimum(np.arange(s, s + batch_rows), cfg.vocab_size - 1)
            rows = np.asarray(fn(inputs, jnp.asarray(ids, jnp.int32)))[:min(batch_rows, cfg.vocab_size - s)]
            parts.append(schemes.quantize(rows, scheme, block))
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("bounded") / "run", CFG, init_params(CFG, seed=21))


@pytest.mark.parametrize("scheme", ["float16", "nf4"])
def test_layer_by_layer_equals_all_layers_at_once_at_any_buffer(ckpt, tmp_path, scheme):
    """One pass (the default buffer), one shard per pass, and two shards per pass on 4 devices: the same files,
    and the same bits as all layers computed at once."""
    shard_rows = 32 if scheme == "nf3" else 16
    shard_nbytes = shard_rows * schemes.make_layout(scheme, CFG).row_nbytes
    tables = {}
    for name, buffer_bytes in [("one pass", convert.BUFFER_BYTES), ("shard per pass", shard_nbytes),
                               ("two per pass", 2 * shard_nbytes + 1)]:
        out = convert_to_lut(ckpt, tmp_path / name.replace(" ", "-"), scheme, shard_rows=shard_rows, batch_rows=4,
                             buffer_bytes=buffer_bytes, progress=False)
        tables[name] = out
        passes = lut.read_info(out)["last_run"]["passes_process0"]
        assert passes == {"one pass": 1, "shard per pass": 7, "two per pass": 4}[name], (name, passes)
    reference = _files(tables["one pass"])
    assert all(_files(t) == reference for t in tables.values())
    want = _all_layers_at_once(ckpt, CFG, scheme, batch_rows=4)
    got = lut.open_lut(tables["one pass"]).read_all_stored()
    for name in want:
        np.testing.assert_array_equal(got[name].view(np.uint8), want[name].view(np.uint8))


def test_step_and_shard_rows_follow_the_shapes():
    """Steps of MAX_STEP_ROWS where one layer's activations allow (410M: d 1,024, F 4,096), fewer for many wide
    experts; shards never smaller than a step; batch rows always divide the shard rows."""
    from mole_jax.config import get_preset

    m410 = get_preset("mole-4e-410m")
    assert convert.step_rows(m410) == 1024
    wide = m410.replace(num_experts=64)  # 64 x (4,096 + 1,024) x 4 bytes a row: 256 MiB hold 204 rows
    assert convert.step_rows(wide) == 128
    layout = schemes.make_layout("float16", m410)
    shard_rows = convert.default_shard_rows(m410, layout)
    assert shard_rows == 1024 and shard_rows * layout.row_nbytes > lut_writer.SHARD_TARGET_BYTES
    assert lut.shard_rows_problem(layout, m410.vocab_size, shard_rows) is None
    assert convert.default_batch_rows(m410, shard_rows) == 1024
    assert convert.default_batch_rows(m410, 96) == 96 and convert.default_batch_rows(CFG, 97) == 97
    assert convert.default_shard_rows(CFG, schemes.make_layout("float16", CFG)) == 97  # at most the vocabulary


def test_bad_buffer_is_refused_in_one_line(ckpt, tmp_path):
    status, _, err = run_cli("convert", ckpt, tmp_path / "lut", "--buffer-mb", "0", "--no-progress")
    assert status == 2 and err.strip().splitlines() == ["mole-jax: error: --buffer-mb must be a positive integer, "
                                                        "got 0"], err
    for bad in (0, -1, 1.5, True):
        with pytest.raises(MoleError, match="buffer_bytes must be a positive integer"):
            convert_to_lut(ckpt, tmp_path / "lut", "float16", buffer_bytes=bad, progress=False)
    assert not (tmp_path / "lut").exists()


# Peak RSS: the same experts with 2 and with 8 layers --------------------------------------------------------------
RSS = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from mole_jax import cli, convert, lut, schemes
from mole_jax.bench.tools import peak_rss_bytes

ckpt, out = sys.argv[1], sys.argv[2]
assert cli.main(["convert", ckpt, out, "--no-progress"]) == 0  # as a user runs it
peak = peak_rss_bytes()  # read before the reference restores every layer at once
table = lut.open_lut(out)
cfg, R = table.config, table.meta["producer"]["batch_rows"]
inputs = convert.restore_table_inputs(ckpt, cfg)
fn = jax.jit(convert.lut_rows_fn(cfg))
with jax.default_matmul_precision("highest"):
    want = np.concatenate([schemes.quantize(np.asarray(fn(inputs, jnp.arange(s, s + R, dtype=jnp.int32))),
                                            "float16")["payload"] for s in range(0, cfg.vocab_size, R)])
same = bool(np.array_equal(want.view(np.uint16), table.read_all_stored()["payload"].view(np.uint16)))
print(json.dumps({"peak_rss_bytes": peak, "bit_identical": same, "batch_rows": R,
                  "passes": table.meta["last_run"]["passes_process0"]}))
"""


def _big_checkpoint(path: Path, cfg: ModelConfig, experts: list[dict]) -> Path:
    """A checkpoint of `cfg` whose layer l has experts[l]; the other parameters small and cheap to make (tiled
    random values: what is measured is memory, and making 0.5 GB of normal samples would dominate the test)."""
    rng = np.random.default_rng(0)
    tile = (0.02 * rng.standard_normal(1 << 16)).astype(np.float32)
    params = jax.tree.map(lambda s: np.resize(tile, s.shape), graphdef_and_shapes(cfg)[1])
    for l, b in params["blocks"].items():
        b["experts"] = experts[l]
        b["norm_expert"]["scale_D"] = np.ones(cfg.d_model, np.float32)
    return _save(path, cfg, params)


def test_peak_rss_does_not_grow_with_the_layers(tmp_path):
    """d 512, 4 experts of F 4,096: 64 MiB of float32 experts per layer, 128 MiB at 2 layers and 512 MiB at 8 (more
    than a JAX process's own RSS). Restoring every layer at once would add the 384 MiB of the six extra layers;
    `mole-jax convert`, reading a layer at a time, peaks within 20% and within a quarter of that at both depths
    (its own peak: VmHWM, see bench/tools.py). Both tables equal all layers computed at once, bit for
    bit."""
    cfg = ModelConfig(kind="mole", vocab_size=128, num_layers=8, d_model=512, num_heads=4, ffn_dim=64,
                      expert_dim=4096, num_experts=4, max_seq_len=64)
    rng = np.random.default_rng(1)
    N, D, F = cfg.num_experts, cfg.d_model, cfg.expert_dim
    experts = [{"w_up_NxDxF": np.resize((0.04 * rng.standard_normal(1 << 20)).astype(np.float32), (N, D, F)),
                "w_down_NxFxD": np.resize((0.02 * rng.standard_normal(1 << 20)).astype(np.float32), (N, F, D))}
               for _ in range(8)]
    per_layer = sum(a.nbytes for a in experts[0].values())
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
    runs = {}
    for L in (2, 8):
        ckpt = _big_checkpoint(tmp_path / f"L{L}", cfg.replace(num_layers=L), experts[:L])
        r = subprocess.run([sys.executable, "-c", RSS, str(ckpt), str(tmp_path / f"lut{L}")], capture_output=True,
                           text=True, cwd=ROOT, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[L] = json.loads(r.stdout.strip().splitlines()[-1])
        assert runs[L]["bit_identical"], runs[L]
    rss2, rss8 = runs[2]["peak_rss_bytes"], runs[8]["peak_rss_bytes"]
    assert rss2 > per_layer  # the experts are a visible part of the peak
    assert rss8 <= 1.2 * rss2, (rss2 / 2 ** 20, rss8 / 2 ** 20)
    assert rss8 - rss2 < 0.25 * 6 * per_layer, (rss2 / 2 ** 20, rss8 / 2 ** 20)


# Stopping at a step boundary (SIGTERM, SIGINT) ------------------------------------------------------------------
HELD = """
import sys, time
from pathlib import Path
from mole_jax import cli, lut_writer

signals = Path(sys.argv[1])
write_shard = lut_writer.TableWriter.write_shard
def hold_after_the_first(self, i, stored):
    futures = write_shard(self, i, stored)
    if i == 0:  # shard 0 durable: say so, and hold the writer until the signal has been sent
        for f in futures:
            f.result()
        (signals / "first").touch()
        deadline = time.monotonic() + 120  # never left waiting if the test that lets it go has died
        while not (signals / "sent").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    return futures
lut_writer.TableWriter.write_shard = hold_after_the_first
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def wide_vocab(tmp_path_factory):
    """CFG at V 1,024 (64 shards of 16 rows: 32 float16 shards per pass with --buffer-mb 1) and its table,
    converted without interruption."""
    cfg = CFG.replace(vocab_size=1024)
    root = tmp_path_factory.mktemp("stop")
    ckpt = _save(root / "run", cfg, init_params(cfg, seed=22))
    reference = convert_to_lut(ckpt, root / "reference", "float16", shard_rows=16, batch_rows=16,
                               buffer_bytes=1 << 20, progress=False)
    return ckpt, reference


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_at_a_step_and_the_rerun_is_bit_identical(wide_vocab, tmp_path, signum, status):
    ckpt, reference = wide_vocab
    out = tmp_path / "lut"
    args = ["convert", str(ckpt), str(out), "--shard-rows", "16", "--batch-rows", "16", "--buffer-mb", "1",
            "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", HELD, str(tmp_path), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "first").exists():  # the first shard is durable
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.02)
        proc.send_signal(signum)
    finally:
        (tmp_path / "sent").touch()
        _, err = proc.communicate(timeout=240)
    lines = err.strip().splitlines()
    info = lut.read_info(out)
    written = info["shards_written"]
    assert proc.returncode == status and len(lines) == 1, err[-3000:]
    assert lines[0] == f"mole-jax: stopped after shard {written} of 64, rerun the same command to resume"
    assert 1 <= written < 64 and not info["complete"]
    arrays = lut.table_arrays(schemes.make_layout("float16", CFG), checksum=True)
    done = lut.stored_shards(lut.open_kvstore(lut.kvstore_spec(out)), arrays)
    with pytest.raises(MoleError, match="incomplete"):
        lut.open_lut(out)

    computed = []
    write_shard = lut_writer.TableWriter.write_shard
    try:
        lut_writer.TableWriter.write_shard = lambda self, i, stored: computed.append(i) or write_shard(self, i, stored)
        status_rerun, _, err = run_cli(*args)  # the same command
    finally:
        lut_writer.TableWriter.write_shard = write_shard
    assert status_rerun == 0, err
    assert computed == sorted(set(range(64)) - done)  # exactly the missing shards, in order
    assert lut.open_lut(out).meta["complete"] and _files(out) == _files(reference)


# A checkpoint written by two processes, its experts sharded across them -------------------------------------------
SHARDED_SAVE = """
import sys
import jax
port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
import numpy as np
from conftest import table_config
from mole_jax import checkpoint, sharding
from mole_jax.model import init_params

cfg = table_config()
host = init_params(cfg, seed=23)
shardings = sharding.param_shardings(cfg, sharding.make_mesh())  # the experts split over 4 devices, 2 processes
params = jax.tree.map(lambda a, s: jax.make_array_from_callback(a.shape, s, lambda idx: np.asarray(a)[idx]), host,
                      shardings)
assert params["blocks"][0]["experts"]["w_up_NxDxF"].sharding.spec != jax.sharding.PartitionSpec()
mngr = checkpoint.manager(out + "/checkpoints", async_save=False)
checkpoint.save(mngr, 3, params, checkpoint.step_meta(cfg, 3))
mngr.close()
"""


def test_a_checkpoint_written_by_two_processes_converts_layer_by_layer(tmp_path):
    """Each process wrote its own shards of every expert (ocdbt.process_0/1); read a layer at a time by one
    process, the table equals that of the same parameters saved by one process, byte for byte."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(2), "PYTHONPATH": str(ROOT / "tests")}
    procs = [subprocess.Popen([sys.executable, "-c", SHARDED_SAVE, str(port), str(i), str(tmp_path / "sharded")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert (tmp_path / "sharded" / "checkpoints" / "3" / "params" / "ocdbt.process_1").is_dir()
    single = _save(tmp_path / "single", CFG, init_params(CFG, seed=23))
    kw = dict(shard_rows=16, batch_rows=4, progress=False)
    a = convert_to_lut(tmp_path / "sharded", tmp_path / "lut-sharded", "nf4", **kw)
    b = convert_to_lut(single, tmp_path / "lut-single", "nf4", **kw)
    assert _files(a) == _files(b) and lut.open_lut(a).fingerprint == lut.fingerprint(init_params(CFG, seed=23))
