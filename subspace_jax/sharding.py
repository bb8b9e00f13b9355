"""Device mesh and shardings from logical axis names.

The mesh has three axes: ``data`` (pure data parallelism), ``fsdp`` (data
parallelism with parameters and optimizer state sharded too) and ``tensor``
(tensor parallelism). Every weight of the model carries logical axis names
(``'embed'``, ``'mlp'``, ...); :data:`LOGICAL_RULES` maps them onto mesh axes.
A dimension that the mesh axes do not divide is replicated instead, so any
mesh works for any model, only less sharded.

The optimizer state is sharded leaf by leaf, by the role of the leaf (see
:func:`state_shardings`): a state leaf that mirrors a parameter (Adam moments
of a full leaf, gradient accumulators) takes that parameter's sharding and,
ZeRO-1, is split over the data-parallel axes too (:func:`zero1_spec`); a
low-rank leaf (``r × k`` moments, model mode's ``B``, ``d × r``
projections) is split over the same mesh axes as its parameter, so under
FSDP every large leaf is split as many ways as the weights; anything else
(counters, keys) is replicated.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from subspace_jax.matrix_view import LeafPlan, path_str
from subspace_jax.naming import setting

__all__ = [
    "MESH_AXES",
    "LOGICAL_RULES",
    "make_mesh",
    "logical_spec",
    "tree_shardings",
    "state_shardings",
    "zero1_spec",
    "batch_sharding",
]

_MASKED = optax.MaskedNode

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
          f"fsdp*tensor*data = {known}*k; change {setting('mesh')}"
      )
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
        f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
        f"{math.prod(sizes)} devices, but {len(devices)} are available; "
        f"change {setting('mesh')} (one size may be -1)"
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


# What a subtree holds, per leaf of the parameters (None: no entry there):
#   "params"     every leaf, at its own shape and names;
#   "full"       the leaves that are not projected (``inner_full``), also
#                split over the data-parallel axes (ZeRO-1);
#   "low"        ``batch + (r, k)`` arrays of the projected leaves: the rank
#                axis replicated, the kept dimension named as in the leaf;
#   "projection" ``batch + (d, r)`` projections of the projected leaves;
#   "updated"    the tree the optimizer updates: "full" (each weight, with
#                ZeRO-1's split) in transform mode, in model mode "low" at
#                the projected leaves (``B``).
# The state classes of the subspace transforms say which field is which
# (their ``ROLES``); elsewhere a subtree laid out like the updated tree (Adam
# moments of adamw, gradient accumulators) is taken as a copy of it.
_ROLES = ("params", "full", "low", "projection", "updated")


def _mesh_axes(spec: P) -> list[str]:
  """The mesh axes a PartitionSpec uses, in order."""
  out = []
  for entry in spec:
    out += [] if entry is None else [entry] if isinstance(entry, str) else list(entry)
  return out


def _spread(spec: P, shape: Sequence[int], axes: Sequence[str], mesh: Mesh) -> P:
  """``spec`` with each mesh axis of ``axes`` it lacks added to a dimension
  that it divides (the largest such dimension first), where there is one.

  A low-rank array named like its leaf can miss one of the leaf's mesh
  axes: its rank axis stands where the leaf's dimension was, and a rank the
  axis does not divide stays replicated. The axis then goes on another
  dimension, so the array is split as many ways as the leaf.
  """
  entries = [() if e is None else (e,) if isinstance(e, str) else tuple(e)
             for e in spec] + [()] * (len(shape) - len(spec))
  for axis in axes:
    if any(axis in e for e in entries):
      continue
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      split = _axis_size(mesh, entries[dim]) * mesh.shape[axis]
      if shape[dim] % split == 0:
        entries[dim] += (axis,)
        break
  return P(*[None if not e else e[0] if len(e) == 1 else e for e in entries])


def zero1_spec(spec: P, shape: Sequence[int], mesh: Mesh,
               rules: Mapping[str, Any] = LOGICAL_RULES) -> P:
  """ZeRO-1: ``spec`` of a full-shape optimizer state leaf (Adam's moments
  of a weight kept in full) with the data-parallel mesh axes (those of the
  ``batch`` rule) that its weight is not split over added to a dimension
  they divide.

  Data-parallel replicas then each update a slice of the weight: its
  gradient is reduce-scattered instead of all-reduced (the same bytes) and
  the updated slices are gathered, and the moments take 1/n of their
  bytes per device. Every optimizer's full leaves get it: all of AdamW's,
  the embedding, lm_head and norms of the subspace methods.
  """
  batch = rules.get("batch")
  axes = () if batch is None else (batch,) if isinstance(batch, str) else batch
  return _spread(spec, shape, [a for a in axes if mesh.shape.get(a, 1) > 1],
                 mesh)


class _Layout:
  """Per role, the tree structure of its subtree and the spec and shape of
  each of its leaves, from the parameters and their plans."""

  def __init__(self, params, axes, plans, factored, mesh, rules):
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    plans = list(plans) if plans is not None else [None] * len(flat)
    entries = {role: [] for role in _ROLES}
    for (path, x), plan in zip(flat, plans):
      names, shape = tuple(axes[path_str(path)]), tuple(x.shape)
      spec = logical_spec(names, shape, mesh, rules)
      low = proj = None
      if plan is not None:
        low_names, proj_names = plan.state_axes(names)
        like = lambda n, s: (_spread(logical_spec(n, s, mesh, rules), s,
                                     _mesh_axes(spec), mesh), s)
        low = like(low_names, plan.low_shape)
        proj = like(proj_names, plan.projection_shape)
      state = (zero1_spec(spec, shape, mesh, rules), shape)
      entries["params"].append((spec, shape))
      entries["full"].append(None if plan is not None else state)
      entries["low"].append(low)
      entries["projection"].append(proj)
      entries["updated"].append(low if factored and plan is not None
                                else state)
    self.structure = {
        role: jax.tree.structure(treedef.unflatten(
            [_MASKED() if e is None else 0 for e in es]))
        for role, es in entries.items()}
    self.leaves = {role: [e for e in es if e is not None]
                   for role, es in entries.items()}


def state_shardings(
    state,
    params,
    axes: Mapping[str, Sequence[Any]],
    mesh: Mesh,
    plans: Callable[[Any], Sequence[LeafPlan | None]] | None = None,
    rules: Mapping[str, Any] = LOGICAL_RULES,
    *,
    factored: bool = False,
):
  """NamedShardings for an optimizer state (or any tree built on params).

  Each leaf is sharded by its role, not by its shape: the fields of the
  subspace states (:class:`~subspace_jax.transform.SubspaceState`,
  :class:`~subspace_jax.factored.FactoredState`,
  :class:`~subspace_jax.factored.FactoredParams`) say what they hold, and
  a subtree laid out like the updated tree mirrors it leaf by leaf. A
  low-rank array (``r × k`` moments, ``B``, ``d × r`` projections) goes on
  the mesh axes of its leaf: named like the leaf's matrix view, the rank
  axis in place of the dimension it shrinks (:meth:`LeafPlan.state_axes`),
  and a leaf's mesh axis that the rank does not divide goes on another
  dimension. Anything else (counters, keys, an array of a shape its role
  does not expect) is replicated.

  Args:
    state: The (abstract) optimizer state.
    params: The (abstract) parameters.
    axes: ``{param path: logical axis names}``.
    mesh: The device mesh.
    plans: ``params -> [LeafPlan | None]`` (in flatten order), e.g.
      ``lambda p: sj.transform.leaf_plans(p, rank=..., views=...)[0]``, to
      shard the low-rank leaves of a subspace transform.
    rules: Logical axis rules.
    factored: The optimizer updates model mode's trainable tree
      (``B`` at the projected leaves, :mod:`subspace_jax.factored`).
  """
  layout = _Layout(params, axes, plans(params) if plans else None, factored,
                   mesh, rules)
  replicated = NamedSharding(mesh, P())

  def named(entry, leaf):
    spec, shape = entry
    return NamedSharding(mesh, spec if tuple(leaf.shape) == shape else P())

  def shard(role, tree):
    if role is not None and jax.tree.structure(tree) == layout.structure[role]:
      leaves = jax.tree.leaves(tree)
      return jax.tree.unflatten(
          layout.structure[role],
          [named(e, x) for e, x in zip(layout.leaves[role], leaves)])
    roles = getattr(type(tree), "ROLES", None)
    if isinstance(roles, Mapping) and hasattr(tree, "_replace"):
      return tree._replace(**{f: shard(roles.get(f), getattr(tree, f))
                              for f in tree._fields})
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(tree)):
      return jax.tree.map(lambda _: replicated, tree)
    # One level down: the node's children, each searched with the same role.
    children, node = jax.tree_util.tree_flatten(
        tree, is_leaf=lambda x: x is not tree)
    return jax.tree.unflatten(node, [shard(role, c) for c in children])

  return shard("updated", state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches ``(batch, seq)`` split over the data-parallel axes."""
  return NamedSharding(mesh, P(("data", "fsdp"), None))


