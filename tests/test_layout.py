"""The package's layout rules (docs/design.md): no import cycle, imports at the top of modules, and a cheap
`import mole_jax` / `mole-jax --help` that does not load JAX."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mole_jax"
OPTIONAL_EXTRAS = ("lm_eval", "matplotlib", "datasets", "huggingface_hub", "torch", "tensorboardX")  # imported where used
# docs/design.md: a module imports only from the layers above its own
LAYERS = [["config", "corpus"], ["layers", "schemes", "data"], ["model", "sampling", "row_sources"],
          ["sharding", "checkpoint", "lut"], ["train_step", "lut_writer", "decoder"],
          ["evaluation", "convert", "hf", "offload", "upcycling"], ["train", "decode"], ["bench", "harness"],
          ["quickstart", "cli"]]


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text())
    return out


def _imported(node) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports at its top."""
    modules = _modules()
    return {name: {m for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
                   for m in _imported(node) if m in modules and m not in (name, "mole_jax")}
            for name, tree in modules.items()}


def test_modules_import_only_from_the_layers_above():
    layer = {f"mole_jax.{m}": i for i, names in enumerate(LAYERS) for m in names}

    def layer_of(module):  # a subpackage's modules share its layer
        parts = module.split(".")
        return layer.get(".".join(parts[:2]))

    graph = _graph()
    unplaced = sorted(m for m in graph if m != "mole_jax" and layer_of(m) is None)
    assert not unplaced, f"modules missing from LAYERS (and docs/design.md): {unplaced}"
    same_package = lambda a, b: a.split(".")[:2] == b.split(".")[:2]  # noqa: E731  (bench.* among themselves)
    upward = [f"{m} imports {d}" for m, deps in graph.items() if m != "mole_jax" for d in deps
              if not (layer_of(d) < layer_of(m) or same_package(d, m))]
    assert not upward, upward


def test_no_import_cycle_between_modules():
    graph = _graph()
    state: dict[str, str] = {}

    def visit(name, path):
        state[name] = "open"
        for dep in sorted(graph[name]):
            assert state.get(dep) != "open", "import cycle: " + " -> ".join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_imports_at_module_top():
    """Only the CLI's subcommands, the package's lazy names (PEP 562: `import mole_jax` loads no JAX) and optional
    extras import inside functions."""
    found = []
    for name, tree in _modules().items():
        if name in ("mole_jax", "mole_jax.cli"):
            continue
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                if not any(m.split(".")[0] in OPTIONAL_EXTRAS for m in _imported(node)):
                    found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "function-local imports:\n" + "\n".join(found)


def test_import_and_help_do_not_load_jax():
    code = ("import sys, mole_jax; from mole_jax.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('jax', 'flax', 'optax', 'orbax', 'tensorstore', 'lm_eval') if m in sys.modules]; "
            "assert not heavy, heavy; print(mole_jax.presets['tiny-mole'].kind)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "mole", r.stderr
