"""The authors' released checkpoints in and out (Hugging Face directory: config.json + safetensors).

Key names and shapes follow JieShibo/MoLE (modeling_dense/moe/mole/mole_rep.py) (the released checkpoints' format).
PyTorch Linear weights are [out, in]; ours are [in, out] with heads split out, so the mapping transposes.
Safetensors are read with the `safetensors` numpy API (no torch); a `.bin` only through torch's weights-only
loader, never by plain unpickling.
"""

from __future__ import annotations

import glob
import json
import os
import pickletools
import shutil
import socket
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from mole_jax import checkpoint, data, lut_writer
from mole_jax.config import ModelConfig, MoleError, check_creatable
from mole_jax.model import Params, graphdef_and_shapes
from mole_jax.schemes import FLOAT_SCHEMES

ARCHITECTURES = {"DenseForCausalLM": "dense", "MoeForCausalLM": "moe", "MoleForCausalLM": "mole"}
MOE_TABLE = "model.moe_table.weight"


# Config ------------------------------------------------------------------------------------------------------
def config_from_hf(hf: dict, *, moe_top_k: int | None = None) -> ModelConfig:
    archs = hf.get("architectures") or []
    kinds = {ARCHITECTURES[a] for a in archs if a in ARCHITECTURES}
    if len(kinds) != 1:
        raise MoleError(f"unknown architecture {archs}: expected one of {sorted(ARCHITECTURES)}")
    kind = kinds.pop()

    def need(name: str):
        if name not in hf:
            raise MoleError(f"config.json has no {name!r}")
        return hf[name]

    heads = need("num_attention_heads")
    if hf.get("num_key_value_heads", heads) != heads:
        raise MoleError(f"num_key_value_heads {hf['num_key_value_heads']} != num_attention_heads {heads}: "
                        "grouped-query attention is not part of MoLE's released models")
    width = need("intermediate_size")  # the width of EVERY FFN of the model, shared and routed
    common = dict(vocab_size=need("vocab_size"), num_layers=need("num_hidden_layers"), d_model=need("hidden_size"),
                  num_heads=heads, max_seq_len=hf.get("max_position_embeddings", 2048),
                  rope_theta=float(hf.get("rope_theta", 10000.0)), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)))
    if hf.get("rope_scaling"):
        raise MoleError(f"rope_scaling {hf['rope_scaling']} is not supported")
    if kind == "dense":
        return ModelConfig(kind="dense", ffn_dim=width, **common)
    n = need("num_experts")
    if kind == "moe":
        # the released code hard-codes 10 (a bug); paper: 2. A given 0 is refused below, not taken as "unset".
        k = moe_top_k if moe_top_k is not None else hf.get("num_experts_per_tok") or 2
        if not 0 < k <= n:
            raise MoleError(f"MoE top-k {k} must be in [1, num_experts={n}]")
        return ModelConfig(kind="moe", ffn_dim=0, expert_dim=width, num_experts=n, top_k=k, **common)
    return ModelConfig(kind="mole", ffn_dim=width, expert_dim=width, num_experts=n, **common)


def config_to_hf(cfg: ModelConfig, torch_dtype: str = "float32") -> dict:
    if cfg.rotary_fraction != 1.0:
        raise MoleError(f"rotary_fraction {cfg.rotary_fraction}: the authors' code rotates the full head, "
                        "so this model cannot be exported to their format")
    if cfg.kind == "mole" and cfg.ffn_dim != cfg.expert_dim:
        raise MoleError(f"the authors' format has one intermediate_size; this MoLE has shared width {cfg.ffn_dim} "
                        f"and expert width {cfg.expert_dim}")
    arch = {v: k for k, v in ARCHITECTURES.items()}[cfg.kind]
    hf = {
        "architectures": [arch], "model_type": "llama",
        "hidden_act": "gelu",  # informational: the authors' code always uses exact GELU
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.expert_dim if cfg.kind == "moe" else cfg.ffn_dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": False, "attention_bias": False,
        "initializer_range": cfg.init_std, "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": torch_dtype,
    }
    if cfg.kind != "dense":
        hf["num_experts"] = cfg.num_experts
    if cfg.kind == "moe":
        hf["num_experts_per_tok"] = cfg.top_k
    return hf


