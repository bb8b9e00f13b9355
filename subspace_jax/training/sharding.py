"""Device mesh and shardings from logical axis names.

The mesh has three axes: ``data`` (pure data parallelism), ``fsdp`` (data
parallelism with parameters and optimizer state sharded too) and ``tensor``
(tensor parallelism). Every weight of the model carries logical axis names
(``'embed'``, ``'mlp'``, ...); :data:`LOGICAL_RULES` maps them onto mesh axes.
A dimension that the mesh axes do not divide is replicated instead, so any
mesh works for any model, only less sharded.

The optimizer state is sharded leaf by leaf: a state leaf that mirrors a
parameter (Adam moments of a full leaf, gradient accumulators) takes that
parameter's sharding; a low-rank leaf of the subspace transform (``r × k``
moments, ``d × r`` projections) is sharded along the logical axis of the
dimension it keeps, with the rank axis replicated; anything else (counters,
keys) is replicated.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from subspace_jax.matrix_view import LeafPlan, path_str

__all__ = [
    "MESH_AXES",
    "LOGICAL_RULES",
    "make_mesh",
    "logical_spec",
    "tree_shardings",
    "state_shardings",
    "batch_sharding",
]

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis name -> mesh axes it is split over (None: replicated).
LOGICAL_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv": None,
    "layers": None,
    "norm": None,
}


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None
) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh; one size may be -1 (all the rest).

  Raises:
    ValueError: when the sizes do not multiply to the number of devices.
  """
  devices = jax.devices() if devices is None else devices
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(
        f"mesh sizes must be positive (one may be -1), got data={data}, "
        f"fsdp={fsdp}, tensor={tensor}"
    )
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
          f"{len(devices)} devices cannot be split into a mesh with "
          f"fsdp*tensor*data = {known}*k; change --mesh"
      )
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
        f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
        f"{math.prod(sizes)} devices, but {len(devices)} are available; "
        "change --mesh (one size may be -1)"
    )
  grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def logical_spec(
    names: Sequence[Any],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, Any] = LOGICAL_RULES,
) -> P:
  """PartitionSpec for an array with per-axis logical ``names``.

  A dimension whose mesh axes do not divide it, or whose mesh axes an earlier
  dimension already uses, is replicated.
  """
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    axes = rules.get(name) if name is not None else None
    flat = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    flat = tuple(a for a in flat if mesh.shape.get(a, 1) > 1)
    if not flat or used & set(flat) or size % _axis_size(mesh, flat):
      spec.append(None)
      continue
    used |= set(flat)
    spec.append(flat[0] if len(flat) == 1 else flat)
  return P(*spec)


def tree_shardings(
    tree, axes: Mapping[str, Sequence[Any]], mesh: Mesh,
    rules: Mapping[str, Any] = LOGICAL_RULES,
):
  """NamedShardings for a parameter tree, from ``{path: logical names}``.

  Paths are the ``/``-joined keys of :func:`subspace_jax.matrix_view.path_str`.
  """
  def one(path, x):
    key = path_str(path)
    if key not in axes:
      raise KeyError(f"no logical axis names for parameter {key!r}")
    return NamedSharding(mesh, logical_spec(axes[key], x.shape, mesh, rules))

  return jax.tree_util.tree_map_with_path(one, tree)


def state_shardings(
    state,
    params,
    axes: Mapping[str, Sequence[Any]],
    mesh: Mesh,
    plans: Callable[[Any], Sequence[LeafPlan | None]] | None = None,
    rules: Mapping[str, Any] = LOGICAL_RULES,
):
  """NamedShardings for an optimizer state (or any tree built on params).

  Args:
    state: The (abstract) optimizer state.
    params: The (abstract) parameters.
    axes: ``{param path: logical axis names}``.
    mesh: The device mesh.
    plans: ``params -> [LeafPlan | None]`` (in flatten order), e.g.
      ``lambda p: sj.transform.leaf_plans(p, rank=..., views=...)[0]``, to
      shard the low-rank leaves of a subspace transform.
    rules: Logical axis rules.
  """
  param_info = {}
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  plan_list = plans(params) if plans is not None else [None] * len(flat_params)
  for (path, x), plan in zip(flat_params, plan_list):
    key = tuple(path_str((k,)) for k in path)
    names = tuple(axes[path_str(path)])
    by_shape = {tuple(x.shape): names}
    if plan is not None:
      low, proj = plan.state_axes(names)
      by_shape.setdefault(plan.low_shape, low)
      by_shape.setdefault(plan.projection_shape, proj)
    param_info[key] = by_shape

  def one(path, leaf):
    keys = tuple(path_str((k,)) for k in path)
    # The parameter this leaf mirrors: the longest matching path suffix.
    for start in range(len(keys)):
      by_shape = param_info.get(keys[start:])
      if by_shape is not None:
        names = by_shape.get(tuple(leaf.shape))
        if names is not None:
          return NamedSharding(mesh, logical_spec(names, leaf.shape, mesh, rules))
        break
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches ``(batch, seq)`` split over the data-parallel axes."""
  return NamedSharding(mesh, P(("data", "fsdp"), None))
