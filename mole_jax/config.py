"""One ModelConfig for the three model kinds (dense | moe | mole), the paper's presets, and TrainConfig.

Field names follow the paper (arXiv 2503.15798, section 3); `to_hf`/`from_hf` in hf.py map them to the authors'
LlamaConfig fields. Every preset of a size shares the backbone, so Dense, MoE and MoLE differ only in the FFN part.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
import os
from pathlib import Path
from typing import Any, Sequence

KINDS = ("dense", "moe", "mole")
DTYPES = ("float32", "bfloat16", "float16")
MOE_IMPLS = ("auto", "dense", "ragged", "grouped", "gather", "skip")
# Activation rematerialisation in training (TrainConfig.remat): "none" keeps every activation for the backward pass,
# "block" recomputes each block from its input, "dots" keeps the matmul outputs and recomputes the rest.
REMAT_POLICIES = ("none", "block", "dots")
# What a run trains (TrainConfig.trainable): "all" its parameters, or "new" only MoLE's routed part (routed
# experts, expert norms, routers), e.g. of a model upcycled from Dense (upcycling.py), the backbone frozen.
TRAINABLE = ("all", "new")


class MoleError(ValueError):
    """Bad input from a user (a path, a file, a value). The CLI prints the message on one line and exits 2."""


def check_creatable(target: Path, start: Path | None = None) -> None:
    """Every output path's one rule: `target` can be created (or written into), i.e. the nearest existing directory
    from `start` (default: target itself) upwards is a writable directory. Nothing is created here: writers create
    missing parents once every argument was checked."""
    ancestor = target if start is None else start
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MoleError(f"cannot create {target}: {ancestor} is a file, which is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise MoleError(f"cannot create {target}: {ancestor} is not writable")


class ConfigError(MoleError):
    """A configuration that cannot describe a valid model or run."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    kind: str  # "dense" | "moe" | "mole"
    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    ffn_dim: int  # width of the dense FFN, and of MoLE's shared expert; 0 for MoE (no shared expert)
    expert_dim: int = 0  # width of each routed expert (MoE, MoLE)
    num_experts: int = 0  # routed experts per layer
    top_k: int = 0  # MoE: experts activated per token; MoLE activates all, so 0
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0  # the released code rotates the full head (paper appendix says 0.25)
    rms_norm_eps: float = 1e-6
    init_std: float = 0.01
    dtype: str = "float32"  # activations and matmuls
    param_dtype: str = "float32"
    moe_balance_coef: float = 0.01  # OLMoE-style load balance, MoE only (MoLE uses no auxiliary loss)
    moe_z_coef: float = 0.001  # router z-loss, MoE only
    moe_impl: str = "auto"  # "auto", or "dense" (all experts, masked), "ragged" (sorted + lax.ragged_dot),
    #                         "grouped" (sorted, batched GEMMs over tiles of one expert's rows), "gather" (each row's
    #                         experts' weights), "skip" (lax.cond skips idle experts)
    attention_impl: str | None = None  # None/"auto" (cuDNN on GPU in bf16/fp16 if it takes the shapes), "xla", "cudnn"

    def __post_init__(self):
        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(f"invalid ModelConfig: {msg}")

        need(self.kind in KINDS, f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "max_seq_len"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, f"{name} must be a positive int")
        need(self.d_model % self.num_heads == 0, f"d_model {self.d_model} not divisible by num_heads {self.num_heads}")
        need(0.0 < self.rotary_fraction <= 1.0, "rotary_fraction must be in (0, 1]")
        need(self.rotary_dim >= 2, "rotary_fraction leaves fewer than 2 rotated dims per head")
        need(self.dtype in DTYPES and self.param_dtype in DTYPES, f"dtypes must be in {DTYPES}")
        need(self.moe_impl in MOE_IMPLS, f"moe_impl must be one of {MOE_IMPLS}")
        if self.kind == "dense":
            need(self.ffn_dim > 0, "dense needs ffn_dim > 0")
            need(self.num_experts == 0 and self.expert_dim == 0 and self.top_k == 0, "dense has no experts")
        elif self.kind == "moe":
            need(self.ffn_dim == 0, "MoE (the paper's baseline) has no shared expert: ffn_dim must be 0")
            need(self.num_experts > 0 and self.expert_dim > 0, "moe needs num_experts and expert_dim")
            need(0 < self.top_k <= self.num_experts, f"moe needs 0 < top_k <= num_experts, got {self.top_k}")
        else:
            need(self.ffn_dim > 0, "mole needs a shared expert: ffn_dim > 0")
            need(self.num_experts > 0 and self.expert_dim > 0, "mole needs num_experts and expert_dim")
            need(self.top_k == 0, "mole activates every routed expert: top_k must be 0")

    # Derived sizes -----------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def rotary_dim(self) -> int:
        """Rotated dims per head (even), GPT-NeoX style: the first `rotary_dim` dims rotate, the rest pass."""
        return int(self.head_dim * self.rotary_fraction) // 2 * 2

    @property
    def lut_row_size(self) -> int:
        """Values per token in the MoLE lookup table: L * N * d."""
        return self.num_layers * self.num_experts * self.d_model if self.kind == "mole" else 0

    def param_counts(self) -> dict[str, int]:
        """Parameter counts: `total` (what trains), `active` (what one token uses on the accelerator at inference;
        for MoLE the routed experts become the LUT and cost nothing), `lut` (MoLE table entries)."""
        d, L, V = self.d_model, self.num_layers, self.vocab_size
        attn = 4 * d * d + 2 * d  # q, k, v, o and the two norms
        dense_ffn = 2 * d * self.ffn_dim
        expert = 2 * d * self.expert_dim
        router = d * self.num_experts
        per_layer_total = attn + dense_ffn + self.num_experts * expert + router
        per_layer_active = attn + dense_ffn + router
        if self.kind == "mole":
            per_layer_total += d  # expert norm
        if self.kind == "moe":
            per_layer_active += self.top_k * expert
        outer = 2 * V * d + d  # embedding, lm head, final norm
        return {
            "total": L * per_layer_total + outer,
            "active": L * per_layer_active + outer,
            "lut": V * self.lut_row_size,
        }

    # (De)serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields: {unknown}")
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# Overrides: `mole-jax train --set KEY=VALUE` and `--config FILE.json` ------------------------------------------
# Fields whose values are names: an override outside these is refused before the config is built.
FIELD_CHOICES: dict[str, tuple] = {"kind": KINDS, "dtype": DTYPES, "param_dtype": DTYPES, "moe_impl": MOE_IMPLS,
                                   "attention_impl": (None, "auto", "xla", "cudnn")}


