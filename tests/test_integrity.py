"""Table integrity: a table that opens is whole and right, whatever happened to it. A missing shard file, a
flipped byte (rows, indexes, checksums; read through Tensorstore or memory-mapped), shards not laid out raw and
in order, an all-zero expert, a resume with other settings, a replaced scheme, an old format and its upgrade
(`lut upgrade`, killed at any point), a full disk, read-only storage and a second converter on the same
directory."""

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import crc32c
import numpy as np
import pytest
import tensorstore as ts

import reference
from conftest import run_cli, table_config
from mole_jax import checkpoint, convert, hf, lut, lut_writer, schemes
from mole_jax.config import MoleError
from mole_jax.convert import convert_to_lut, verify_lut
from mole_jax.model import init_params

ROOT = Path(__file__).resolve().parents[1]
CFG = table_config()  # V 97, L 2, N 32, d 16; shards of 16 rows (whole pages): 7 shards, the last of 1 row
KW = dict(shard_rows=16, batch_rows=4, progress=False)
ROW = 2 * 32 * 16 * 2  # bytes of a float16 row


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


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["first row", "last row"])
def test_a_flipped_byte_raises_naming_its_shard(ckpt, reference_table, tmp_path, where):
    out = _copy(reference_table, tmp_path / "copy")
    row = 32 if where == "first row" else 47
    _flip(out / "payload" / "c" / "2" / "0" / "0" / "0", (row - 32) * ROW + 5)  # the rows are the file's first bytes
    table = lut.open_lut(out)  # the shard set is whole: it opens
    np.testing.assert_array_equal(table.rows([0, 96]), lut.open_lut(reference_table).rows([0, 96]))
    named = rf"shard 2 \(payload/c/2/0/0/0, rows 32\.\.47\): row {row} does not match its checksum"
    for read in (lambda: table.rows(np.arange(32, 48)), lambda: table.rows([row]), table.read_all_stored,
                 table.mapped_stored, lambda: lut.open_lut(out, cache_bytes=0).read_stored([96, row, 3])):
        with pytest.raises(MoleError, match=named) as e:
            read()
        assert "\n" not in str(e.value)
    mapped = table.mapped_stored(verify=False)  # the structure is right: only the row checksums catch it
    assert mapped["payload"][row].tobytes() != lut.open_lut(reference_table).read_stored([row])["payload"].tobytes()
    status, text, _ = run_cli("lut", "verify", out, ckpt, "--full", "--no-progress")
    assert status == 1, text
    bad = [line for line in text.splitlines() if line.startswith("bad ")]
    assert len(bad) == 1 and bad[0].startswith(f"bad {named.replace(chr(92), '')}"), text


@pytest.mark.parametrize("damage", ["shard index", "checksums", "truncated", "rows out of order"])
def test_damage_outside_the_rows_is_refused_naming_its_shard(ckpt, reference_table, tmp_path, damage):
    out = _copy(reference_table, tmp_path / "copy")
    shard = out / "payload" / "c" / "4" / "0" / "0" / "0"
    index = 16 * 16 + 4
    if damage == "shard index":
        _flip(shard, shard.stat().st_size - index + 3)
        msg = r"shard 4 \(payload/c/4/0/0/0, rows 64\.\.79\): .*"
    elif damage == "checksums":
        _flip(out / "checksums" / "c" / "4" / "0", 9)
        msg = r"shard 4 \(checksums/c/4/0, rows 64\.\.79\): .*"
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[ROW:])  # the first row lost: the index no longer fits the file
        msg = r"shard 4 \(payload/c/4/0/0/0, rows 64\.\.79\): .*"
    else:  # rows 0 and 1 of the shard swapped, the index saying so (with its checksum): Tensorstore reads it
        data = shard.read_bytes()  # right, but it cannot be mapped
        rows, tail = data[:-index], data[-index:]
        entries = np.frombuffer(tail[:-4], "<u8").reshape(16, 2).copy()
        entries[[0, 1], 0] = entries[[1, 0], 0]
        body = entries.astype("<u8").tobytes()
        shard.write_bytes(rows[ROW:2 * ROW] + rows[:ROW] + rows[2 * ROW:] + body +
                          crc32c.crc32c(body).to_bytes(4, "little"))
        msg = r"shard 4 \(payload/c/4/0/0/0, rows 64\.\.79\): its index puts row 0 at \(offset 2048, 2048 bytes\)"
        np.testing.assert_array_equal(lut.open_lut(out).rows(np.arange(97)),
                                      lut.open_lut(reference_table).rows(np.arange(97)))
    table = lut.open_lut(out)
    if damage != "rows out of order":
        with pytest.raises(MoleError, match=msg):
            table.rows([70])
        with pytest.raises(MoleError, match=msg):
            table.read_all_stored()
    np.testing.assert_array_equal(table.rows([3, 96]), lut.open_lut(reference_table).rows([3, 96]))
    for verify in ([True, False] if damage != "checksums" else [True]):
        with pytest.raises(MoleError, match=msg):
            table.mapped_stored(verify=verify)
    status, text, _ = run_cli("lut", "verify", out, "--no-progress")
    bad = [line for line in text.splitlines() if line.startswith("bad ")]
    assert status == 1 and len(bad) == 1 and "shard 4 (" in bad[0], text


