"""Reading an optimizer state against the parameters: which state leaf belongs to which.

Optax states hold subtrees with the parameters' structure (moments, projectors, limiter
norms, ``optax.MaskedNode()`` where a transformation skips a leaf) among other leaves (step
counts, hyperparameters). Fira's layouts for each parameter are those that its pieces compute
in ``init``; :func:`layouts_seen_by_init` reads them there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from fira_jax import boxes
from fira_jax import subspace


def is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def layouts_seen_by_init(tx, params) -> tuple[Any, list[list[subspace.SubspaceLayout]]]:
  """The abstract state of ``tx`` (anything with ``init``), and per parameter the distinct
  layouts that the Fira pieces computed for it in ``init`` (empty: not projected)."""
  with subspace.recording_layouts() as records:
    # A new function object: a cached trace of tx.init would compute no layouts.
    state = jax.eval_shape(lambda p: tx.init(p), params)
  treedef = jax.tree.structure(boxes.unbox(params))
  return state, layouts_by_parameter(records, treedef)


def layouts_by_parameter(records: list, treedef: Any) -> list[list[subspace.SubspaceLayout]]:
  """Per parameter of ``treedef``, the distinct layouts in ``records`` (from
  :func:`fira_jax.subspace.recording_layouts`) of trees with the parameters' structure."""
  seen = [[] for _ in range(treedef.num_leaves)]
  for tree, layouts in records:
    if jax.tree.structure(tree, is_leaf=is_masked) != treedef:
      continue  # a tree other than the parameters' (none of optax's wrappers make one)
    found = iter(layouts)
    for i, node in enumerate(jax.tree.leaves(tree, is_leaf=is_masked)):
      lay = None if is_masked(node) else next(found)
      if lay is not None and lay not in seen[i]:
        seen[i].append(lay)
  return seen


def map_by_parameter(
  state: Any,
  treedef: Any,
  per_parameter: Callable[[int, Any], Any],
  other: Callable[[Any], Any],
) -> Any:
  """Maps ``state``: ``per_parameter(i, leaf)`` on the leaves of subtrees with the
  parameters' structure (``i``: the parameter's index; ``MaskedNode`` kept), ``other(leaf)``
  on every other array leaf (counts, hyperparameters, …)."""

  def walk(node):
    if jax.tree.structure(node, is_leaf=is_masked) == treedef:
      leaves = treedef.flatten_up_to(node)
      return treedef.unflatten(
        [x if is_masked(x) else per_parameter(i, x) for i, x in enumerate(leaves)]
      )
    if is_masked(node) or node is None:
      return node
    children, node_def = jax.tree.flatten(node, is_leaf=lambda c: c is not node)
    if len(children) == 1 and children[0] is node:
      return other(node)
    return node_def.unflatten([walk(c) for c in children])

  return walk(state)
