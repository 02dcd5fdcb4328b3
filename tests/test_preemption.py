"""Preemption: SIGTERM or SIGINT during `mole-jax train` finishes the running step, saves it, says so in one line
and exits 128 + the signal; several processes save the same step; a signal during the save does not cut it short;
rerunning the same command continues to the loss of the uninterrupted run."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import run_cli, xla_flags
from mole_jax import checkpoint, train
from mole_jax.config import TrainConfig, get_preset

CLI = [sys.executable, "-m", "mole_jax.cli"]
TIMEOUT_S = 900  # per subprocess: far above what one takes on a loaded 2-core machine
STEPS, EVERY = 60, 10
# tiny-dense on random token ids: preemption is about the loop, not the model; checkpoints every 10 steps, so
# that a stop between two of them has steps to lose
TC = TrainConfig(steps=STEPS, batch_size=8, seq_len=32, checkpoint_every=EVERY, eval_every=0, eval_batches=1,
                 log_every=1)
ARGS = ["--preset", "tiny-dense", "--steps", str(STEPS), "--batch-size", "8", "--seq-len", "32",
        "--checkpoint-every", str(EVERY), "--eval-every", "0", "--eval-batches", "1", "--log-every", "1",
        "--no-progress", "--no-tensorboard", "--peak-tflops", "1"]


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.bin"
    np.random.default_rng(0).integers(0, get_preset("tiny-dense").vocab_size, 60_000).astype(np.uint16).tofile(path)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, token_file) -> dict[int, float]:
    """The uninterrupted run's loss at every step (this process: the same 4 CPU devices and XLA flags as the
    subprocesses, so the same bits)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train.train(get_preset("tiny-dense").replace(dtype="float32"), TC, out=out, data_source=str(token_file),
                preset="tiny-dense", progress=False, peak_tflops=1.0, tensorboard=False)
    return _losses(out)


def _losses(out: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (out / checkpoint.METRICS).read_text().splitlines()]
    steps = [r["step"] for r in lines]
    assert steps == sorted(set(steps)), steps  # each step logged once
    return {r["step"]: r["loss"] for r in lines}


def _logged_step(out: Path) -> int:
    """The last step in metrics.jsonl (0 before the first)."""
    try:
        lines = (out / checkpoint.METRICS).read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max([json.loads(x)["step"] for x in lines if x.endswith("}")], default=0)


def _when_logged(out: Path, step: int, procs: list[subprocess.Popen]) -> None:
    """Return once `out` has logged `step` (the run is then at that step or one later)."""
    deadline = time.monotonic() + TIMEOUT_S
    while _logged_step(out) < step:
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"the run ended (status {p.returncode}) before step {step} was logged: "
                            + p.stderr.read()[-3000:])
        assert time.monotonic() < deadline, f"step {step} was not logged in time"
        time.sleep(0.005)  # polling the file: the run logs a step every few milliseconds


def _saved_line(stderr: str, name: str) -> int:
    """The step named by the one line a stopped run prints last."""
    last = stderr.strip().splitlines()[-1]
    prefix, suffix = f"mole-jax: {name}: saved step ", ", rerun the same command to resume"
    assert last.startswith(prefix) and last.endswith(suffix), stderr[-2000:]
    return int(last[len(prefix):-len(suffix)])


def _check_stopped_at(out: Path, saved: int, signalled_after: int) -> None:
    """The step the run was at when signalled (or later) is saved, and every step it logged is in it: none lost."""
    assert signalled_after <= saved < STEPS
    assert checkpoint.locate(out).step == saved
    assert _logged_step(out) == saved and sorted(_losses(out)) == list(range(1, saved + 1))


def _check_equals(out: Path, reference: dict[int, float]) -> None:
    got = _losses(out)
    assert sorted(got) == list(range(1, STEPS + 1)) and checkpoint.locate(out).step == STEPS
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], [reference[s] for s in range(1, STEPS + 1)],
                               rtol=1e-6)


