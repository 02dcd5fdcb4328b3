"""Training: the run around the compiled step of train_step.py: the run directory, resume, metrics, checkpoints
and periodic validation (evaluation.py), profiler traces of chosen steps, and stopping on SIGTERM/SIGINT.

    train(model_cfg, train_cfg, out=RUN_DIR, data_source=...)   train, or resume the run in RUN_DIR
    evaluate(RUN_DIR, data_source=..., split="val")             mean next-token cross-entropy (evaluation.py)

Everything the user gave is checked before anything is written. The loop dispatches step s+1 before it reads
step s's metrics, and syncs only at checkpoint and evaluation steps, where it checks that the state to save is
finite. A SIGTERM or SIGINT lets the running step finish, saves it and raises Preempted (every process of a
multi-process run at the same step). See docs/training.md for the run directory, resume rules, measurements,
profiles and preemption.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from mole_jax import checkpoint, data, sharding
from mole_jax.config import TRAINABLE, ModelConfig, MoleError, TrainConfig, format_override
from mole_jax.evaluation import Evaluator, evaluate  # evaluate: README's `from mole_jax.train import train, evaluate`
from mole_jax.train_step import (NOMINAL_BF16_PEAK, ShardedStep, TrainState, choose_dedup_rows,
                                 matmul_peak_flops, nominal_peak, train_flops_per_token)

__all__ = ["train", "evaluate", "run_model", "run_overrides", "RunResult", "initialize_distributed",
           "RUN_CONTROL", "IMPLEMENTATION", "NOMINAL_BF16_PEAK", "nominal_peak", "peak_flops", "TENSORBOARD", "PROFILE",
           "Preempted", "STOP_SIGNALS"]

# TrainConfig fields that may change when a run is resumed: they steer the loop, not the trajectory. `steps` only
# says where the run stops: the learning-rate schedule spans `schedule_steps`, fixed when the run starts.
RUN_CONTROL = ("steps", "checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "eval_batches", "dedup",
               "remat")
# ModelConfig fields that choose an implementation, not parameters: a run may resume on other hardware with others.
IMPLEMENTATION = ("dtype", "moe_impl", "attention_impl")
# TensorBoard event files of a run, by default (tensorboardX, the `tensorboard` extra): OUT/tensorboard.
TENSORBOARD = "tensorboard"
# Profiler traces of the steps `profile_steps` names: OUT/profile (OUT/profile/process<i> for each of several
# processes, whose files would otherwise share a host name).
PROFILE = "profile"
# What stops training between two steps, with the running step saved (a scheduler's preemption notice or time
# limit, kill's default, Ctrl-C).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# Multi-host -----------------------------------------------------------------------------------------------------
def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """jax.distributed.initialize() when asked: explicit arguments, JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES
    and JAX_PROCESS_ID), or a cluster JAX detects by itself (SLURM with several tasks, Open MPI, TPU pods).
    Must run before anything touches a device."""
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    cluster = int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    if not (coordinator or cluster) or jax.distributed.is_initialized():
        return
    if num_processes is None and "JAX_NUM_PROCESSES" in env:
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in env:
        process_id = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(coordinator, num_processes, process_id)


# Checks before anything is written -----------------------------------------------------------------------------
def _checked_mesh(cfg: ModelConfig, tc: TrainConfig, devices: int | None) -> Mesh:
    """The mesh to train on, once the batch settings are known to fit the model and to split over it."""
    if tc.seq_len < 1 or tc.seq_len > cfg.max_seq_len:
        raise MoleError(f"sequence length {tc.seq_len} exceeds the model's maximum of {cfg.max_seq_len}"
                        if tc.seq_len > 0 else f"sequence length must be positive, got {tc.seq_len}")
    if tc.steps < 1 or tc.batch_size < 1 or tc.grad_accum < 1:
        raise MoleError("steps, batch size and grad accumulation must be positive")
    if tc.schedule_steps is not None and tc.schedule_steps < 1:
        raise MoleError(f"schedule steps must be positive, got {tc.schedule_steps}")
    if tc.batch_size % tc.grad_accum:
        raise MoleError(f"batch size {tc.batch_size} is not divisible by grad accumulation {tc.grad_accum}")
    if tc.trainable not in TRAINABLE:
        raise MoleError(f"unknown --train {tc.trainable!r}: use one of {', '.join(TRAINABLE)}")
    if tc.trainable == "new" and cfg.kind != "mole":
        raise MoleError(f"--train new trains MoLE's routed experts, expert norms and routers; a {cfg.kind} model has "
                        "none: use --train all")
    mesh = sharding.make_mesh(devices)
    if tc.batch_size // tc.grad_accum % mesh.size:
        raise MoleError(f"{tc.batch_size // tc.grad_accum} sequences per micro-batch cannot be split over "
                        f"{mesh.size} devices: make batch size / grad accumulation a multiple of the device count")
    return mesh


def _as_json(value):
    """As run.json holds it (tuples become lists)."""
    return json.loads(json.dumps(value))


def _previous_run(out: Path, cfg: ModelConfig, tc: TrainConfig, preset: str | None,
                  overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """run.json of the run already in `out` ({} for a new run), once it is known to be this same run."""
    if out.exists() and not out.is_dir():
        raise MoleError(f"--out {out} is a file")
    previous = checkpoint.read_run(out) if out.is_dir() else {}
    if out.is_dir() and not previous and any(out.iterdir()):
        raise MoleError(f"{out} exists and is not a mole-jax run directory: choose another --out")
    if previous:
        if "train_config" in previous:
            _check_resumable(out, previous, cfg, tc, preset, overrides)
        elif "upcycled_from" in previous:  # not trained yet: it starts from its step-0 parameters (upcycling.py)
            _check_same_model(out, previous, cfg, preset, overrides)
        else:
            raise MoleError(f"{out} holds a run that was not trained here (an import): choose another --out")
    return previous


def run_model(out: str | Path) -> tuple[ModelConfig, str | None]:
    """The model config and preset name of the run in `out`: what `mole-jax train --out OUT` trains."""
    out = Path(out).expanduser().absolute()
    run = checkpoint.read_run(out) if out.is_dir() else {}
    if "model_config" not in run:
        raise MoleError(f"{out} holds no run to continue: pass --preset to start one")
    return ModelConfig.from_dict(run["model_config"]), run.get("preset")


def run_overrides(out: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The `--set` overrides and the `--config` file that the run in `out` was started with ({} and None if none)."""
    out = Path(out).expanduser().absolute()
    run = checkpoint.read_run(out) if out.is_dir() else {}
    return dict(run.get("overrides") or {}), run.get("config_file")


