"""Profiler traces: `train --profile-steps A:B` traces exactly those steps, `generate --profile DIR` the
generation, bench decode's profile_turn a few steps of a decoder; bad specifications are one line, exit 2."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from mole_jax import train
from mole_jax.config import get_preset

# tiny-dense on one device and random token ids: a profile is about the loop, not the model or its sharding
RUN = ["--preset", "tiny-dense", "--batch-size", "8", "--seq-len", "32", "--eval-batches", "1", "--devices", "1",
       "--no-progress", "--no-tensorboard", "--peak-tflops", "1"]


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.bin"
    np.random.default_rng(0).integers(0, get_preset("tiny-dense").vocab_size, 60_000).astype(np.uint16).tofile(path)
    return path


def _trace_events(directory: Path) -> list[dict]:
    """The events of the one trace under `directory`, which holds its xplane.pb (TensorBoard) beside it."""
    sessions = list((directory / "plugins" / "profile").iterdir())
    assert len(sessions) == 1, sessions
    assert len(list(sessions[0].glob("*.xplane.pb"))) == 1
    (trace,) = sessions[0].glob("*.trace.json.gz")
    return json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]


def _steps_named(events: list[dict], name: str) -> list[int]:
    return sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == name and "args" in e)


def test_train_profile_steps_then_generate_profile(tmp_path, token_file):
    out = tmp_path / "run"
    status, _, err = run_cli("train", *RUN, "--data", token_file, "--out", out, "--steps", "4",
                             "--profile-steps", "2:3")
    assert status == 0, err
    events = _trace_events(out / train.PROFILE)
    assert _steps_named(events, "train") == [2, 3]  # the steps asked for, each a step marker of the profile plugin
    assert any("train_step" in e.get("name", "") for e in events)  # the compiled step ran inside the trace

    where = tmp_path / "generation"
    status, ids, err = run_cli("generate", out, "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--profile", where)
    assert status == 0, err
    assert len(ids.split()) == 5 and f"profile in {where}" in err
    assert _steps_named(_trace_events(where), "decode") == list(range(6))  # 5 tokens and the generator's end


def test_bench_decode_profile_turn(tmp_path):
    """bench decode's trace of a row: a turn of a compiled decoder's steps, in the directory named for the row."""
    from mole_jax.bench.decode import Turns, profile_turn
    from mole_jax.decode import LanguageModel
    from mole_jax.decoder import random_state
    from mole_jax.model import init_params

    cfg = get_preset("tiny-dense")
    model = LanguageModel(cfg, init_params(cfg, seed=0), steps_per_dispatch=4)
    turns = Turns(steps=8, chunk=8, warmup=4, prompt_len=8, cache_len=8 + 4 + 8 + 1, steps_per_dispatch=4)
    template = random_state(cfg, 2, turns.prompt_len, turns.cache_len)
    profile_turn(model, template, turns, tmp_path / "warm", before=lambda: None)  # compiles, as the timing would
    where = profile_turn(model, template, turns, tmp_path / "dense-batch2")
    events = _trace_events(where)
    assert any(e.get("name") == "decode dense-batch2" for e in events)
    assert not any("compile" in e.get("name", "").lower() for e in events)  # a warm decoder: steps, no compiling


@pytest.mark.parametrize("argv, expected", [
    (["train", "--profile-steps", "5:3"], "--profile-steps: expected two step numbers A:B with 1 <= A <= B"),
    (["train", "--profile-steps", "x"], "got 'x'"),
    (["train", "--profile-steps", "0:2"], "got '0:2'"),
    (["train", "--profile-steps", "3:"], "got '3:'"),
    (["generate", "--profile", "{file}"], "is a file, not a directory"),
    (["bench", "decode", "--profile", "{file}"], "is a file, not a directory"),
])
def test_bad_profile_arguments_one_line(tmp_path, token_file, argv, expected):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    argv = [a.format(file=a_file) for a in argv]
    rest = {"train": [*RUN, "--data", token_file, "--out", tmp_path / "run", "--steps", "4"],
            "generate": [tmp_path / "run", "--prompt-ids", "1"], "bench": []}[argv[0]]
    status, out, err = run_cli(*argv, *rest)
    assert status == 2 and out == "" and len(err.strip().splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "run").exists()


def test_profile_range_past_the_last_step_is_refused(tmp_path, token_file):
    status, _, err = run_cli("train", *RUN, "--data", token_file, "--out", tmp_path / "run", "--steps", "4",
                             "--profile-steps", "5:6")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "starts after the run's last step (4)" in err and not (tmp_path / "run").exists()
