"""Shardings of Fira's optimizer state, derived from the parameters' shardings.

Each piece of the state follows the dimension of its parameter that it
shares, so a sharded (FSDP, tensor-parallel) parameter never has full-size
state replicated on every device:

* projector ``(…, c, r)``: batch axes like the parameter's, ``c`` like the
  compressed side of the matrix, ``r`` replicated;
* low-rank moments ``(…, r, o)`` or ``(…, i, r)``: batch axes like the
  parameter's, the kept side like the parameter's, ``r`` replicated; with
  ``spread_moments`` (default) a kept side that the parameter does not shard
  takes the compressed side's mesh axes instead (ZeRO-style), so FSDP on the
  compressed side does not leave the moments replicated;
* limiter norm ``(…)``: like the parameter's batch axes;
* full-shape leaves (unprojected parameters' moments): exactly like the
  parameter;
* everything else (step counts, schedule state): replicated.

A side made of several parameter axes (e.g. ``output_axis=(1, 2)``) is one
flattened dimension of the state: it is sharded like the side's first axis of
size > 1 when that is the only sharded axis of the side, and replicated
otherwise (a flattened dimension cannot express the other tilings).

Like ``optax.tree_map_params``, the result mirrors what was given: a tree of
``NamedSharding`` for ``NamedSharding``, of ``PartitionSpec`` for
``PartitionSpec``, ready for ``jax.jit(..., out_shardings=...)``,
``jax.device_put`` or ``jax.lax.with_sharding_constraint``.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from fira_jax import fira
from fira_jax import projection as projection_lib

Spec = tuple  # one entry per array dimension: None, a mesh axis name, or a tuple of names


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _is_sharding(x: Any) -> bool:
  return isinstance(x, (NamedSharding, PartitionSpec))


def _padded(spec: PartitionSpec, ndim: int) -> Spec:
  entries = tuple(spec)
  if len(entries) > ndim:
    raise ValueError(f"partition spec {spec} has more entries than the array's {ndim} dimensions.")
  return entries + (None,) * (ndim - len(entries))


def _merged(entries: Spec, sizes: tuple[int, ...]) -> Any:
  """The spec of the flattening of axes with ``entries`` and ``sizes`` (major first)."""
  sharded = [i for i, e in enumerate(entries) if e is not None]
  if not sharded:
    return None
  first_real = next((i for i, n in enumerate(sizes) if n > 1), 0)
  if sharded == [first_real]:
    return entries[first_real]  # the only split is along the major axis: contiguous tiles
  return None


def _axes_of(spec: projection_lib.FiraDimensionNumbers, ndim: int):
  reduction = tuple(a % ndim for a in projection_lib._as_axes(spec.reduction_axis))
  output = tuple(a % ndim for a in projection_lib._as_axes(spec.output_axis))
  batch = tuple(a for a in range(ndim) if a not in reduction + output)
  return batch, reduction, output


class _Leaf:
  """One parameter: its shape, spec entries and (if projected) layout and axes."""

  def __init__(self, shape, sharding, entries, layout, spec):
    self.shape, self.sharding, self.layout = tuple(shape), sharding, layout
    if layout is not None:
      batch, reduction, output = _axes_of(spec, len(self.shape))
      pick = lambda axes: tuple(entries[a] for a in axes)
      size = lambda axes: tuple(self.shape[a] for a in axes)
      self.batch = pick(batch)
      self.reduction = _merged(pick(reduction), size(reduction))
      self.output = _merged(pick(output), size(output))

  def projector(self) -> Spec:
    side = self.reduction if self.layout.compressed_axis == 0 else self.output
    return self.batch + (side, None)

  def low_rank(self, spread: bool) -> Spec:
    compressed, kept = (
      (self.reduction, self.output)
      if self.layout.compressed_axis == 0
      else (self.output, self.reduction)
    )
    if spread and kept is None:
      kept = compressed  # the mesh axes that split the compressed side are free here
    return self.batch + ((None, kept) if self.layout.compressed_axis == 0 else (kept, None))


def state_shardings(
  tx_or_state: optax.GradientTransformation | optax.OptState,
  params: optax.Params,
  param_shardings: Any,
  *,
  weight_dimension_numbers: projection_lib.DimensionNumbersOrFn = None,
  rank: int = 128,
  compressed_side: projection_lib.CompressedSide = "smaller",
  spread_moments: bool = True,
) -> Any:
  """Shardings of an optimizer state containing :class:`FiraState`, from the params'.

  Args:
    tx_or_state: the optimizer (its state's shapes come from
      ``jax.eval_shape(tx.init, params)``, nothing is allocated), or a state
      or abstract state already at hand.
    params: the parameters, as arrays or ``jax.ShapeDtypeStruct``.
    param_shardings: a tree like ``params`` of ``NamedSharding`` or of
      ``PartitionSpec``.
    weight_dimension_numbers: as given to the optimizer.
    rank: as given to the optimizer.
    compressed_side: as given to the optimizer.
    spread_moments: low-rank moments whose kept side is not sharded in the
      parameter are split along it over the mesh axes that split the
      compressed side (which the rank-``r`` moments do not have), ZeRO-style:
      with FSDP on the compressed side they would otherwise be replicated
      over the FSDP axis. ``R = PᵀG`` then ends in a reduce-scatter instead
      of an all-reduce, and ``P N`` gathers ``N`` (rank × kept). False keeps
      the kept side exactly as the parameter's.

  Returns:
    A tree like the state, of the same kind as ``param_shardings``
    (``optax.MaskedNode()`` where the state has one). Fira's state follows
    the table in :mod:`fira_jax.sharding`; elsewhere, subtrees with the
    parameters' structure (e.g. AdamW's moments) take the parameter's
    sharding where they have its shape, and all other leaves are replicated.
    So the same call gives the shardings of any optax state.

  Raises:
    ValueError: if a Fira state's shapes do not match the layouts given by
      ``weight_dimension_numbers``, ``rank`` and ``compressed_side``.

  Example:
    >>> import jax, jax.numpy as jnp, fira_jax
    >>> from jax.sharding import PartitionSpec as P
    >>> params = {'w': jnp.ones((8, 16)), 'b': jnp.zeros((16,))}
    >>> tx = fira_jax.fira_adamw(1e-2, rank=2)
    >>> specs = fira_jax.state_shardings(tx, params, {'w': P('fsdp'), 'b': P()}, rank=2)
    >>> specs[0].projector['w']  # (8, 2): the compressed side is sharded like w's rows
    P('fsdp', None)
    >>> specs[0].base_optimizer_state.mu['w']  # (2, 16): rank replicated, kept side spread
    P(None, 'fsdp')
  """
  if isinstance(tx_or_state, optax.GradientTransformation):
    state = jax.eval_shape(tx_or_state.init, params)
  else:
    state = tx_or_state
  param_leaves, treedef = jax.tree.flatten(params)
  sharding_leaves = treedef.flatten_up_to(param_shardings)
  meshes = {s.mesh for s in sharding_leaves if isinstance(s, NamedSharding)}
  if len(meshes) > 1:
    raise ValueError("the parameters' NamedShardings use more than one mesh.")
  for s in sharding_leaves:
    if not _is_sharding(s):
      raise TypeError(f"param_shardings leaves must be NamedSharding or PartitionSpec, got {s!r}.")
  mesh = meshes.pop() if meshes else None
  if mesh is not None and not all(isinstance(s, NamedSharding) for s in sharding_leaves):
    raise TypeError("param_shardings mixes NamedSharding and PartitionSpec leaves.")

  def make(entries: Spec):
    spec = PartitionSpec(*entries)
    return spec if mesh is None else NamedSharding(mesh, spec)

  specs = projection_lib.resolve_dimension_numbers(weight_dimension_numbers, params)
  layouts = projection_lib.layouts_for(params, weight_dimension_numbers, rank, compressed_side)
  names = projection_lib.leaf_names(params)
  leaves = []
  for x, s, layout, spec in zip(param_leaves, sharding_leaves, layouts, specs, strict=True):
    shape = jax.numpy.shape(x)
    spec_of = s.spec if isinstance(s, NamedSharding) else s
    leaves.append(_Leaf(shape, s, _padded(spec_of, len(shape)), layout, spec))

  def checked(state_leaf, want_shape, entries, role, i):
    if tuple(state_leaf.shape) != tuple(want_shape):
      raise ValueError(
        f"the Fira {role} of {names[i]} has shape {tuple(state_leaf.shape)}, but"
        f" weight_dimension_numbers={weight_dimension_numbers!r}, rank={rank} and"
        f" compressed_side={compressed_side!r} give {tuple(want_shape)}: pass state_shardings"
        " the values given to the optimizer."
      )
    return make(entries)

  def params_like(tree, fira_role=None):
    """Maps a subtree with the parameters' structure (MaskedNode leaves allowed)."""
    state_leaves = treedef.flatten_up_to(tree)
    out = []
    for i, (x, leaf) in enumerate(zip(state_leaves, leaves, strict=True)):
      if _is_masked(x):
        out.append(x)
      elif fira_role == "projector" and leaf.layout is not None:
        out.append(checked(x, leaf.layout.projector_shape, leaf.projector(), "projector", i))
      elif fira_role == "norm" and leaf.layout is not None:
        out.append(checked(x, leaf.layout.batch_shape, leaf.batch, "limiter norm", i))
      elif (
        fira_role == "base" and leaf.layout is not None and x.shape == leaf.layout.low_rank_shape
      ):
        out.append(make(leaf.low_rank(spread_moments)))
      elif tuple(x.shape) == leaf.shape:
        out.append(leaf.sharding)
      else:
        out.append(make(()))
    return treedef.unflatten(out)

  def matches(node) -> bool:
    return jax.tree.structure(node, is_leaf=_is_masked) == treedef

  def walk(node, fira_role=None):
    if isinstance(node, fira.FiraState):
      if fira_role is not None:
        raise ValueError("a FiraState nested inside another's base optimizer is not supported.")
      return fira.FiraState(
        count=make(()),
        base_optimizer_state=walk(node.base_optimizer_state, "base"),
        projector=params_like(node.projector, "projector"),
        residual_norm=params_like(node.residual_norm, "norm"),
      )
    if matches(node):
      return params_like(node, fira_role)
    if _is_masked(node) or node is None:
      return node
    children, node_def = jax.tree.flatten(node, is_leaf=lambda c: c is not node)
    if len(children) == 1 and children[0] is node:
      return make(())  # an array outside any parameter-shaped subtree: count, lr, …
    return node_def.unflatten([walk(c, fira_role) for c in children])

  return walk(state)