def _differences(old: dict, new: dict, ignore=()) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in ignore and old.get(k) != new.get(k)]


def _check_resumable(out: Path, run: dict, cfg: ModelConfig, tc: TrainConfig, preset: str | None,
                     overrides: dict[str, Any] | None) -> None:
    """An existing OUT may only be continued by the same run: same model, same optimisation and data settings."""
    _check_same_model(out, run, cfg, preset, overrides)
    old = run.get("train_config", {})
    diff = _differences(old, tc.to_dict(), RUN_CONTROL + ("schedule_steps",))
    if diff:
        raise MoleError(f"{out} holds a run with other training settings ({'; '.join(diff)}): choose another --out")
    horizon = old.get("schedule_steps") or old.get("steps")  # a run.json without schedule_steps: it was steps
    if horizon != tc.schedule_steps:
        raise MoleError(f"{out} holds a run whose learning-rate schedule spans {horizon} steps; this would make it "
                        f"{tc.schedule_steps} and change the learning rate from the resume step on: to extend the "
                        f"run add --schedule-steps {horizon} (later steps train at its final rate), or choose "
                        "another --out")


def _check_same_model(out: Path, run: dict, cfg: ModelConfig, preset: str | None,
                      overrides: dict[str, Any] | None = None) -> None:
    if preset and run.get("preset") and run["preset"] != preset:
        raise MoleError(f"{out} holds a run of preset {run['preset']}, not {preset}: choose another --out")
    if overrides is not None:  # an override the run had and this command lacks (or changes): named as such
        old_set, new_set = run.get("overrides") or {}, _as_json(overrides)
        old_model, new_model = run.get("model_config", {}), cfg.to_dict()
        for key in sorted(set(old_set) | set(new_set)):
            if key in IMPLEMENTATION or old_set.get(key) == new_set.get(key):
                continue
            if old_model.get(key) != new_model.get(key):
                def given(o: dict, model: dict) -> str:
                    return (f"--set {format_override(key, o[key])}" if key in o else
                            f"no --set {key} ({format_override(key, model.get(key))})")
                raise MoleError(f"{out} holds a run started with {given(old_set, old_model)}; this command gives "
                                f"{given(new_set, new_model)}: resume with the run's overrides or choose another "
                                "--out")
    diff = _differences(run.get("model_config", {}), cfg.to_dict(), IMPLEMENTATION)
    if diff:
        raise MoleError(f"{out} holds a run of another model ({'; '.join(diff)}): choose another --out")


