"""Flax's metadata boxes (Linen ``nn.Partitioned``, NNX Variables) around parameters: read,
strip and restore them without depending on flax (recognised once flax is imported)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
import optax

# Where an NNX Variable keeps its axis names, newest flax first.
_NNX_NAME_KEYS = ("out_sharding", "sharding_names", "sharding")


def _box_types() -> tuple[type, ...]:
  types = []
  meta = sys.modules.get("flax.core.meta")
  if meta is not None:
    types.append(meta.AxisMetadata)
  variables = sys.modules.get("flax.nnx.variablelib")
  if variables is not None:
    types.append(variables.Variable)
  return tuple(types)


def is_box(x: Any) -> bool:
  """Whether ``x`` is a Flax metadata box (``nn.Partitioned``, an NNX Variable, …)."""
  types = _box_types()
  return bool(types) and isinstance(x, types)


def _value(box: Any) -> Any:
  return box.get_value() if hasattr(box, "get_value") else box.value


def unbox(tree: Any) -> Any:
  """``tree`` with every Flax box replaced by its value (no sharding constraint applied)."""
  if not _box_types():
    return tree
  return jax.tree.map(lambda x: _value(x) if is_box(x) else x, tree, is_leaf=is_box)


def has_boxes(*trees: Any) -> bool:
  return any(is_box(x) for t in trees for x in jax.tree.leaves(t, is_leaf=is_box))


def _names_key(box: Any) -> str | None:
  """The field of ``box`` that holds its axis names, or None if it names none."""
  if hasattr(box, "get_metadata"):
    metadata = box.get_metadata()
    return next((k for k in _NNX_NAME_KEYS if metadata.get(k) is not None), None)
  return "names" if getattr(box, "names", None) is not None else None


def axis_names(box: Any) -> tuple | None:
  """The axis names of ``box`` (one entry per dimension), or None if it names none."""
  key = _names_key(box)
  if key is None:
    return None
  names = box.get_metadata()[key] if hasattr(box, "get_metadata") else box.names
  return tuple(names)


def with_value(box: Any, value: Any) -> Any:
  """``box`` holding ``value``, its metadata unchanged (built as a pytree, never re-sharded)."""
  return jax.tree.structure(box, is_leaf=lambda x: x is not box).unflatten([value])


def renamed(box: Any, value: Any, names: tuple) -> Any:
  key = _names_key(box)
  if key is None:
    return with_value(box, value)
  if hasattr(box, "get_metadata"):  # an NNX Variable: replace() does not re-shard
    return box.replace(value, **{key: names})
  return box.replace(value=value, names=names)


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _empty(x: Any) -> bool:
  """A MaskedNode, bare or boxed (``optax.masked`` with a mask mapped through the boxes)."""
  return _is_masked(x) or (is_box(x) and _is_masked(_value(x)))


def held_boxes(tree: Any) -> list:
  """One entry per leaf of ``unbox(tree)``: the box around it, or the leaf itself."""
  position = lambda x: is_box(x) or _is_masked(x)
  return [x for x in jax.tree.leaves(tree, is_leaf=position) if not _empty(x)]


def rebox_like(boxed: Any, plain: Any, is_leaf: Callable[[Any], bool] | None = None) -> Any:
  """``plain`` (a tree with ``unbox(boxed)``'s structure as a prefix, ``is_leaf`` nodes
  counted as leaves) with each subtree put back in the box that ``boxed`` has there."""
  inner = lambda x: _is_masked(x) or (is_leaf is not None and is_leaf(x))
  at_position = lambda x: is_box(x) or inner(x)
  outer = jax.tree.structure(boxed, is_leaf=at_position)
  inputs = jax.tree.leaves(boxed, is_leaf=at_position)
  outputs = jax.tree.structure(unbox(boxed), is_leaf=inner).flatten_up_to(plain)
  return outer.unflatten(
    [with_value(b, o) if is_box(b) else o for b, o in zip(inputs, outputs, strict=True)]
  )
