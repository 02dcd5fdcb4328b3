"""Table integrity (issue 11): a table that opens is whole and right, whatever happened to it. A missing shard
file, a flipped byte, an all-zero expert, a resume with other settings, a replaced scheme, an old format, a full
disk, read-only storage and a second converter on the same directory."""

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import reference
from conftest import prime_config, run_cli
from mole_jax import checkpoint, hf, lut, schemes
from mole_jax.config import MoleError
from mole_jax.convert import convert_to_lut, verify_lut
from mole_jax.model import init_params

ROOT = Path(__file__).resolve().parents[1]
CFG = prime_config("mole", d_model=24)  # V 97, L 3, N 5; shards of 16 rows: 7 shards, the last of 1 row
KW = dict(shard_rows=16, batch_rows=4, progress=False)


def _save(path: Path, params) -> Path:
    mngr = checkpoint.manager(path / checkpoint.CHECKPOINTS, async_save=False)
    checkpoint.save(mngr, 1, params, checkpoint.step_meta(CFG, 1))
    mngr.close()
    return path


def _files(lut_dir: Path) -> dict[str, bytes]:
    """The stored arrays' files by relative path (not lut.json, not the converter's lock): what bit-identity means."""
    return {str(p.relative_to(lut_dir)): p.read_bytes() for p in sorted(lut_dir.rglob("*"))
            if p.is_file() and p.name not in ("lut.json", "lut.lock")}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("integrity") / "run", init_params(CFG, seed=11))


@pytest.fixture(scope="module")
def reference_table(ckpt, tmp_path_factory):
    """An uninterrupted float16 conversion: what every other conversion here must equal bit for bit."""
    return convert_to_lut(ckpt, tmp_path_factory.mktemp("reference") / "lut", "float16", **KW)


def _copy(table: Path, to: Path) -> Path:
    shutil.copytree(table, to)
    return to


# A missing shard file, a flipped byte ----------------------------------------------------------------------------
def test_a_missing_shard_file_is_refused_and_named(ckpt, reference_table, tmp_path):
    out = _copy(reference_table, tmp_path / "copy")
    status, text, _ = run_cli("lut", "verify", out, ckpt, "--rows", "2", "--no-progress")
    assert status == 0 and text.strip().endswith(": ok") and "7 shards present" in text, text
    (out / "payload" / "c" / "3" / "0" / "0" / "0").unlink()  # an interrupted copy
    with pytest.raises(MoleError, match=r"shard file payload/c/3/0/0/0 is missing"):
        lut.open_lut(out)
    assert lut.read_info(out)["shards_written"] == 6  # `lut info` still describes it
    status, text, _ = run_cli("lut", "verify", out, "--no-progress")
    assert status == 1, text
    bad = [line for line in text.splitlines() if line.startswith("bad ")]
    assert len(bad) == 1 and "shard 3 (payload/c/3/0/0/0, rows 48..63): missing" in bad[0], text


def test_a_flipped_byte_raises_naming_its_shard(ckpt, reference_table, tmp_path):
    out = _copy(reference_table, tmp_path / "copy")
    shard = out / "payload" / "c" / "2" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[5] ^= 0x10  # inside the first stored row (rows come first, the index last)
    shard.write_bytes(bytes(data))
    table = lut.open_lut(out)  # the shard set is whole: it opens
    np.testing.assert_array_equal(table.rows([0, 96]), lut.open_lut(reference_table).rows([0, 96]))
    with pytest.raises(MoleError, match=r"shard 2 \(payload/c/2/0/0/0, rows 32\.\.47\)"):
        table.rows(np.arange(32, 48))
    with pytest.raises(MoleError, match=r"shard 2 "):
        table.read_all_stored()
    status, text, _ = run_cli("lut", "verify", out, ckpt, "--full", "--no-progress")
    assert status == 1, text
    bad = [line for line in text.splitlines() if line.startswith("bad ")]
    assert len(bad) == 1 and bad[0].startswith("bad shard 2 (payload/c/2/0/0/0, rows 32..47)"), text


