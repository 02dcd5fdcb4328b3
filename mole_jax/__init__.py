"""mole-jax: Mixture of Lookup Experts (Jie et al., ICML 2025) in JAX and Flax NNX.

The public API (kept small; everything else is reachable through the modules):
    presets                        name -> ModelConfig (the paper's Table 2 and CPU-sized tiny-*/small-*)
    ModelConfig, TrainConfig       configuration
    load(path)                     a checkpoint -> LanguageModel with .config and .logits(ids)
    import_hf(src, out), export_hf(ckpt, out)   the authors' checkpoints in and out
    MoleError                      bad input (the CLI prints it on one line and exits 2)
"""

from mole_jax.config import ModelConfig, MoleError, TrainConfig, get_preset, presets
from mole_jax.decode import LanguageModel, load
from mole_jax.hf import export_hf, import_hf

__all__ = ["ModelConfig", "MoleError", "TrainConfig", "get_preset", "presets", "LanguageModel", "load",
           "import_hf", "export_hf"]
__version__ = "0.1.0"
