"""Import of the authors' checkpoints (fixtures written here under the official names), export, and bad input."""

import json
import os
import pickle
import pickletools
import re
import shlex
import signal
import socket
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import reference
from conftest import prime_config, run_cli, write_hf_checkpoint
from mole_jax import checkpoint, hf
from mole_jax.config import MoleError
from mole_jax.decode import load

IDS = np.array([[5, 17, 96, 0, 3, 3, 41], [88, 2, 2, 60, 71, 9, 13]], np.int32)


@pytest.mark.parametrize("kind", ["dense", "moe", "mole"])
def test_import_matches_reference(tmp_path, kind):
    cfg = prime_config(kind)
    tensors = write_hf_checkpoint(tmp_path / "src", cfg)
    hf.import_hf(tmp_path / "src", tmp_path / "run")
    model = load(tmp_path / "run")
    assert model.config == cfg.replace(init_std=model.config.init_std)
    hf_cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    ref = reference.forward(hf_cfg, tensors, IDS, top_k=2)
    got = model.logits(IDS)
    assert got.dtype == np.float32 and got.shape == (*IDS.shape, cfg.vocab_size)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_moe_top_k_option(tmp_path):
    cfg = prime_config("moe")
    tensors = write_hf_checkpoint(tmp_path / "src", cfg)
    hf.import_hf(tmp_path / "src", tmp_path / "k3", moe_top_k=3)
    model = load(tmp_path / "k3")
    assert model.config.top_k == 3
    hf_cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    ref3 = reference.forward(hf_cfg, tensors, IDS, top_k=3)
    np.testing.assert_allclose(model.logits(IDS), ref3, rtol=0, atol=1e-5 * np.abs(ref3).max())
    # default is 2 (the paper), and num_experts_per_tok in config.json wins over the default
    hf.import_hf(tmp_path / "src", tmp_path / "k2")
    assert load(tmp_path / "k2").config.top_k == 2
    (tmp_path / "src" / "config.json").write_text(json.dumps({**hf_cfg, "num_experts_per_tok": 4}))
    hf.import_hf(tmp_path / "src", tmp_path / "k4")
    assert load(tmp_path / "k4").config.top_k == 4


@pytest.mark.parametrize("kind", ["dense", "moe", "mole"])
def test_import_export_import_bit_exact(tmp_path, kind):
    cfg = prime_config(kind)
    tensors = write_hf_checkpoint(tmp_path / "src", cfg)
    hf.import_hf(tmp_path / "src", tmp_path / "a")
    hf.export_hf(tmp_path / "a", tmp_path / "exported")
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert set(exported) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    hf.import_hf(tmp_path / "exported", tmp_path / "b")
    _, pa = checkpoint.restore_params(tmp_path / "a", as_numpy=True)
    _, pb = checkpoint.restore_params(tmp_path / "b", as_numpy=True)
    for x, y in zip(_leaves(pa), _leaves(pb)):
        np.testing.assert_array_equal(x, y)
    exported_cfg = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert exported_cfg["architectures"] == [{"dense": "DenseForCausalLM", "moe": "MoeForCausalLM",
                                              "mole": "MoleForCausalLM"}[kind]]


