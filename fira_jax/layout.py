"""How a parameter becomes a batch of matrices: dimension numbers and matrix layouts.

Every projected leaf is viewed as a batch of matrices ``X`` of shape ``(reduction, output)``
(Flax's ``(in, out)`` kernel layout). Its dimension numbers say which axes form the
reduction side and which the output side; every other axis is a batch axis (stacked or
scanned layers), handled matrix by matrix.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class FiraDimensionNumbers(NamedTuple):
  """Which axes of a parameter form the matrix that Fira projects.

  The matrix is ``(reduction, output)``: ``y = x W`` reduces over the
  reduction axis. Flax kernels are stored ``(in, out)``, so the default
  ``FiraDimensionNumbers()`` fits them; a torch-layout ``(out, in)`` weight
  takes ``FiraDimensionNumbers(reduction_axis=1, output_axis=0)``. Either field
  may be a sequence of axes, flattened in order (e.g. an attention kernel
  ``(embed, heads, head_dim)`` with ``output_axis=(1, 2)``).

  Axes named by neither field are batch axes: a stacked ``(layers, in, out)``
  kernel from ``nnx.scan`` with ``FiraDimensionNumbers(1, 2)`` gets one
  projector, one set of low-rank moments and one limiter value per layer.

  Example:
    >>> import jax.numpy as jnp, fira_jax
    >>> stacked = fira_jax.FiraDimensionNumbers(reduction_axis=1, output_axis=2)
    >>> tx = fira_jax.fira_adamw(1e-2, rank=2, weight_dimension_numbers=stacked)
    >>> state = tx.init({'layers': jnp.zeros((3, 8, 4))})  # 3 layers of (8, 4)
    >>> state[0].projector['layers'].shape, state[0].residual_norm['layers'].shape
    ((3, 4, 2), (3,))
  """

  reduction_axis: Sequence[int] | int = 0
  output_axis: Sequence[int] | int = 1


DimensionNumbersOrFn = FiraDimensionNumbers | Any | Callable[[Any], Any] | None

# Flax's names of biases, norm scales and embedding tables: never projected by default.
NOT_PROJECTED_BY_DEFAULT = ("bias", "scale", "embedding")


def _is_spec_leaf(x: Any) -> bool:
  return x is None or isinstance(x, FiraDimensionNumbers)


def _as_axes(axes: Sequence[int] | int) -> tuple[int, ...]:
  return (axes,) if isinstance(axes, int) else tuple(axes)


@dataclasses.dataclass(frozen=True)
class MatrixLayout:
  """How one leaf maps to a batch of ``(reduction, output)`` matrices (static fields).

  Made by :func:`matrix_layout`: the leaf's ``shape`` and which of its axes are batch,
  reduction and output axes; ``to_matrices`` and ``from_matrices`` convert between the
  leaf's shape and ``(B, reduction, output)``.
  """

  shape: tuple[int, ...]
  batch_axes: tuple[int, ...]
  reduction_axes: tuple[int, ...]
  output_axes: tuple[int, ...]

  @property
  def permutation(self) -> tuple[int, ...]:
    return self.batch_axes + self.reduction_axes + self.output_axes

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.batch_axes)

  @property
  def num_matrices(self) -> int:
    return math.prod(self.batch_shape)

  @property
  def reduction(self) -> int:
    """Size of the flattened reduction side."""
    return math.prod(self.shape[a] for a in self.reduction_axes)

  @property
  def output(self) -> int:
    """Size of the flattened output side."""
    return math.prod(self.shape[a] for a in self.output_axes)

  def to_matrices(self, x: jax.Array) -> jax.Array:
    """``x`` with the leaf's shape -> ``(B, reduction, output)``."""
    return x.transpose(self.permutation).reshape((self.num_matrices, self.reduction, self.output))

  def from_matrices(self, x: jax.Array) -> jax.Array:
    """``(B, reduction, output)`` -> the leaf's shape."""
    permuted_shape = tuple(self.shape[a] for a in self.permutation)
    inverse = tuple(sorted(range(len(self.shape)), key=self.permutation.__getitem__))
    return x.reshape(permuted_shape).transpose(inverse)

  def to_batched(self, x: jax.Array) -> jax.Array:
    """An array stored with ``batch_shape`` leading -> ``(B, ...)``."""
    return x.reshape((self.num_matrices,) + x.shape[len(self.batch_axes) :])

  def from_batched(self, x: jax.Array) -> jax.Array:
    """``(B, ...)`` -> ``batch_shape + (...)``."""
    return x.reshape(self.batch_shape + x.shape[1:])