# Tensor name mapping ------------------------------------------------------------------------------------------
def _mapping(cfg: ModelConfig, *, with_experts: bool = True) -> list[tuple[str, tuple, Callable, Callable]]:
    """(hf_name, our param path, ours->hf, hf->ours) for every tensor; transforms work on numpy arrays."""
    D, H, K = cfg.d_model, cfg.num_heads, cfg.head_dim
    same = (lambda a: a, lambda a: a)
    linear = (lambda w: w.T, lambda w: w.T)  # ours [in, out] <-> torch [out, in]
    qkv = (lambda w: w.reshape(D, H * K).T, lambda w: w.T.reshape(D, H, K))
    out_proj = (lambda w: w.reshape(H * K, D).T, lambda w: w.T.reshape(H, K, D))
    rows = [("model.embed_tokens.weight", ("embed_VxD",), *same),
            ("model.norm.weight", ("norm_out", "scale_D"), *same),
            ("lm_head.weight", ("unembed_DxV",), *linear)]
    for i in range(cfg.num_layers):
        pre, blk = f"model.layers.{i}.", ("blocks", i)
        for n in "qkv":
            rows.append((f"{pre}self_attn.{n}_proj.weight", (*blk, "attn", f"w{n}_DxHxK"), *qkv))
        rows += [(f"{pre}self_attn.o_proj.weight", (*blk, "attn", "wo_HxKxD"), *out_proj),
                 (f"{pre}input_layernorm.weight", (*blk, "norm_in", "scale_D"), *same),
                 (f"{pre}post_attention_layernorm.weight", (*blk, "norm_post", "scale_D"), *same)]
        if cfg.kind in ("dense", "mole"):
            rows += [(f"{pre}mlp.up_proj.weight", (*blk, "ffn", "w_up_DxF"), *linear),
                     (f"{pre}mlp.down_proj.weight", (*blk, "ffn", "w_down_FxD"), *linear)]
        if cfg.kind in ("moe", "mole"):
            rows.append((f"{pre}router.weight", (*blk, "w_router_DxN"), *linear))
        if cfg.kind == "moe" or with_experts and cfg.kind == "mole":
            for j in range(cfg.num_experts):
                rows += [(f"{pre}experts.{j}.up_proj.weight", (*blk, "experts", "w_up_NxDxF", j), *linear),
                         (f"{pre}experts.{j}.down_proj.weight", (*blk, "experts", "w_down_NxFxD", j), *linear)]
        if cfg.kind == "mole" and with_experts:
            rows.append((f"{pre}expert_layernorm.weight", (*blk, "norm_expert", "scale_D"), *same))
    return rows


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def params_to_hf(cfg: ModelConfig, params: Params, dtype=np.float32) -> dict[str, np.ndarray]:
    with_experts = cfg.kind != "mole" or "experts" in params["blocks"][0]
    return {name: np.ascontiguousarray(to_hf(np.asarray(_get(params, path))).astype(dtype))
            for name, path, to_hf, _ in _mapping(cfg, with_experts=with_experts)}


def _leaf_shape(shapes, path) -> tuple:
    """Our shape of the tensor at `path`; a trailing int indexes one expert of a batched [N, ...] weight."""
    node = _get(shapes, path[:-1] if isinstance(path[-1], int) else path)
    return tuple(node.shape[1:] if isinstance(path[-1], int) else node.shape)


def hf_shapes(cfg: ModelConfig, *, with_experts: bool = True) -> dict[str, tuple]:
    """Every tensor name a checkpoint of this config holds, with its shape in the authors' layout."""
    _, shapes = graphdef_and_shapes(cfg, with_experts=with_experts)
    return {name: to_hf(np.empty(_leaf_shape(shapes, path), np.float32)).shape
            for name, path, to_hf, _ in _mapping(cfg, with_experts=with_experts)}


def params_from_hf(cfg: ModelConfig, get_tensor: Callable[[str], np.ndarray], names: set[str], *,
                   with_experts: bool = True) -> Params:
    """Build our params from tensors by HF name, checking that every one is present and of the right shape."""
    _, shapes = graphdef_and_shapes(cfg, with_experts=with_experts)
    params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    want = hf_shapes(cfg, with_experts=with_experts)
    for name, path, _, from_hf in _mapping(cfg, with_experts=with_experts):
        if name not in names:
            raise MoleError(f"checkpoint is missing tensor {name!r}")
        tensor = get_tensor(name)
        if tuple(tensor.shape) != want[name]:
            raise MoleError(f"tensor {name!r} has shape {tuple(tensor.shape)}; the config needs {want[name]}")
        if tensor.dtype.kind != "f" and tensor.dtype.name != "bfloat16":
            raise MoleError(f"tensor {name!r} has dtype {tensor.dtype}; expected floating point")
        _get(params, path[:-1])[path[-1]] = from_hf(np.asarray(tensor, dtype=np.float32))
    return params