def test_verify_recomputes_rows_per_shard(ckpt, reference_table):
    report = verify_lut(reference_table, ckpt, rows=3, seed=5)
    assert report["ok"] and report["problems"] == [] and report["checksum"] is True
    assert report["rows"] == 6 * 3 + 1  # 3 rows in each full shard, the last shard's one row
    full = verify_lut(reference_table, ckpt, full=True)
    assert full["ok"] and full["rows"] == 97 and 0 < full["max_error_over_allowed"] <= 1.0
    assert verify_lut(reference_table)["rows"] == 0  # without a checkpoint: presence and checksums only


# All-zero rows ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zeroed", ["first expert", "every expert"])
def test_zero_experts_convert_to_a_complete_table(tmp_path, zeroed):
    """zarr3 drops chunks equal to the fill value unless told to store them: a zero expert must not leave a
    table that never completes (every expert zero: every row, hence every chunk, is zeros)."""
    params = init_params(CFG, seed=12)
    for block in params["blocks"].values():
        w = block["experts"]["w_down_NxFxD"]
        block["experts"]["w_down_NxFxD"] = w.at[0].set(0.0) if zeroed == "first expert" else w * 0
    ckpt = _save(tmp_path / "run", params)
    table = lut.open_lut(convert_to_lut(ckpt, tmp_path / "lut", "int8", **KW))
    assert lut.read_info(tmp_path / "lut")["shards_written"] == 7
    rows = table.rows(np.arange(97))
    ref = reference.lut_table(hf.config_to_hf(CFG), hf.params_to_hf(CFG, params))
    bound = schemes.error_bound(ref, "int8", 24) + 1e-6 * np.abs(ref).max()
    assert np.all(rows[:, :, 0] == 0) and np.all(np.abs(rows - ref) <= bound)
    if zeroed == "every expert":
        assert not rows.any()
    assert verify_lut(tmp_path / "lut", ckpt, full=True)["ok"]


# Resume safety ---------------------------------------------------------------------------------------------------
def _interrupted(table: Path, **changes) -> None:
    meta = json.loads((table / "lut.json").read_text())
    (table / "lut.json").write_text(json.dumps({**meta, "complete": False, **changes}))


def test_a_resume_with_other_settings_is_refused_in_one_line(ckpt, reference_table, tmp_path):
    out = _copy(reference_table, tmp_path / "copy")
    _interrupted(out)
    base = ["convert", ckpt, out, "--dtype", "float16", "--shard-rows", "16", "--no-progress"]
    for extra, setting in [(["--batch-rows", "8"], "batch_rows 4 (this run: 8)"),
                           (["--batch-rows", "4", "--dtype", "bfloat16"], "scheme 'float16' (this run: 'bfloat16')")]:
        status, _, err = run_cli(*base, *extra)
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1, err
        assert setting in lines[0] and "--overwrite" in lines[0], lines[0]
    meta = json.loads((out / "lut.json").read_text())
    _interrupted(out, producer={**meta["producer"], "jax": "0.0.1"})  # converted by another jax
    with pytest.raises(MoleError, match=r"with jax '0\.0\.1' \(this run: "):
        convert_to_lut(ckpt, out, "float16", **KW)
    _interrupted(out, producer=meta["producer"])
    convert_to_lut(ckpt, out, "float16", **KW)  # the same settings: resumed and completed
    assert _files(out) == _files(reference_table)


def test_overwrite_leaves_no_array_of_the_old_table(ckpt, reference_table, tmp_path):
    out = tmp_path / "lut"
    convert_to_lut(ckpt, out, "nf4", shard_rows=16, progress=False)
    assert (out / "scales" / "zarr.json").is_file()
    convert_to_lut(ckpt, out, "float16", overwrite=True, **KW)
    assert not [p for p in (out / "scales").rglob("*") if p.is_file()]  # at most an empty directory
    assert _files(out) == _files(reference_table)


def test_a_table_of_format_version_1_is_refused_with_how_to_reconvert(ckpt, reference_table, tmp_path):
    out = _copy(reference_table, tmp_path / "old")
    meta = json.loads((out / "lut.json").read_text())
    (out / "lut.json").write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(MoleError, match="format version 1, which has no checksums.*reconvert it"):
        lut.open_lut(out)
    with pytest.raises(MoleError, match="format version 1; pass overwrite"):
        convert_to_lut(ckpt, out, "float16", **KW)
    convert_to_lut(ckpt, out, "float16", overwrite=True, **KW)
    assert _files(out) == _files(reference_table)


