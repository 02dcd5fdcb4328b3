"""Loading a checkpoint for inference: `mole_jax.load(path)` -> LanguageModel with `.config` and `.logits(ids)`."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mole_jax import checkpoint
from mole_jax.config import ModelConfig, MoleError
from mole_jax.model import Params, graphdef_and_shapes
from flax import nnx


def check_ids(ids, cfg: ModelConfig, *, max_len: int | None = None) -> np.ndarray:
    """Validate token ids on the host: an int array [B, T], 0 <= id < V, T within the context."""
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise MoleError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise MoleError(f"token ids must have shape [batch, length], got shape {arr.shape}")
    if arr.size == 0:
        raise MoleError(f"token ids are empty (shape {arr.shape})")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= cfg.vocab_size:
        bad = lo if lo < 0 else hi
        raise MoleError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
    limit = max_len or cfg.max_seq_len
    if arr.shape[1] > limit:
        raise MoleError(f"sequence length {arr.shape[1]} exceeds the model's context of {limit} tokens")
    return arr.astype(np.int32)


class LanguageModel:
    """A model ready for inference on the default device."""

    def __init__(self, cfg: ModelConfig, params: Params, *, run_dir: Path | None = None):
        self.config = cfg
        self.params = params
        self.run_dir = run_dir
        self._graphdef, _ = graphdef_and_shapes(cfg)

    @partial(jax.jit, static_argnums=0)
    def _logits(self, params, ids_BxT):
        return nnx.merge(self._graphdef, params)(ids_BxT).logits_BxTxV

    def logits(self, ids) -> np.ndarray:
        """Next-token logits, float32 numpy [B, T, V], for int token ids [B, T]."""
        ids = check_ids(ids, self.config)
        return np.asarray(self._logits(self.params, jnp.asarray(ids)))

    def __hash__(self):  # jit's static self
        return id(self)

    def __eq__(self, other):
        return self is other


def load(path: str | Path) -> LanguageModel:
    """Load a checkpoint (a run directory = its latest step, a checkpoints directory, or a step directory)."""
    meta = checkpoint.read_meta(path)
    ref = checkpoint.locate(path)
    if not meta.get("has_experts", True):
        raise MoleError(f"{ref.path} is MoLE's inference form: it needs its LUT")
    cfg, params = checkpoint.restore_params(path)
    return LanguageModel(cfg, params, run_dir=ref.run_dir)
