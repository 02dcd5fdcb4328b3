"""Training: the step against plain references (dedup, accumulation, sharding), crash and resume, the CLI on the
embedded default corpus, multi-host, and bad input."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import prime_config, run_cli, xla_flags
from mole_jax import checkpoint, data, sharding, train
from mole_jax.config import MoleError, TrainConfig, get_preset
from mole_jax.model import graphdef_and_shapes, init_params
from mole_jax.train_step import (TrainState, choose_dedup_rows, loss_fn, lr_schedule, make_grad_fn, make_optimizer,
                                 make_train_step, train_flops_per_token)

# 10 steps of tiny-mole on 16 x 64 tokens: MoLE with dedup is the path with the most machinery.
TC = TrainConfig(steps=10, batch_size=16, seq_len=64, peak_lr=3e-3, warmup_frac=0.1, checkpoint_every=5,
                 eval_every=5, eval_batches=2, log_every=1)
CLI = [sys.executable, "-m", "mole_jax.cli"]
# Subprocess limits: about five times what each takes on a 2-core machine, for a machine three times slower.
TIMEOUT_S = 900


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """Real English (the language reference's prose) and a BPE tokenizer trained on it once for all tests."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("text")
    (root / "corpus.txt").write_text("\n\n".join(topics[k] for k in sorted(topics)))
    tok = data.train_tokenizer([(root / "corpus.txt").read_text()], 512)
    tok.save(str(root / "tokenizer.json"))
    return root / "corpus.txt", root / "tokenizer.json"


def _train(out, text_data, *, tc=TC, preset="tiny-mole", **kw):
    return train.train(get_preset(preset), tc, out=out, data_source=text_data[0], tokenizer=text_data[1],
                       preset=preset, progress=False, **kw)


def _event_files(directory: Path) -> list:
    """The events of each TensorBoard event file in `directory`, the files in the order they were started. Read
    from the TFRecord framing (length, crc, data, crc) with tensorboardX's Event protobuf."""
    import struct

    from tensorboardX.proto import event_pb2

    files = []
    for path in directory.glob("events.out.tfevents.*"):
        raw, events = path.read_bytes(), []
        while raw:
            (n,) = struct.unpack("<Q", raw[:8])
            events.append(event_pb2.Event.FromString(raw[12:12 + n]))
            raw = raw[12 + n + 4:]
        files.append(events)
    return sorted(files, key=lambda e: e[0].wall_time)


def _events(directory: Path) -> dict[str, dict[int, float]]:
    """The scalars of TensorBoard event files as TensorBoard shows them: {tag: {step: value}}, the files read in
    the order they were started, a SessionLog START at step s (a writer's purge_step) dropping the steps >= s
    before it."""
    scalars: dict[str, dict[int, float]] = {}
    for events in _event_files(directory):
        for e in events:
            if e.HasField("session_log") and e.session_log.status == e.session_log.START:
                for steps in scalars.values():
                    for s in [s for s in steps if s >= e.step]:
                        del steps[s]
            for v in e.summary.value:
                scalars.setdefault(v.tag, {})[e.step] = v.simple_value
    return scalars


def _check_events(out: Path, directory: Path | None = None) -> None:
    """The event files hold every scalar of every metrics.jsonl record at its step, and nothing else."""
    lines = [json.loads(x) for x in (out / checkpoint.METRICS).read_text().splitlines()]
    want: dict[str, dict[int, float]] = {}
    for r in lines:
        for k, v in r.items():
            if k != "step":
                want.setdefault(k, {})[r["step"]] = v
    got = _events(directory or out / train.TENSORBOARD)
    assert sorted(got) == sorted(want)
    for tag in want:
        assert sorted(got[tag]) == sorted(want[tag]), tag
        np.testing.assert_allclose([got[tag][s] for s in sorted(want[tag])],
                                   [want[tag][s] for s in sorted(want[tag])], rtol=1e-6, err_msg=tag)


def _losses(result_or_path) -> dict[int, float]:
    path = Path(result_or_path) / checkpoint.METRICS
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_data):
    """The same 10-step run on 1 device and on 4 devices (fully sharded, per-device dedup)."""
    root = tmp_path_factory.mktemp("runs")
    return {n: _train(root / f"devices{n}", text_data, devices=n) for n in (1, 4)}


