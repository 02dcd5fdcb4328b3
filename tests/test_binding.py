"""The checkpoint-to-table binding: `load(ckpt, lut=...)` trusts the table when it records that it was converted
from exactly the checkpoint's parameter files (same paths, sizes and mtimes: no expert is read), else computes the
checkpoint's fingerprint from its experts and compares. A checkpoint changed after conversion (re-saved with one
expert weight changed, or one byte edited in place) is refused; a copy (new mtimes, same bytes) loads. Nothing is
ever written into the checkpoint, an input that may be read-only or shared."""

import os
import shutil
import stat
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import prime_config
from mole_jax import checkpoint, convert, lut
from mole_jax.config import MoleError
from mole_jax.convert import convert_to_lut
from mole_jax.decode import load
from mole_jax.model import init_params

REFUSED = "was built from another checkpoint"
TABLE_INPUTS = ("experts", "norm_expert")  # what only the table's check reads (besides the embedding)
IDS = np.array([[3, 41, 96, 0, 7]])


def _save(root, cfg, params):
    mngr = checkpoint.manager(root, async_save=False)
    checkpoint.save(mngr, 0, params, checkpoint.step_meta(cfg, 0))
    mngr.close()
    return root / "0"


def _age(step_dir, hours=1.0):
    """Date every file of a step back: a checkpoint written an hour ago (a table records the signature of files
    old enough for their mtimes to tell a later change: checkpoint.RACY_NS)."""
    then = time.time_ns() - int(hours * 3600e9)
    for f in step_dir.rglob("*"):
        os.utime(f, ns=(then, then))


