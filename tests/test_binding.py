"""The checkpoint-to-table binding: `load(ckpt, lut=...)` checks the table against the fingerprint recorded beside
the checkpoint (STEP/lut_binding.json) and then reads no expert; a checkpoint changed after conversion (re-saved
with one expert weight changed, or one byte edited in place) is still refused."""

import os
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import prime_config
from mole_jax import checkpoint, lut
from mole_jax.config import MoleError
from mole_jax.convert import convert_to_lut
from mole_jax.decode import load
from mole_jax.model import init_params

REFUSED = "was built from another checkpoint"
TABLE_INPUTS = ("experts", "norm_expert")  # what only the table's check reads (besides the embedding)


def _save(root, cfg, params):
    mngr = checkpoint.manager(root, async_save=False)
    checkpoint.save(mngr, 0, params, checkpoint.step_meta(cfg, 0))
    mngr.close()
    return root / "0"


def _age(step_dir, hours=1.0):
    """Date every file of a step back: a checkpoint written an hour ago (a fresh one is never recorded: RACY_NS)."""
    then = time.time_ns() - int(hours * 3600e9)
    for f in step_dir.rglob("*"):
        os.utime(f, ns=(then, then))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A MoLE training-form checkpoint, its parameters and a float32 table converted from it."""
    root = tmp_path_factory.mktemp("binding")
    cfg = prime_config("mole")
    params = jax.tree.map(np.asarray, init_params(cfg, seed=5))
    step = _save(root / "ckpt", cfg, params)
    convert_to_lut(step, root / "lut", dtype="float32", progress=False)
    return cfg, params, step, root / "lut"


@pytest.fixture
def ckpt(source, tmp_path):
    """A copy of the source checkpoint, dated an hour back and without a recorded fingerprint."""
    step = tmp_path / "ckpt" / "0"
    shutil.copytree(source[2], step)
    (step / checkpoint.BINDING).unlink(missing_ok=True)
    _age(step)
    return step


@pytest.fixture
def restored(monkeypatch):
    """The leaf paths of every tree a checkpoint restore asks Orbax for (what is read from disk), call by call."""
    calls = []
    real = ocp.PyTreeCheckpointer.restore

    def spy(self, directory, *args, **kwargs):
        leaves, _ = jax.tree_util.tree_flatten_with_path(kwargs["args"].item)
        calls.append([jax.tree_util.keystr(path) for path, _ in leaves])
        return real(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", spy)
    return calls


def _reads_table_inputs(paths) -> bool:
    return any(name in p for p in paths for name in TABLE_INPUTS)


def test_load_reads_the_experts_once_then_never(source, ckpt, restored):
    _, params, _, lut_dir = source
    want = lut.fingerprint(params)
    first = load(ckpt, lut=lut_dir)
    # no fingerprint recorded yet: the table inputs are read once, on the host, then the inference parameters
    assert len(restored) == 2 and _reads_table_inputs(restored[0]) and not _reads_table_inputs(restored[1])
    assert checkpoint.recorded_fingerprint(ckpt) == want
    restored.clear()
    second = load(ckpt, lut=lut_dir)
    assert len(restored) == 1 and not _reads_table_inputs(restored[0])  # only the inference form is read
    assert "['embed_VxD']" in restored[0] and any("attn" in p for p in restored[0])
    ids = np.array([[3, 41, 96, 0, 7]])
    np.testing.assert_array_equal(second.logits(ids), first.logits(ids))


def test_resaved_checkpoint_with_one_expert_weight_changed_is_refused(source, ckpt, restored):
    cfg, params, _, lut_dir = source
    load(ckpt, lut=lut_dir)
    binding = (ckpt / checkpoint.BINDING).read_text()
    edited = jax.tree.map(np.copy, params)
    edited["blocks"][1]["experts"]["w_down_NxFxD"][2, 5, 7] += 0.25
    # saved through the project's API, then put in place of the old parameters: the old binding stays beside them
    new_step = _save(ckpt.parent.parent / "resaved", cfg, edited)
    shutil.rmtree(ckpt / "params")
    shutil.move(new_step / "params", ckpt / "params")
    assert (ckpt / checkpoint.BINDING).read_text() == binding and checkpoint.recorded_fingerprint(ckpt) is None
    restored.clear()
    with pytest.raises(MoleError, match=REFUSED) as e:
        load(ckpt, lut=lut_dir)
    assert "\n" not in str(e.value) and _reads_table_inputs(restored[0])  # recomputed from the experts
    # once its files are an hour old the edited checkpoint's own fingerprint is recorded: refused without a read
    _age(ckpt)
    with pytest.raises(MoleError, match=REFUSED):
        load(ckpt, lut=lut_dir)
    assert checkpoint.recorded_fingerprint(ckpt) == lut.fingerprint(edited) != lut.fingerprint(params)
    restored.clear()
    with pytest.raises(MoleError, match=REFUSED):
        load(ckpt, lut=lut_dir)
    assert restored == []  # refused before anything was restored


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
    load(ckpt, lut=lut_dir)
    assert checkpoint.recorded_fingerprint(ckpt) == lut.fingerprint(params)
    sizes = {p: s for p, (s, _) in checkpoint.params_signature(ckpt).items()}
    assert "['experts']" in _flip_one_expert_weight(ckpt, cfg, params)
    assert {p: s for p, (s, _) in checkpoint.params_signature(ckpt).items()} == sizes  # the same files and sizes
    assert checkpoint.recorded_fingerprint(ckpt) is None  # the mtime tells
    with pytest.raises(MoleError, match=REFUSED) as e:
        load(ckpt, lut=lut_dir)
    assert "\n" not in str(e.value)


def test_fresh_or_changing_or_read_only_checkpoints_record_nothing(source, ckpt, monkeypatch):
    _, params, _, lut_dir = source
    fp = lut.fingerprint(params)
    signature = checkpoint.params_signature(ckpt)
    os.utime(ckpt / next(iter(signature)))  # a file changed after its signature was taken (while being read)
    assert not checkpoint.record_fingerprint(ckpt, fp, signature=signature)
    assert not checkpoint.record_fingerprint(ckpt, fp, signature=checkpoint.params_signature(ckpt))  # too fresh
    _age(ckpt)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", read_only)
    assert load(ckpt, lut=lut_dir).table is not None  # it loads, checked the slow way, and records nothing
    assert not (ckpt / checkpoint.BINDING).exists() and not list(ckpt.glob(f".{checkpoint.BINDING}*"))
    monkeypatch.undo()
    assert checkpoint.record_fingerprint(ckpt, fp, signature=checkpoint.params_signature(ckpt))
    assert checkpoint.recorded_fingerprint(ckpt) == fp
    assert not list(ckpt.glob(f".{checkpoint.BINDING}*"))  # no temporary file left
