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
  compressed side does not leave the moments replicated (only where the kept
  side's length is a multiple of the compressed side's, so that those mesh axes
  divide it: an untied ``(D, vocab)`` head keeps its moments' vocab side whole);
* limiter norm ``(…)``: like the parameter's batch axes;
* full-shape leaves (unprojected parameters' moments): exactly like the
  parameter;
* everything else (step counts, schedule state): replicated.

A side made of several parameter axes (e.g. ``output_axis=(1, 2)``) is one
flattened dimension of the state: it is sharded like the side's first axis of
size > 1 when that is the only sharded axis of the side, and replicated
otherwise (a flattened dimension cannot express the other tilings).

The layouts (which leaves are projected, on which axes and side, to which rank) are the
optimizer's own: :func:`state_shardings` runs its ``init`` abstractly and reads the layouts
that each Fira piece computes there, so wrappers (``optax.chain``, ``MultiSteps``,
``inject_hyperparams``, ``partition``, ``masked``) need nothing extra.

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

from fira_jax import boxes
from fira_jax import layout
from fira_jax import state_tree
from fira_jax import subspace

Spec = tuple  # one entry per array dimension: None, a mesh axis name, or a tuple of names


def _is_sharding(x: Any) -> bool:
  return isinstance(x, (NamedSharding, PartitionSpec))


def padded(spec: PartitionSpec | Spec, ndim: int) -> Spec:
  """``spec``'s entries, padded with None to ``ndim``."""
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


def _state_specs(entries: Spec, lay: subspace.SubspaceLayout, spread: bool) -> dict:
  """The specs of a projected parameter's state by shape: projector, moments, norm."""
  matrix = lay.matrix
  pick = lambda axes: tuple(entries[a] for a in axes)
  side = lambda axes: _merged(pick(axes), tuple(matrix.shape[a] for a in axes))
  batch = pick(matrix.batch_axes)
  reduction, output = side(matrix.reduction_axes), side(matrix.output_axes)
  compressed, kept = (reduction, output) if lay.compressed == "reduction" else (output, reduction)
  sizes = (matrix.reduction, matrix.output)
  c_size, k_size = sizes if lay.compressed == "reduction" else sizes[::-1]
  # The mesh axes that split the compressed side are free here; they surely divide the kept
  # side too only if the compressed side's length does.
  if spread and kept is None and k_size % c_size == 0:
    kept = compressed
  low_rank = (None, kept) if lay.compressed == "reduction" else (kept, None)
  return {
    lay.projector_shape: batch + (compressed, None),
    lay.low_rank_shape: batch + low_rank,
    lay.batch_shape: batch,
  }


def specs_by_shape(
  shape: tuple[int, ...],
  entries: Spec,
  layouts: list[subspace.SubspaceLayout],
  spread: bool = True,
) -> dict:
  """A parameter's state specs by the state array's shape: Fira's shapes of it, then the
  parameter's own shape (its own entries)."""
  specs = {}
  for lay in layouts:
    specs.update(_state_specs(entries, lay, spread))
  specs[tuple(shape)] = entries
  return specs


def _mesh_of(sharding_leaves: list) -> Any:
  """The one mesh of ``NamedSharding`` leaves, or None for ``PartitionSpec`` ones."""
  for s in sharding_leaves:
    if not _is_sharding(s):
      raise TypeError(f"param_shardings leaves must be NamedSharding or PartitionSpec, got {s!r}.")
  meshes = {s.mesh for s in sharding_leaves if isinstance(s, NamedSharding)}
  if len(meshes) > 1:
    raise ValueError("the parameters' NamedShardings use more than one mesh.")
  mesh = meshes.pop() if meshes else None
  if mesh is not None and not all(isinstance(s, NamedSharding) for s in sharding_leaves):
    raise TypeError("param_shardings mixes NamedSharding and PartitionSpec leaves.")
  return mesh


def state_shardings(
  tx_or_state: optax.GradientTransformation | optax.OptState,
  params: optax.Params,
  param_shardings: Any,
  *,
  spread_moments: bool = True,
) -> Any:
  """Shardings of an optimizer state containing Fira's, from the parameters' shardings.

  Args:
    tx_or_state: the optimizer (anything with ``init``: a ``GradientTransformation``,
      ``optax.MultiSteps``, …). Its state's shapes and Fira's layouts come from
      ``jax.eval_shape(tx.init, params)``; nothing is allocated. A state (or abstract
      state) is accepted for optimizers without Fira; a Fira state needs the optimizer.
    params: the parameters, as arrays or ``jax.ShapeDtypeStruct``.
    param_shardings: a tree like ``params`` of ``NamedSharding`` or of
      ``PartitionSpec``.
    spread_moments: low-rank moments whose kept side is not sharded in the
      parameter are split along it over the mesh axes that split the
      compressed side (which the rank-``r`` moments do not have), ZeRO-style:
      with FSDP on the compressed side they would otherwise be replicated
      over the FSDP axis. ``R = PᵀG`` then ends in a reduce-scatter instead
      of an all-reduce, and ``P N`` gathers ``N`` (rank × kept). Only where the
      kept side's length is a multiple of the compressed side's (so the mesh axes
      divide it). False keeps the kept side exactly as the parameter's.

  Returns:
    A tree like the state, of the same kind as ``param_shardings``
    (``optax.MaskedNode()`` where the state has one). Fira's state follows
    the table in :mod:`fira_jax.sharding`; subtrees with the parameters'
    structure (e.g. AdamW's moments) take the parameter's sharding where they
    have its shape; other leaves (step counts, scalars) are replicated.

  Raises:
    ValueError: if a leaf in a subtree with the parameters' structure has neither the
      parameter's shape nor a Fira shape of it, while the parameter is sharded
      (replicating it would be a silent surprise).

  Example:
    >>> import jax, jax.numpy as jnp, fira_jax
    >>> from jax.sharding import PartitionSpec as P
    >>> params = {'w': jnp.ones((8, 16)), 'b': jnp.zeros((16,))}
    >>> tx = fira_jax.fira_adamw(1e-2, rank=2)
    >>> specs = fira_jax.state_shardings(tx, params, {'w': P('fsdp'), 'b': P()})
    >>> specs[0].projector['w']  # (8, 2): the compressed side is sharded like w's rows
    P('fsdp', None)
    >>> specs[0].base_optimizer_state.mu['w']  # (2, 16): rank replicated, kept side spread
    P(None, 'fsdp')
  """
  if callable(getattr(tx_or_state, "init", None)):
    state, seen = state_tree.layouts_seen_by_init(tx_or_state, params)
  else:
    state, seen = tx_or_state, [[] for _ in jax.tree.leaves(params)]
  # Flax's boxes (nn.Partitioned, NNX Variables) hold the arrays; the shardings are per array.
  state, params, param_shardings = (boxes.unbox(t) for t in (state, params, param_shardings))
  param_leaves, treedef = jax.tree.flatten(params)
  sharding_leaves = treedef.flatten_up_to(param_shardings)
  mesh = _mesh_of(sharding_leaves)

  def make(entries: Spec):
    spec = PartitionSpec(*entries)
    return spec if mesh is None else NamedSharding(mesh, spec)

  names = layout.leaf_names(params)
  entries = [
    padded(s.spec if isinstance(s, NamedSharding) else s, jax.numpy.ndim(x))
    for x, s in zip(param_leaves, sharding_leaves, strict=True)
  ]
  by_shape = []  # per parameter: state shape -> spec
  for x, e, s, lays in zip(param_leaves, entries, sharding_leaves, seen, strict=True):
    specs = specs_by_shape(jax.numpy.shape(x), e, lays, spread_moments)
    specs[tuple(jax.numpy.shape(x))] = s  # the parameter's own shape: its sharding
    by_shape.append(specs)

  def per_parameter(i, x):
    shape = tuple(x.shape)
    spec = by_shape[i].get(shape)
    if spec is None and any(e is not None for e in entries[i]) and shape:
      raise ValueError(
        f"the optimizer state holds a leaf of shape {shape} for {names[i]}, of shape"
        f" {jax.numpy.shape(param_leaves[i])} and sharded {entries[i]}, that is neither"
        " the parameter's shape nor one of Fira's state shapes for it: pass"
        " state_shardings the optimizer (not its state), or shard that leaf yourself."
      )
    return make(()) if spec is None else spec if _is_sharding(spec) else make(spec)

  # Arrays outside any parameter-shaped subtree (counts, learning rates) are replicated.
  return state_tree.map_by_parameter(state, treedef, per_parameter, lambda _: make(()))