def _leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def test_half_precision_and_sharded_safetensors(tmp_path):
    """bf16 weights, split over two shards with an index, as large HF checkpoints are saved."""
    import ml_dtypes

    cfg = prime_config("mole")
    tensors = write_hf_checkpoint(tmp_path / "one", cfg, dtype=ml_dtypes.bfloat16)
    src = tmp_path / "sharded"
    src.mkdir()
    (src / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(src / fname))
    index = {"weight_map": {n: f for f, part in halves.items() for n in part}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    hf.import_hf(src, tmp_path / "run")
    ref = reference.forward(hf.config_to_hf(cfg), {k: v.astype(np.float32) for k, v in tensors.items()}, IDS)
    np.testing.assert_allclose(load(tmp_path / "run").logits(IDS), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_pytorch_bin_through_weights_only_loader(tmp_path):
    torch = pytest.importorskip("torch")
    cfg = prime_config("dense")
    tensors = write_hf_checkpoint(tmp_path / "st", cfg)
    src = tmp_path / "bin"
    src.mkdir()
    (src / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, src / "pytorch_model.bin")
    hf.import_hf(src, tmp_path / "run")
    ref = reference.forward(hf.config_to_hf(cfg), tensors, IDS)
    np.testing.assert_allclose(load(tmp_path / "run").logits(IDS), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def _malicious_bin(path, marker, layout: str) -> bytes:
    """A pytorch_model.bin whose unpickling runs os.system (touching `marker`), built without torch: the pickle a
    `__reduce__` returning (os.system, ...) gives (GLOBAL posix.system, REDUCE), either raw (torch's legacy
    format) or as data.pkl in a zip laid out as torch.save writes it. Returns the pickle."""
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {shlex.quote(str(marker))}",)

    evil = pickle.dumps({"model.embed_tokens.weight": Payload()}, protocol=2)
    ops = {(op.name, arg) for op, arg, _ in pickletools.genops(evil)}
    assert ("GLOBAL", f"{os.system.__module__} system") in ops and ("REDUCE", None) in ops
    if layout == "raw":
        path.write_bytes(evil)
    else:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            z.writestr("archive/data.pkl", evil)
            z.writestr("archive/byteorder", "little")
            z.writestr("archive/version", "3\n")
    return evil


@pytest.mark.parametrize("layout", ["zip", "raw"])
def test_pickle_with_code_is_refused(tmp_path, layout):
    """No torch needed: the import refuses the file from its bytes (the pickle's opcodes name os.system; a raw
    pickle is not the zip torch.save writes), in one line from the command, and the payload never runs."""
    refusal = ("refusing to load .*pytorch_model.bin: " + (
        rf"not a plain weights file \(it calls {os.system.__module__}.system\)" if layout == "zip"
        else "not the zip format torch.save writes"))
    marker = tmp_path / "payload-ran"
    src = tmp_path / "evil"
    write_hf_checkpoint(src, prime_config("dense"))
    (src / "model.safetensors").unlink()
    evil = _malicious_bin(src / "pytorch_model.bin", marker, layout)
    with pytest.raises(MoleError, match=refusal):
        hf.import_hf(src, tmp_path / "run")
    assert not marker.exists() and not (tmp_path / "run").exists()
    r = subprocess.run([sys.executable, "-m", "mole_jax.cli", "import-hf", str(src), str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith("mole-jax: error: ") and re.search(refusal, lines[0]), lines[0]
    assert not marker.exists() and not (tmp_path / "run").exists()
    # the file is what it claims to be: plain unpickling runs the payload (which only touches the marker)
    pickle.loads(evil)
    assert marker.exists()


# Bad input ----------------------------------------------------------------------------------------------------
def _bad_cases(tmp_path):
    cfg = prime_config("mole")
    cases = {}
    d = tmp_path / "no_config"
    d.mkdir()
    cases["no_config"] = (d, "no config.json")
    d = tmp_path / "unknown_arch"
    write_hf_checkpoint(d, cfg)
    c = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**c, "architectures": ["GPT2LMHeadModel"]}))
    cases["unknown_arch"] = (d, "unknown architecture")
    d = tmp_path / "missing_tensor"
    t = write_hf_checkpoint(d, cfg)
    del t["model.layers.1.experts.3.down_proj.weight"]
    save_file(t, str(d / "model.safetensors"))
    cases["missing_tensor"] = (d, "missing tensor 'model.layers.1.experts.3.down_proj.weight'")
    d = tmp_path / "misshapen"
    t = write_hf_checkpoint(d, cfg)
    t["model.layers.0.router.weight"] = t["model.layers.0.router.weight"][:, :-1].copy()
    save_file(t, str(d / "model.safetensors"))
    cases["misshapen"] = (d, "'model.layers.0.router.weight' has shape")
    d = tmp_path / "no_weights"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(c))
    cases["no_weights"] = (d, "no weights")
    cases["not_a_dir"] = (tmp_path / "does-not-exist", "not a directory")
    return cases


def test_bad_checkpoints_raise_one_clear_error(tmp_path):
    for name, (src, msg) in _bad_cases(tmp_path).items():
        out = tmp_path / f"out_{name}"
        with pytest.raises(MoleError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            hf.import_hf(src, out)
        assert not out.exists(), name
        assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name], "temporary directory left behind"


def test_cli_bad_input_exit_2_one_line(tmp_path):
    for name, (src, msg) in _bad_cases(tmp_path).items():
        status, _, err = run_cli("import-hf", src, tmp_path / "o")
        assert status == 2, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0] and "Traceback" not in err, (name, err)
    r = subprocess.run([sys.executable, "-m", "mole_jax.cli", "import-hf"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr  # the installed entry point, as a user


KILLED_BEFORE_PUBLISHING = """
import os, signal, sys
from mole_jax import hf

hf._publish = lambda tmp, out: os.kill(os.getpid(), signal.SIGKILL)  # all built, not yet moved into place
(hf.import_hf if sys.argv[1] == "import" else hf.export_hf)(sys.argv[2], sys.argv[3])
"""


def test_a_killed_import_or_export_leaves_nothing_behind(tmp_path):
    write_hf_checkpoint(tmp_path / "src", prime_config("mole"))

    def leftovers(out):
        return [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")]

    for cmd, src, out in [("import", tmp_path / "src", tmp_path / "run"),
                          ("export", tmp_path / "run", tmp_path / "exported")]:
        r = subprocess.run([sys.executable, "-c", KILLED_BEFORE_PUBLISHING, cmd, str(src), str(out)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
        assert [name for name in leftovers(out) if ".partial-" in name] and not out.exists()
        (hf.import_hf if cmd == "import" else hf.export_hf)(src, out)  # the next run cleans up after the killed one
        assert out.is_dir() and leftovers(out) == []
    # killed between the two renames of a replacement: the previous OUT is moved back, not lost
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    out = tmp_path / "exported"
    out.rename(tmp_path / f".exported.old-{dead.pid}-{socket.gethostname()}")
    with pytest.raises(MoleError, match="exists and is not empty"):
        hf.export_hf(tmp_path / "run", out)
    assert (out / "model.safetensors").is_file() and leftovers(out) == []


def test_existing_destination_is_not_overwritten(tmp_path):
    cfg = prime_config("dense")
    write_hf_checkpoint(tmp_path / "src", cfg, seed=1)
    hf.import_hf(tmp_path / "src", tmp_path / "run")
    before = load(tmp_path / "run").logits(IDS)
    write_hf_checkpoint(tmp_path / "src", cfg, seed=2)
    with pytest.raises(MoleError, match="exists"):
        hf.import_hf(tmp_path / "src", tmp_path / "run")
    np.testing.assert_array_equal(load(tmp_path / "run").logits(IDS), before)
    hf.import_hf(tmp_path / "src", tmp_path / "run", overwrite=True)
    assert np.abs(load(tmp_path / "run").logits(IDS) - before).max() > 1e-3


def test_bad_ids(tmp_path):
    cfg = prime_config("dense")
    write_hf_checkpoint(tmp_path / "src", cfg)
    hf.import_hf(tmp_path / "src", tmp_path / "run")
    model = load(tmp_path / "run")
    with pytest.raises(MoleError, match="outside the vocabulary"):
        model.logits(np.array([[1, 97]]))
    with pytest.raises(MoleError, match="outside the vocabulary"):
        model.logits(np.array([[-1, 2]]))
    with pytest.raises(MoleError, match="integers"):
        model.logits(np.array([[1.0, 2.0]]))
    with pytest.raises(MoleError, match=r"\[batch, length\]"):
        model.logits(np.array([1, 2]))
    with pytest.raises(MoleError, match="exceeds the model's context"):
        model.logits(np.zeros((1, cfg.max_seq_len + 1), np.int32))


def test_load_accepts_run_checkpoints_and_step_dirs(tmp_path):
    cfg = prime_config("mole")
    write_hf_checkpoint(tmp_path / "src", cfg)
    hf.import_hf(tmp_path / "src", tmp_path / "run")
    a = load(tmp_path / "run").logits(IDS)
    np.testing.assert_array_equal(load(tmp_path / "run" / "checkpoints").logits(IDS), a)
    np.testing.assert_array_equal(load(tmp_path / "run" / "checkpoints" / "0").logits(IDS), a)
    with pytest.raises(MoleError, match="no checkpoint"):
        load(tmp_path / "src")
    with pytest.raises(MoleError, match="does not exist"):
        load(tmp_path / "nope")