# The step against plain references ------------------------------------------------------------------------------
def test_sharded_equals_single_device(runs):
    one, four = runs[1], runs[4]
    assert one.dedup_rows > 0 and four.dedup_rows > 0  # dedup really ran: global on 1 device, per device on 4
    a, b = _losses(one.out), _losses(four.out)
    assert sorted(a) == list(range(1, 11)) and sorted(b) == list(range(1, 11))
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
    assert a[10] < a[1] - 0.3  # it trained
    np.testing.assert_allclose(four.val_loss, one.val_loss, rtol=1e-5)


def test_moe_sharded_equals_single_device(tmp_path, text_data):
    """MoE's auxiliary losses are means over the whole (sharded) batch: the same on 1 and on 4 devices."""
    tc = TrainConfig(**{**TC.to_dict(), "steps": 6, "eval_every": 0})
    one, four = (_train(tmp_path / f"d{n}", text_data, tc=tc, preset="tiny-moe", devices=n) for n in (1, 4))
    for key in ("loss", "balance", "router_z", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in four.history], [r[key] for r in one.history], rtol=1e-5,
                                   err_msg=key)


@pytest.fixture(scope="module")
def dedup_case():
    """A MoLE with prime dims, ids < 17 (many repeats), and the plain per-token path's loss and gradients."""
    cfg = prime_config("mole", num_layers=2)
    params = init_params(cfg, seed=1)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 17, (8, 12)), jnp.int32)
    return cfg, params, tokens, jax.jit(make_grad_fn(cfg))(params, tokens)


@pytest.mark.parametrize("devices,capacity", [(1, 17), (4, 17), (1, 3), (4, 3)])
def test_dedup_equals_plain_loss_and_grads(dedup_case, devices, capacity):
    """MoLE's dedup (per device on a mesh) against the per-token path: same loss, same gradients. Capacity 17
    holds every distinct id; capacity 3 forces the exact per-token fallback."""
    cfg, params, tokens, ((l0, _), g0) = dedup_case
    mesh = sharding.make_mesh(devices)
    (l1, m1), g1 = jax.jit(make_grad_fn(cfg, dedup_rows=capacity, mesh=mesh))(params, tokens)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    assert float(m1["dedup_overflow"]) == (0.0 if capacity == 17 else 1.0)
    shares = np.asarray(tokens[:, :-1]).reshape(devices, -1)
    np.testing.assert_allclose(m1["unique_fraction"], np.mean([np.unique(s).size / s.size for s in shares]))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(np.abs(b).max(), 1e-12))
    assert np.abs(np.asarray(g0["embed_VxD"])).max() > 0  # gradients reach the embedding through the gather


def test_dedup_capacity_holds_later_batches():
    """U from the run's first shares (mean + 3.5 std, at least their maximum) holds the distinct ids of the shares
    that follow, with less padding than a 10% margin over the maximum would take."""
    corpus = data.open_corpus(None, vocab_size=4096)
    windows, _ = data.split_windows(corpus.tokens.size, 128, 0.0)
    batches = data.Batches(corpus.tokens, windows, seq_len=128, batch_size=32, seed=3, vocab_size=4096)
    dedup = choose_dedup_rows(batches, 2, 2, 4096)  # shares of 1,024 tokens: 2 micro-batches x 2 devices
    later = [np.unique(share).size for step in range(40, 140)
             for share in batches.batch(step)[:, :-1].reshape(4, -1)]
    assert dedup["tokens_per_share"] == 1024 and dedup["rows"] % 8 == 0 and dedup["max_unique"] <= dedup["rows"]
    assert np.mean(np.asarray(later) > dedup["rows"]) <= 0.01
    assert dedup["rows"] < 1024 and dedup["rows"] <= 1.1 * dedup["max_unique"] + 8