def test_sigterm_then_sigint_on_four_devices_resume_to_the_uninterrupted_loss(tmp_path, token_file, reference,
                                                                               monkeypatch):
    if threading.current_thread() is not threading.main_thread():  # signals sent to this process need its handlers
        pytest.skip("signal handlers are installed from the main thread only")
    rng = random.Random()
    out = tmp_path / "run"
    cmd = ["train", *ARGS, "--data", str(token_file), "--out", str(out)]

    # SIGTERM at a random step of a 4-device run (its own process: the CLI as a scheduler runs it)
    at = rng.randint(3, 15)
    proc = subprocess.Popen(CLI + cmd, env={**os.environ, "XLA_FLAGS": xla_flags(4)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _when_logged(out, at, [proc])
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err[-3000:]
    first = _saved_line(err, "SIGTERM")
    _check_stopped_at(out, first, at)

    # the same command, in this process, gets SIGINT at a later random step; a SIGTERM arrives while a checkpoint
    # is being committed (Orbax's rename of the step's temporary directory), which must not cut the save short
    from orbax.checkpoint._src.path import atomicity

    at = rng.randint(first + 3, first + 15)
    interrupted, again = threading.Event(), threading.Event()
    commit = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize_with_a_signal(self, *a, **kw):
        if interrupted.is_set() and not again.is_set():
            again.set()
            os.kill(os.getpid(), signal.SIGTERM)
        return await commit(self, *a, **kw)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize_with_a_signal)

    finished = threading.Event()

    def interrupt():  # never after the run: a SIGINT then would be pytest's
        while _logged_step(out) < at and not finished.wait(0.005):
            pass
        if not finished.is_set():
            os.kill(os.getpid(), signal.SIGINT)
            interrupted.set()  # after the kill: a SIGTERM sent on seeing it comes second

    watcher = threading.Thread(target=interrupt, daemon=True)
    watcher.start()
    try:
        status, _, err = run_cli(*cmd)
    finally:
        finished.set()
        watcher.join()
    assert status == 130, err[-3000:]
    second = _saved_line(err, "SIGINT")
    _check_stopped_at(out, second, at)
    assert again.is_set() and "SIGTERM again: finishing the checkpoint of the current step first" in err, err
    previous = max(s for s in checkpoint._steps(out / checkpoint.CHECKPOINTS) if s < second)
    for step in (previous, second):  # the save the SIGTERM came during, and the one before, restore whole
        _, params = checkpoint.restore_params(out / checkpoint.CHECKPOINTS / str(step), as_numpy=True)
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))
    monkeypatch.undo()

    # rerun once more: it continues to the end, the steps and losses of the uninterrupted run
    status, stdout, err = run_cli(*cmd)
    assert status == 0 and f"trained tiny-dense to step {STEPS}" in stdout, err[-3000:]
    _check_equals(out, reference)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(cmd: list[str]) -> list[subprocess.Popen]:
    port = _free_port()
    return [subprocess.Popen(CLI + cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={
        **os.environ, "XLA_FLAGS": xla_flags(2), "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
        "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid)}) for pid in range(2)]


def _communicate(procs: list[subprocess.Popen]) -> list[str]:
    """Each process's stderr once all have ended (one left hanging by a dead peer is killed)."""
    try:
        return [p.communicate(timeout=TIMEOUT_S)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def test_sigterm_to_one_of_two_processes_both_save_the_same_step(tmp_path, token_file, reference):
    """SIGTERM to process 1 only (jax.distributed over localhost, 2 devices each): process 0 learns of it through
    the steps' agreement, both save the same step and exit 143. The checkpoint is the whole run's: resumed here
    (one process of 4 devices, a cheaper rerun than two new processes), it continues to the uninterrupted run's
    losses."""
    out = tmp_path / "run"
    cmd = ["train", *ARGS, "--data", str(token_file), "--out", str(out)]
    at = random.Random().randint(3, 15)
    procs = _two_processes(cmd)
    try:
        _when_logged(out, at, procs)
        procs[1].send_signal(signal.SIGTERM)
    finally:
        errs = _communicate(procs)
    assert [p.returncode for p in procs] == [143, 143], errs[0][-3000:] + errs[1][-3000:]
    saved = {_saved_line(err, "SIGTERM") for err in errs}
    assert len(saved) == 1, saved
    _check_stopped_at(out, saved.pop(), at)

    status, stdout, err = run_cli(*cmd)
    assert status == 0 and f"trained tiny-dense to step {STEPS}" in stdout, err[-3000:]
    _check_equals(out, reference)