# Reading a Hugging Face directory -----------------------------------------------------------------------------
class TensorSource:
    """The tensors of an HF directory by name, read lazily: model.safetensors, sharded safetensors (an
    index.json), or pytorch_model.bin (sharded too) through torch's weights-only loader."""

    def __init__(self, src: Path):
        self.src = src
        self._files: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        for stem, kind in (("model.safetensors", "st"), ("pytorch_model.bin", "bin")):
            index = src / f"{stem}.index.json"
            if (src / stem).is_file():
                self.kind, files = kind, [src / stem]
            elif index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise MoleError(f"unreadable shard index {index}: {e}") from None
                self.kind, files = kind, sorted({src / f for f in weight_map.values()})
            else:
                continue
            for f in files:
                if not f.is_file():
                    raise MoleError(f"weights shard {f} is missing")
                for name in self._handle(f).keys():
                    self._files[name] = f
            return
        raise MoleError(f"no weights in {src}: expected model.safetensors, model.safetensors.index.json or "
                        "pytorch_model.bin")

    @property
    def names(self) -> set[str]:
        return set(self._files)

    def _handle(self, f: Path):
        if f not in self._open:
            if self.kind == "st":
                try:
                    self._open[f] = safe_open(str(f), framework="numpy")
                except (SafetensorError, OSError) as e:
                    raise MoleError(f"unreadable safetensors file {f}: {e}") from None
            else:
                self._open[f] = _load_bin(f)
        return self._open[f]

    def get(self, name: str) -> np.ndarray:
        h = self._handle(self._files[name])
        if self.kind == "st":
            return h.get_tensor(name)
        t = h[name]
        return t.float().numpy() if str(t.dtype) == "torch.bfloat16" else t.numpy()

    def shape(self, name: str) -> tuple[int, ...]:
        h = self._handle(self._files[name])
        return tuple(h.get_slice(name).get_shape() if self.kind == "st" else h[name].shape)

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor in its own dtype, reading only those rows (tables are large)."""
        h = self._handle(self._files[name])
        if self.kind == "st":
            return h.get_slice(name)[start:stop]
        t = h[name][start:stop]
        return t.float().numpy().astype(ml_dtypes.bfloat16) if str(t.dtype) == "torch.bfloat16" else t.numpy()


# What a plain weights file written by torch.save may call when unpickled: a state dict of tensors and nothing else.
_PICKLE_ALLOWED = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
                   ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state")}


def _pickle_calls(data: bytes) -> list[tuple[str, str]]:
    """The (module, name) of every global a pickle loads, read with pickletools (nothing is unpickled)."""
    calls, strings = [], []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("GLOBAL", "INST"):
            calls.append(tuple(arg.split(" ", 1)))
        elif op.name == "STACK_GLOBAL":
            calls.append((strings[-2], strings[-1]) if len(strings) >= 2 else ("?", "?"))
        elif isinstance(arg, str):
            strings.append(arg)
    return calls


def _check_plain_weights(f: Path) -> None:
    """Refuse a .bin that is not torch.save's zip of a plain state dict, from its bytes alone (no torch, nothing
    unpickled): any global it would call outside the tensors' rebuild functions and storages is code."""
    if not zipfile.is_zipfile(f):
        raise MoleError(f"refusing to load {f}: not the zip format torch.save writes (a legacy or foreign pickle)")
    with zipfile.ZipFile(f) as z:
        pickles = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise MoleError(f"refusing to load {f}: not a torch.save archive (no single data.pkl)")
        try:
            calls = _pickle_calls(z.read(pickles[0]))
        except Exception as e:  # a truncated or malformed pickle
            raise MoleError(f"refusing to load {f}: its pickle does not parse ({type(e).__name__}: {e})") from None
    for module, name in calls:
        storage = module == "torch" and name.endswith("Storage")
        if (module, name) not in _PICKLE_ALLOWED and not storage:
            raise MoleError(f"refusing to load {f}: not a plain weights file (it calls {module}.{name})")