def test_grad_accumulation_equals_one_batch():
    cfg = prime_config("mole", num_layers=1)
    tc = TrainConfig(steps=5, batch_size=8, seq_len=11)
    tx = make_optimizer(tc)
    params = init_params(cfg)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (8, 12)), jnp.int32)
    out = {accum: jax.device_get(jax.jit(make_train_step(cfg, tc, tx))(state, tokens.reshape(accum, -1, 12))[1])
           for accum in (1, 4)}
    for k in ("loss", "grad_norm", "lr"):
        np.testing.assert_allclose(out[4][k], out[1][k], rtol=1e-5, err_msg=k)


@pytest.mark.parametrize("kind", ["moe", "mole"])
def test_moe_objective_adds_aux_losses_mole_adds_none(kind):
    cfg = prime_config(kind)
    graphdef, _ = graphdef_and_shapes(cfg)
    # 4 x 37 predicted tokens: more than model.DECODE_ROWS, so the MoE runs its training path
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (4, 38)), jnp.int32)
    params = init_params(cfg)
    objective, m = jax.jit(lambda p, t: loss_fn(p, graphdef, cfg, t))(params, tokens)
    logits = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t).logits_BxTxV)(params, tokens[:, :-1])
    ce = -np.mean(np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(tokens[:, 1:, None]), -1))
    np.testing.assert_allclose(m["loss"], ce, rtol=1e-6)
    expected = ce + (0.01 * m["balance"] + 0.001 * m["router_z"] if kind == "moe" else 0.0)
    np.testing.assert_allclose(objective, expected, rtol=1e-6)
    assert (set(m) >= {"balance", "router_z"}) == (kind == "moe")


def test_optimizer_recipe():
    tc = TrainConfig(steps=1000, peak_lr=6e-4)
    lr = lr_schedule(tc)
    np.testing.assert_allclose([lr(0), lr(9), lr(10), lr(505), lr(1000)],
                               [6e-5, 6e-4, 6e-4, 3.3e-4, 6e-5], rtol=1e-4)  # warmup 10, cosine to 0.1x
    cfg = prime_config("mole")
    params = init_params(cfg)
    tx = make_optimizer(tc)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zero, tx.init(params), params)
    # decoupled weight decay 0.1 at lr(0) on matrices; RMSNorm scales are not decayed
    np.testing.assert_allclose(updates["embed_VxD"], -6e-5 * 0.1 * params["embed_VxD"], rtol=1e-5)
    assert np.all(np.asarray(updates["blocks"][0]["norm_post"]["scale_D"]) == 0)
    assert np.all(np.asarray(updates["norm_out"]["scale_D"]) == 0)


def test_flops_count_matches_paper_sized_ratio():
    dense, mole = get_preset("small-dense"), get_preset("small-mole")
    fd, fm = train_flops_per_token(dense, 256), train_flops_per_token(mole, 256)
    assert 2.2 < fm / fd < 2.6  # "without dedup about 2.5x at the small presets"
    assert fd < train_flops_per_token(mole, 256, expert_rows_per_token=0.1) < 1.3 * fd
    n = dense.param_counts()["total"] - dense.vocab_size * dense.d_model  # matmul params (no embedding gather)
    assert abs(fd - (6 * n + 3 * 4 * 256 * dense.d_model * dense.num_layers)) / fd < 0.01  # 6N + attention


def test_nominal_peaks_by_device_kind():
    assert train.nominal_peak("NVIDIA H100 80GB HBM3") == 989e12 and train.nominal_peak("NVIDIA H200") == 989e12
    assert train.nominal_peak("NVIDIA H100 PCIe") == 756e12 and train.nominal_peak("NVIDIA A100-SXM4-40GB") == 312e12
    assert train.nominal_peak("TPU v4") == 275e12 and train.nominal_peak("TPU v5 lite") == 197e12
    assert train.nominal_peak("TPU v5p") == 459e12 and train.nominal_peak("TPU v6 lite") == 918e12
    assert train.nominal_peak("cpu") is None and train.nominal_peak("Some New Chip") is None


