"""Shared fixtures, and the environment every test process and every subprocess it starts inherits (set before
JAX starts): four fake CPU devices, so that sharding tests run anywhere, and XLA's CPU backend set for tiny
programs run by one test process per core (pytest-xdist): compiling dominates running, so optimisation level 0
(the same HLO, less LLVM work per kernel), the older loop emitters for fusions (a MoLE training step compiles in
about two thirds of the time, and runs as fast), and neither compiling nor running spreads over threads."""

import os

FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                "--xla_cpu_parallel_codegen_split_count=1 --xla_cpu_multi_thread_eigen=false")


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test subprocess with `devices` fake CPU devices. Programs compiled with the same flags give
    the same bits, which the bit-exact comparisons between processes rely on."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


os.environ.setdefault("XLA_FLAGS", xla_flags(4))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests compile the same small programs, in this process, in the other workers and in the subprocesses they
# start (CLI runs, notebook kernels, a killed run and its resumption): JAX's persistent compilation cache shares
# them. Its key holds the program, the XLA flags and the devices, so a hit is the executable a compile would
# give. One empty directory per session (made here by the first process, inherited by the rest), so nothing stale
# is reused; removed when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mole-jax-test-xla-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
else:
    _OWN_CACHE = None

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mole_jax.config import ModelConfig  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
NEOX_TOKENIZER = SHARED / "data" / "gpt-neox-20b" / "tokenizer.json"

# Prime sizes wherever the architecture allows (head_dim must be even for rotate_half), so a transposed or
# mis-reshaped weight cannot hide behind a coincidence of shapes.
PRIME = dict(vocab_size=97, num_layers=3, d_model=22, num_heads=2, max_seq_len=64, init_std=0.2)


def prime_config(kind: str, **changes) -> ModelConfig:
    fields = {"dense": dict(ffn_dim=37),
              "moe": dict(ffn_dim=0, expert_dim=31, num_experts=5, top_k=2),
              "mole": dict(ffn_dim=37, expert_dim=37, num_experts=5)}[kind]
    return ModelConfig(kind=kind, **{**PRIME, **fields, **changes})


def write_hf_checkpoint(path: Path, cfg: ModelConfig, *, seed: int = 0, inference_form: bool = False,
                        dtype=np.float32) -> dict[str, np.ndarray]:
    """An authors'-format directory with random weights under the official key names and shapes."""
    from safetensors.numpy import save_file

    from mole_jax import hf

    rng = np.random.default_rng(seed)
    hf_cfg = hf.config_to_hf(cfg)
    if cfg.kind == "moe":
        del hf_cfg["num_experts_per_tok"]  # the released configs do not carry it
    shapes = hf.hf_shapes(cfg, with_experts=not inference_form)
    tensors = {}
    for n in shapes:
        scale = 1.0 if n.endswith("layernorm.weight") or n == "model.norm.weight" else 0.2
        base = 1.0 if scale == 1.0 else 0.0
        tensors[n] = (base + scale * rng.standard_normal(shapes[n])).astype(dtype)
    if inference_form:
        tensors["model.moe_table.weight"] = (0.2 * rng.standard_normal(
            (cfg.vocab_size, cfg.num_layers * cfg.num_experts * cfg.d_model))).astype(dtype)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_cfg))
    save_file(tensors, str(path / "model.safetensors"))
    return tensors


def run_cli(*args) -> tuple[int, str, str]:
    """The `mole-jax` command run in this process: (exit status, stdout, stderr). The same code as the installed
    command (`cli.main`), without a new interpreter per call; tests that need a process of its own (streaming
    output, kill -9, several processes, the entry point itself) start one."""
    from mole_jax import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            status = e.code
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def neox_tokenizer_path():
    if not NEOX_TOKENIZER.is_file():
        pytest.skip("../shared/data/gpt-neox-20b is not available")
    return NEOX_TOKENIZER


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pytest.ini): one worker per CPU this process may run on, within the cgroup's CPU quota if one is
    set. xdist's own count asks psutil (installed with ipykernel) for physical cores, and a VM whose two vCPUs are
    presented as the two threads of one core (common for 2-vCPU cloud machines) has one: the suite ran serially
    there, in about twice the time. PYTEST_XDIST_AUTO_NUM_WORKERS still overrides."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS", "").isdigit():
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    return max(1, min(len(os.sched_getaffinity(0)), _cgroup_cpu_quota() or os.cpu_count() or 1))


def _cgroup_cpu_quota() -> int | None:
    """CPUs allowed by the cgroup's CFS quota, rounded up; None if unlimited or unknown."""
    import math

    try:  # cgroup v2: "<quota> <period>", quota "max" when unlimited
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        try:  # cgroup v1: quota -1 when unlimited
            quota = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text().strip()
            period = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1") or not (quota.isdigit() and period.isdigit()):
        return None
    return max(1, math.ceil(int(quota) / int(period)))


# pytest-xdist (pytest.ini: --dist loadfile) hands whole files to its workers in collection order: the longest
# first, so that none of them starts last and runs alone.
LONGEST_FIRST = ["test_decode.py", "test_train.py", "test_experiments.py", "test_convert.py", "test_notebooks.py",
                 "test_convert_bounded.py", "test_accelerator_paths.py", "test_model.py", "test_harness.py",
                 "test_preemption.py", "test_accelerator.py", "test_upcycle.py", "test_integrity.py", "test_hf.py",
                 "test_sampling.py", "test_quickstart.py", "test_tokenizer_flag.py", "test_lut.py", "test_profile.py",
                 "test_overrides.py", "test_cli_input.py", "test_aux_losses.py", "test_indexed_data.py",
                 "test_data.py", "test_layout.py", "test_entry_point.py", "test_binding.py", "test_figures.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):  # the process that made it, after every worker ended
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# Lookup tables with several shards of a few rows: a shard's rows must fill whole 4096-byte pages in every stored
# array (format version 3 maps shard file i at row i * shard_rows), so the rows' bytes need powers of two. 2 layers
# x 32 experts x d 16 (the vocabulary still prime, 97): shards of 16 rows suit every scheme but nf3, 32 rows all
# (rows of float16 2048 bytes; int8 1024 + 256; nf4 512 + 256; nf3 384 + 128).
TABLE_SHAPE = dict(num_layers=2, num_experts=32, d_model=16)


def table_config(**changes) -> ModelConfig:
    """A MoLE config whose tables can have shards of 16 rows (32 for nf3), see TABLE_SHAPE."""
    return prime_config("mole", **{**TABLE_SHAPE, **changes})