def peak_flops(devices: int, peak_tflops: float | None = None) -> dict[str, Any]:
    """What MFU divides by, as run.json records it: `flops_per_s` (the whole run's peak; None: no MFU),
    `flops_per_s_per_device`, `device_kind`, `source`. peak_tflops: one device's peak in TFLOP/s, given by the user;
    else the nominal bf16 peak of a GPU/TPU (NOMINAL_BF16_PEAK), or on CPU float32 matmuls measured now
    (train_step.matmul_peak_flops): the host's devices share its cores, so the host's measured rate is the peak
    of its devices together (times the processes, one per host)."""
    dev = jax.local_devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    record: dict[str, Any] = {"device_kind": kind, "devices": devices}
    if peak_tflops is not None:
        per_device = peak_tflops * 1e12
        record.update(source="--peak-tflops", flops_per_s_per_device=per_device, flops_per_s=per_device * devices)
    elif jax.default_backend() == "cpu":
        measured = matmul_peak_flops("float32")
        total = measured * jax.process_count()
        record.update(source="measured float32 matmul (train_step.matmul_peak_flops)",
                      measured_flops_per_s=measured, flops_per_s_per_device=total / devices, flops_per_s=total)
    else:
        per_device = nominal_peak(kind)
        record.update(source=f"nominal bf16 peak of {kind}" if per_device else
                      f"no nominal peak known for {kind}: give --peak-tflops for MFU",
                      flops_per_s_per_device=per_device, flops_per_s=per_device * devices if per_device else None)
    return record


def _tensorboard_dir(out: Path, tensorboard: str | Path | bool | None) -> Path | None:
    """Where the run's TensorBoard event files go. None: OUT/tensorboard when tensorboardX is installed, else
    none; False: none; True: OUT/tensorboard; a path: there (True and a path need tensorboardX)."""
    if tensorboard is False:
        return None
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        if tensorboard is None:
            return None
        raise MoleError("TensorBoard event files need tensorboardX: pip install 'mole-jax[tensorboard]', or "
                        "pass --no-tensorboard") from None
    if tensorboard is None or tensorboard is True:
        return out / TENSORBOARD
    where = Path(tensorboard).expanduser().absolute()
    if where.exists() and not where.is_dir():
        raise MoleError(f"--tensorboard {where} is a file")
    return where


def _fixed_schedule(tc: TrainConfig) -> TrainConfig:
    """The config with its schedule's horizon written out (None: the run's steps), as run.json records it."""
    return dataclasses.replace(tc, schedule_steps=tc.schedule_steps or tc.steps)


def _check_same_data(out: Path, run: dict, desc: dict) -> None:
    old = run.get("data", {})
    for key in ("kind", "fingerprint", "num_tokens"):
        if old.get(key) != desc.get(key):
            raise MoleError(f"{out} was trained on other data ({key}: {old.get(key)!r} -> {desc.get(key)!r}): "
                            "resume with the run's data or choose another --out")


# The run --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Run:
    """A run whose settings and data have been checked: what the loop needs."""
    cfg: ModelConfig
    tc: TrainConfig
    out: Path
    mesh: Mesh
    corpus: data.Corpus
    batches: data.Batches  # training batches: a pure function of (seed, step)
    val_windows: np.ndarray  # every validation window (each evaluation scores the first eval_batches of them)
    dedup: dict[str, Any]  # choose_dedup_rows's choice, recorded in run.json; rows 0: dedup off
    lead: bool  # process 0: it writes the run directory's files
    peak: dict[str, Any] = dataclasses.field(default_factory=dict)  # peak_flops's record: what MFU divides by
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # --set, as run.json records them
    config_file: dict[str, Any] | None = None  # --config: {"path", "model_config"}
    tensorboard: Path | None = None  # the event files' directory (None: none)

    @property
    def flops_per_token(self) -> float:
        """The model's matmul FLOPs per training token (train_step.train_flops_per_token: every MoLE expert on
        every token, MoE's top_k; what dedup saves and remat recomputes are not counted), for TFLOP/s and MFU."""
        return train_flops_per_token(self.cfg, self.tc.seq_len)

    @property
    def dedup_rows(self) -> int:
        return self.dedup["rows"]


