"""mole-jax: Mixture of Lookup Experts (Jie et al., ICML 2025) in JAX and Flax NNX.

The public API (kept small; everything else is reachable through the modules):
    presets                        name -> ModelConfig (the paper's Table 2 and CPU-sized tiny-*/small-*)
    ModelConfig, TrainConfig       configuration
    load(path, lut=None, lut_placement="device", tokenizer=None)   a checkpoint -> LanguageModel: .logits(ids),
                                   .generate(prompts, max_new_tokens, ...), .stream(...), .generate_text(text, ...)
    import_hf(src, out), export_hf(ckpt, out)   the authors' checkpoints in and out
    upcycle(dense_ckpt, out, num_experts=4)   a trained Dense checkpoint -> a MoLE run directory (step 0 = Dense)
    convert_to_lut(ckpt, lut_dir, dtype)  MoLE's re-parameterisation: experts -> lookup table on storage
    open_lut(lut_dir)              a table: .rows(ids) -> float32 [len(ids), L, N, d]
    MoleError                      bad input (the CLI prints it on one line and exits 2)
    evaluate(run_dir, data_source, split)   loss (nats), perplexity, tokens of a checkpoint on text
Training lives in the module of its name: `from mole_jax.train import train` (train or resume a run directory).

Importing the package is cheap: the names above are resolved on first use (PEP 562), so `mole-jax --help` and
`import mole_jax` do not load JAX. With lm-eval installed, the lm-eval model "mole_jax" (mole_jax.harness) is
registered as soon as lm-eval's registry is loaded (see `_register_with_lm_eval`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

from mole_jax.config import ModelConfig, MoleError, TrainConfig, get_preset, presets

__version__ = "0.1.0"

_LAZY = {  # public name -> the module that defines it
    "LanguageModel": "mole_jax.decode",
    "import_hf": "mole_jax.hf", "export_hf": "mole_jax.hf",
    "convert_to_lut": "mole_jax.convert", "open_lut": "mole_jax.lut", "evaluate": "mole_jax.evaluation",
    "upcycle": "mole_jax.upcycling",
}
__all__ = ["ModelConfig", "MoleError", "TrainConfig", "get_preset", "presets", "load", *_LAZY]


def load(path, lut=None, lut_placement: str = "device", *, tokenizer=None, **kwargs):
    """`mole_jax.decode.load` (see there for lut, lut_placement and the other keywords), with the tokenizer its
    text methods (.encode, .decode, .generate_text) use: tokenizer=None takes RUN_DIR/tokenizer.json; a
    tokenizer.json, a directory holding one, or a tokenizers.Tokenizer replaces it, e.g. GPT-NeoX-20B's for the
    authors' released checkpoints, which carry none. It is read and checked against the model's vocabulary before
    the weights are."""
    from mole_jax import checkpoint, data, decode

    given = None if tokenizer is None else data.resolve_tokenizer(tokenizer, checkpoint.model_config(path).vocab_size)
    model = decode.load(path, lut, lut_placement, **kwargs)
    if given is not None:
        model._tokenizer = given  # what the LanguageModel.tokenizer property would otherwise read from RUN_DIR
    return model


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'mole_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # resolved once
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


# lm-eval ----------------------------------------------------------------------------------------------------------
_LM_EVAL_REGISTRY = "lm_eval.api.registry"


def _register(registry) -> None:
    for alias in ("mole_jax", "mole-jax"):
        if alias not in registry.model_registry:
            registry.model_registry.register(alias, target="mole_jax.harness:MoleJaxLM")  # lazy: a path, no import


class _RegisterWithLmEval(importlib.abc.MetaPathFinder):
    """lm-eval (0.4.13) finds models only in its in-process registry; it reads no entry points. Importing lm-eval
    here would make every `import mole_jax` slower, so this finder waits for lm-eval's registry module to be
    imported by whoever uses lm-eval, and registers "mole_jax" right after it has loaded."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _LM_EVAL_REGISTRY:
            return None
        sys.meta_path.remove(self)  # find the real spec with the other finders, then wrap its loader
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _register(module)
            importlib.import_module("lm_eval.models")  # lm-eval's own model table, as importing lm_eval loads it

        spec.loader.exec_module = exec_and_register
        return spec


def _register_with_lm_eval() -> None:
    if _LM_EVAL_REGISTRY in sys.modules:  # lm-eval was imported first: register now (cheap)
        _register(sys.modules[_LM_EVAL_REGISTRY])
    elif not any(isinstance(f, _RegisterWithLmEval) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWithLmEval())


_register_with_lm_eval()