def test_a_missing_shard_is_refused_by_the_mapped_path_too(reference_table, tmp_path):
    out = _copy(reference_table, tmp_path / "copy")
    (out / "checksums" / "c" / "5" / "0").unlink()
    with pytest.raises(MoleError, match=r"shard file checksums/c/5/0 is missing"):
        lut.open_lut(out)
    table = lut.open_lut(out, allow_missing=True)
    with pytest.raises(MoleError, match=r"is not whole: shard file checksums/c/5/0 is missing"):
        table.mapped_stored(verify=False)
    (out / "payload" / "c" / "6" / "0" / "0" / "0").unlink()
    with pytest.raises(MoleError, match=r"shard file checksums/c/5/0 is missing"):
        table.mapped_stored()


def test_verify_recomputes_rows_per_shard(ckpt, reference_table):
    report = verify_lut(reference_table, ckpt, rows=3, seed=5)
    assert report["ok"] and report["problems"] == [] and report["checksum"] is True
    assert report["rows"] == 6 * 3 + 1  # 3 rows in each full shard, the last shard's one row
    full = verify_lut(reference_table, ckpt, full=True)
    assert full["ok"] and full["rows"] == 97 and 0 < full["max_error_over_allowed"] <= 1.0
    assert verify_lut(reference_table)["rows"] == 0  # without a checkpoint: presence and checksums only


def test_verify_reads_the_checkpoint_layer_by_layer(ckpt, reference_table, monkeypatch):
    """The fingerprint is one pass over the layers (convert.fingerprint_checkpoint), the recomputed rows one pass
    per buffer of rows (here one shard each): never every layer at once, and the same report as one pass."""
    one_pass = verify_lut(reference_table, ckpt, full=True, seed=0)
    reads = []
    real_layer = convert.CheckpointLayers.layer
    monkeypatch.setattr(convert.CheckpointLayers, "layer", lambda self, l: reads.append(l) or real_layer(self, l))
    monkeypatch.setattr(convert, "restore_table_inputs", None)  # every layer at once: not used
    per_shard = verify_lut(reference_table, ckpt, full=True, seed=0, buffer_bytes=1)
    assert reads == list(range(CFG.num_layers)) * (1 + 7)  # the fingerprint's pass, then one pass per shard
    assert per_shard == one_pass


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
    mapped = table.mapped_stored()  # all-zero rows are stored, checksummed and mapped like any other
    for name, a in table.read_all_stored().items():
        np.testing.assert_array_equal(mapped[name].view(np.uint8), a.view(np.uint8))
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


# Format version 2 and its upgrade --------------------------------------------------------------------------------
V2_ROW_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


def _as_version_2(table: Path, shard_rows: int | None = None) -> Path:
    """Rewrite a table in format version 2's layout, as its writer did: a crc32c after every row inside the
    shards (zarr3 `crc32c` codec), no `checksums` array, lut.json of version 2; optionally with other shard_rows."""
    t = lut.open_lut(table)
    stored = t.read_all_stored()
    S = shard_rows or t.shard_rows
    for name, (shape, dt) in t.layout.arrays.items():
        metadata = lut.array_metadata(t.shape[0], shape, dt, S)
        metadata["codecs"][0]["configuration"]["codecs"] = V2_ROW_CODECS
        a = ts.open({**lut.array_spec(lut.kvstore_spec(table), name), "metadata": metadata}, create=True,
                    delete_existing=True).result()
        a.write(stored[name]).result()  # each shard whole, once
    shutil.rmtree(table / lut.CHECKSUMS)
    meta = json.loads((table / "lut.json").read_text())
    (table / "lut.json").write_text(json.dumps({**meta, "format_version": 2, "shard_rows": S}))
    return table


def _meta(table: Path) -> dict:
    return json.loads((table / "lut.json").read_text())


@pytest.fixture(scope="module")
def version_2_table(reference_table, tmp_path_factory):
    return _as_version_2(_copy(reference_table, tmp_path_factory.mktemp("v2") / "lut"))


