"""Training: the run around the compiled step of train_step.py: the run directory, resume, metrics, checkpoints
and periodic validation (evaluation.py).

    train(model_cfg, train_cfg, out=RUN_DIR, data_source=...)   train, or resume the run in RUN_DIR
    evaluate(RUN_DIR, data_source=..., split="val")             mean next-token cross-entropy (evaluation.py)

Everything the user gave is checked before anything is written. The loop dispatches step s+1 before it reads
step s's metrics, and syncs only at checkpoint and evaluation steps, where it checks that the state to save is
finite. See docs/training.md for the run directory, resume rules and measurements.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from mole_jax import checkpoint, data, sharding
from mole_jax.config import TRAINABLE, ModelConfig, MoleError, TrainConfig, format_override
from mole_jax.evaluation import Evaluator, evaluate  # evaluate: README's `from mole_jax.train import train, evaluate`
from mole_jax.train_step import (NOMINAL_BF16_PEAK, ShardedStep, TrainState, choose_dedup_rows,
                                 matmul_peak_flops, nominal_peak, train_flops_per_token)

__all__ = ["train", "evaluate", "run_model", "run_overrides", "RunResult", "initialize_distributed",
           "RUN_CONTROL", "IMPLEMENTATION", "NOMINAL_BF16_PEAK", "nominal_peak", "peak_flops", "TENSORBOARD"]

# TrainConfig fields that may change when a run is resumed: they steer the loop, not the trajectory. `steps` only
# says where the run stops: the learning-rate schedule spans `schedule_steps`, fixed when the run starts.
RUN_CONTROL = ("steps", "checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "eval_batches", "dedup",
               "remat")
# ModelConfig fields that choose an implementation, not parameters: a run may resume on other hardware with others.
IMPLEMENTATION = ("dtype", "moe_impl", "attention_impl")
# TensorBoard event files of a run, by default (tensorboardX, the `tensorboard` extra): OUT/tensorboard.
TENSORBOARD = "tensorboard"


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
          tensorboard: str | Path | bool | None = None) -> RunResult:
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
    on_step(step, metrics): called on every process after each step's metrics are read (one step late).
    Rerunning the same call on the same `out` resumes from the latest checkpoint; the batches are a pure function
    of (seed, step), so the resumed run is the uninterrupted run. `steps` may change on resume; the learning-rate
    schedule's horizon (`schedule_steps`, default `steps`) is fixed when the run starts, and a resume that would
    change it is refused. Bad input raises MoleError before anything is written.
    """
    cfg, out = model_cfg, Path(out).expanduser().absolute()
    if peak_tflops is not None and not (math.isfinite(peak_tflops) and peak_tflops > 0):
        raise MoleError(f"--peak-tflops must be a positive number, got {peak_tflops}")
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
    mngr = checkpoint.manager(out / checkpoint.CHECKPOINTS, max_to_keep=tc.keep_checkpoints,
                              save_interval_steps=tc.checkpoint_every)
    try:
        return _resume(run, mngr, progress=progress, on_step=on_step)
    finally:
        mngr.wait_until_finished()
        mngr.close()


def _resume(run: _Run, mngr: ocp.CheckpointManager, *, progress: bool, on_step) -> RunResult:
    """Train from the latest checkpoint (or from scratch) to the last step."""
    start = mngr.latest_step() or 0
    if run.lead:
        _truncate_metrics(run.out / checkpoint.METRICS, start)
    if start >= run.tc.steps:
        return RunResult(run.out, start, None, None, run.dedup_rows, [])
    return _Loop(run, mngr, start, progress=progress, on_step=on_step).run_steps()


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

    def __init__(self, run: _Run, mngr: ocp.CheckpointManager, start: int, *, progress: bool, on_step):
        tc = run.tc
        self.run, self.mngr, self.start, self.on_step = run, mngr, start, on_step
        self.step = ShardedStep(run.cfg, tc, run.mesh, dedup_rows=run.dedup_rows)
        self.state = self._initial_state()
        self.batch = self._batch(start)
        self.compiled = self.step.compile(self.state, self.batch)
        self.evaluator = Evaluator(run.cfg, run.mesh, self.step.shardings.params, tc.batch_size // tc.grad_accum,
                                   tc.seq_len)
        self.val_windows = run.val_windows[:tc.eval_batches * self.evaluator.batch]
        self.val_loss: float | None = None
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
                self.state, metrics = self.compiled(self.state, self.batch)
                done = step + 1
                if done < tc.steps:  # the host builds the next batch while this step runs
                    self.batch = self._batch(done)
                if pending is not None:  # the previous step's metrics, read while this one runs
                    self._report(*pending)
                pending = (done, metrics)
                save = done % tc.checkpoint_every == 0 or done == tc.steps  # (Orbax would also save step 1)
                evaluate_now = bool(tc.eval_every and done % tc.eval_every == 0) or done == tc.steps
                if save or evaluate_now:
                    self._sync(done, metrics, save=save, evaluate_now=evaluate_now)
                    pending = None
        finally:
            self.log.close()
        last = self.log.history[-1] if self.log.history else {}
        return RunResult(self.run.out, tc.steps, last.get("loss"), self.val_loss, self.run.dedup_rows,
                         self.log.history)

    def _report(self, step: int, metrics) -> None:
        values = self.log.read(step, metrics)
        if step % self.run.tc.log_every == 0:
            self.log.write(step, values)
        if self.on_step:
            self.on_step(step, values)

    def _sync(self, step: int, metrics, *, save: bool, evaluate_now: bool) -> None:
        """Read the step's metrics now: what is saved or evaluated must be known finite first."""
        values, extra = self.log.read(step, metrics), {}
        if evaluate_now and self.val_windows.size:
            self.val_loss = self.evaluator.loss(self.state.params, self.run.corpus.tokens, self.val_windows)
            extra["val_loss"] = self.val_loss
        self.log.write(step, values, **extra)
        if save:
            meta = checkpoint.step_meta(self.run.cfg, step, has_experts=True, loss=values["loss"], **extra)
            checkpoint.save(self.mngr, step, self.state.params, meta, opt_state=self.state.opt_state, force=True)
        if self.on_step:
            self.on_step(step, values)
        self.log.restart_clock()
