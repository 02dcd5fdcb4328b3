"""Mesh and partition rules, in one place.

One 2-D mesh ("data", "fsdp"): batches are split over every device; parameters and optimizer state are fully
sharded (FSDP) over "fsdp" along one dimension each, and XLA inserts the all-gathers and reduce-scatters.
Every parameter names its dimensions (`axes` metadata in layers.py); RULES says which logical dimension we prefer
to split. A dimension that does not divide evenly falls back to the next largest that does, else the parameter
is replicated, so any device count works (prime test dims included).
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mole_jax.config import ModelConfig, MoleError
from mole_jax.model import abstract_module

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over every device
PREFERRED = ("embed", "mlp", "vocab")  # logical dims to shard over "fsdp", in order of preference
MIN_SHARD_SIZE = 2 ** 12  # smaller parameters (norm scales, tiny routers) stay replicated


def make_mesh(num_devices: int | None = None, *, data: int = 1) -> Mesh:
    """A ("data", "fsdp") mesh over the first `num_devices` devices (default: all)."""
    devices = jax.devices()
    n = num_devices or len(devices)
    if n > len(devices):
        raise MoleError(f"asked for {n} devices but only {len(devices)} are available")
    if n % data:
        raise MoleError(f"data-parallel size {data} does not divide the device count {n}")
    return jax.make_mesh((data, n // data), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices[:n])


def spec_for(shape: tuple[int, ...], axes: tuple, mesh: Mesh) -> P:
    n = mesh.shape["fsdp"]
    if n == 1 or len(shape) < 2 or math.prod(shape) < MIN_SHARD_SIZE:
        return P()
    preferred = [axes.index(a) for a in PREFERRED if a in axes]
    others = sorted((i for i in range(len(shape)) if i not in preferred), key=lambda i: -shape[i])
    for i in preferred + others:
        if shape[i] % n == 0:
            return P(*[("fsdp" if j == i else None) for j in range(len(shape))])
    return P()


def param_shardings(cfg: ModelConfig, mesh: Mesh, *, with_experts: bool = True) -> dict:
    """NamedShardings for the params pytree (the same nested dict as model.init_params)."""
    state = nnx.state(abstract_module(cfg, with_experts=with_experts), nnx.Param)
    specs = jax.tree.map(lambda v: NamedSharding(mesh, spec_for(v.shape, v.get_metadata()["axes"], mesh)),
                         state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(specs)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())