def test_a_table_of_format_version_2_is_refused_then_upgraded_bit_for_bit(ckpt, reference_table, version_2_table,
                                                                            tmp_path):
    out = _copy(version_2_table, tmp_path / "lut")
    assert (out / "payload" / "c" / "0" / "0" / "0" / "0").stat().st_size == 16 * (ROW + 4) + 16 * 16 + 4
    for call in (lambda: lut.open_lut(out), lambda: lut.read_info(out)):
        with pytest.raises(MoleError) as e:
            call()
        assert str(e.value) == (f"table {out} has format version 2; this mole-jax reads version 3: upgrade it "
                                f"with `mole-jax lut upgrade {out}` (or reconvert it)")
    with pytest.raises(MoleError, match=r"format version 2; pass overwrite=True .* \(or upgrade it: `mole-jax lut "
                                        r"upgrade"):
        convert_to_lut(ckpt, out, "float16", **KW)

    status, text, err = run_cli("lut", "upgrade", out, "--no-progress")
    assert status == 0, err
    assert text.strip() == (f"upgraded {out} to format version 3: 7 shards, 16 rows each, every row checked, "
                            f"fingerprint {_meta(reference_table)['fingerprint'][:16]}")
    assert _files(out) == _files(reference_table)  # the same files as a version 3 conversion, byte for byte
    old, new = _meta(version_2_table), _meta(out)
    assert new["upgraded"]["from_format_version"] == 2 and new["format_version"] == 3
    assert {k: v for k, v in new.items() if k not in ("upgraded", "format_version")} == \
        {k: v for k, v in old.items() if k != "format_version"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lut"]  # nothing left beside it
    assert verify_lut(out, ckpt, rows=2)["ok"]
    status, text, _ = run_cli("lut", "upgrade", out, "--no-progress")
    assert status == 0 and text.strip() == f"{out} is already format version 3: nothing to do"


def test_upgrade_with_shard_rows_that_cannot_be_mapped(reference_table, tmp_path):
    out = _as_version_2(_copy(reference_table, tmp_path / "lut"), shard_rows=3)  # 6 KiB shards: not whole pages
    report = lut_writer.upgrade_table(out)
    assert report["status"] == "upgraded" and report["from_shard_rows"] == 3 and report["shard_rows"] == 97
    table = lut.open_lut(out)
    assert table.meta["upgraded"]["from_shard_rows"] == 3 and table.num_shards == 1
    want = lut.open_lut(reference_table).read_all_stored()
    for name, a in table.mapped_stored().items():
        np.testing.assert_array_equal(a.view(np.uint8), want[name].view(np.uint8))


KILLED_UPGRADE = """
import os, signal, sys
from mole_jax import cli, lut_writer

write_shard = lut_writer.TableWriter.write_shard
def write_and_die(self, i, stored):
    futures = write_shard(self, i, stored)
    if i == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)  # with this shard's write in flight
    return futures
lut_writer.TableWriter.write_shard = write_and_die
sys.exit(cli.main(["lut", "upgrade", sys.argv[1], "--no-progress"]))
"""


def test_an_upgrade_killed_while_writing_resumes(reference_table, version_2_table, tmp_path):
    out = _copy(version_2_table, tmp_path / "lut")
    before = _files(out)
    r = subprocess.run([sys.executable, "-c", KILLED_UPGRADE, str(out), "3"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == -9, r.stderr[-3000:]
    assert _files(out) == before and _meta(out)["format_version"] == 2  # the old table is untouched
    staging = tmp_path / "lut.v3-upgrade"
    written = lut.read_info(staging)["shards_written"]
    assert not lut.read_info(staging)["complete"] and written < 7
    calls = []
    write_shard = lut_writer.TableWriter.write_shard
    try:
        lut_writer.TableWriter.write_shard = lambda self, i, stored: calls.append(i) or write_shard(self, i, stored)
        assert lut_writer.upgrade_table(out)["status"] == "upgraded"
    finally:
        lut_writer.TableWriter.write_shard = write_shard
    assert len(calls) == 7 - written  # only the shards missing
    assert _files(out) == _files(reference_table) and sorted(p.name for p in tmp_path.iterdir()) == ["lut"]


class _Killed(BaseException):
    """Stands for a kill -9 at this point: nothing after it runs (the kernel releases the locks either way)."""


@pytest.mark.parametrize("when", ["after the exchange", "between two renames", "while deleting the old table"])
def test_an_upgrade_interrupted_while_swapping_is_finished_by_a_rerun(reference_table, version_2_table, tmp_path,
                                                                      monkeypatch, when):
    out = _copy(version_2_table, tmp_path / "lut")
    rename, rmtree = lut_writer.os.rename, lut_writer.shutil.rmtree
    if when == "after the exchange":  # the new table in place, the old one in LUT.v3-upgrade
        monkeypatch.setattr(lut_writer.os, "rename", lambda *a: (_ for _ in ()).throw(_Killed()))
    elif when == "between two renames":  # a filesystem without exchange: the old table moved aside, no table yet
        monkeypatch.setattr(lut_writer, "_exchange", lambda a, b: False)
        done = []
        monkeypatch.setattr(lut_writer.os, "rename", lambda a, b: done.append(rename(a, b)) if not done else
                            (_ for _ in ()).throw(_Killed()))
    else:  # part of the old table deleted
        def partly(path):
            (Path(path) / "lut.json").unlink()
            raise _Killed()
        monkeypatch.setattr(lut_writer.shutil, "rmtree", partly)
    with pytest.raises(_Killed):
        lut_writer.upgrade_table(out)
    monkeypatch.setattr(lut_writer.os, "rename", rename)
    monkeypatch.setattr(lut_writer.shutil, "rmtree", rmtree)
    if when == "between two renames":
        assert not out.exists() and _meta(tmp_path / "lut.v2-retired")["format_version"] == 2
        with pytest.raises(MoleError, match="does not exist"):
            lut.open_lut(out)
    else:
        assert lut.open_lut(out).meta["format_version"] == 3  # readers already see the upgraded table
    status, text, err = run_cli("lut", "upgrade", out, "--no-progress")
    assert status == 0 and text.startswith(f"finished upgrading {out} to format version 3"), (text, err)
    assert _files(out) == _files(reference_table) and sorted(p.name for p in tmp_path.iterdir()) == ["lut"]


def test_upgrade_refuses_what_it_cannot_upgrade(reference_table, version_2_table, tmp_path):
    out = _copy(version_2_table, tmp_path / "damaged")
    before = _files(out)
    (out / "payload" / "c" / "2" / "0" / "0" / "0").write_bytes(
        bytes(b ^ (i == 7) for i, b in enumerate((out / "payload" / "c" / "2" / "0" / "0" / "0").read_bytes())))
    status, _, err = run_cli("lut", "upgrade", out, "--no-progress")
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert "cannot upgrade" in lines[0] and "shard 2 (payload/c/2/0/0/0, rows 32..47)" in lines[0], lines[0]
    assert _meta(out)["format_version"] == 2 and _files(out) != before  # left as it was (damaged)
    incomplete = _copy(version_2_table, tmp_path / "incomplete")
    (incomplete / "lut.json").write_text(json.dumps({**_meta(incomplete), "complete": False}))
    (incomplete / "payload" / "c" / "3" / "0" / "0" / "0").unlink()
    old = _copy(version_2_table, tmp_path / "old")
    (old / "lut.json").write_text(json.dumps({**_meta(old), "format_version": 1}))
    missing = _copy(version_2_table, tmp_path / "missing")
    (missing / "payload" / "c" / "3" / "0" / "0" / "0").unlink()
    for where, msg in [(incomplete, "incomplete table of format version 2"),
                       (missing, r"shard file payload/c/3/0/0/0 is missing"),
                       (tmp_path / "nothing", "does not exist"), ("memory://x/", "local directories"),
                       (tmp_path, "is not a mole-jax lookup table"), (old, "format version 1: `lut upgrade` "
                                                                              "upgrades tables of version 2")]:
        with pytest.raises(MoleError, match=msg):
            lut_writer.upgrade_table(where)


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
mapped = table.mapped_stored()["payload"]
assert mapped[50].tobytes() == table.read_stored([50])["payload"].tobytes()
sys.stdout.buffer.write(table.rows(np.array([3, 50, 96])).tobytes())
"""


def test_a_read_only_table_opens_and_serves(reference_table):
    """Files 0444 and directories 0555 (as root, read by a process that dropped to `nobody`, since root ignores
    file modes): the table opens and serves rows (through Tensorstore and mapped), and nothing tries to write or
    lock."""
    where = Path(tempfile.mkdtemp())  # under /tmp, which `nobody` can reach (pytest's own tmp_path is 0700)
    out = _copy(reference_table, where / "ro")
    try:
        for p in [where, *sorted(out.rglob("*"), reverse=True), out]:  # files before their directories
            p.chmod(0o555 if p.is_dir() else 0o444)
        r = subprocess.run([sys.executable, "-c", READ_ONLY, str(out)], capture_output=True, cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-3000:]
        served = np.frombuffer(r.stdout, np.float32).reshape(3, 2, 32, 16)
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
        deadline = time.monotonic() + 600  # never left waiting if the test that lets it go has died
        while not (signals / "go").exists():
            if time.monotonic() > deadline:
                sys.exit("never let go")
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
