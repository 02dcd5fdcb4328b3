"""The notebooks run top to bottom (nbclient, a fresh kernel, a temporary working directory, the network cut off)
and are committed without outputs."""

import json
import os
import re
from pathlib import Path

import pytest

from conftest import xla_flags

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["quickstart.ipynb", "latency.ipynb"]

# Run first in the kernel: any connection beyond this machine fails the notebook (the kernel's own channels are
# ZeroMQ sockets, not Python ones).
NO_NETWORK = """
import socket as _socket
_connect = _socket.socket.connect
def _local_only(self, address, *args):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and not host.startswith("/") and host not in ("127.0.0.1", "localhost", "::1"):
        raise OSError(f"a notebook tried to reach the network: {address}")
    return _connect(self, address, *args)
_socket.socket.connect = _local_only
"""


def _run(name: str, workdir: Path, parameters: str = "", **env_changes) -> nbformat.NotebookNode:
    """Runs a notebook; `parameters`, if given, is a cell run right after its parameters cell (as papermill
    injects one)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    if parameters:
        at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        nb.cells.insert(at + 1, nbformat.v4.new_code_cell(parameters))
    nb.cells.insert(0, nbformat.v4.new_code_cell(NO_NETWORK))
    # one CPU device as a user would have (conftest fakes four for the sharding tests), offline
    env = dict(os.environ)
    env.update(XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TMPDIR=str(workdir), MPLBACKEND="module://matplotlib_inline.backend_inline", **env_changes)
    # per cell, and for the kernel to start: generous for a slow 2-core machine (the longest cell, training, takes
    # under a minute on 2 busy cores); pytest.ini's timeout bounds the whole test
    client = nbclient.NotebookClient(nb, timeout=600, startup_timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute(env=env)  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    return nb


def _text(nb) -> str:
    return "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/plain", ""))
                   for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert any("parameters" in c.metadata.get("tags", []) for c in code)


def test_quickstart_runs(tmp_path):
    nb = _run("quickstart.ipynb", tmp_path, parameters="STEPS = 80")  # enough to learn; the default is a demo's
    text = _text(nb)
    losses = re.search(r"training loss ([\d.]+), validation loss ([\d.]+)", text)
    assert losses and float(losses.group(2)) < 5.5  # trained: a uniform guess over 512 ids is 6.24 nats
    # the two forms compute the same function (the table's float16 rounding aside): every greedy token the same
    shared = re.search(r"greedy tokens shared by both forms: (\d+) of (\d+)", text)
    assert shared and (int(shared.group(1)), int(shared.group(2))) == (48, 48), shared and shared.group(0)
    assert "'ok': True" in text and "most distinctive tokens" in text and "experts disagree most" in text
    assert _images(nb) >= 3
    assert f"run directory: {tmp_path}" in text  # the notebook writes into a temporary directory only


def test_latency_runs_a_benchmark_then_plots_a_given_file(tmp_path):
    nb = _run("latency.ipynb", tmp_path)
    found = re.search(r"benchmark results: (\S+decode\.json)", _text(nb))
    assert found and _images(nb) == 2
    result = Path(found.group(1))
    assert result.is_relative_to(tmp_path)
    rows = json.loads(result.read_text())["rows"]
    assert {r["model"] for r in rows} >= {"dense", "moe", "moe-offload", "mole-device", "mole-host", "mole-storage"}
    again = _run("latency.ipynb", tmp_path, MOLE_BENCH_JSON=str(result))
    text = _text(again)
    assert f"loaded {result}" in text and "running a tiny benchmark" not in text and _images(again) == 2
