"""Flax's parameter metadata in Fira's state: Linen ``nn.Partitioned`` boxes, NNX Variables.

Flax attaches axis names to a parameter (Linen ``nn.with_partitioning`` /
``nn.with_logical_partitioning`` boxes, an NNX Variable's ``out_sharding``) and expects an
optimizer's state to carry them: Linen code shards its state with
``nn.get_sharding(jax.eval_shape(tx.init, params), mesh)``, and ``nnx.Optimizer`` copies each
Variable's metadata onto what ``tx.init`` returns for it. Fira's state holds arrays of other
shapes than the parameter (projectors, rank-``r`` moments, per-matrix norms), so the
parameter's names would be wrong there. :func:`keep_flax_metadata` names each state array's
axes by the rule of :mod:`fira_jax.sharding` (projector: the compressed side's names, rank
unnamed; moments: the kept side's names; norms: the batch axes' names) and strips and
restores the boxes around ``update``.

Flax is not a dependency: boxes are recognised only once flax has been imported.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import optax

from fira_jax import boxes as boxes_lib
from fira_jax import layout
from fira_jax import sharding
from fira_jax import state_tree
from fira_jax import subspace


def boxed_state(state: Any, params: Any, seen: list) -> Any:
  """``state`` (computed from the unboxed ``params``) with each array of a boxed parameter in
  that parameter's box, its axes named by :mod:`fira_jax.sharding`'s rule."""
  plain = boxes_lib.unbox(params)
  treedef = jax.tree.structure(plain)
  held = boxes_lib.held_boxes(params)
  leaves = treedef.flatten_up_to(plain)
  names = [boxes_lib.axis_names(b) if boxes_lib.is_box(b) else None for b in held]
  by_shape = [
    None
    if not boxes_lib.is_box(b)
    else sharding.specs_by_shape(
      jax.numpy.shape(x), sharding.padded(n or (), jax.numpy.ndim(x)), lays
    )
    for b, x, n, lays in zip(held, leaves, names, seen, strict=True)
  ]

  def per_parameter(i, x):
    if by_shape[i] is None:
      return x
    spec = by_shape[i].get(tuple(x.shape))
    if spec is None:
      spec = (None,) * x.ndim
      if x.ndim >= 2 and any(e is not None for e in names[i] or ()):
        warnings.warn(
          f"optimizer state of shape {x.shape} for {layout.leaf_names(plain)[i]}"
          f" (named {names[i]}) has no naming rule; its axes are left unnamed (replicated).",
          stacklevel=4,
        )
    return boxes_lib.renamed(held[i], x, spec)

  return state_tree.map_by_parameter(state, treedef, per_parameter, lambda x: x)


def keep_flax_metadata(
  tx: optax.GradientTransformation, is_leaf: Callable[[Any], bool] | None = None
) -> optax.GradientTransformation:
  """``tx`` on Flax-boxed parameters: its state boxed and named, its updates boxed like the
  gradients.

  Plain (unboxed) inputs pass straight through. With boxes, ``init`` runs ``tx.init`` on
  the unboxed parameters and puts each state array of a boxed parameter in the
  parameter's box with names for its own axes (see :mod:`fira_jax.flax_metadata`);
  ``update`` unboxes updates, state and parameters, runs ``tx.update`` and restores the
  boxes. Every Fira transformation is already wrapped; wrap your own chain of Fira's
  pieces only if it holds other transformations that need it.

  Args:
    tx: a gradient transformation.
    is_leaf: which nodes of the updates are one parameter's update (besides arrays), as
      in ``jax.tree.map``; Fira's pieces pass their :class:`SubspaceUpdate`.

  Returns:
    The same transformation, aware of Flax's boxes.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, fira_jax
    >>> kernel = nn.Partitioned(jnp.ones((8, 16)), names=('data', 'model'))
    >>> state = fira_jax.fira_adamw(1e-2, rank=2).init({'w': kernel})
    >>> state[0].projector['w'].names, state[0].base_optimizer_state.mu['w'].names
    (('data', None), (None, 'model'))
  """

  def init_fn(params):
    if not boxes_lib.has_boxes(params):
      return tx.init(params)
    plain = boxes_lib.unbox(params)
    with subspace.recording_layouts() as records:
      state = tx.init(plain)
    seen = state_tree.layouts_by_parameter(records, jax.tree.structure(plain))
    return boxed_state(state, params, seen)

  def update_fn(updates, state, params=None):
    if not boxes_lib.has_boxes(updates, state, params):
      return tx.update(updates, state, params)
    new_updates, new_state = tx.update(
      boxes_lib.unbox(updates), boxes_lib.unbox(state), boxes_lib.unbox(params)
    )
    restored_state = jax.tree.structure(state).unflatten(jax.tree.leaves(new_state))
    return boxes_lib.rebox_like(updates, new_updates, is_leaf), restored_state

  return optax.GradientTransformation(init_fn, update_fn)
