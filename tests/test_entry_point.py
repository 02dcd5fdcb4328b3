"""The installed `mole-jax` console script itself (pyproject's [project.scripts]), run as a user runs it: its help,
and a bad input answered with exit status 2 and one line on stderr. (Other tests call cli.main in process.)"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

TIMEOUT_S = 300  # a fresh interpreter importing JAX, on a slow machine


def _entry_point() -> str:
    """The script next to this interpreter (the virtual environment's bin/), else the one on PATH."""
    beside = Path(sys.executable).parent / "mole-jax"
    found = str(beside) if beside.is_file() else shutil.which("mole-jax")
    assert found, "the mole-jax command is not installed: pip install -e '.[dev]'"
    return found


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([_entry_point(), *args], capture_output=True, text=True, env=env, timeout=TIMEOUT_S)


def test_help():
    r = _run("--help")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("usage: mole-jax") and "Traceback" not in r.stderr
    for command in ("train", "convert", "generate", "import-hf"):
        assert command in r.stdout, command


def test_bad_input_is_exit_2_and_one_line(tmp_path):
    r = _run("import-hf", str(tmp_path / "missing"), str(tmp_path / "out"))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith("mole-jax: error: ") and "is not a directory" in lines[0], lines
    assert not (tmp_path / "out").exists()
