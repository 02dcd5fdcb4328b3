"""The main job end to end (the README's first command), at tiny size; a rerun resumes and reuses the table."""

import json
import subprocess
import sys

from mole_jax import lut
from mole_jax.quickstart import run


def test_quickstart_end_to_end_and_rerun(tmp_path):
    settings = dict(preset="tiny-mole", steps=30, seq_len=64, timing_steps=8, max_new_tokens=8, progress=False)
    report = run(tmp_path / "qs", **settings)
    assert report["steps"] == 30 and report["final_loss"] < report["first_loss"]
    assert report["generated"] and isinstance(report["generated"], str)
    table = lut.open_lut(tmp_path / "qs" / "mole" / "lut")
    assert report["lut_bytes_on_disk"] == table.nbytes > 0 and report["lut_scheme"] == "float16"
    dev = report["device_param_bytes"]
    # the table replaces the experts on the device: what stays is within 2% of the Dense model's parameters
    assert abs(dev["mole-lut-storage"] / dev["dense"] - 1) < 0.02
    assert dev["mole-experts-on-device"] > 2 * dev["mole-lut-storage"]
    assert set(report["ms_per_step"]) == {"mole-lut-storage", "mole-lut-host", "dense"}
    assert all(v > 0 for v in report["ms_per_step"].values())
    saved = json.loads((tmp_path / "qs" / "report.json").read_text())
    assert saved["lut_bytes_on_disk"] == report["lut_bytes_on_disk"]
    mtime = (tmp_path / "qs" / "mole" / "lut" / lut.META_KEY).stat().st_mtime_ns
    again = run(tmp_path / "qs", **settings)
    assert again["final_loss"] == report["final_loss"] and again["generated"] == report["generated"]
    assert (tmp_path / "qs" / "mole" / "lut" / lut.META_KEY).stat().st_mtime_ns == mtime  # table reused


def test_quickstart_cli_bad_preset(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mole_jax.cli", "quickstart", "--out", str(tmp_path / "q"),
                        "--preset", "tiny-nope"], capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith("mole-jax: error: ") and "unknown preset" in lines[0]
    assert not (tmp_path / "q").exists()
