"""Orbax checkpoints and the run-directory layout.

    RUN_DIR/
      run.json               what the run is: model config, train config, data and tokenizer description
      tokenizer.json         when the run has a tokenizer
      checkpoints/<step>/    Orbax items: params (model weights), opt_state (training only), meta (JSON)
      metrics.jsonl          the training log
      lut/                   a MoLE lookup table (import of an inference-form checkpoint, or `mole-jax convert`)

Every step directory is self-describing: its `meta` item holds the model config, so a step directory, a
checkpoints directory or a run directory can each be handed to `locate`/`restore_params`. Reading a checkpoint
never writes into it: it is an input, maybe read-only or shared.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from mole_jax import data
from mole_jax.config import ModelConfig, MoleError
from mole_jax.model import Params, graphdef_and_shapes

FORMAT = "mole-jax/1"
RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
TOKENIZER = data.TOKENIZER
METRICS = "metrics.jsonl"
LUT = "lut"
# A file modified this close to the moment its signature is recorded may be modified again within the same
# timestamp tick (coarse clocks, 2 s on FAT) without a new mtime: such a signature is never recorded (a table
# records its checkpoint's signature only when its files are older: convert.fingerprint_checkpoint).
RACY_NS = 2_000_000_000


def manager(root: str | Path, *, max_to_keep: int | None = None, save_interval_steps: int = 1,
            async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                           enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(Path(root).absolute(), options=options)


def step_meta(cfg: ModelConfig, step: int, **extra: Any) -> dict[str, Any]:
    return {"format": FORMAT, "model_config": cfg.to_dict(), "step": step, **extra}


def save(mngr: ocp.CheckpointManager, step: int, params: Params, meta: dict, opt_state: Any = None,
         force: bool = False) -> bool:
    items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    return mngr.save(step, args=ocp.args.Composite(**items), force=force)


@dataclasses.dataclass(frozen=True)
class StepDir:
    root: Path  # the directory holding <step>/ subdirectories
    step: int

    @property
    def path(self) -> Path:
        return self.root / str(self.step)

    @property
    def run_dir(self) -> Path | None:
        """The run directory around this checkpoint, if it sits in one."""
        parent = self.root.parent
        return parent if self.root.name == CHECKPOINTS and (parent / RUN_FILE).exists() else None


def _steps(root: Path) -> list[int]:
    # Orbax marks finished steps; a half-written one (e.g. killed mid-save) has no commit marker or a tmp name.
    return sorted(int(p.name) for p in root.iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / "meta").is_dir() and (p / "params").is_dir())


def locate(path: str | Path) -> StepDir:
    """Find the checkpoint a path names: a run directory or checkpoints directory (latest step) or a step."""
    p = Path(path).expanduser().absolute()
    if not p.exists():
        raise MoleError(f"checkpoint not found: {p} does not exist")
    if not p.is_dir():
        raise MoleError(f"checkpoint not found: {p} is a file, not a checkpoint or run directory")
    if (p / "meta").is_dir() and (p / "params").is_dir() and p.name.isdigit():
        return StepDir(p.parent, int(p.name))
    root = p / CHECKPOINTS if (p / CHECKPOINTS).is_dir() else p
    steps = _steps(root)
    if not steps:
        raise MoleError(f"no checkpoint in {p}: expected a run directory, a checkpoints directory or a step "
                        "directory written by mole-jax")
    return StepDir(root, steps[-1])


def read_meta(path: str | Path) -> dict[str, Any]:
    ref = locate(path)
    meta_file = ref.path / "meta" / "metadata"  # where Orbax's JsonSave puts the JSON
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MoleError(f"unreadable checkpoint metadata at {meta_file}: {e}") from None
    if meta.get("format") != FORMAT:
        raise MoleError(f"{ref.path} has checkpoint format {meta.get('format')!r}; this version reads {FORMAT!r}")
    return meta


def model_config(path: str | Path) -> ModelConfig:
    return ModelConfig.from_dict(read_meta(path)["model_config"])


def restore_params(path: str | Path, *, with_experts: bool = True, shardings: Any = None,
                   as_numpy: bool = False, cfg: ModelConfig | None = None,
                   select: Callable[[dict], dict] | None = None,
                   this_process_only: bool = False) -> tuple[ModelConfig, Params]:
    """Restore a checkpoint's parameters.

    with_experts=False restores MoLE's inference form only (the routed experts stay on disk, never in memory).
    shardings: a pytree of jax.sharding.Sharding matching the params (placement on a mesh, any device count);
    default: the first device. as_numpy: restore to host numpy arrays instead.
    select: prunes the params tree (e.g. lut.table_inputs) so that only those parameters are read.
    this_process_only: no barrier with the other processes of a multi-process run (Orbax ends a restore with one):
    for reads that each process makes on its own schedule, e.g. a converter reading one layer at a time.
    """
    ref = locate(path)
    cfg = cfg or model_config(path)
    _, shapes = graphdef_and_shapes(cfg, with_experts=with_experts)
    if select is not None:
        shapes = select(shapes)
    if as_numpy:
        restore_args = jax.tree.map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray), shapes)
    else:
        if shardings is None:
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: one, shapes)
        restore_args = jax.tree.map(lambda s, sh: ocp.ArrayRestoreArgs(sharding=sh, global_shape=s.shape,
                                                                       dtype=s.dtype), shapes, shardings)
    if this_process_only:
        checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(), multiprocessing_options=(
            ocp.options.MultiprocessingOptions(active_processes={jax.process_index()})))
    else:
        checkpointer = ocp.PyTreeCheckpointer()
    try:
        params = checkpointer.restore(
            ref.path / "params", args=ocp.args.PyTreeRestore(item=shapes, restore_args=restore_args,
                                                             partial_restore=True))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise MoleError(f"checkpoint {ref.path} does not match its model config: {e}") from None
    return cfg, params


def restore_train_state(mngr: ocp.CheckpointManager, step: int, target: Any) -> tuple[Params, Any]:
    """Restore params and optimizer state of `step` onto `target`'s placement: `target.params` and
    `target.opt_state` are trees of jax.ShapeDtypeStruct with shardings (any mesh, any device count)."""
    items = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target.params),
                                                       opt_state=ocp.args.StandardRestore(target.opt_state)))
    return items["params"], items["opt_state"]


def read_run(run_dir: str | Path) -> dict[str, Any]:
    f = Path(run_dir) / RUN_FILE
    return json.loads(f.read_text()) if f.exists() else {}


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


# The signature of a checkpoint's parameter files ------------------------------------------------------------------
def params_signature(path: str | Path) -> dict[str, list[int]]:
    """[size, mtime_ns] of every file of the checkpoint's `params` item (where the experts are), by path relative
    to the step directory: what a table records of the checkpoint it was converted from (lut.json's
    `source.params_files`) and `decode.checkpoint_fingerprint` compares, as make and rsync's quick check do."""
    step_dir = locate(path).path
    signature = {}
    for root, _, files in os.walk(step_dir / "params"):
        for name in files:
            st = os.stat(os.path.join(root, name))
            signature[os.path.relpath(os.path.join(root, name), step_dir)] = [st.st_size, st.st_mtime_ns]
    return dict(sorted(signature.items()))
