"""mole-jax: Mixture of Lookup Experts (Jie et al., ICML 2025) in JAX and Flax NNX.

The public API (kept small; everything else is reachable through the modules):
    presets                        name -> ModelConfig (the paper's Table 2 and CPU-sized tiny-*/small-*)
    ModelConfig, TrainConfig       configuration
    load(path, lut=None, lut_placement="device")   a checkpoint -> LanguageModel: .logits(ids),
                                   .generate(prompts, max_new_tokens, ...), .stream(...), .generate_text(text, ...)
    import_hf(src, out), export_hf(ckpt, out)   the authors' checkpoints in and out
    convert_to_lut(ckpt, lut_dir, dtype)  MoLE's re-parameterisation: experts -> lookup table on storage
    open_lut(lut_dir)              a table: .rows(ids) -> float32 [len(ids), L, N, d]
    MoleError                      bad input (the CLI prints it on one line and exits 2)
    evaluate(run_dir, data_source, split)   loss (nats), perplexity, tokens of a checkpoint on text
Training lives in the module of its name: `from mole_jax.train import train` (train or resume a run directory).
With lm-eval installed, importing mole_jax registers the lm-eval model "mole_jax" (mole_jax.harness).
"""

from mole_jax.config import ModelConfig, MoleError, TrainConfig, get_preset, presets
from mole_jax.decode import LanguageModel, load
from mole_jax.hf import export_hf, import_hf
from mole_jax.convert import convert_to_lut
from mole_jax.lut import open_lut
from mole_jax.train import evaluate

__all__ = ["ModelConfig", "MoleError", "TrainConfig", "get_preset", "presets", "LanguageModel", "load",
           "import_hf", "export_hf", "convert_to_lut", "open_lut", "evaluate"]
__version__ = "0.1.0"


def _register_lm_eval() -> None:
    """Make "mole_jax" an lm-eval model whenever lm-eval is installed (the `eval` extra). The entry is lazy:
    neither lm-eval's model code nor mole_jax.harness is imported until lm-eval asks for the model (a few ms)."""
    try:
        import lm_eval.models  # registers lm-eval's own models first: it skips that once the registry is non-empty
    except ImportError:
        return
    try:
        from lm_eval.api.registry import model_registry

        for alias in ("mole_jax", "mole-jax"):
            if alias not in model_registry:
                model_registry.register(alias, target="mole_jax.harness:MoleJaxLM")
    except (ImportError, AttributeError, TypeError, ValueError) as e:  # an lm-eval older than 0.4.13: say so
        import warnings

        warnings.warn(f"mole_jax could not register itself with lm-eval {getattr(lm_eval, '__version__', '?')}: "
                      f"{e}", stacklevel=2)


_register_lm_eval()