def _load_bin(f: Path) -> dict:
    _check_plain_weights(f)
    try:
        import torch
    except ImportError:
        raise MoleError(f"{f.name} is a PyTorch pickle; reading it safely needs torch (pip install torch), or "
                        "convert the checkpoint to safetensors") from None
    try:
        return torch.load(f, map_location="cpu", weights_only=True, mmap=True)  # never plain unpickling
    except Exception as e:  # torch raises UnpicklingError for anything that is not plain tensors
        raise MoleError(f"refusing to load {f}: not a plain weights file ({type(e).__name__}: {e})") from None


def read_hf_config(src: Path) -> dict:
    f = src / "config.json"
    if not src.is_dir():
        raise MoleError(f"{src} is not a directory (expected a Hugging Face model directory)")
    if not f.is_file():
        raise MoleError(f"{src} has no config.json (expected a Hugging Face model directory)")
    try:
        hf = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise MoleError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise MoleError(f"{f} does not hold a JSON object")
    return hf


# Tokenizers ---------------------------------------------------------------------------------------------------
# Import / export ---------------------------------------------------------------------------------------------
def _fresh_destination(out: Path, overwrite: bool) -> None:
    """OUT may be written: empty or missing (or replaced with overwrite), and its nearest existing ancestor is a
    writable directory. Missing parents are created only once everything was checked (`_build_dir`), as train,
    convert and upcycle do."""
    _remove_leftovers(out)  # first: a killed run may have left OUT moved aside
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise MoleError(f"destination {out} exists and is not empty (pass overwrite to replace it)")
    check_creatable(out, out.parent)


def _publish(tmp: Path, out: Path) -> None:
    """Move a fully written directory into place: OUT never holds a partial result."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{socket.gethostname()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _build_dir(out: Path) -> Path:
    """A fresh directory beside OUT to build in, named after this process: `.OUT.partial-PID-HOST-*`; OUT's
    missing parents are created first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-{socket.gethostname()}-",
                                 dir=out.parent))


def _remove_leftovers(out: Path) -> None:
    """What a run killed on this host left beside OUT: its build directories are removed; the previous OUT, if
    the kill came between the two renames of _publish (OUT moved aside, the new one not yet in place), is moved
    back. Runs of other hosts (a shared filesystem) or still alive are left alone."""
    for p in sorted(out.parent.glob(f".{glob.escape(out.name)}.*-*")):
        kind, _, rest = p.name[len(out.name) + 2:].partition("-")
        pid, _, host = rest.partition("-")
        if kind == "partial":
            host = host.rsplit("-", 1)[0]  # mkdtemp's random suffix has no '-'
        if kind not in ("partial", "old") or not pid.isdigit() or host != socket.gethostname() or _alive(int(pid)):
            continue
        if kind == "old" and not out.exists():
            p.rename(out)
        else:
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def import_hf(src: str | Path, out: str | Path, *, moe_top_k: int | None = None, overwrite: bool = False,
              tokenizer=None) -> Path:
    """Convert an authors' checkpoint (HF directory) into a mole-jax run directory that `mole_jax.load` reads.

    Dense, MoE and MoLE training form become an Orbax checkpoint (step 0). MoLE's inference form
    (`model.moe_table.weight`) becomes the checkpoint without experts plus its table as a LUT in OUT/lut.
    moe_top_k: experts per token for MoE (default: config's num_experts_per_tok, else 2 as in the paper; the
    released modeling_moe.py hard-codes 10).
    tokenizer: written to OUT/tokenizer.json, where `load`, `generate` and `eval` find it: a tokenizer.json, a
    directory holding one, or a tokenizers.Tokenizer (default: SRC/tokenizer.json if there is one). The released
    checkpoints carry none; they use GPT-NeoX-20B's.
    The config, the tensor names, the tokenizer and OUT are checked before a tensor is read; OUT is written only
    after every tensor was read and checked.
    """
    src, out = Path(src).expanduser().absolute(), Path(out).expanduser().absolute()
    hf_cfg = read_hf_config(src)
    cfg = config_from_hf(hf_cfg, moe_top_k=moe_top_k)
    tensors = TensorSource(src)
    inference_form = MOE_TABLE in tensors.names
    if inference_form and cfg.kind != "mole":
        raise MoleError(f"{MOE_TABLE} found in a {cfg.kind} checkpoint")
    if tokenizer is None and (src / checkpoint.TOKENIZER).is_file():
        tokenizer = src / checkpoint.TOKENIZER
    checked_tokenizer = None if tokenizer is None else data.resolve_tokenizer(tokenizer, cfg.vocab_size)
    _check_tensor_headers(cfg, tensors, with_experts=not inference_form)
    _fresh_destination(out, overwrite)
    params = params_from_hf(cfg, tensors.get, tensors.names, with_experts=not inference_form)
    tmp = _build_dir(out)
    try:
        meta_extra = {"has_experts": not inference_form, "source": {"format": "hf", "path": str(src)}}
        if inference_form:
            meta_extra["lut_fingerprint"] = _import_table(cfg, tensors, tmp / checkpoint.LUT)
        mngr = checkpoint.manager(tmp / checkpoint.CHECKPOINTS, async_save=False)
        checkpoint.save(mngr, 0, params, checkpoint.step_meta(cfg, 0, **meta_extra))
        mngr.close()
        checkpoint.write_json_atomic(tmp / checkpoint.RUN_FILE, {"model_config": cfg.to_dict(), **meta_extra})
        if isinstance(tokenizer, (str, os.PathLike)):  # the file as given, byte for byte
            shutil.copyfile(data.tokenizer_file(tokenizer), tmp / checkpoint.TOKENIZER)
        elif checked_tokenizer is not None:
            checked_tokenizer.save(str(tmp / checkpoint.TOKENIZER))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_tensor_headers(cfg: ModelConfig, tensors: TensorSource, *, with_experts: bool) -> None:
    """Every tensor the config needs is present with its shape, from the files' headers alone (params_from_hf
    checks the same as it reads, for callers that give tensors another way)."""
    for name, shape in hf_shapes(cfg, with_experts=with_experts).items():
        if name not in tensors.names:
            raise MoleError(f"checkpoint is missing tensor {name!r}")
        if tensors.shape(name) != shape:
            raise MoleError(f"tensor {name!r} has shape {tensors.shape(name)}; the config needs {shape}")


