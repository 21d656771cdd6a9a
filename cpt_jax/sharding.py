"""Device mesh and the one table that maps logical axis names to mesh axes.

Parameters and key activations name their dimensions logically ("embed", "mlp", ...). `RULES` is
the single place that decides how those names land on the mesh axes (data, fsdp, tensor, context).
A dimension that a mesh axis does not divide stays replicated on that axis, so the same model runs
on 1 device, on 8, or on a pod without edits.

The context axis splits each row's sequence (context parallelism, for long rows): activations
along "length" are sharded over it and attention passes keys and values around it
(`models.context_parallel`). `mesh.shape` may leave it out: (data, fsdp, tensor) means context 1,
so configs written before it keep their meaning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

CONTEXT = "context"
MESH_AXES = ("data", "fsdp", "tensor", CONTEXT)
# Logical axes whose replication costs compute as well as memory (every device computes every
# head): param_shardings warns when a mesh axis that would split them does not divide them.
WARN_REPLICATED = ("heads", "kv_heads")
log = logging.getLogger("cpt_jax")

# logical name -> mesh axes it may be split over, in order.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "length": (CONTEXT,),
    "vocab": ("tensor",),
    # The context axis holds other tokens of the same rows, as data parallelism holds other rows:
    # it also shards the parameters and their AdamW moments (ZeRO-3, as fsdp does), else each
    # context shard would keep a whole replica. Activations' "embed" never gets it: their
    # "length" takes it first.
    "embed": ("fsdp", CONTEXT),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "norm": (),
    "layers": (),
}


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Resolves one -1 entry of `mesh.shape` so the product is `num_devices`; checks the rest.
    Three entries (data, fsdp, tensor) mean a context axis of 1."""
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (len(MESH_AXES) - 1, len(MESH_AXES)):
        raise ValueError(f"mesh.shape={shape} must have 3 entries (data, fsdp, tensor) or 4 (data, fsdp, tensor, "
                         f"context)")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh.shape={shape}: entries must be positive, with at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known:
        raise ValueError(f"mesh.shape={shape} does not divide the {num_devices} available devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh.shape={shape} uses {math.prod(shape)} devices but {num_devices} are available")
    return shape + (1,) * (len(MESH_AXES) - len(shape))


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh of `mesh.shape` over `devices` (default: all), always with the four MESH_AXES. Over
    several TPU slices the data axis is the one that crosses them (DCN); fsdp, tensor and context
    stay within a slice (ICI)."""
    devices = list(jax.devices() if devices is None else devices)
    given, shape = len(shape), mesh_shape(shape, len(devices))
    # Auto axes: Flax layers with sharded params fail under the Explicit default of make_mesh.
    auto = (AxisType.Auto,) * len(MESH_AXES)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    if shape[0] % slices:
        raise ValueError(f"mesh.shape={shape[:given]}: the data axis crosses the {slices} slices, so it must be a "
                         f"multiple of {slices}, e.g. ({slices}, -1, 1)")
    grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices, *shape[1:]), (slices, 1, 1, 1), devices,
                                                allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=auto)


def logical_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh=None) -> P:
    """PartitionSpec for logical `axes` under RULES. Each mesh axis is used at most once; one of
    size 1, or one that does not divide the dimension (when `shape` and `mesh` are known), is left
    out."""
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        if name is not None and name not in RULES:
            raise ValueError(f"logical axis {name!r} has no rule in sharding.RULES")
        chosen = []
        size = 1
        for m in RULES.get(name, ()) if name else ():
            n = mesh.shape[m] if mesh is not None else 2
            if m in used or n == 1 or (shape is not None and shape[i] % (size * n)):
                continue
            chosen.append(m)
            size *= n
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return P(*out)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation; a no-op when no mesh is set (plain eager use)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_spec(axes, x.shape, mesh)))


def param_shardings(abstract_params, axes, mesh: Mesh):
    """NamedShardings for a pure dict of parameters, from the matching pure dict of logical axes.
    Attention heads that a mesh axis does not divide are replicated over it, with a warning."""
    _warn_replicated(abstract_params, axes, mesh)
    return jax.tree.map(
        lambda p, a: NamedSharding(mesh, logical_spec(a, p.shape, mesh)), abstract_params, axes,
        is_leaf=lambda x: hasattr(x, "shape"),
    )


def _warn_replicated(abstract_params, axes, mesh: Mesh) -> None:
    """One warning per WARN_REPLICATED axis that its mesh axes would split but do not divide."""
    found: dict[str, tuple[int, str | tuple[str, ...]]] = {}

    def visit(p, a) -> None:
        fitted, wanted = logical_spec(a, p.shape, mesh), logical_spec(a, None, mesh)
        for i, name in enumerate(a):
            if name in WARN_REPLICATED and fitted[i] != wanted[i]:
                found[name] = (p.shape[i], wanted[i])

    jax.tree.map(visit, abstract_params, axes, is_leaf=lambda x: hasattr(x, "shape"))
    for name, (n, over) in sorted(found.items()):
        over = over if isinstance(over, tuple) else (over,)
        size = math.prod(mesh.shape[m] for m in over)
        log.warning("model %s=%d is not a multiple of the mesh's %s axis (%d devices): the attention weights of "
                    "those heads are replicated over it, and each of its devices computes all %d; a mesh.shape "
                    "whose %s axis divides %d splits them", name, n, "x".join(over), size, n, "x".join(over), n)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(RULES["batch"], *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[m] for m in RULES["batch"]]))


def context_size(mesh=None) -> int:
    """The size of the context axis of `mesh` (default: the mesh set by `jax.set_mesh`, 1 where none)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return 1 if mesh.empty or CONTEXT not in mesh.axis_names else int(mesh.shape[CONTEXT])


__all__ = [
    "CONTEXT", "MESH_AXES", "RULES", "batch_sharding", "constrain", "context_size", "data_parallel_size",
    "logical_spec", "make_mesh", "mesh_shape", "param_shardings", "process_rows", "to_device",
]


def process_rows(batch: NamedSharding, batch_size: int) -> np.ndarray:
    """The rows of a global batch (dim 0 under the `batch` sharding) that this process's devices
    hold, ascending: the rows it builds. Under any mesh: where the batch is split over fewer mesh
    positions than there are processes (tensor parallelism across hosts), several hold the same rows."""
    shape = (batch_size, *[1] * (len(batch.spec) - 1))
    rows = set()
    for index in batch.addressable_devices_indices_map(shape).values():
        rows.update(range(*index[0].indices(batch_size)))
    return np.array(sorted(rows))


def to_device(host: dict, shardings: dict, batch_size: int) -> dict:
    """Each array of a batch, given as this process's rows of it (`process_rows`), as a global array."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v, (batch_size, *v.shape[1:]))
            for k, v in host.items()}