# Faults ----------------------------------------------------------------------------------------------------------
FULL_DISK = """
import resource, signal, sys
from mole_jax import cli, lut_writer

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that a write beyond the limit fails with EFBIG
write_shard = lut_writer.TableWriter.write_shard
def fill_the_disk(self, i, stored):
    if i == 3:  # from the fourth shard on, no file may grow past 1 KiB: the disk is full
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
    return write_shard(self, i, stored)
lut_writer.TableWriter.write_shard = fill_the_disk
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_full_disk_gives_one_line_and_the_rerun_is_bit_identical(ckpt, reference_table, tmp_path):
    out = tmp_path / "lut"
    args = ["convert", str(ckpt), str(out), "--dtype", "float16", "--shard-rows", "16", "--batch-rows", "4",
            "--no-progress"]
    r = subprocess.run([sys.executable, "-c", FULL_DISK, *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert "writing shard" in lines[0] and "File too large" in lines[0] and "rerun" in lines[0], lines[0]
    info = lut.read_info(out)
    assert not info["complete"] and 0 < info["shards_written"] < 7
    convert_to_lut(ckpt, out, "float16", **KW)  # space freed: the same command resumes
    assert lut.open_lut(out).meta["complete"] and _files(out) == _files(reference_table)


READ_ONLY = """
import os, sys
import numpy as np
from mole_jax import lut

if os.geteuid() == 0:  # root reads and writes through any file mode: become nobody, who may only read here
    os.setgid(65534)
    os.setuid(65534)
table = lut.open_lut(sys.argv[1])
assert table.read_all_stored()["payload"].shape[0] == 97
sys.stdout.buffer.write(table.rows(np.array([3, 50, 96])).tobytes())
"""


def test_a_read_only_table_opens_and_serves(reference_table):
    """Files 0444 and directories 0555 (as root, read by a process that dropped to `nobody`, since root ignores
    file modes): the table opens and serves rows, and nothing tries to write or lock."""
    where = Path(tempfile.mkdtemp())  # under /tmp, which `nobody` can reach (pytest's own tmp_path is 0700)
    out = _copy(reference_table, where / "ro")
    try:
        for p in [where, *sorted(out.rglob("*"), reverse=True), out]:  # files before their directories
            p.chmod(0o555 if p.is_dir() else 0o444)
        r = subprocess.run([sys.executable, "-c", READ_ONLY, str(out)], capture_output=True, cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-3000:]
        served = np.frombuffer(r.stdout, np.float32).reshape(3, 3, 5, 24)
        np.testing.assert_array_equal(served, lut.open_lut(reference_table).rows([3, 50, 96]))
    finally:
        for p in [where, out, *out.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        shutil.rmtree(where)


PAUSED = """
import sys, time
from pathlib import Path
from mole_jax import lut_writer
from mole_jax.convert import convert_to_lut

ckpt, out, signals = sys.argv[1], sys.argv[2], Path(sys.argv[3])
write_shard = lut_writer.TableWriter.write_shard
def pause(self, i, stored):
    if i == 2:  # mid-way: say so, and wait to be let go
        (signals / "ready").touch()
        while not (signals / "go").exists():
            time.sleep(0.05)
    return write_shard(self, i, stored)
lut_writer.TableWriter.write_shard = pause
convert_to_lut(ckpt, out, "float16", shard_rows=16, batch_rows=4, progress=False)
"""


def test_a_second_converter_on_the_same_directory_is_refused(ckpt, reference_table, tmp_path):
    out = tmp_path / "lut"
    first = subprocess.Popen([sys.executable, "-c", PAUSED, str(ckpt), str(out), str(tmp_path)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "ready").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.05)
        status, _, err = run_cli("convert", ckpt, out, "--shard-rows", "16", "--batch-rows", "4", "--no-progress")
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1, err
        assert f"being written by another conversion (pid {first.pid} on " in lines[0], lines[0]
    finally:
        (tmp_path / "go").touch()
        _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-3000:]
    assert _files(out) == _files(reference_table)  # the refused converter wrote nothing
    with pytest.raises(MoleError, match="already holds a complete table"):  # the lock is free again
        convert_to_lut(ckpt, out, "float16", **KW)
