"""experiments/accelerator.py, the one command for an accelerator window, in its CPU form: run as a user runs it
there (a fresh process, PYTHONPATH=., no arguments beyond the scale, budget and output), it writes its JSON and
markdown, measures every piece, and stops cleanly at its budget."""

import json
import os
import subprocess
import sys
from pathlib import Path


from conftest import xla_flags

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu"}
    # the budget bounds the measuring (--budget-s 300 at most here); the rest is start-up and writing the results
    return subprocess.run([sys.executable, "experiments/accelerator.py", "--scale", "tiny", "--out",
                           str(tmp_path / "out"), "--workdir", str(tmp_path), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _results(tmp_path: Path) -> tuple[dict, str, Path]:
    (device_dir,) = (tmp_path / "out").iterdir()  # OUT/<device kind>/
    return (json.loads((device_dir / "accelerator.json").read_text()),
            (device_dir / "accelerator.md").read_text(), device_dir)


def test_tiny_form_measures_every_piece(tmp_path):
    out = _run(tmp_path, "--budget-s", "300")
    assert out.returncode == 0, out.stderr[-3000:]
    doc, md, device_dir = _results(tmp_path)
    assert doc["errors"] == {} and doc["skipped"] == [] and doc["stopped"] is None
    dev = doc["device"]
    assert dev["backend"] == "cpu" and dev["bf16_matmul_peak_flops_per_s"] > 0 and dev["jax"] and dev["jaxlib"]
    assert dev["transfer"]["h2d_pageable"] > 0 and dev["transfer"]["d2h_pageable"] > 0
    models = {r["model"] for r in doc["decode"]["rows"]}
    assert models >= {"dense", "moe", "moe-offload", "mole-device", "mole-host", "mole-host-gather", "mole-storage",
                      "mole-storage-batched"}
    assert doc["decode"]["in_program_host_read"] == {"compiles": True, "why_not": None}  # the CPU backend compiles it
    conv = doc["convert"]
    assert conv["bytes_written"] > 0 and conv["achieved_flops_per_s"] > 0 and conv["write_floor_bytes_per_s"] > 0
    train = {r["model"]: r for r in doc["train"]}
    assert list(train) == ["dense", "mole-dedup", "moe", "mole-plain"]
    for r in train.values():
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu_vs_measured_peak"]
        assert r["loss"] == r["loss"]  # not NaN
    assert train["mole-dedup"]["dedup_rows"] and not train["mole-plain"]["dedup_rows"]
    # every goal is evaluated; the ones a CPU cannot measure (pinned memory, a nominal peak) say so with None
    texts = [g["goal"] for g in doc["goals"]]
    assert any("MFU" in t for t in texts) and any("mole-storage" in t for t in texts)
    assert all(g["holds"] in (True, False, None) for g in doc["goals"])
    assert "## Goals" in md and "## Training" in md and "## Decoding" in md and doc["command"] in md
    assert json.loads((device_dir / "decode.json").read_text())["rows"]


def test_stops_at_its_budget_with_what_it_measured(tmp_path):
    """A 4 s budget: the decode piece (estimated at 5 s at this scale) never starts, and neither does the rest of
    what the budget cannot cover; what was measured is written. (The work done, not the wall time, is checked.)"""
    out = _run(tmp_path, "--budget-s", "4")
    assert out.returncode == 0, out.stderr[-3000:]
    doc, md, _ = _results(tmp_path)
    # either the watchdog ended a piece, or the planner skipped the pieces the budget left could not cover
    assert doc["stopped"] == "budget reached in the middle of a piece" or "decode" in doc["skipped"]
    assert doc["decode"] is None and "[accelerator] decode (" not in out.stderr  # never started
    assert len(doc["train"]) < 4
    assert "stopped" in md or "Skipped" in md


def test_bad_budget_is_one_line(tmp_path):
    out = _run(tmp_path, "--budget-s", "0")
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert lines and lines[-1].endswith("error: --budget-s must be positive"), out.stderr
    assert not (tmp_path / "out").exists()  # refused before writing anything
    assert len(lines) == 1, out.stderr


def test_small_decode_goals(monkeypatch):
    """The 160M run also times `bench decode --preset-size small` (whose steps are short): its rows get their own
    goal lines, the in-program host read against 1.03 at every batch size; whether the backend compiled the
    in-program read is a goal line of its own."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("accelerator", ROOT / "experiments" / "accelerator.py")
    acc = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "accelerator", acc)  # its dataclasses look their module up
    spec.loader.exec_module(acc)
    assert acc.SCALES["160m"].small_decode and not acc.SCALES["tiny"].small_decode
    rows = [{"model": m, "batch_size": B, "vs_dense": v} for m, B, v in
            (("mole-host", 1, 1.02), ("mole-host", 8, 1.08), ("mole-storage", 1, 1.3), ("mole-storage", 8, 1.2))]
    holds = {g["goal"]: g["holds"] for g in acc.goals({"decode_small": {"rows": rows}, "decode": {
        "rows": [], "in_program_host_read": {"compiles": False, "why_not": "refused"}}})}
    assert holds["the backend compiles the host placement's in-program read"] is False
    assert holds["decode small mole-host / dense at batch 1 <= 1.03"] is True
    assert holds["decode small mole-host / dense at batch 8 <= 1.03"] is False
    assert holds["decode small mole-storage / dense at batch 1 <= 1.25"] is False
    assert holds["decode small mole-storage / dense at batch 8 <= 1.25"] is True