def model_field_types() -> dict[str, Any]:
    """ModelConfig's fields in declaration order, each with its type (int, float, bool, str, X | None, tuple)."""
    hints = typing.get_type_hints(ModelConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(ModelConfig)}


def _type_words(hint) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_words(a) for a in inner) + " or none"
    if typing.get_origin(hint) is tuple:
        return f"comma-separated {_type_words(args[0]).split(' ', 1)[-1]}s"
    return {int: "an int", float: "a float", bool: "true or false", str: "a string"}.get(hint, str(hint))


class _BadValue(Exception):
    pass


def _coerce(hint, value, text: bool = True):
    """`value` (text from the command line, or a JSON value) as a value of type `hint`; _BadValue if it is none.
    text=False: `value` is a JSON value, and only a string field takes a string."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (text and isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            try:
                return _coerce(a, value, text)
            except _BadValue:
                pass
        raise _BadValue
    if origin is tuple:
        items = [v for v in value.split(",") if v.strip()] if text and isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise _BadValue
        item = args[0] if args else str
        return tuple(_coerce(item, v, text) for v in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if text and isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise _BadValue
    if hint in (int, float):  # JSON may give an int for a float field, never a float for an int one
        accepted = (int,) if hint is int else (int, float)
        if isinstance(value, accepted) and not isinstance(value, bool):
            return hint(value)
        if text and isinstance(value, str):
            try:
                return hint(value.strip())
            except ValueError:
                raise _BadValue from None
        raise _BadValue
    if hint is str:
        if isinstance(value, str):
            return value
        raise _BadValue
    raise _BadValue


def _unknown_field(key: str, where: str) -> ConfigError:
    names = list(model_field_types())
    near = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    return ConfigError(f"{where}: ModelConfig has no field {key!r}: {hint}the fields are {', '.join(names)}")


def field_value(key: str, value, where: str | None = None, *, text: bool = True) -> Any:
    """The value of ModelConfig field `key` given as text (`--set`) or as a JSON value (text=False, `--config`),
    checked against the field's type and, for the named fields, its choices. `where` names it in the message."""
    fields = model_field_types()
    where = where or f"--set {key}={value}"
    if key not in fields:
        raise _unknown_field(key, where)
    try:
        parsed = _coerce(fields[key], value, text)
    except _BadValue:
        raise ConfigError(f"{where}: {key} takes {_type_words(fields[key])}, not {value!r}") from None
    choices = FIELD_CHOICES.get(key)
    if choices is not None and parsed not in choices:
        allowed = ", ".join("none" if c is None else str(c) for c in choices)
        raise ConfigError(f"{where}: {key} must be one of {allowed}, not {value!r}")
    return parsed


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items as {field: typed value} (later items win), each checked by field_value."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"--set takes KEY=VALUE (a ModelConfig field and its value), not {item!r}")
        overrides[key] = field_value(key, text.strip())
    return overrides


