"""Upcycling: a trained Dense checkpoint -> a MoLE run directory whose model, at step 0, is the Dense model.

    upcycle(DENSE_CKPT, OUT, num_experts=4, init="zero-down")     mole-jax upcycle DENSE_CKPT OUT --experts 4
    mole-jax train --out OUT --steps N --train new                train only what is new (train.py)

MoLE's routed experts read the token embedding, which a Dense model already has, so they can be added to a trained
Dense model without changing its function. The MoLE config is the Dense one with kind="mole", N routed experts of
width expert_dim (default: the Dense FFN's, as the paper's MoLE presets, whose shared expert is the Dense FFN). Its
backbone (embedding, attention, norms, the Dense FFN as the shared expert, head) is the Dense checkpoint's, bit for
bit; per layer it gets new routed experts, an expert norm (ones) and a router, initialised by `init`:

    zero-down         experts' up-projections and the router random (the presets' init), down-projections zero:
                      the routed output is exactly zero, so step-0 logits are the Dense model's. The first update
                      reaches only the down-projections (their gradient is the up-projections' activations times
                      the gate-weighted output gradient); the others follow from the second step.
    zero-down-router  the router zero too: uniform gates at step 0 (logits again the Dense model's).
    small-down        nothing zeroed: a fresh MoLE's init of the new parameters (down-projections at the presets'
                      std / sqrt(2L)); step-0 logits differ from the Dense model's by the experts' small output.

OUT is a run directory like any other (checkpoint.py): run.json holds the MoLE config and `upcycled_from` (the
Dense checkpoint's path, step and parameter fingerprint, the settings above, and the Dense run's data, which
training defaults to), checkpoints/0 the upcycled parameters, and the Dense run's tokenizer.json is copied. It is
built in a temporary sibling directory and renamed into place. `mole_jax.load`, `convert_to_lut` and `evaluate`
read it at step 0; `mole_jax.train` (run.json without a training config) starts from those parameters. Measured
comparisons of the inits and the training modes: docs/upcycle.md.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mole_jax import checkpoint
from mole_jax.config import ModelConfig, MoleError
from mole_jax.model import Params, graphdef_and_shapes

INITS = ("zero-down", "zero-down-router", "small-down")

__all__ = ["upcycle", "upcycled_config", "start_run", "params_fingerprint", "INITS"]


def upcycled_config(dense: ModelConfig, num_experts: int, expert_dim: int | None = None) -> ModelConfig:
    """The MoLE config of a Dense config: the same backbone, N routed experts of width expert_dim (default: the
    Dense FFN's width, so the result of a Dense preset is the MoLE preset of its family)."""
    if dense.kind != "dense":
        raise MoleError(f"upcycling starts from a Dense model, not a {dense.kind} one")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise MoleError(f"the number of routed experts must be at least 1, got {num_experts}")
    if expert_dim is not None and (not isinstance(expert_dim, int) or expert_dim < 1):
        raise MoleError(f"the routed experts' width must be at least 1, got {expert_dim}")
    return dense.replace(kind="mole", num_experts=num_experts, expert_dim=expert_dim or dense.ffn_dim)


def new_block_params(cfg: ModelConfig, init: str, rng: np.random.Generator) -> Params:
    """One layer's new parameters (routed experts, expert norm, router) under `init` (see the module docstring)."""
    D, N, F = cfg.d_model, cfg.num_experts, cfg.expert_dim
    dtype = jnp.dtype(cfg.param_dtype)

    def normal(shape, std):
        return (std * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)

    down_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)  # layers.Experts' init of the down-projections
    return {"w_router_DxN": np.zeros((D, N), dtype) if init == "zero-down-router" else normal((D, N), cfg.init_std),
            "experts": {"w_up_NxDxF": normal((N, D, F), cfg.init_std),
                        "w_down_NxFxD": normal((N, F, D), down_std) if init == "small-down"
                        else np.zeros((N, F, D), dtype)},
            "norm_expert": {"scale_D": np.ones((D,), dtype)}}