# Resume -------------------------------------------------------------------------------------------------------
_CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from mole_jax import train
    from mole_jax.config import TrainConfig, get_preset
    out, text, tok, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    tc = TrainConfig(steps=40, batch_size=16, seq_len=64, peak_lr=3e-3, warmup_frac=0.1, checkpoint_every=20,
                     eval_every=20, eval_batches=2, log_every=1)

    def on_step(step, metrics):
        if step == kill_at:  # after the step-20 checkpoint became durable (Orbax renames it into place)
            deadline = time.monotonic() + 600
            while not (Path(out) / "checkpoints" / "20" / "params").is_dir():
                if time.monotonic() > deadline:
                    sys.exit("the step-20 checkpoint did not appear")
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)

    train.train(get_preset("tiny-mole"), tc, out=out, data_source=text, tokenizer=tok, progress=False,
                on_step=on_step)
""")


def test_crash_and_resume_equals_uninterrupted(tmp_path, text_data):
    script = tmp_path / "run.py"
    script.write_text(_CRASH_SCRIPT)
    cmd = [sys.executable, str(script), str(tmp_path / "crashed"), str(text_data[0]), str(text_data[1])]
    killed = subprocess.run(cmd + ["27"], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert checkpoint.locate(tmp_path / "crashed").step == 20
    assert max(_losses(tmp_path / "crashed")) >= 26  # it had logged past the checkpoint when it died
    resumed = subprocess.run(cmd + ["0"], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    tc = TrainConfig(**{**TC.to_dict(), "steps": 40, "checkpoint_every": 20, "eval_every": 20})
    reference = _train(tmp_path / "uninterrupted", text_data, tc=tc)
    _, got = checkpoint.restore_params(tmp_path / "crashed", as_numpy=True)
    _, want = checkpoint.restore_params(reference.out, as_numpy=True)
    assert checkpoint.locate(tmp_path / "crashed").step == 40
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())
    lines = [json.loads(x) for x in (tmp_path / "crashed" / checkpoint.METRICS).read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 41))  # the killed run's steps 21-27 were replaced
    np.testing.assert_allclose([r["loss"] for r in lines], [r["loss"] for r in reference.history], rtol=1e-6)
    # TensorBoard: two writers' files; the resumed one starts with a purge at step 21, so that its steps 21-40
    # replace the killed one's 21-26 or more, and holds only steps 21-40
    killed, resumed = _event_files(tmp_path / "crashed" / train.TENSORBOARD)
    assert max(e.step for e in killed if e.summary.value) >= 26
    purges = [e.step for e in resumed if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert purges == [21] and {e.step for e in resumed if e.summary.value} == set(range(21, 41))
    _check_events(tmp_path / "crashed")


class _Stop(Exception):
    pass


def test_resume_on_another_device_count(tmp_path, text_data, runs):
    def stop_at_5(step, metrics):
        if step == 5:
            raise _Stop

    with pytest.raises(_Stop):
        _train(tmp_path / "run", text_data, devices=4, on_step=stop_at_5)
    assert checkpoint.locate(tmp_path / "run").step == 5
    result = _train(tmp_path / "run", text_data, devices=2)  # the same call on 2 devices continues at step 6
    assert [r["step"] for r in result.history] == list(range(6, 11))
    want = _losses(runs[4].out)
    np.testing.assert_allclose([r["loss"] for r in result.history], [want[s] for s in range(6, 11)], rtol=1e-5)
    assert json.loads((tmp_path / "run" / checkpoint.RUN_FILE).read_text())["devices"] == 2
    # a finished run is complete: rerunning trains nothing
    again = _train(tmp_path / "run", text_data, devices=2)
    assert again.history == [] and again.step == 10


def test_extending_steps_keeps_the_learning_rate_schedule(tmp_path, text_data, runs):
    """Steps 1-6 of a 10-step schedule, resumed to 10 (the schedule is then its steps, 10 again): the uninterrupted
    run, learning rate and loss. Extending the finished run needs --schedule-steps (else one line, exit 2, nothing
    touched), and the steps past the schedule train at its final rate."""
    out = tmp_path / "run"
    _train(out, text_data, tc=dataclasses.replace(TC, steps=6, schedule_steps=10))
    assert json.loads((out / checkpoint.RUN_FILE).read_text())["train_config"]["schedule_steps"] == 10
    resumed = _train(out, text_data)  # TC: steps 10, schedule_steps None
    want = {r["step"]: r for r in runs[1].history}
    got = {r["step"]: r for r in map(json.loads, (out / checkpoint.METRICS).read_text().splitlines())}
    assert sorted(got) == list(range(1, 11)) and [r["step"] for r in resumed.history] == list(range(7, 11))
    for key in ("lr", "loss"):
        np.testing.assert_allclose([got[s][key] for s in range(1, 11)], [want[s][key] for s in range(1, 11)],
                                   rtol=1e-6, err_msg=key)

    before = _snapshot(out)
    line = _cli_error(["train", "--preset", "tiny-mole", "--data", text_data[0], "--tokenizer", text_data[1],
                       "--out", out, "--steps", "12", "--batch-size", "16", "--seq-len", "64", "--lr", "3e-3",
                       "--warmup-frac", "0.1", "--no-progress"])
    assert "schedule spans 10 steps; this would make it 12" in line and "--schedule-steps 10" in line, line
    assert _snapshot(out) == before
    extended = _train(out, text_data, tc=dataclasses.replace(TC, steps=12, schedule_steps=10))
    assert [r["step"] for r in extended.history] == [11, 12]
    np.testing.assert_allclose([r["lr"] for r in extended.history], 2 * [TC.peak_lr * TC.final_lr_frac], rtol=1e-6)
    assert json.loads((out / checkpoint.RUN_FILE).read_text())["train_config"]["steps"] == 12
    with pytest.raises(MoleError, match="schedule steps must be positive"):
        _train(tmp_path / "bad", text_data, tc=dataclasses.replace(TC, schedule_steps=0))


# Multi-host ---------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path, text_data, runs):
    """Two CPU processes of 2 devices each (jax.distributed over localhost), each feeding only its own rows of
    every batch: the same losses as one process with 4 devices."""
    port = _free_port()
    args = ["train", "--preset", "tiny-mole", "--data", str(text_data[0]), "--tokenizer", str(text_data[1]),
            "--out", str(tmp_path / "run"), "--steps", "10", "--batch-size", "16", "--seq-len", "64", "--lr", "3e-3",
            "--warmup-frac", "0.1", "--checkpoint-every", "5", "--eval-every", "5", "--eval-batches", "2",
            "--log-every", "1", "--no-progress"]
    procs = []
    for pid in range(2):
        env = {**os.environ, "XLA_FLAGS": xla_flags(2), "JAX_PLATFORMS": "cpu",
               "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen(CLI + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    finally:  # one that hangs (a coordinator waiting for a peer that died) is not left running
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "trained tiny-mole to step 10" in outs[0][0] and "trained" not in outs[1][0]  # process 0 reports
    run = json.loads((tmp_path / "run" / checkpoint.RUN_FILE).read_text())
    assert run["processes"] == 2 and run["devices"] == 4
    got, want = _losses(tmp_path / "run"), _losses(runs[4].out)
    np.testing.assert_allclose([got[s] for s in range(1, 11)], [want[s] for s in range(1, 11)], rtol=1e-5)


# The CLI on the embedded default corpus --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    cmd = CLI + ["train", "--preset", "tiny-mole", "--out", str(out), "--steps", "120", "--batch-size", "16",
                 "--seq-len", "64", "--lr", "3e-3", "--checkpoint-every", "60", "--eval-every", "40"]
    # one device, as on a laptop (four fake ones cost a third more CPU; sharding has its own tests above)
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": xla_flags(1)},
                       timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, cmd, r


def test_loss_falls_on_the_default_corpus(cli_run):
    out, _, r = cli_run
    assert "trained tiny-mole to step 120" in r.stdout
    assert "loss=" in r.stderr and "tok_s=" in r.stderr and "mfu=" in r.stderr  # the progress bar
    lines = [json.loads(x) for x in (out / checkpoint.METRICS).read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "unique_fraction", "tflops", "mfu"} <= set(lines[0])
    assert all(r["tokens_per_s"] > 0 and np.isfinite(r["loss"]) for r in lines)
    val = [r["val_loss"] for r in lines if "val_loss" in r]
    assert len(val) == 3 and val[0] > val[1] > val[2]
    assert val[-1] < np.log(512) - 1.5  # from uniform (ln 512 = 6.24) to clearly below, in seconds of training
    assert lines[-1]["loss"] < lines[0]["loss"] - 1.0
    run = json.loads((out / checkpoint.RUN_FILE).read_text())
    assert run["data"]["kind"] == "default" and run["preset"] == "tiny-mole" and run["dedup"]["rows"] > 0
    assert (out / checkpoint.TOKENIZER).is_file()
    assert sorted(int(p.name) for p in (out / checkpoint.CHECKPOINTS).iterdir()) == [60, 120]
    _check_events(out)  # OUT/tensorboard by default (tensorboardX is in the dev extra)


def test_tflops_and_mfu_in_every_record(cli_run, tmp_path, text_data):
    """tflops = the model's FLOPs per token x tokens/s; mfu = that / the peak: on CPU a float32 matmul rate measured
    at the start (recorded in run.json), or one device's --peak-tflops."""
    out, _, _ = cli_run
    run = json.loads((out / checkpoint.RUN_FILE).read_text())
    peak = run["peak"]
    assert peak["source"].startswith("measured") and peak["flops_per_s"] == peak["measured_flops_per_s"] > 0
    assert run["flops_per_token"] == train_flops_per_token(get_preset("tiny-mole"), 64)
    lines = [json.loads(x) for x in (out / checkpoint.METRICS).read_text().splitlines()]
    for r in lines:
        assert r["tflops"] > 0 and 0 < r["mfu"] < 1.5, r
        np.testing.assert_allclose(r["tflops"] * 1e12, run["flops_per_token"] * r["tokens_per_s"], rtol=1e-9)
        np.testing.assert_allclose(r["mfu"] * peak["flops_per_s"], r["tflops"] * 1e12, rtol=1e-9)

    tc = dataclasses.replace(TC, steps=3, eval_every=0, checkpoint_every=3)
    result = _train(tmp_path / "peak", text_data, tc=tc, devices=1, peak_tflops=1000)
    run = json.loads((tmp_path / "peak" / checkpoint.RUN_FILE).read_text())
    assert run["peak"]["source"] == "--peak-tflops" and run["peak"]["flops_per_s"] == 1000e12
    assert [r["step"] for r in result.history] == [1, 2, 3]
    for r in result.history:
        assert r["tflops"] > 0
        np.testing.assert_allclose(r["mfu"] * 1000, r["tflops"], rtol=1e-9)
    _check_events(tmp_path / "peak")
    _train(tmp_path / "elsewhere", text_data, tc=tc, devices=1, tensorboard=tmp_path / "events")
    _check_events(tmp_path / "elsewhere", tmp_path / "events")
    _train(tmp_path / "none", text_data, tc=tc, devices=1, tensorboard=False)
    assert not (tmp_path / "none" / train.TENSORBOARD).exists()
    with pytest.raises(MoleError, match="--peak-tflops must be a positive number"):
        _train(tmp_path / "bad", text_data, tc=tc, peak_tflops=-1.0)
    assert not (tmp_path / "bad").exists()


