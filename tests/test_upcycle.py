"""Upcycling a trained Dense checkpoint into MoLE (mole_jax/upcycling.py) and training only what is new: step-0
logits equal the Dense model's (training form and converted table), the run directory's record, `--train new`
(backbone bit-identical, optimizer state of the new parameters only, exact resume), `--train all`, bad input,
and experiments/upcycle.py at --scale tiny."""

import json
import shutil

import jax
import numpy as np
import pytest

import mole_jax
from conftest import run_cli
from mole_jax import checkpoint, sharding, train
from mole_jax.config import TrainConfig, get_preset
from mole_jax.train_step import NEW_PARAMS, ShardedStep
from mole_jax.upcycling import INITS, params_fingerprint, start_run, upcycled_config

TC = dict(batch_size=8, seq_len=32, peak_lr=3e-3, warmup_frac=0.25, eval_every=0, log_every=1)
TRAIN_FLAGS = ["--batch-size", "8", "--seq-len", "32", "--lr", "3e-3", "--warmup-frac", "0.25", "--eval-every", "0",
               "--log-every", "1", "--devices", "2", "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A slice of real English (the language reference's prose) as a text file."""
    from pydoc_data.topics import topics

    f = tmp_path_factory.mktemp("text") / "corpus.txt"
    f.write_text("\n\n".join(topics[k] for k in sorted(topics)[:60]))
    return f


@pytest.fixture(scope="module")
def dense(tmp_path_factory, corpus):
    """A tiny Dense model trained for a few steps on the corpus (its own BPE tokenizer): the starting point."""
    out = tmp_path_factory.mktemp("dense") / "run"
    train.train(get_preset("tiny-dense"), TrainConfig(steps=6, checkpoint_every=6, **TC), out=out,
                data_source=str(corpus), preset="tiny-dense", devices=2, progress=False)
    return out


def _backbone_and_new(params):
    flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    new = {k: v for k, v in flat.items() if any(f"'{n}'" in k for n in NEW_PARAMS)}
    return {k: v for k, v in flat.items() if k not in new}, new


def _dense_params(dense):
    return _backbone_and_new(checkpoint.restore_params(dense, as_numpy=True)[1])[0]


@pytest.mark.parametrize("init", ["zero-down", "zero-down-router"])
def test_step0_logits_equal_the_dense_model_through_training_form_and_table(dense, tmp_path, init):
    up = mole_jax.upcycle(dense, tmp_path / "up", num_experts=4, init=init, seed=3)
    ids_BxT = np.random.default_rng(1).integers(0, 512, (3, 23))
    want = mole_jax.load(dense).logits(ids_BxT)
    got = mole_jax.load(up).logits(ids_BxT)
    assert want.dtype == got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    mole_jax.convert_to_lut(up, tmp_path / "lut", "float32", progress=False)
    table = mole_jax.open_lut(tmp_path / "lut")
    assert not np.any(table.rows([0, 7, 511]))  # zero down-projections: every routed output is zero
    np.testing.assert_allclose(mole_jax.load(up, lut=tmp_path / "lut").logits(ids_BxT), want, rtol=0, atol=1e-6)
    # the backbone is the Dense checkpoint's, bit for bit; the new parts are as the init says
    backbone, new = _backbone_and_new(checkpoint.restore_params(up, as_numpy=True)[1])
    dense_params = _dense_params(dense)
    assert backbone.keys() == dense_params.keys()
    assert all(backbone[k].tobytes() == dense_params[k].tobytes() for k in backbone)
    for k, v in new.items():
        if "w_down" in k or (init == "zero-down-router" and "w_router" in k):
            assert not v.any(), k
        elif "scale_D" in k:
            assert np.all(v == 1), k
        else:
            assert 0.005 < v.std() < 0.015, k  # the presets' init_std 0.01


def test_small_down_init_moves_step0_logits_a_little(dense, tmp_path):
    up = mole_jax.upcycle(dense, tmp_path / "up", num_experts=2, init="small-down")
    ids_BxT = np.random.default_rng(2).integers(0, 512, (2, 19))
    diff = np.abs(mole_jax.load(up).logits(ids_BxT) - mole_jax.load(dense).logits(ids_BxT))
    assert 0 < diff.max() < 0.05


def test_run_directory_records_where_it_came_from(dense, tmp_path):
    status, out, err = run_cli("upcycle", dense, tmp_path / "up", "--experts", "4")
    assert status == 0 and not err and "mole-jax train --out" in out
    run = checkpoint.read_run(tmp_path / "up")
    cfg = upcycled_config(get_preset("tiny-dense"), 4)
    assert cfg == get_preset("tiny-mole")  # a Dense preset upcycles into its family's MoLE preset
    assert run["model_config"] == cfg.to_dict() and checkpoint.model_config(tmp_path / "up") == cfg
    origin = run["upcycled_from"]
    ref = checkpoint.locate(dense)
    assert origin["path"] == str(ref.path) and origin["step"] == ref.step == 6 and origin["kind"] == "dense"
    assert origin["fingerprint"] == params_fingerprint(checkpoint.restore_params(dense, as_numpy=True)[1])
    assert origin["data"] == checkpoint.read_run(dense)["data"] and origin["init"] == "zero-down"
    assert (tmp_path / "up" / "tokenizer.json").read_bytes() == (dense / "tokenizer.json").read_bytes()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert run_cli("upcycle", dense, tmp_path / "up", "--experts", "4")[0] == 0  # the same call again: as it is
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def _opt_state(run_dir, tc):
    cfg = checkpoint.model_config(run_dir)
    step = ShardedStep(cfg, tc, sharding.make_mesh(1))
    mngr = checkpoint.manager(run_dir / checkpoint.CHECKPOINTS)
    _, opt_state = checkpoint.restore_train_state(mngr, mngr.latest_step(), step.abstract_state())
    mngr.close()
    return opt_state


@pytest.fixture(scope="module")
def trained_new(dense, tmp_path_factory):
    """The upcycled model trained 4 steps with --train new through the CLI, with no --preset and no --data (both
    come from the run directory: the model, and the Dense run's data)."""
    out = tmp_path_factory.mktemp("new") / "up"
    mole_jax.upcycle(dense, out, num_experts=4)
    status, _, err = run_cli("train", "--out", out, "--steps", "4", "--schedule-steps", "4", "--train", "new",
                             "--checkpoint-every", "2", *TRAIN_FLAGS)
    assert status == 0, err
    return out


def test_train_new_keeps_the_backbone_bit_identical(dense, trained_new):
    run = checkpoint.read_run(trained_new)
    assert run["train_config"]["trainable"] == "new" and run["upcycled_from"]["path"].startswith(str(dense))
    dense_data = checkpoint.read_run(dense)["data"]  # the Dense run's data and tokenizer by default
    assert {k: v for k, v in run["data"].items() if k != "tokenizer"} == {k: v for k, v in dense_data.items()
                                                                          if k != "tokenizer"}
    assert run["data"]["tokenizer"]["fingerprint"] == dense_data["tokenizer"]["fingerprint"]
    assert checkpoint.locate(trained_new).step == 4
    backbone, new = _backbone_and_new(checkpoint.restore_params(trained_new, as_numpy=True)[1])
    dense_params = _dense_params(dense)
    assert all(backbone[k].tobytes() == dense_params[k].tobytes() for k in dense_params)
    assert all(v.any() for k, v in new.items() if "w_down" in k)  # what is new did train


def test_train_new_optimizer_state_holds_only_the_new_parameters(trained_new):
    tc = TrainConfig.from_dict(checkpoint.read_run(trained_new)["train_config"])
    opt_state = _opt_state(trained_new, tc)
    _, new = _backbone_and_new(checkpoint.restore_params(trained_new, as_numpy=True)[1])
    moments = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]
               if np.ndim(x)]
    names = sorted(k[k.index("['blocks']"):] for k, _ in moments)
    assert names == sorted(list(new) * 2)  # Adam's two moments of every new parameter, of nothing else
    assert sum(x.size for _, x in moments) == 2 * sum(v.size for v in new.values())
    assert all(".mu[" in k or ".nu[" in k for k, _ in moments)