def _snapshot(root):
    """Every path under root (root included) with its kind, size, mtime and mode: what a write would change."""
    return sorted((str(p.relative_to(root)), p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode)
                  for p in [root, *root.rglob("*")])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A MoLE training-form checkpoint written an hour ago, its parameters and a float32 table converted from it
    (which records the checkpoint's parameter files)."""
    root = tmp_path_factory.mktemp("binding")
    cfg = prime_config("mole")
    params = jax.tree.map(np.asarray, init_params(cfg, seed=5))
    step = _save(root / "ckpt", cfg, params)
    _age(step)
    convert_to_lut(step, root / "lut", dtype="float32", progress=False)
    return cfg, params, step, root / "lut"


@pytest.fixture
def ckpt(source, tmp_path):
    """A copy of the source checkpoint with its mtimes: the files the table records it was converted from."""
    step = tmp_path / "ckpt" / "0"
    shutil.copytree(source[2], step)  # copy2: the same mtimes
    assert lut.open_lut(source[3]).meta["source"]["params_files"] == checkpoint.params_signature(step)
    return step


@pytest.fixture
def restored(monkeypatch):
    """The leaf paths of every tree a checkpoint restore asks Orbax for (what is read from disk), call by call."""
    calls = []
    real = ocp.Checkpointer.restore  # PyTreeCheckpointer's too, and the per-process one a layer read uses

    def spy(self, directory, *args, **kwargs):
        leaves, _ = jax.tree_util.tree_flatten_with_path(kwargs["args"].item)
        calls.append([jax.tree_util.keystr(path) for path, _ in leaves])
        return real(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.Checkpointer, "restore", spy)
    return calls


def _reads_table_inputs(paths) -> bool:
    return any(name in p for p in paths for name in TABLE_INPUTS)


def _assert_read_layer_by_layer(calls, cfg):
    """The table inputs were read for the fingerprint, the embedding then one layer at a time, before the
    inference form (which has no expert)."""
    assert len(calls) == 1 + cfg.num_layers + 1, [len(c) for c in calls]
    assert calls[0] == ["['embed_VxD']"]
    for l, paths in enumerate(calls[1:-1]):
        assert paths and all(p.startswith(f"['blocks'][{l}]") for p in paths) and _reads_table_inputs(paths)
    assert not _reads_table_inputs(calls[-1]) and "['embed_VxD']" in calls[-1]


def test_load_reads_no_expert_when_the_table_records_the_checkpoints_files(source, ckpt, restored):
    before = _snapshot(ckpt.parent)
    model = load(ckpt, lut=source[3])
    assert len(restored) == 1 and not _reads_table_inputs(restored[0])  # only the inference form is read
    assert "['embed_VxD']" in restored[0] and any("attn" in p for p in restored[0])
    assert model.table is not None and _snapshot(ckpt.parent) == before
    reference = load(source[2])  # the training form, its experts computed on the device
    np.testing.assert_allclose(model.logits(IDS), reference.logits(IDS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_copied_checkpoint_loads_after_reading_the_experts_and_writes_nothing(source, tmp_path, restored,
                                                                              read_only):
    cfg, _, step, lut_dir = source
    copy = tmp_path / "copy" / "0"
    shutil.copytree(step, copy, copy_function=shutil.copyfile)  # the same bytes, new mtimes
    assert checkpoint.params_signature(copy) != checkpoint.params_signature(step)
    if read_only:
        for p in [copy.parent, copy, *copy.rglob("*")]:
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = _snapshot(copy.parent)
    try:
        model = load(copy, lut=lut_dir)
        _assert_read_layer_by_layer(restored, cfg)  # checked against the experts, layer by layer
        assert _snapshot(copy.parent) == before  # nothing written, created or touched in the input
        restored.clear()
        again = load(copy, lut=lut_dir)  # nothing was recorded: the experts are read again, and again nothing written
        _assert_read_layer_by_layer(restored, cfg)
        assert _snapshot(copy.parent) == before
    finally:
        for p in [copy.parent, copy, *copy.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    np.testing.assert_array_equal(again.logits(IDS), model.logits(IDS))
    np.testing.assert_array_equal(model.logits(IDS), load(step, lut=lut_dir).logits(IDS))


def test_resaved_checkpoint_with_one_expert_weight_changed_is_refused(source, ckpt, restored):
    cfg, params, _, lut_dir = source
    edited = jax.tree.map(np.copy, params)
    edited["blocks"][1]["experts"]["w_down_NxFxD"][2, 5, 7] += 0.25
    # saved through the project's API, then put in place of the old parameters, dated back as the old ones were
    new_step = _save(ckpt.parent.parent / "resaved", cfg, edited)
    shutil.rmtree(ckpt / "params")
    shutil.move(new_step / "params", ckpt / "params")
    _age(ckpt)
    before = _snapshot(ckpt.parent)
    with pytest.raises(MoleError, match=REFUSED) as e:
        load(ckpt, lut=lut_dir)
    assert "\n" not in str(e.value)
    assert any(_reads_table_inputs(c) for c in restored)  # computed from the experts
    assert not any("attn" in p for c in restored for p in c)  # refused before the model's other weights were read
    assert convert.fingerprint_checkpoint(ckpt, cfg)[0] == lut.fingerprint(edited) != lut.fingerprint(params)
    assert _snapshot(ckpt.parent) == before


def _changed_leaves(step, cfg, params) -> dict[str, int]:
    """How many elements of each table input differ from `params` in the checkpoint; {"": -1}: unreadable."""
    try:
        _, got = checkpoint.restore_params(step, cfg=cfg, as_numpy=True, select=lut.table_inputs)
    except MoleError:
        return {"": -1}
    want = lut.table_inputs(params)
    return {jax.tree_util.keystr(path): int((a != b).sum()) for (path, a), b in
            zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)) if (a != b).any()}


def _write_byte(path, at: int, value: int) -> None:
    with open(path, "r+b") as f:  # in place: the file keeps its size
        f.seek(at)
        f.write(bytes([value]))


def _flip_one_expert_weight(step, cfg, params) -> str:
    """Flip one bit of the checkpoint's largest data file in place (the same size) where that changes exactly one
    expert weight. Orbax's zstd codes float bytes nearly one for one, so most bytes do: the first such offset from
    the file's middle on. Returns the weight's array."""
    data_file = max((f for f in (step / "params").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    blob = data_file.read_bytes()
    for at in range(len(blob) // 2, len(blob), 97):
        _write_byte(data_file, at, blob[at] ^ 1)
        changed = _changed_leaves(step, cfg, params)
        if len(changed) == 1 and "experts" in next(iter(changed)) and list(changed.values()) == [1]:
            return next(iter(changed))
        _write_byte(data_file, at, blob[at])  # put back: it did something else
    raise AssertionError("no single-bit edit of the checkpoint's data changes exactly one expert weight")


def test_byte_edited_in_place_is_refused(source, ckpt):
    cfg, params, _, lut_dir = source
    sizes = {p: s for p, (s, _) in checkpoint.params_signature(ckpt).items()}
    assert "['experts']" in _flip_one_expert_weight(ckpt, cfg, params)
    signature = checkpoint.params_signature(ckpt)
    assert {p: s for p, (s, _) in signature.items()} == sizes  # the same files and sizes: the mtime tells
    assert signature != lut.open_lut(lut_dir).meta["source"]["params_files"]
    before = _snapshot(ckpt.parent)
    with pytest.raises(MoleError, match=REFUSED) as e:
        load(ckpt, lut=lut_dir)
    assert "\n" not in str(e.value) and _snapshot(ckpt.parent) == before


def test_fresh_or_changing_checkpoints_are_not_recorded_in_the_table(source, tmp_path, monkeypatch, restored):
    """A table records only a signature that a later change cannot hide: not of files written within
    checkpoint.RACY_NS (a change in the same timestamp tick keeps the mtime), nor of files that changed while
    the experts were read. Without one, loading checks the experts (and still accepts the right checkpoint)."""
    cfg, _, step, _ = source
    fresh = tmp_path / "fresh" / "0"
    shutil.copytree(step, fresh, copy_function=shutil.copyfile)  # files written now
    table = lut.open_lut(convert_to_lut(fresh, tmp_path / "lut", dtype="float32", progress=False))
    assert "params_files" not in table.meta["source"]
    restored.clear()
    assert load(fresh, lut=table).table is not None
    _assert_read_layer_by_layer(restored, cfg)

    _age(fresh)
    fp, signature = convert.fingerprint_checkpoint(fresh, cfg)
    assert fp == table.fingerprint and signature == checkpoint.params_signature(fresh)  # old enough: recordable
    real = checkpoint.params_signature
    calls = []

    def touched_while_read(path):  # a file's mtime changes between the signature before and after the read
        calls.append(path)
        signature = real(path)
        if len(calls) > 1:
            signature = {**signature, next(iter(signature)): [0, 0]}
        return signature

    monkeypatch.setattr(checkpoint, "params_signature", touched_while_read)
    assert convert.fingerprint_checkpoint(fresh, cfg) == (fp, None)