def apply_overrides(cfg: "ModelConfig", overrides: dict[str, Any]) -> "ModelConfig":
    """`cfg` with `overrides` (parse_overrides's) applied together, validated as every ModelConfig is."""
    if not overrides:
        return cfg
    try:
        return cfg.replace(**overrides)
    except ConfigError as e:
        given = " ".join(f"--set {k}={_show(v)}" for k, v in overrides.items())
        raise ConfigError(f"{given}: {e}") from None


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(_show, value))
    return str(value)


def format_override(key: str, value) -> str:
    """`key=value` as --set takes it."""
    return f"{key}={_show(value)}"


def read_model_config(path: str | Path) -> tuple["ModelConfig", dict[str, Any]]:
    """A whole model config from a JSON file as ModelConfig.to_dict writes it: (config, the file's fields).
    Every field is checked as --set checks it; missing required fields and unknown ones are refused."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--config {path} does not exist" if not path.exists() else f"--config {path} is not a file")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path} must hold a JSON object of ModelConfig fields")
    values = {k: field_value(k, v, where=f"--config {path}: {k}={json.dumps(v)}", text=False) for k, v in raw.items()}
    required = [f.name for f in dataclasses.fields(ModelConfig)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in values]
    if missing:
        raise ConfigError(f"--config {path} lacks the required fields {', '.join(missing)}")
    try:
        cfg = ModelConfig(**values)
    except ConfigError as e:
        raise ConfigError(f"--config {path}: {e}") from None
    return cfg, cfg.to_dict()


def _family(size: str, L: int, d: int, heads: int, ffn: int, vocab: int, seq: int, **kw) -> dict[str, ModelConfig]:
    """Dense, MoE-10E (half width, top-2), MoLE-4E (full width) and the 34E/16E pair: equal activated size."""
    base = dict(vocab_size=vocab, num_layers=L, d_model=d, num_heads=heads, max_seq_len=seq, **kw)
    return {
        f"dense-{size}": ModelConfig(kind="dense", ffn_dim=ffn, **base),
        f"moe-10e-{size}": ModelConfig(kind="moe", ffn_dim=0, expert_dim=ffn // 2, num_experts=10, top_k=2, **base),
        f"mole-4e-{size}": ModelConfig(kind="mole", ffn_dim=ffn, expert_dim=ffn, num_experts=4, **base),
        f"moe-34e-{size}": ModelConfig(kind="moe", ffn_dim=0, expert_dim=ffn // 2, num_experts=34, top_k=2, **base),
        f"mole-16e-{size}": ModelConfig(kind="mole", ffn_dim=ffn, expert_dim=ffn, num_experts=16, **base),
    }


def _cpu_family(size: str, **kw) -> dict[str, ModelConfig]:
    fam = _family(size, **kw)
    return {f"{size}-{kind}": fam[f"{name}-{size}"] for kind, name in (("dense", "dense"), ("moe", "moe-10e"),
                                                                        ("mole", "mole-4e"))}


# The paper's Table 2 (vocabulary padded to 50,304, sequence 2,048), and CPU-sized presets with the same matching.
_PAPER = {
    **_family("160m", L=12, d=768, heads=12, ffn=3072, vocab=50304, seq=2048),
    **_family("410m", L=24, d=1024, heads=16, ffn=4096, vocab=50304, seq=2048),
    **{k: v for k, v in _family("1b", L=16, d=2048, heads=8, ffn=8192, vocab=50304, seq=2048).items()
       if "34e" not in k and "16e" not in k},
}
_CPU = {
    **_cpu_family("tiny", L=2, d=64, heads=4, ffn=256, vocab=512, seq=128),
    **_cpu_family("small", L=4, d=256, heads=4, ffn=1024, vocab=8192, seq=256),
}
presets: dict[str, ModelConfig] = {**_CPU, **_PAPER}


def get_preset(name: str) -> ModelConfig:
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(presets)}")
    return presets[name]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run settings (the paper's training recipe as defaults)."""

    steps: int = 1000
    # Steps the learning-rate schedule spans (warmup and cosine); None: `steps`. Fixed when a run starts (run.json),
    # so that a run extended past it keeps its trajectory: later steps train at the schedule's final rate.
    schedule_steps: int | None = None
    batch_size: int = 16  # sequences per optimizer step (global, across devices and accumulation)
    seq_len: int = 128
    grad_accum: int = 1  # micro-batches per step
    peak_lr: float = 6e-4
    warmup_frac: float = 0.01
    final_lr_frac: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    dedup: bool = True  # MoLE: evaluate routed experts once per unique token id in the batch
    remat: str = "none"  # activation rematerialisation in the backward pass: one of REMAT_POLICIES
    trainable: str = "all"  # which parameters get updates: one of TRAINABLE (frozen ones have no optimizer state)
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    val_fraction: float = 0.05

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