def _import_table(cfg: ModelConfig, tensors: TensorSource, lut_dir: Path) -> str:
    """MoLE's inference form: stream `model.moe_table.weight` [V, L*N*d] (row-major [V, L, N, d]) into a table at
    lut_dir, shard by shard, keeping its dtype as the scheme. There are no experts to fingerprint, so the
    fingerprint is the table's content hash (lut.ContentHash); it is returned for the checkpoint's meta."""
    V, L, N, D = cfg.vocab_size, cfg.num_layers, cfg.num_experts, cfg.d_model
    shape = tensors.shape(MOE_TABLE)
    if shape != (V, L * N * D):
        raise MoleError(f"tensor {MOE_TABLE!r} has shape {shape}; the config needs {(V, L * N * D)}")
    dtype = tensors.get_rows(MOE_TABLE, 0, 1).dtype
    if dtype.name not in FLOAT_SCHEMES:
        raise MoleError(f"tensor {MOE_TABLE!r} has dtype {dtype}; expected float32, float16 or bfloat16")
    return lut_writer.write_table(lut_dir, cfg, dtype.name,
                                  lambda start, stop: tensors.get_rows(MOE_TABLE, start, stop).reshape(-1, L, N, D),
                                  source={"format": "hf", "tensor": MOE_TABLE, "path": str(tensors.src)})


def export_hf(ckpt: str | Path, out: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write a checkpoint as the authors' format (config.json + model.safetensors) for their PyTorch code."""
    out = Path(out).expanduser().absolute()
    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}.get(dtype)
    if np_dtype is None:
        raise MoleError(f"unknown export dtype {dtype!r}: use float32, float16 or bfloat16")
    meta = checkpoint.read_meta(ckpt)
    if not meta.get("has_experts", True):
        raise MoleError("this checkpoint is MoLE's inference form; export the training-form checkpoint instead")
    hf_cfg = config_to_hf(checkpoint.model_config(ckpt), torch_dtype=dtype)
    _fresh_destination(out, overwrite)  # before the weights are read
    cfg, params = checkpoint.restore_params(ckpt, as_numpy=True)
    tensors = params_to_hf(cfg, params, np_dtype)
    tmp = _build_dir(out)
    try:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        ref = checkpoint.locate(ckpt)
        if ref.run_dir is not None and (ref.run_dir / checkpoint.TOKENIZER).is_file():
            shutil.copyfile(ref.run_dir / checkpoint.TOKENIZER, tmp / "tokenizer.json")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