def params_fingerprint(params: Params) -> str:
    """sha256 (hex) of a params tree: each leaf's key path, dtype, shape and bytes, in key-path order."""
    h = hashlib.sha256(b"mole-jax-params/1\0")
    leaves = sorted((jax.tree_util.keystr(path), np.ascontiguousarray(np.asarray(x)))
                    for path, x in jax.tree_util.tree_flatten_with_path(params)[0])
    for name, a in leaves:
        h.update(f"{name}{a.dtype.str}{list(a.shape)}\0".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def upcycle(dense_ckpt: str | Path, out: str | Path, num_experts: int = 4, *, init: str = "zero-down",
            expert_dim: int | None = None, seed: int = 0) -> Path:
    """Write OUT, a MoLE run directory whose backbone is the Dense checkpoint's and whose step-0 logits equal the
    Dense model's (init "zero-down" or "zero-down-router"); see the module docstring. dense_ckpt: a run, checkpoints
    or step directory of a Dense model (trained here or imported with import_hf). seed: of the new random weights.
    Rerunning the same call returns OUT as it is; an OUT that holds anything else is refused."""
    if init not in INITS:
        raise MoleError(f"unknown upcycling init {init!r}: use one of {', '.join(INITS)}")
    ref = checkpoint.locate(dense_ckpt)
    dense_cfg = checkpoint.model_config(ref.path)
    if dense_cfg.kind != "dense":
        raise MoleError(f"{ref.path} holds a {dense_cfg.kind} model: upcycling starts from a Dense checkpoint")
    cfg = upcycled_config(dense_cfg, num_experts, expert_dim)
    out = Path(out).expanduser().absolute()
    settings = {"path": str(ref.path), "step": ref.step, "num_experts": cfg.num_experts,
                "expert_dim": cfg.expert_dim, "init": init, "seed": seed}
    if _holds_this_upcycle(out, settings):  # before reading any weights: rerunning the same call is free
        return out
    _, dense = checkpoint.restore_params(ref.path, as_numpy=True)
    dense_run = checkpoint.read_run(ref.run_dir) if ref.run_dir else {}
    origin = {**settings, "kind": "dense", "fingerprint": params_fingerprint(dense),
              "preset": dense_run.get("preset"), **({"data": dense_run["data"]} if "data" in dense_run else {})}
    rng = np.random.default_rng(seed)
    params = {**dense, "blocks": {l: {**b, **new_block_params(cfg, init, rng)} for l, b in dense["blocks"].items()}}
    tokenizer = ref.run_dir / checkpoint.TOKENIZER if ref.run_dir else None
    return start_run(out, cfg, params, origin, tokenizer=tokenizer)


def _holds_this_upcycle(out: Path, settings: dict[str, Any]) -> bool:
    """Whether OUT already holds the upcycle of these settings; False for a missing or empty OUT; MoleError for an
    OUT that holds anything else."""
    if out.exists() and not out.is_dir():
        raise MoleError(f"{out} is a file: choose another OUT")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    origin = checkpoint.read_run(out).get("upcycled_from") or {}
    if {k: origin.get(k) for k in settings} != settings:
        raise MoleError(f"{out} is not empty and holds no upcycle of {settings['path']} with these settings: "
                        "choose another OUT")
    return True


def start_run(out: str | Path, cfg: ModelConfig, params: Params, origin: dict[str, Any], *,
              tokenizer: Path | None = None) -> Path:
    """A run directory whose training starts from `params` (checkpoint step 0; a fresh optimizer when trained):
    run.json records `origin` as `upcycled_from`. What `upcycle` writes; also a Dense model's copy that continues
    training on the same terms (experiments/upcycle.py). OUT must not exist or be empty."""
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoleError(f"{out} exists and is not empty: choose another OUT")
    _, shapes = graphdef_and_shapes(cfg)
    if jax.tree.structure(params) != jax.tree.structure(shapes) or any(
            np.shape(p) != s.shape for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(shapes))):
        raise MoleError("these parameters do not match the model config")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        mngr = checkpoint.manager(tmp / checkpoint.CHECKPOINTS, async_save=False)
        checkpoint.save(mngr, 0, params, checkpoint.step_meta(cfg, 0, has_experts=True, upcycled_from={
            k: v for k, v in origin.items() if k != "data"}))
        mngr.close()
        checkpoint.write_json_atomic(tmp / checkpoint.RUN_FILE, {"format": checkpoint.FORMAT, "preset": None,
                                                                 "model_config": cfg.to_dict(),
                                                                 "upcycled_from": origin})
        if tokenizer is not None and tokenizer.is_file():
            shutil.copyfile(tokenizer, tmp / checkpoint.TOKENIZER)
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