def matrix_layout(
  shape: Sequence[int], spec: FiraDimensionNumbers, name: str = "parameter"
) -> MatrixLayout:
  """Validates ``spec`` against ``shape`` and returns the leaf's layout.

  Args:
    shape: the leaf's shape (two or more dimensions).
    spec: the leaf's :class:`FiraDimensionNumbers`; negative axes count from the end.
    name: what error messages call the leaf.

  Returns:
    A :class:`MatrixLayout`; the axes that ``spec`` does not name are batch axes.

  Raises:
    ValueError: if ``shape`` has fewer than two dimensions, or ``spec`` names an axis
      that does not exist, names one twice, or leaves a side empty.

  Example:
    >>> import jax.numpy as jnp, fira_jax
    >>> spec = fira_jax.FiraDimensionNumbers(reduction_axis=0, output_axis=(1, 2))
    >>> lay = fira_jax.matrix_layout((16, 4, 8), spec)  # (embed, heads, head_dim)
    >>> lay.batch_shape, lay.reduction, lay.output
    ((), 16, 32)
    >>> lay.to_matrices(jnp.zeros((16, 4, 8))).shape
    (1, 16, 32)
  """
  shape = tuple(shape)
  ndim = len(shape)
  if ndim < 2:
    raise ValueError(
      f"{name} with shape {shape} has fewer than two dimensions and cannot be"
      " projected; give it None in weight_dimension_numbers."
    )
  reduction_axes = _as_axes(spec.reduction_axis)
  output_axes = _as_axes(spec.output_axis)
  named = reduction_axes + output_axes
  for axis in named:
    if not isinstance(axis, int) or not -ndim <= axis < ndim:
      raise ValueError(
        f"{name} with shape {shape}: dimension numbers {spec} name axis"
        f" {axis!r}, which does not exist."
      )
  reduction_axes = tuple(a % ndim for a in reduction_axes)
  output_axes = tuple(a % ndim for a in output_axes)
  if not reduction_axes or not output_axes:
    raise ValueError(
      f"{name} with shape {shape}: dimension numbers {spec} must name at"
      " least one reduction and one output axis."
    )
  if len(set(reduction_axes + output_axes)) != len(named):
    raise ValueError(
      f"{name} with shape {shape}: dimension numbers {spec} name an axis more than once."
    )
  batch_axes = tuple(a for a in range(ndim) if a not in reduction_axes + output_axes)
  return MatrixLayout(shape, batch_axes, reduction_axes, output_axes)


def resolve_dimension_numbers(
  weight_dimension_numbers: DimensionNumbersOrFn, tree: Any
) -> list[FiraDimensionNumbers | None]:
  """Returns one spec (or None) per leaf of ``tree``, in flattening order.

  ``weight_dimension_numbers`` is None (every 2-D leaf as an ``(in, out)`` kernel, except
  leaves named ``bias``, ``scale`` or ``embedding``; a float leaf of three or more
  dimensions gets a warning naming it and what to pass), one
  spec (every leaf with two or more dimensions), a prefix tree of specs and
  None, or a callable of the tree returning one of those.
  """
  if callable(weight_dimension_numbers) and not isinstance(
    weight_dimension_numbers, FiraDimensionNumbers
  ):
    weight_dimension_numbers = weight_dimension_numbers(tree)
  leaves, treedef = jax.tree.flatten(tree)
  if weight_dimension_numbers is None:
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    return [_default_spec(path, x) for path, x in zip(paths, leaves, strict=True)]
  if isinstance(weight_dimension_numbers, FiraDimensionNumbers):
    return [weight_dimension_numbers if jnp.ndim(x) >= 2 else None for x in leaves]
  try:
    full = jax.tree.map(
      lambda spec, subtree: jax.tree.map(lambda _: spec, subtree),
      weight_dimension_numbers,
      tree,
      is_leaf=_is_spec_leaf,
    )
  except ValueError as e:
    raise ValueError(
      "weight_dimension_numbers must be a tree of FiraDimensionNumbers and"
      " None that is a prefix of the parameters' tree; the two trees"
      f" differ: {e}"
    ) from e
  specs = treedef.flatten_up_to(full)
  for spec in specs:
    if not _is_spec_leaf(spec):
      raise TypeError(
        f"weight_dimension_numbers leaves must be FiraDimensionNumbers or None, got {spec!r}."
      )
  return specs


def _last_name(path) -> str | None:
  """The innermost dict key or attribute name of a key path (an NNX Variable's ``value``
  skipped)."""
  for entry in reversed(path):
    name = getattr(entry, "key", getattr(entry, "name", None))
    if isinstance(name, str) and name not in ("value", "raw_value"):
      return name
  return None