def _open_run(cfg: ModelConfig, tc: TrainConfig, out: Path, mesh: Mesh, corpus: data.Corpus) -> _Run:
    train_windows, val_windows = data.split_windows(corpus.tokens.size, tc.seq_len, tc.val_fraction)
    batches = data.Batches(corpus.tokens, train_windows, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=tc.seed,
                           vocab_size=cfg.vocab_size)
    batches.batch(0)  # the first batch reads and checks its token ids before anything is written
    dedup = {"rows": 0}
    if cfg.kind == "mole" and tc.dedup:
        dedup = choose_dedup_rows(batches, tc.grad_accum, mesh.size, cfg.vocab_size)
    if jax.process_count() > 1:  # every host must have read the same data
        multihost_utils.assert_equal(np.frombuffer(bytes.fromhex(corpus.description["fingerprint"]), np.uint8),
                                     "the hosts read different data")
    return _Run(cfg, tc, out, mesh, corpus, batches, val_windows, dedup, lead=jax.process_index() == 0)


def _write_run_directory(run: _Run, previous: dict[str, Any], preset: str | None) -> None:
    """run.json (rewritten at every start: the device and process counts may change), the tokenizer and the
    training windows' token counts."""
    run.out.mkdir(parents=True, exist_ok=True)
    record = {"format": checkpoint.FORMAT, "preset": preset or previous.get("preset"),
              "model_config": run.cfg.to_dict(), "overrides": _as_json(run.overrides),
              "params": run.cfg.param_counts(), "train_config": run.tc.to_dict(),
              "data": previous.get("data", run.corpus.description), "dedup": run.dedup, "devices": run.mesh.size,
              "processes": jax.process_count(), "val_windows": int(run.val_windows.size),
              "train_windows": int(run.batches.windows.size), "flops_per_token": run.flops_per_token,
              "peak": run.peak}
    if run.config_file is not None:
        record["config_file"] = run.config_file
    if "upcycled_from" in previous:  # where the run's starting parameters came from (upcycling.py)
        record["upcycled_from"] = previous["upcycled_from"]
    checkpoint.write_json_atomic(run.out / checkpoint.RUN_FILE, record)
    if run.corpus.tokenizer is not None and not (run.out / checkpoint.TOKENIZER).is_file():
        tmp = run.out / (checkpoint.TOKENIZER + ".tmp")
        run.corpus.tokenizer.save(str(tmp))
        tmp.replace(run.out / checkpoint.TOKENIZER)
    if not (run.out / data.TOKEN_COUNTS).is_file():  # what a decode's device tier is ordered by (decode.load)
        counts_V = data.token_counts(run.corpus.tokens, run.cfg.vocab_size, seq_len=run.tc.seq_len,
                                     exclude_windows=run.val_windows)
        with open(run.out / (data.TOKEN_COUNTS + ".tmp"), "wb") as f:
            np.save(f, counts_V)
        (run.out / (data.TOKEN_COUNTS + ".tmp")).replace(run.out / data.TOKEN_COUNTS)