def check_batch(batch_size: int, mesh: Mesh, micro_batches: int = 1) -> None:
  """Refuses a batch size that the mesh or the processes cannot split (into
  ``micro_batches`` micro-batches of gradient accumulation first).

  Raises:
    ValueError: Naming the batch size, the mesh or the accumulation.
  """
  if batch_size % micro_batches:
    raise ValueError(
        f"{setting('batch_size')} {batch_size} is not divisible by "
        f"{setting('optimizer.grad_accum')} {micro_batches}; use a multiple "
        f"of {micro_batches}")
  micro = batch_size // micro_batches
  what = (f"{setting('batch_size')} {batch_size}" if micro_batches == 1 else
          f"the micro-batch of {micro} ({setting('batch_size')} / "
          f"{setting('optimizer.grad_accum')})")
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if micro % dp:
    raise ValueError(
        f"{what} is not divisible by the data-parallel size {dp} (data x fsdp "
        f"of the mesh {dict(mesh.shape)}); use a multiple of {dp} or change "
        f"{setting('mesh')}")
  procs = jax.process_count()
  if micro % procs:
    raise ValueError(f"{what} is not divisible by the {procs} processes; use "
                     f"a multiple of {procs}")
  if dp % procs:
    raise ValueError(
        f"the data-parallel size {dp} (data x fsdp of {setting('mesh')}) is "
        f"not a multiple of the {procs} processes, so the processes cannot "
        f"each feed their own share of the batch; change {setting('mesh')}")