def _default_spec(path, x) -> FiraDimensionNumbers | None:
  """The default: 2-D ``(in, out)`` kernels; biases, norm scales and embeddings are not
  projected, and a float leaf of three or more dimensions is reported, not guessed at."""
  if jnp.ndim(x) == 2 and _last_name(path) not in NOT_PROJECTED_BY_DEFAULT:
    return FiraDimensionNumbers()
  if jnp.ndim(x) >= 3 and is_trainable(x):
    warnings.warn(
      f"parameter {jax.tree_util.keystr(path)} with shape {jnp.shape(x)} is not projected:"
      " the default weight_dimension_numbers projects 2-D (in, out) kernels only. To"
      " project it, give it FiraDimensionNumbers in weight_dimension_numbers (a tree or"
      " a callable such as dimension_numbers_for_paths), e.g. FiraDimensionNumbers(0,"
      " (1, 2)) for a DenseGeneral (embed, heads, head_dim) kernel, FiraDimensionNumbers("
      "(0, 1), 2) for (heads, head_dim, embed), FiraDimensionNumbers(1, 2) for stacked"
      " (layers, in, out) layers; None there keeps plain Adam without this warning.",
      stacklevel=2,
    )
  return None


def dimension_numbers_for_paths(
  pattern: str, spec: FiraDimensionNumbers | None = None
) -> Callable[[Any], Any]:
  """A ``weight_dimension_numbers`` callable that projects leaves whose path matches.

  Leaves whose key path (as ``jax.tree_util.keystr`` writes it, e.g.
  ``"['layers']['attn']['q']['kernel']"``) matches the regular expression
  ``pattern`` (``re.search``) and that have two or more dimensions get ``spec``
  (default ``FiraDimensionNumbers()``); all others get None.

  Args:
    pattern: a regular expression, searched in each leaf's key path.
    spec: the :class:`FiraDimensionNumbers` of the matching leaves.

  Returns:
    A callable of the parameters' tree, for ``weight_dimension_numbers``.

  Example:
    >>> import jax.numpy as jnp, fira_jax
    >>> params = {'attn': {'kernel': jnp.zeros((4, 4))}, 'embed': jnp.zeros((10, 4))}
    >>> fn = fira_jax.dimension_numbers_for_paths(r"attn|mlp")
    >>> fn(params)
    {'attn': {'kernel': FiraDimensionNumbers(reduction_axis=0, output_axis=1)}, 'embed': None}
  """
  spec = FiraDimensionNumbers() if spec is None else spec
  regex = re.compile(pattern)

  def select(tree):
    return jax.tree_util.tree_map_with_path(
      lambda path, x: (
        spec if jnp.ndim(x) >= 2 and regex.search(jax.tree_util.keystr(path)) else None
      ),
      tree,
    )

  return select


def galore_dimension_numbers(weight_dimension_numbers: DimensionNumbersOrFn) -> Callable:
  """The same selection of matrices as ``optax.contrib.galore``'s dimension numbers.

  ``optax.contrib.galore`` has no batch axes, so only leaves given the default
  ``FiraDimensionNumbers()`` (2-D ``(in, out)`` kernels) carry over; any other spec raises.
  Use it to run ``optax.contrib.galore`` on the same matrices as :func:`galore_adamw`.

  Args:
    weight_dimension_numbers: fira_jax's ``weight_dimension_numbers`` (None, a
      :class:`FiraDimensionNumbers`, a prefix tree of them and None, or a callable).

  Returns:
    A callable of the parameters' tree that returns a tree of
    ``optax.contrib.GaLoreDimensionNumbers`` and None, for ``optax.contrib.galore``'s
    ``weight_dimension_numbers``. It raises ``ValueError`` for a selected leaf that is
    not a 2-D matrix with the default spec.

  Example:
    >>> import jax.numpy as jnp, fira_jax
    >>> fn = fira_jax.galore_dimension_numbers(None)  # every 2-D leaf
    >>> fn({'w': jnp.zeros((4, 3)), 'b': jnp.zeros(3)})
    {'b': None, 'w': GaLoreDimensionNumbers(reduction_axis=0, output_axis=1)}

  References:
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, 2024
  """

  def galore_specs(tree):
    specs = resolve_dimension_numbers(weight_dimension_numbers, tree)
    names = leaf_names(tree)
    for spec, x, name in zip(specs, jax.tree.leaves(tree), names, strict=True):
      if spec is not None and (spec != FiraDimensionNumbers() or jnp.ndim(x) != 2):
        raise ValueError(
          f"optax.contrib.galore projects 2-D (in, out) kernels only; {name} with shape"
          f" {jnp.shape(x)} has dimension numbers {spec}."
        )
    galore = [None if s is None else optax.contrib.GaLoreDimensionNumbers() for s in specs]
    return jax.tree.structure(tree).unflatten(galore)

  return galore_specs


def leaf_names(tree: Any) -> list[str]:
  """Readable key paths of the leaves of ``tree``, for error messages."""
  paths, _ = jax.tree_util.tree_flatten_with_path(tree)
  return ["parameter " + (jax.tree_util.keystr(path) or "<root>") for path, _ in paths]


def is_trainable(leaf: Any) -> bool:
  """Floating-point leaves are optimized; integer, boolean and ``float0`` ones are not."""
  return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