def test_train_new_resumes_exactly(dense, trained_new, tmp_path):
    """2 steps, then the same command to step 4: the same parameters and optimizer state as 4 steps at once."""
    out = tmp_path / "up"
    mole_jax.upcycle(dense, out, num_experts=4)
    for steps in ("2", "4"):
        status, _, err = run_cli("train", "--out", out, "--steps", steps, "--schedule-steps", "4", "--train", "new",
                                 "--checkpoint-every", "2", *TRAIN_FLAGS)
        assert status == 0, err
    for a, b in zip(jax.tree.leaves(checkpoint.restore_params(out, as_numpy=True)[1]),
                    jax.tree.leaves(checkpoint.restore_params(trained_new, as_numpy=True)[1])):
        assert a.tobytes() == b.tobytes()
    tc = TrainConfig.from_dict(checkpoint.read_run(out)["train_config"])
    for a, b in zip(jax.tree.leaves(_opt_state(out, tc)), jax.tree.leaves(_opt_state(trained_new, tc))):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_train_all_starts_from_the_dense_function_and_trains_the_backbone(dense, tmp_path, corpus):
    """The first step's loss (of the step-0 parameters) of the upcycled MoLE equals that of the Dense model copied
    into a run of the same recipe; with --train all the backbone then moves."""
    cfg, params = checkpoint.restore_params(dense, as_numpy=True)
    start_run(tmp_path / "copy", cfg, params, {"path": str(dense), "kind": "dense"},
              tokenizer=dense / "tokenizer.json")
    mole_jax.upcycle(dense, tmp_path / "up", num_experts=4)
    tc = TrainConfig(steps=2, checkpoint_every=2, **TC)
    first = {}
    for name, model in (("copy", cfg), ("up", get_preset("tiny-mole"))):
        r = train.train(model, tc, out=tmp_path / name, data_source=str(corpus), devices=2, progress=False)
        first[name] = r.history[0]["loss"]
    assert first["up"] == pytest.approx(first["copy"], abs=1e-5)
    backbone, _ = _backbone_and_new(checkpoint.restore_params(tmp_path / "up", as_numpy=True)[1])
    dense_params = _dense_params(dense)
    assert any(backbone[k].tobytes() != dense_params[k].tobytes() for k in dense_params)