def test_eval_cli_and_load(cli_run, tmp_path):
    import mole_jax

    out, _, _ = cli_run
    lines = [json.loads(x) for x in (out / checkpoint.METRICS).read_text().splitlines()]
    r = subprocess.run(CLI + ["eval", str(out), "--max-windows", "128", "--json", str(tmp_path / "e.json")],
                       capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["tokens"] == 128 * 64 and result["split"] == "val" and result["step"] == 120
    np.testing.assert_allclose(result["loss"], lines[-1]["val_loss"], rtol=1e-5)  # the loop's validation batches
    np.testing.assert_allclose(result["perplexity"], np.exp(result["loss"]), rtol=1e-6)
    assert f"loss {result['loss']:.4f}" in r.stdout and "perplexity" in r.stdout
    model = mole_jax.load(out)
    assert model.config == get_preset("tiny-mole") and model.run_dir == out
    tokens = data.load_tokenizer(out / checkpoint.TOKENIZER).encode("The if statement is used for").ids
    assert np.all(np.isfinite(model.logits(np.asarray([tokens]))))
    train_split = train.evaluate(out, split="train", max_windows=64, devices=2)
    assert train_split["tokens"] == 64 * 64 and np.isfinite(train_split["loss"])


# Bad input ----------------------------------------------------------------------------------------------------
def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _cli_error(args) -> str:
    """The one line of a refused command: exit status 2, exactly one non-empty line on stderr, no traceback."""
    status, _, err = run_cli(*args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("mole-jax: error: "), lines[0]
    return lines[0]


def test_bad_input_one_line_nothing_written(cli_run, tmp_path, text_data):
    out, _, _ = cli_run
    before = _snapshot(out)
    base = ["train", "--preset", "tiny-mole", "--steps", "5"]
    (tmp_path / "empty.txt").write_text("")
    big = data.train_tokenizer([text_data[0].read_text()], 600)
    big.save(str(tmp_path / "big.json"))
    cases = {
        "missing": (["--data", str(tmp_path / "nope.txt")], "does not exist"),
        "empty": (["--data", str(tmp_path / "empty.txt")], "is empty"),
        "seq_len": (["--seq-len", "129"], "sequence length 129 exceeds the model's maximum of 128"),
        "tokenizer": (["--data", str(text_data[0]), "--tokenizer", str(tmp_path / "big.json")],
                      "the tokenizer has 600 tokens but the model's vocab_size is 512"),
    }
    for name, (extra, msg) in cases.items():
        line = _cli_error(base + extra + ["--out", str(tmp_path / name)])
        assert msg in line, (name, line)
        assert not (tmp_path / name).exists(), name
    # an OUT holding a run of another preset, or other settings: refused, untouched
    assert "holds a run of preset tiny-mole, not tiny-dense" in _cli_error(["train", "--preset", "tiny-dense",
                                                                            "--steps", "5", "--out", str(out)])
    with pytest.raises(MoleError, match="another model .*num_experts: 4 -> 5"):  # the same preset, changed
        train.train(get_preset("tiny-mole").replace(num_experts=5), TC, out=out, progress=False)
    assert "other training settings" in _cli_error(["train", "--preset", "tiny-mole", "--steps", "200",
                                                    "--batch-size", "16", "--seq-len", "32", "--out", str(out)])
    with pytest.raises(MoleError, match="other data"):
        train.train(get_preset("tiny-mole"), TrainConfig(steps=120, batch_size=16, seq_len=64, peak_lr=3e-3,
                                                         checkpoint_every=60, eval_every=40),
                    out=out, data_source=text_data[0], progress=False)
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("mine")
    with pytest.raises(MoleError, match="not a mole-jax run directory"):
        _train(tmp_path / "stranger", text_data)
    assert _snapshot(out) == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, text_data):
    tc = TrainConfig(**{**TC.to_dict(), "peak_lr": 1e30, "checkpoint_every": 1, "eval_every": 0})
    with pytest.raises(MoleError, match=r"non-finite loss at step (\d+)") as e:
        _train(tmp_path / "run", text_data, tc=tc, preset="tiny-dense")
    bad = int(e.value.args[0].split("at step ")[1].split()[0])
    assert f"last good checkpoint is step {bad - 1}" in str(e.value)
    assert checkpoint.locate(tmp_path / "run").step == bad - 1
    _, params = checkpoint.restore_params(tmp_path / "run", as_numpy=True)
    assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))
    assert max(_losses(tmp_path / "run")) == bad - 1  # nothing logged for the bad step


def test_bad_run_settings_write_nothing(tmp_path, text_data):
    with pytest.raises(MoleError, match="cannot be split over 4 devices"):
        _train(tmp_path / "run", text_data, tc=TrainConfig(steps=2, batch_size=6, seq_len=16), devices=4)
    with pytest.raises(MoleError, match="not divisible by grad accumulation"):
        _train(tmp_path / "run", text_data, tc=TrainConfig(steps=2, batch_size=8, grad_accum=3, seq_len=16))
    np.full(5000, 600, np.uint16).tofile(tmp_path / "ids.bin")
    with pytest.raises(MoleError, match=r"token id 600 in the data is outside the model's vocabulary \[0, 512\)"):
        train.train(get_preset("tiny-dense"), TC, out=tmp_path / "run", data_source=tmp_path / "ids.bin",
                    progress=False)
    assert not (tmp_path / "run").exists()