@dataclasses.dataclass
class RunResult:
    out: Path
    step: int  # the last step trained (and checkpointed)
    loss: float | None  # training loss at that step
    val_loss: float | None  # the last validation loss
    dedup_rows: int
    history: list[dict[str, Any]]  # the metrics written by this call


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, *, out: str | Path, data_source=None, tokenizer=None,
          devices: int | None = None, preset: str | None = None, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None, overrides: dict[str, Any] | None = None,
          config_file: dict[str, Any] | None = None, peak_tflops: float | None = None,
          tensorboard: str | Path | bool | None = None, profile_steps: tuple[int, int] | None = None,
          handle_signals: bool = True) -> RunResult:
    """Train `model_cfg` with `train_cfg` into the run directory `out`, or continue the run already there.

    data_source: None / "default" (the embedded corpus), text file(s) or directory, a .bin token file, or
        "hf:NAME" (see data.py). tokenizer: a tokenizer.json path or `tokenizers.Tokenizer`; default: the run's
        own tokenizer.json when resuming, else a byte-level BPE trained on the text with the model's vocab size.
    devices: how many devices to use (default: all). preset: the preset's name, recorded in run.json.
    overrides: the ModelConfig fields given on top of the preset or config file (`--set`, already applied to
        `model_cfg`), and config_file: {"path", "model_config"} of `--config`; both recorded in run.json. A resume
        that lacks or changes an override of the run is refused naming it. None: the run's own records are kept.
    peak_tflops: one device's peak in TFLOP/s for MFU (default: the nominal bf16 peak of a known GPU/TPU, on CPU a
        float32 matmul rate measured at the start); `tflops` and `mfu` are in every metrics record.
    tensorboard: where process 0 writes TensorBoard event files of every metrics record (tensorboardX): None
        (default) OUT/tensorboard when tensorboardX is installed, True OUT/tensorboard, a directory, False none.
    profile_steps: (A, B): a jax.profiler trace of steps A to B (1-based, inclusive) into OUT/profile, one per
        process of several in OUT/profile/process<i> (TensorBoard's profile plugin, Perfetto: docs/training.md).
        Steps of the range that this call does not train (done before a resume, past `steps`) are not traced.
    handle_signals: SIGTERM or SIGINT (STOP_SIGNALS) during training lets the running step finish, saves it and
        raises Preempted (every process of a multi-process run saves the same step); a repeated signal does not
        interrupt the save. Only in the main thread, where Python runs signal handlers; False: the signals act
        as they would without training.
    on_step(step, metrics): called on every process after each step's metrics are read (one step late).
    Rerunning the same call on the same `out` resumes from the latest checkpoint; the batches are a pure function
    of (seed, step), so the resumed run is the uninterrupted run. `steps` may change on resume; the learning-rate
    schedule's horizon (`schedule_steps`, default `steps`) is fixed when the run starts, and a resume that would
    change it is refused. Bad input raises MoleError before anything is written.
    """
    cfg, out = model_cfg, Path(out).expanduser().absolute()
    if peak_tflops is not None and not (math.isfinite(peak_tflops) and peak_tflops > 0):
        raise MoleError(f"--peak-tflops must be a positive number, got {peak_tflops}")
    check_profile_steps(profile_steps, train_cfg.steps)
    tensorboard_dir = _tensorboard_dir(out, tensorboard)
    mesh = _checked_mesh(cfg, train_cfg, devices)
    tc = _fixed_schedule(train_cfg)
    previous = _previous_run(out, cfg, tc, preset, overrides)
    if previous:  # resuming: the run's own tokenizer and data (an upcycle's: its Dense run's) unless told otherwise
        if tokenizer is None and (out / checkpoint.TOKENIZER).is_file():
            tokenizer = out / checkpoint.TOKENIZER
        recorded = previous.get("data") or previous.get("upcycled_from", {}).get("data")
        if data_source is None and recorded and recorded["kind"] != "default":
            data_source = data.recorded_source(recorded)
        if tokenizer is None and not data.is_token_source(data_source):  # a new BPE would not match its embedding
            raise MoleError(f"{out} holds a trained model without its tokenizer.json: pass its --tokenizer or a "
                            "token file (.bin) as --data")
    corpus = data.open_corpus(data_source, vocab_size=cfg.vocab_size, tokenizer=tokenizer)
    if "data" in previous:
        _check_same_data(out, previous, corpus.description)
    run = _open_run(cfg, tc, out, mesh, corpus)
    run.overrides = overrides if overrides is not None else dict(previous.get("overrides") or {})
    run.config_file = config_file if config_file is not None else previous.get("config_file")
    run.peak = peak_flops(mesh.size, peak_tflops)
    run.tensorboard = tensorboard_dir
    if run.lead:
        _write_run_directory(run, previous, preset)
    # the handlers stay installed until the last save is committed (wait_until_finished): a repeated signal
    # cannot cut it short
    with _StopSignals(handle_signals) as signals:
        mngr = checkpoint.manager(out / checkpoint.CHECKPOINTS, max_to_keep=tc.keep_checkpoints,
                                  save_interval_steps=tc.checkpoint_every)
        try:
            return _resume(run, mngr, progress=progress, on_step=on_step, signals=signals,
                           profile_steps=profile_steps)
        finally:
            mngr.wait_until_finished()
            mngr.close()