def _one_error_line(status, out, err, *words):
    """Exit status 2, nothing on stdout, exactly one non-empty line on stderr, no traceback."""
    assert status == 2 and not out, (status, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mole-jax: error: ") and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


def test_bad_input_one_line_exit_2_nothing_written(dense, tmp_path, corpus):
    up = mole_jax.upcycle(dense, tmp_path / "mole", num_experts=2)
    _one_error_line(*run_cli("upcycle", up, tmp_path / "x"), "holds a mole model", "Dense")
    _one_error_line(*run_cli("upcycle", dense, tmp_path / "x", "--experts", "0"), "at least 1, got 0")
    _one_error_line(*run_cli("upcycle", dense, tmp_path / "x", "--init", "ones"), "unknown upcycling init")
    _one_error_line(*run_cli("upcycle", tmp_path / "missing", tmp_path / "x"), "does not exist")
    assert not (tmp_path / "x").exists()
    _one_error_line(*run_cli("upcycle", dense, dense), "holds no upcycle", "choose another OUT")
    _one_error_line(*run_cli("upcycle", dense, up, "--experts", "3"), "holds no upcycle")  # another upcycle
    (tmp_path / "file").write_text("x")
    _one_error_line(*run_cli("upcycle", dense, tmp_path / "file"), "is a file")
    _one_error_line(*run_cli("train", "--out", tmp_path / "y", "--steps", "2"), "holds no run", "--preset")
    _one_error_line(*run_cli("train", "--preset", "tiny-dense", "--out", tmp_path / "y", "--steps", "2", "--train",
                             "new", "--data", corpus), "--train new", "dense model")
    _one_error_line(*run_cli("train", "--out", up, "--steps", "2", "--preset", "tiny-dense", "--data", corpus),
                    "another model")
    assert not (tmp_path / "y").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mole"]  # no partial directories left behind
    assert checkpoint.locate(up).step == 0 and "train_config" not in checkpoint.read_run(up)


def test_upcycle_experiment_tiny(tmp_path):
    import upcycle  # experiments/upcycle.py (experiments/ is on pytest's pythonpath)

    assert upcycle.INITS == INITS  # restated there so that its --help starts no JAX

    out = tmp_path / "results"
    rc = upcycle.main(["--scale", "tiny", "--out", str(out), "--runs", str(tmp_path / "runs"), "--devices", "1",
                       "--no-progress", "--inits", "zero-down", "--step-iters", "1"])
    assert rc == 0
    result = json.loads((out / "upcycle_tiny.json").read_text())
    rows = {r["model"]: r for r in result["rows"]}
    start, dense, new, full = (rows[k] for k in ("Dense (start)", "Dense", "MoLE-4E new", "MoLE-4E all"))
    assert dense["train_tokens"] == new["train_tokens"] == full["train_tokens"] > 0
    for r in (new, full):  # zero down-projections: the upcycled model starts exactly where the Dense model is
        assert r["val_loss_step0"] == pytest.approx(start["val_loss"], abs=1e-5)
        assert np.isfinite(r["val_loss"]) and r["lut_bytes_fp16"] == 2 * 512 * 2 * 4 * 64
    assert new["trained_params"] < full["trained_params"] == full["params_total"]
    assert new["val_loss_lut_fp16"] == pytest.approx(new["val_loss_scored"], abs=1e-4)  # the table is exact
    assert all(r["step_ms"] > 0 for r in (dense, new, full))
    assert (out / "upcycle_tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.rmtree(tmp_path / "runs")
