"""`mole-jax train --set KEY=VALUE` and `--config FILE.json`: the values parsed to each ModelConfig field's type and
checked as the config checks them, the overrides trained (parameter count, checkpoint shapes) and recorded in
run.json, resume refused with another override, and bad keys or values refused with one line before anything is
written."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import run_cli
from mole_jax import checkpoint
from mole_jax.config import (ConfigError, ModelConfig, apply_overrides, get_preset, model_field_types,
                             parse_overrides, read_model_config)

# A few steps of tiny-mole on the embedded corpus, one device: enough to train, checkpoint and resume.
RUN = ["--batch-size", "8", "--seq-len", "32", "--checkpoint-every", "2", "--eval-every", "0",
       "--eval-batches", "1", "--log-every", "1", "--devices", "1", "--no-progress"]


def _cli_error(args) -> str:
    """The one line of a refused command: exit status 2, exactly one non-empty line on stderr, no traceback."""
    status, _, err = run_cli(*args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("mole-jax: error: "), lines[0]
    return lines[0]


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# Parsing -----------------------------------------------------------------------------------------------------
def test_values_take_each_fields_type():
    types = model_field_types()
    assert list(types) == [f for f in ModelConfig.__dataclass_fields__]  # every field, in order
    got = parse_overrides(["num_experts=8", "d_model=512", "rope_theta=5e5", "kind=mole", "attention_impl=none",
                           "init_std = 0.02", "num_experts=6"])  # later items win
    assert got == {"num_experts": 6, "d_model": 512, "rope_theta": 500000.0, "kind": "mole",
                   "attention_impl": None, "init_std": 0.02}
    assert type(got["num_experts"]) is int and type(got["rope_theta"]) is float
    cfg = apply_overrides(get_preset("tiny-mole"), {"num_experts": 2, "d_model": 128})
    assert cfg == get_preset("tiny-mole").replace(num_experts=2, d_model=128)
    assert apply_overrides(get_preset("tiny-mole"), {}) == get_preset("tiny-mole")


@pytest.mark.parametrize("item,words", [
    ("num_experts=two", ["num_experts", "'two'", "an int"]),
    ("num_experts=2.5", ["num_experts", "'2.5'", "an int"]),
    ("rope_theta=big", ["rope_theta", "'big'", "a float"]),
    ("kind=sparse", ["kind", "'sparse'", "dense, moe, mole"]),
    ("dtype=int8", ["dtype", "'int8'", "float32, bfloat16, float16"]),
    ("attention_impl=flash", ["attention_impl", "'flash'", "none, auto, xla, cudnn"]),
    ("num_expert=2", ["'num_expert'", "did you mean num_experts", "the fields are kind, vocab_size"]),
    ("colour=red", ["'colour'", "the fields are kind, vocab_size"]),
    ("num_experts", ["KEY=VALUE", "'num_experts'"]),
])
def test_bad_items_are_named(item, words):
    with pytest.raises(ConfigError) as e:
        parse_overrides([item])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_overrides_are_validated_as_the_config_is():
    with pytest.raises(ConfigError, match=r"--set d_model=66: invalid ModelConfig: d_model 66 not divisible by "
                                          r"num_heads 4"):
        apply_overrides(get_preset("tiny-mole"), parse_overrides(["d_model=66"]))
    with pytest.raises(ConfigError, match=r"--set top_k=2: invalid ModelConfig: mole activates every routed expert"):
        apply_overrides(get_preset("tiny-mole"), parse_overrides(["top_k=2"]))
    with pytest.raises(ConfigError, match="num_layers must be a positive int"):
        apply_overrides(get_preset("tiny-mole"), parse_overrides(["num_layers=0"]))
    # several fields are applied together: a valid combination passes whatever the order
    moe = apply_overrides(get_preset("tiny-mole"), parse_overrides(["kind=moe", "top_k=2", "ffn_dim=0"]))
    assert moe.kind == "moe" and moe.top_k == 2 and moe.ffn_dim == 0


def test_config_file(tmp_path):
    cfg = get_preset("tiny-mole").replace(num_experts=3)
    (tmp_path / "m.json").write_text(cfg.to_json())
    assert read_model_config(tmp_path / "m.json") == (cfg, cfg.to_dict())
    bad = {"partial.json": ({"kind": "mole"}, "lacks the required fields vocab_size, num_layers"),
           "unknown.json": ({**cfg.to_dict(), "experts": 2}, "no field 'experts'"),
           "type.json": ({**cfg.to_dict(), "num_experts": "2"}, "num_experts takes an int"),
           "invalid.json": ({**cfg.to_dict(), "top_k": 1}, "invalid ModelConfig: mole activates every"),
           "list.json": ([1, 2], "must hold a JSON object")}
    for name, (content, msg) in bad.items():
        (tmp_path / name).write_text(json.dumps(content))
        with pytest.raises(ConfigError, match=msg):
            read_model_config(tmp_path / name)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        read_model_config(tmp_path / "broken.json")
    with pytest.raises(ConfigError, match="does not exist"):
        read_model_config(tmp_path / "nope.json")


# The CLI -----------------------------------------------------------------------------------------------------
def test_bad_keys_and_values_one_line_nothing_written(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"kind": "mole"}))
    cases = {
        "unknown": (["--preset", "tiny-mole", "--set", "num_expert=2"], "did you mean num_experts"),
        "value": (["--preset", "tiny-mole", "--set", "num_experts=two"], "num_experts takes an int, not 'two'"),
        "invalid": (["--preset", "tiny-mole", "--set", "d_model=66"], "d_model 66 not divisible by num_heads 4"),
        "choice": (["--preset", "tiny-mole", "--set", "moe_impl=fast"], "moe_impl must be one of auto, dense"),
        "form": (["--preset", "tiny-mole", "--set", "num_experts"], "--set takes KEY=VALUE"),
        "both": (["--preset", "tiny-mole", "--config", str(tmp_path / "m.json")], "--preset or --config, not both"),
        "file": (["--config", str(tmp_path / "m.json")], "lacks the required fields"),
        "dtype": (["--preset", "tiny-mole", "--set", "dtype=bfloat16", "--dtype", "float32"], "disagree"),
        "peak": (["--preset", "tiny-mole", "--peak-tflops", "0"], "--peak-tflops must be a positive number"),
    }
    for name, (extra, msg) in cases.items():
        line = _cli_error(["train", "--steps", "2", "--out", str(tmp_path / name)] + extra + RUN)
        assert msg in line, (name, line)
        assert not (tmp_path / name).exists(), name


@pytest.fixture(scope="module")
def two_experts(tmp_path_factory):
    """tiny-mole with --set num_experts=2, steps 1-2 of a 4-step schedule."""
    out = tmp_path_factory.mktemp("overrides") / "run"
    status, stdout, err = run_cli("train", "--preset", "tiny-mole", "--set", "num_experts=2", "--out", out,
                                  "--steps", "2", "--schedule-steps", "4", *RUN)
    assert status == 0, err[-3000:]
    return out


def test_set_trains_the_overridden_model(two_experts):
    out = two_experts
    run = json.loads((out / checkpoint.RUN_FILE).read_text())
    want = get_preset("tiny-mole").replace(num_experts=2)
    assert run["overrides"] == {"num_experts": 2} and run["preset"] == "tiny-mole"
    assert run["model_config"]["num_experts"] == 2
    assert run["params"] == want.param_counts() != get_preset("tiny-mole").param_counts()
    cfg, params = checkpoint.restore_params(out, as_numpy=True)
    assert cfg.num_experts == 2
    for block in params["blocks"].values() if isinstance(params["blocks"], dict) else params["blocks"]:
        assert block["w_router_DxN"].shape == (want.d_model, 2)
        assert all(leaf.shape[0] == 2 for leaf in jax.tree.leaves(block["experts"]))
    assert sum(np.asarray(leaf).size for leaf in jax.tree.leaves(params)) == want.param_counts()["total"]


def test_resume_needs_the_same_overrides(two_experts, tmp_path):
    out = two_experts
    base = ["train", "--out", str(out), "--steps", "3", "--schedule-steps", "4"] + RUN
    before = _snapshot(out)
    line = _cli_error(base + ["--preset", "tiny-mole"])  # the override left out
    assert "started with --set num_experts=2; this command gives no --set num_experts (num_experts=4)" in line
    line = _cli_error(base + ["--preset", "tiny-mole", "--set", "num_experts=3"])
    assert "started with --set num_experts=2; this command gives --set num_experts=3" in line
    line = _cli_error(base + ["--set", "num_experts=3"])  # the run's model, changed
    assert "num_experts=2" in line and "num_experts=3" in line
    assert _snapshot(out) == before
    # the same override resumes; so does the run's own model without --preset (its overrides are kept)
    status, stdout, err = run_cli(*base, "--preset", "tiny-mole", "--set", "num_experts=2")
    assert status == 0 and "to step 3" in stdout, err[-3000:]
    status, stdout, err = run_cli("train", "--out", out, "--steps", "4", "--schedule-steps", "4", *RUN)
    assert status == 0 and "to step 4" in stdout, err[-3000:]
    run = json.loads((out / checkpoint.RUN_FILE).read_text())
    assert run["overrides"] == {"num_experts": 2}
    steps = [json.loads(x)["step"] for x in (out / checkpoint.METRICS).read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_config_file_with_set_on_top(tmp_path):
    """--config FILE (a whole config as to_dict writes it) with --set on top: the run's model; the file's content
    is recorded; resuming with another file is refused naming the field."""
    cfg = get_preset("tiny-mole").replace(num_layers=1)
    (tmp_path / "m.json").write_text(cfg.to_json())
    out = tmp_path / "run"
    args = ["train", "--config", tmp_path / "m.json", "--set", "num_experts=3", "--out", out, "--steps", "1", *RUN]
    status, stdout, err = run_cli(*args)
    assert status == 0, err[-3000:]
    run = json.loads((out / checkpoint.RUN_FILE).read_text())
    assert run["model_config"] == {**cfg.to_dict(), "num_experts": 3} and run["preset"] is None
    assert run["config_file"]["model_config"] == cfg.to_dict() and run["overrides"] == {"num_experts": 3}
    (tmp_path / "other.json").write_text(cfg.replace(num_layers=2).to_json())
    line = _cli_error(["train", "--config", tmp_path / "other.json", "--set", "num_experts=3", "--out", out,
                       "--steps", "1", *RUN])
    assert "num_layers: 1 -> 2" in line, line
