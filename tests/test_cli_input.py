"""Bad input is refused before any work and any write: every `mole-jax` command checks its arguments (choices,
ranges, existence, writability) as they are parsed, in one line with exit status 2, and creates no directory;
sizes of 0 or below are errors, not the defaults. `convert` writes nothing into the checkpoint it reads."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import prime_config, run_cli
from mole_jax import checkpoint, cli, convert, lut, quickstart, schemes
from mole_jax.config import MoleError
from mole_jax.decode import load
from mole_jax.model import init_params

TIMEOUT_S = 120
ROOT = Path(cli.__file__).resolve().parents[1]  # this checkout, for the fresh interpreter's imports

# (arguments, words the one line must hold). CKPT: an existing directory (arguments are refused before it is read);
# FILE: an existing file.
BAD = [
    (["quickstart", "--dtype", "int4"], ["--dtype", "invalid choice: 'int4'"]),
    (["quickstart", "--preset", "tiny-dense"], ["tiny-dense is a dense model", "needs a MoLE preset"]),
    (["quickstart", "--preset", "tiny-nope"], ["unknown preset 'tiny-nope'"]),
    (["quickstart", "--prompt", ""], ["--prompt must be non-empty text"]),
    (["quickstart", "--steps", "0"], ["--steps must be a positive integer, got 0"]),
    (["quickstart", "--max-new-tokens", "-3"], ["--max-new-tokens must be a positive integer, got -3"]),
    (["quickstart", "--out", "FILE"], ["is a file, not a directory"]),
    (["convert", "CKPT", "runs/lut", "--shard-rows", "0"], ["--shard-rows must be a positive integer, got 0"]),
    (["convert", "CKPT", "runs/lut", "--batch-rows", "0"], ["--batch-rows must be a positive integer, got 0"]),
    (["convert", "CKPT", "runs/lut", "--block", "-1"], ["--block must be a positive integer, got -1"]),
    (["convert", "CKPT", "runs/lut", "--dtype", "int4"], ["invalid choice: 'int4'"]),
    (["convert", "CKPT", "FILE/lut"], ["cannot create", "is a file"]),
    (["convert", "missing", "runs/lut"], ["checkpoint not found: missing does not exist"]),
    (["train", "--preset", "tiny-mole", "--out", "runs/x", "--steps", "0"], ["--steps must be a positive integer"]),
    (["train", "--preset", "tiny-mole", "--out", "runs/x", "--steps", "2", "--batch-size", "0"], ["--batch-size"]),
    (["train", "--preset", "tiny-mole", "--out", "runs/x", "--steps", "2", "--seq-len", "-8"], ["--seq-len"]),
    (["train", "--preset", "tiny-mole", "--out", "runs/x", "--steps", "2", "--grad-accum", "0"], ["--grad-accum"]),
    (["train", "--preset", "tiny-mole", "--out", "runs/x", "--steps", "2", "--checkpoint-every", "0"],
     ["--checkpoint-every"]),
    (["train", "--preset", "tiny-mole", "--out", "runs/x", "--steps", "2", "--val-fraction", "1"],
     ["--val-fraction must be in [0, 1), got 1.0"]),
    (["train", "--preset", "tiny-mole", "--out", "runs/x", "--steps", "2", "--lr", "0"], ["--lr must be a positive"]),
    (["train", "--preset", "tiny-mole", "--out", "runs/x", "--steps", "2", "--devices", "0"], ["--devices"]),
    (["train", "--preset", "tiny-mole", "--out", "FILE", "--steps", "2"], ["is a file, not a directory"]),
    (["train", "--preset", "tiny-mole", "--out", "runs/x", "--steps", "2", "--tokenizer", "missing.json"],
     ["tokenizer not found"]),
    (["generate", "CKPT", "--prompt", ""], ["--prompt must be non-empty text"]),
    (["generate", "CKPT", "--prompt-ids", "1", "--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["generate", "CKPT", "--prompt-ids", "1", "--top-k", "0"], ["--top-k must be a positive integer"]),
    (["generate", "CKPT", "--prompt-ids", "1", "--top-p", "0"], ["--top-p must be in (0, 1], got 0.0"]),
    (["generate", "CKPT", "--prompt-ids", "1", "--temperature", "-1"], ["--temperature"]),
    (["generate", "CKPT", "--prompt-ids", "1", "--device-rows", "0"], ["--device-rows"]),
    (["generate", "CKPT", "--prompt-ids", "1,x"], ["--prompt-ids must be comma-separated integers"]),
    (["generate", "CKPT", "--prompt-ids", "1", "--lut", "missing"], ["lookup table not found"]),
    (["eval", "CKPT", "--batch-size", "0"], ["--batch-size must be a positive integer"]),
    (["eval", "CKPT", "--max-windows", "0"], ["--max-windows"]),
    (["eval", "CKPT", "--json", "FILE/r.json"], ["cannot create", "is a file"]),
    (["import-hf", "CKPT", "runs/x", "--moe-top-k", "0"], ["--moe-top-k must be a positive integer"]),
    (["import-hf", "missing", "runs/x"], ["is not a directory"]),
    (["import-hf", "CKPT", "FILE/x"], ["cannot create", "is a file"]),
    (["import-hf", "CKPT", "runs/x", "--tokenizer", "missing.json"], ["tokenizer not found"]),
    (["export-hf", "CKPT", "runs/x", "--dtype", "int8"], ["invalid choice: 'int8'"]),
    (["upcycle", "CKPT", "runs/x", "--experts", "0"], ["--experts must be at least 1, got 0"]),
    (["upcycle", "CKPT", "runs/x", "--expert-dim", "0"], ["--expert-dim"]),
    (["lut", "verify", "CKPT", "--rows", "0"], ["--rows must be a positive integer"]),
    (["lut", "info", "missing"], ["lookup table not found"]),
    (["bench", "decode", "--batch-sizes", "1,0"], ["--batch-sizes must be a positive integer, got 0"]),
    (["bench", "decode", "--steps", "0"], ["--steps"]),
    (["bench", "decode", "--steps-per-dispatch", "0"], ["--steps-per-dispatch"]),
    (["bench", "decode", "--lut-dtype", "nf4"], ["invalid choice"]),
    (["bench", "decode", "--json", "FILE/d.json"], ["is a file"]),
    (["bench", "convert", "--vocab-sizes", "8192,-1"], ["--vocab-sizes"]),
    (["bench", "convert", "--shard-rows", "0"], ["--shard-rows"]),
    (["bench", "train", "--tokens", "0"], ["--tokens"]),
    (["bench", "train", "--iters", "0"], ["--iters"]),
]
# What the issue names, each checked in a fresh interpreter too (before JAX or ml_dtypes is imported).
MUST_SHOW = [["quickstart", "--dtype", "int4"], ["quickstart", "--preset", "tiny-dense"],
             ["quickstart", "--prompt", ""], ["convert", "CKPT", "runs/lut", "--shard-rows", "0"],
             ["convert", "CKPT", "runs/lut", "--batch-rows", "0"]]


def _in(workdir, args):
    """Arguments with CKPT and FILE made real inside workdir (the other paths stay relative to it)."""
    return [str(workdir / a.replace("CKPT", "ckpt").replace("FILE", "file")) if a.startswith(("CKPT", "FILE"))
            else a for a in args]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.mark.parametrize("args,words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_nothing_created(workdir, args, words):
    before = _snapshot(workdir)
    status, out, err = run_cli(*_in(workdir, args))
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and not out and len(lines) == 1 and "Traceback" not in err, (status, out, err)
    assert lines[0].startswith(cli.ERROR_PREFIX), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert _snapshot(workdir) == before  # no directory, no file, nothing touched


def test_refused_in_a_fresh_interpreter_before_jax_is_imported(workdir):
    """The commands the issue names are refused before JAX (or ml_dtypes, a second of CPU on its own) is imported,
    so within a second of starting: `mole-jax` is cli.main, run here as a user's shell would."""
    code = ("import json, sys\nfrom mole_jax import cli\nresults = []\n"
            "for args in json.loads(sys.argv[1]):\n"
            "    try:\n        status = cli.main(args)\n    except SystemExit as e:\n        status = e.code\n"
            "    results.append(status)\n"
            "print(json.dumps({'status': results, 'jax': 'jax' in sys.modules,\n"
            "                  'ml_dtypes': 'ml_dtypes' in sys.modules}))")
    cases = [_in(workdir, args) for args in MUST_SHOW]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], capture_output=True, text=True,
                       timeout=TIMEOUT_S, env=env, cwd=workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {"status": [2] * len(cases), "jax": False, "ml_dtypes": False}, (got, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == len(cases) and all(line.startswith(cli.ERROR_PREFIX) for line in lines), r.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["ckpt", "file"]


def test_cli_schemes_are_the_table_schemes():
    assert cli.TABLE_SCHEMES == schemes.SCHEMES


def test_quickstart_api_refuses_before_training(tmp_path):
    for kwargs, words in [(dict(preset="tiny-dense"), "needs a MoLE preset"), (dict(table_dtype="int4"), "int4"),
                          (dict(prompt=""), "non-empty"), (dict(steps=0), "steps must be a positive integer"),
                          (dict(placement="moon"), "placement"), (dict(max_new_tokens=-1), "max_new_tokens")]:
        with pytest.raises(MoleError, match=words) as e:
            quickstart.run(tmp_path / "q", **{"preset": "tiny-mole", **kwargs})
        assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


# convert: nothing written into the checkpoint; the destination checked before the experts are read --------------
@pytest.fixture(scope="module")
def aged_checkpoint(tmp_path_factory):
    """A MoLE training-form step directory whose files are an hour old (as a checkpoint being converted is)."""
    cfg = prime_config("mole")
    root = tmp_path_factory.mktemp("convert-input")
    mngr = checkpoint.manager(root / "ckpt", async_save=False)
    checkpoint.save(mngr, 0, jax.tree.map(np.asarray, init_params(cfg, seed=3)), checkpoint.step_meta(cfg, 0))
    mngr.close()
    then = time.time_ns() - 3600 * 10**9
    for f in (root / "ckpt").rglob("*"):
        os.utime(f, ns=(then, then))
    return root / "ckpt" / "0"


def test_convert_writes_nothing_into_the_checkpoint(aged_checkpoint, tmp_path, monkeypatch):
    step = aged_checkpoint
    before = _snapshot(step)
    reads = []  # the layers whose experts are read
    real_layer = convert.CheckpointLayers.layer
    monkeypatch.setattr(convert.CheckpointLayers, "layer", lambda self, l: reads.append(l) or real_layer(self, l))
    (tmp_path / "file").write_text("x")
    with pytest.raises(MoleError, match="is not a directory"):
        convert.convert_to_lut(step, tmp_path / "file" / "lut", "float32", progress=False)
    for bad in (0, -4):
        with pytest.raises(MoleError, match="must be a positive integer"):
            convert.convert_to_lut(step, tmp_path / "lut", "float32", shard_rows=bad, progress=False)
        with pytest.raises(MoleError, match="must be a positive integer"):
            convert.convert_to_lut(step, tmp_path / "lut", "float32", batch_rows=bad, progress=False)
    assert reads == [] and not (tmp_path / "lut").exists()  # refused before the experts were read

    table_dir = convert.convert_to_lut(step, tmp_path / "lut", "float32", progress=False)
    assert reads and _snapshot(step) == before  # nothing written into the input
    table = lut.open_lut(table_dir)
    assert table.meta["source"]["params_files"] == checkpoint.params_signature(step)
    # the binding lives in the table: loading the two together reads no expert to check they belong together
    restored = []
    real = checkpoint.restore_params
    monkeypatch.setattr(checkpoint, "restore_params",
                        lambda *a, **k: restored.append(k.get("with_experts", True)) or real(*a, **k))
    model = load(step, lut=table_dir)
    assert model.table is not None and restored == [False] and _snapshot(step) == before


def test_python_api_sizes_of_zero_are_errors_not_defaults(tmp_path):
    from mole_jax import hf
    from mole_jax.evaluation import evaluate

    for kwargs in (dict(max_windows=0), dict(batch_size=0), dict(seq_len=-1), dict(devices=0)):
        with pytest.raises(MoleError, match=f"{next(iter(kwargs))} must be a positive integer"):
            evaluate(tmp_path / "any", **kwargs)  # refused before the checkpoint is looked for
    with pytest.raises(MoleError, match=r"MoE top-k 0 must be in \[1, num_experts=5\]"):
        hf.config_from_hf(hf.config_to_hf(prime_config("moe")), moe_top_k=0)