def _resume(run: _Run, mngr: ocp.CheckpointManager, *, progress: bool, on_step, signals: _StopSignals,
            profile_steps: tuple[int, int] | None) -> RunResult:
    """Train from the latest checkpoint (or from scratch) to the last step."""
    start = mngr.latest_step() or 0
    if run.lead:
        _truncate_metrics(run.out / checkpoint.METRICS, start)
    if profile_steps and profile_steps[0] <= start and run.lead:
        print(f"mole-jax: the run resumes after step {start}: "
              + (f"--profile-steps {profile_steps[0]}:{profile_steps[1]} traces steps {start + 1} to "
                 f"{profile_steps[1]}" if profile_steps[1] > start else
                 f"--profile-steps {profile_steps[0]}:{profile_steps[1]} traces nothing"), file=sys.stderr)
    if start >= run.tc.steps:
        return RunResult(run.out, start, None, None, run.dedup_rows, [])
    return _Loop(run, mngr, start, progress=progress, on_step=on_step, signals=signals,
                 profile_steps=profile_steps).run_steps()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from (the killed run's steps after it are redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line cut by a kill
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


# Profiles and preemption ----------------------------------------------------------------------------------------
def check_profile_steps(profile_steps: tuple[int, int] | None, steps: int) -> None:
    """A profile range is two step numbers 1 <= A <= B; a range that starts past the run's last step would trace
    nothing on any resume: refused."""
    if profile_steps is None:
        return
    if (len(profile_steps) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in profile_steps)
            or not 1 <= profile_steps[0] <= profile_steps[1]):
        raise MoleError(f"--profile-steps must be two step numbers A:B with 1 <= A <= B, got {profile_steps}")
    if profile_steps[0] > steps:
        raise MoleError(f"--profile-steps {profile_steps[0]}:{profile_steps[1]} starts after the run's last step "
                        f"({steps}): nothing would be traced")


def profile_dir(out: Path) -> Path:
    """Where this process writes its profiler traces (jax.profiler names its files after the host, so processes
    sharing a host need directories of their own)."""
    root = out / PROFILE
    return root if jax.process_count() == 1 else root / f"process{jax.process_index()}"


class _ProfileWindow:
    """A jax.profiler trace from before step `first` is dispatched until step `last` has run (the device work of
    the last step is waited for, so that it is in the trace). Each step of the loop is a StepTraceAnnotation
    "train" with its step number: the profile plugin's step markers."""

    def __init__(self, steps: tuple[int, int] | None, start: int, last: int, directory: Path):
        self.first, self.last, self.directory = None, None, directory
        if steps is not None and max(steps[0], start + 1) <= min(steps[1], last):
            self.first, self.last = max(steps[0], start + 1), min(steps[1], last)
        self.active = False

    def before(self, step: int) -> None:
        if step == self.first:
            self.directory.mkdir(parents=True, exist_ok=True)
            # HOST.xplane.pb for TensorBoard's profile plugin, HOST.trace.json.gz for ui.perfetto.dev
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, step: int, state) -> None:
        if self.active and step == self.last:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()


class Preempted(Exception):
    """Training stopped on a signal (STOP_SIGNALS) after saving the step that was running: rerunning the same call
    resumes after `step`. exit_code: the shell's status for the signal (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, out: Path, step: int, signum: int):
        self.out, self.step, self.signum = out, step, signum
        super().__init__(f"{signal.Signals(signum).name}: saved step {step}, rerun the same command to resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _StopSignals:
    """While installed, SIGTERM and SIGINT are recorded, not acted on: the loop reads `signum` between steps and
    stops there. A repeated signal only prints a line: the checkpoint being written is finished (a process killed
    regardless leaves the previous checkpoint usable: Orbax commits a step by renaming its directory into place).
    Python runs signal handlers in the main thread only, so elsewhere (or with enabled=False) nothing is
    installed; the previous handlers come back on exit."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if self.enabled:
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        else:
            print(f"mole-jax: {signal.Signals(signum).name} again: finishing the checkpoint of the current step "
                  "first", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():  # None: a handler not installed from Python (e.g. JAX's own)
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class _StopAgreement:
    """When to stop, the same step on every process. One process: the step boundary after its signal. Several
    (each may get the signal at another step, or only one of them may get it): after every step each process
    dispatches a max over one int per device, each process filling its own devices' entries with its signal
    number (0: none); the loop reads the result with that step's metrics, one step late like them, so every
    process reads the same value at the same step and stops after the same step. No extra host synchronisation:
    a few bytes of all-reduce behind each step, read when the step's metrics are read anyway."""

    def __init__(self, mesh: Mesh, signals: _StopSignals):
        self.signals, self.agreed = signals, None
        self.distributed = jax.process_count() > 1
        if self.distributed:
            self.sharding = NamedSharding(mesh, P(sharding.BATCH_AXES))
            self.shape = (mesh.size,)
            self.local = len(self.sharding.addressable_devices)
            self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
            self._no_signal = self._flags(0)  # built once: the usual step sends nothing to the devices

    def _flags(self, signum: int) -> jax.Array:
        local = np.full(self.local, signum, np.int32)
        return jax.make_array_from_process_local_data(self.sharding, local, self.shape)

    def dispatch(self) -> jax.Array | None:
        """After a step: this process's contribution to the agreement (None on one process)."""
        if not self.distributed:
            return None
        signum = self.signals.signum
        return self._max(self._no_signal if signum is None else self._flags(signum))

    def read(self, notice: jax.Array | None) -> None:
        if notice is not None and self.agreed is None:
            agreed = int(jax.device_get(notice))
            self.agreed = agreed or None

    def stop_signal(self) -> int | None:
        """The signal to stop on at this step boundary (this process's own if it got one), or None."""
        if not self.distributed:
            return self.signals.signum
        return None if self.agreed is None else self.signals.signum or self.agreed


# The loop -------------------------------------------------------------------------------------------------------
class _MetricsLog:
    """Reads each step's metrics, stops the run on a non-finite one, shows them on the progress bar, and appends
    the logged ones to metrics.jsonl (process 0) and to the history that RunResult returns."""

    def __init__(self, run: _Run, mngr: ocp.CheckpointManager, start: int, *, progress: bool):
        self.run, self.mngr = run, mngr
        self.tokens_per_step = run.tc.batch_size * run.tc.seq_len
        self.flops_per_token, self.peak = run.flops_per_token, run.peak.get("flops_per_s")
        self.bar = (tqdm(total=run.tc.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
                    if progress and run.lead else None)
        self.file = open(run.out / checkpoint.METRICS, "a") if run.lead else None
        self.events = None  # TensorBoard: the steps after `start` replace any the directory holds (purge_step)
        if run.lead and run.tensorboard is not None:
            from tensorboardX import SummaryWriter

            self.events = SummaryWriter(logdir=str(run.tensorboard), purge_step=start + 1)
        self.history: list[dict[str, Any]] = []
        self.clock_step, self.clock_time = start, time.perf_counter()  # throughput is measured between reads

    def read(self, step: int, metrics) -> dict[str, float]:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        values["tokens_per_s"] = self.tokens_per_step * (step - self.clock_step) / max(now - self.clock_time, 1e-9)
        self.clock_step, self.clock_time = step, now
        flops_per_s = self.flops_per_token * values["tokens_per_s"]  # the model's FLOPs, achieved
        values["tflops"] = flops_per_s / 1e12
        if self.peak:
            values["mfu"] = flops_per_s / self.peak
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            self.mngr.wait_until_finished()
            raise MoleError(f"non-finite loss at step {step} ({bad}); stopped without saving it: the last good "
                            f"checkpoint is step {self.mngr.latest_step() or 'none'} in {self.run.out}")
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            shown = {"loss": f"{values['loss']:.4f}", "tok_s": f"{values['tokens_per_s']:.0f}"}
            shown.update({"mfu": f"{values['mfu']:.1%}"} if "mfu" in values else
                         {"tflops": f"{values['tflops']:.3g}"})
            self.bar.set_postfix(shown, refresh=False)
        return values

    def write(self, step: int, values: dict[str, float], **extra) -> None:
        record = {"step": step, **values, "epoch": round(self.run.batches.epoch(step), 4), **extra}
        self.history.append(record)
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.events is not None:  # every scalar of the record, at its step
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.events.add_scalar(key, value, step)
            self.events.flush()

    def restart_clock(self) -> None:
        """After evaluating or saving: neither is training throughput."""
        self.clock_time = time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.events is not None:
            self.events.close()


class _Loop:
    """Steps `start` to the last of a run. Step s+1 is dispatched (and the host builds its batch) before step s's
    metrics are read; the loop syncs only where it saves or evaluates, after checking that the step is finite."""

    def __init__(self, run: _Run, mngr: ocp.CheckpointManager, start: int, *, progress: bool, on_step,
                 signals: _StopSignals, profile_steps: tuple[int, int] | None = None):
        tc = run.tc
        self.run, self.mngr, self.start, self.on_step = run, mngr, start, on_step
        self.stop = _StopAgreement(run.mesh, signals)
        self.profile = _ProfileWindow(profile_steps, start, tc.steps, profile_dir(run.out))
        self.step = ShardedStep(run.cfg, tc, run.mesh, dedup_rows=run.dedup_rows)
        self.state = self._initial_state()
        self.batch = self._batch(start)
        self.compiled = self.step.compile(self.state, self.batch)
        self.evaluator = Evaluator(run.cfg, run.mesh, self.step.shardings.params, tc.batch_size // tc.grad_accum,
                                   tc.seq_len)
        self.val_windows = run.val_windows[:tc.eval_batches * self.evaluator.batch]
        self.val_loss: float | None = None
        self.synced: tuple[dict, dict] | None = None  # the values and extras of the last step read by _sync
        self.log = _MetricsLog(run, mngr, start, progress=progress)

    def _initial_state(self) -> TrainState:
        if not self.start and self.mngr.latest_step() == 0:  # the run starts from given parameters (upcycling.py)
            _, params = checkpoint.restore_params(self.run.out / checkpoint.CHECKPOINTS / "0", cfg=self.run.cfg,
                                                  shardings=self.step.shardings.params)
            return self.step.state_from_params(params)
        if not self.start:
            return self.step.init_state(self.run.tc.seed)
        params, opt_state = checkpoint.restore_train_state(self.mngr, self.start, self.step.abstract_state())
        step = jax.device_put(jnp.asarray(self.start, jnp.int32), self.step.shardings.step)
        return TrainState(step, params, opt_state)

    def _batch(self, step: int) -> jax.Array:
        return self.step.feed(lambda rows: self.run.batches.batch(step, rows))

    def run_steps(self) -> RunResult:
        tc, pending = self.run.tc, None
        try:
            for step in range(self.start, tc.steps):
                done = step + 1
                self.profile.before(done)
                with jax.profiler.StepTraceAnnotation("train", step_num=done):
                    self.state, metrics = self.compiled(self.state, self.batch)
                    notice = self.stop.dispatch()
                    if done < tc.steps:  # the host builds the next batch while this step runs
                        self.batch = self._batch(done)
                    if pending is not None:  # the previous step's metrics, read while this one runs
                        self._report(*pending)
                    pending = (done, metrics, notice)
                    save = done % tc.checkpoint_every == 0 or done == tc.steps  # (Orbax would also save step 1)
                    evaluate_now = bool(tc.eval_every and done % tc.eval_every == 0) or done == tc.steps
                    if save or evaluate_now:
                        self._sync(done, metrics, notice, save=save, evaluate_now=evaluate_now)
                        pending = None
                self.profile.after(done, self.state)
                signum = self.stop.stop_signal()
                if signum is not None and done < tc.steps:  # the last step is saved (and evaluated) as usual
                    if pending is not None:  # the step's metrics not read yet: read, logged and saved now
                        self._sync(*pending, save=True, evaluate_now=False)
                    elif not save:  # evaluated at this step, not saved
                        self._save(done, *self.synced)
                    raise Preempted(self.run.out, done, signum)
        finally:
            self.profile.stop()
            self.log.close()
        last = self.log.history[-1] if self.log.history else {}
        return RunResult(self.run.out, tc.steps, last.get("loss"), self.val_loss, self.run.dedup_rows,
                         self.log.history)

    def _save(self, step: int, values: dict[str, float], extra: dict[str, float]) -> None:
        meta = checkpoint.step_meta(self.run.cfg, step, has_experts=True, loss=values["loss"], **extra)
        checkpoint.save(self.mngr, step, self.state.params, meta, opt_state=self.state.opt_state, force=True)

    def _report(self, step: int, metrics, notice) -> None:
        values = self.log.read(step, metrics)
        self.stop.read(notice)
        if step % self.run.tc.log_every == 0:
            self.log.write(step, values)
        if self.on_step:
            self.on_step(step, values)

    def _sync(self, step: int, metrics, notice, *, save: bool, evaluate_now: bool) -> None:
        """Read the step's metrics now: what is saved or evaluated must be known finite first."""
        values, extra = self.log.read(step, metrics), {}
        self.stop.read(notice)
        if evaluate_now and self.val_windows.size:
            self.val_loss = self.evaluator.loss(self.state.params, self.run.corpus.tokens, self.val_windows)
            extra["val_loss"] = self.val_loss
        self.log.write(step, values, **extra)
        self.synced = (values, extra)
        if save:
            self._save(step, values, extra)
        if self.on_step:
            self.on_step(step, values)
        self.log.restart_clock()
