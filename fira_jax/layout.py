"""How a parameter becomes a batch of matrices: dimension numbers and matrix layouts.

Every projected leaf is viewed as a batch of matrices ``X`` of shape ``(reduction, output)``
(Flax's ``(in, out)`` kernel layout). Its dimension numbers say which axes form the
reduction side and which the output side; every other axis is a batch axis (stacked or
scanned layers), handled matrix by matrix.
"""

from __future__ import annotations

import collections
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

from fira_jax import boxes


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

  ``weight_dimension_numbers`` is None (:func:`default_dimension_numbers`), one
  spec (every leaf with two or more dimensions), a prefix tree of specs and
  None, or a callable of the tree returning one of those.
  """
  if callable(weight_dimension_numbers) and not isinstance(
    weight_dimension_numbers, FiraDimensionNumbers
  ):
    weight_dimension_numbers = weight_dimension_numbers(tree)
  leaves, treedef = jax.tree.flatten(tree)
  if weight_dimension_numbers is None:
    weight_dimension_numbers = default_dimension_numbers(tree)
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
  names = [k for k in _path_keys(path) if isinstance(k, str)]
  return names[-1] if names else None


def _not_projected_by_name(name: str | None) -> bool:
  name = (name or "").lower()
  return name in ("bias", "scale") or "embed" in name


def _path_keys(path) -> tuple:
  """The module names along a key path; flattened dicts' tuple keys and "a/b" keys split."""
  keys = []
  for entry in path:
    key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", None)))
    if isinstance(key, tuple):
      keys.extend(key)
    elif isinstance(key, str):
      keys.extend(key.split("/"))
    elif key not in ("value", "raw_value"):
      keys.append(key)
  return tuple(k for k in keys if k not in ("value", "raw_value"))


class _TreeFacts(NamedTuple):
  """What the default reads from the whole tree to place one leaf's axes."""

  width: int | None  # D, the model width
  stacks: list[tuple[tuple, tuple[int, ...]]]  # (path prefix, stack shape) of stacked norms


def _tree_facts(paths: list, leaves: list) -> _TreeFacts:
  """The model width D (the embedding tables' columns, else the norm scales' size) and
  the stacks of layers (``nn.scan``/``nnx.scan``/``nnx.vmap``: norm scales with leading
  axes)."""
  names = [_last_name(p) for p in paths]
  shapes = [tuple(jnp.shape(x)) for x in leaves]
  embeds = [s[-1] for n, s in zip(names, shapes, strict=True) if "embed" in (n or "").lower()]
  norms = [s[-1] for n, s in zip(names, shapes, strict=True) if n == "scale" and s]
  sizes = [s for s in embeds if s > 1] or norms
  width = collections.Counter(sizes).most_common(1)[0][0] if sizes else None
  # A stacked norm's block: its path without the norm module and "scale".
  stacks = [
    (_path_keys(p)[:-2], s[:-1])
    for p, n, s in zip(paths, names, shapes, strict=True)
    if n == "scale" and len(s) >= 2 and (width is None or s[-1] == width)
  ]
  return _TreeFacts(width, [(block, stack) for block, stack in stacks if block])


def _stack_axes(path, shape: tuple[int, ...], facts: _TreeFacts) -> int:
  """How many leading axes of the leaf are layer-stack axes: those of a stacked norm scale
  in the same block (the leaf's path starts with the norm's block path)."""
  keys = _path_keys(path)
  best, best_block = 0, 0
  for block, stack in facts.stacks:
    inside = keys[: len(block)] == block and shape[: len(stack)] == stack
    if inside and len(block) > best_block:
      best, best_block = len(stack), len(block)
  return best


def _placed(path, shape: tuple[int, ...], facts: _TreeFacts) -> FiraDimensionNumbers | None:
  """The default reading of a leaf's axes as matrices, or None if it cannot be placed.

  Leading stack axes are batch axes. Two axes left: ``(in, out)``. Three or more: one side
  is the model-width axis D, the other side every other axis (attention kernels are
  projected whole: ``(D, heads, head_dim)`` as ``D × heads·head_dim``); D first or in the
  middle is the reduction side (Flax ``DenseGeneral``, ``Einsum`` ``"BTD,NDH->BTNH"``), D
  last the output side (``(heads, head_dim, D)``).
  """
  s = _stack_axes(path, shape, facts)
  rest = list(range(s, len(shape)))
  if len(rest) == 2:
    return FiraDimensionNumbers(rest[0], rest[1])
  wide = [a for a in rest if shape[a] == facts.width]
  if len(rest) < 2 or not wide:
    return None
  if rest[-1] in wide and rest[0] not in wide:
    return FiraDimensionNumbers(tuple(rest[:-1]), rest[-1])
  d = wide[0]
  return FiraDimensionNumbers(d, tuple(a for a in rest if a != d))


def _warn_not_placed(path, x: Any) -> None:
  warnings.warn(
    f"parameter {jax.tree_util.keystr(path)} with shape {jnp.shape(x)} is not projected:"
    " its axes cannot be read as a matrix by the default (no axis of the model width,"
    " the embedding tables' or norm scales' size). To project it, give it"
    " FiraDimensionNumbers in weight_dimension_numbers (a tree or a callable), e.g."
    " FiraDimensionNumbers(0, (1, 2)) for an (embed, heads, head_dim) kernel,"
    " FiraDimensionNumbers((0, 1), 2) for (heads, head_dim, embed),"
    " FiraDimensionNumbers(1, 2) for stacked (layers, in, out) layers; None there keeps"
    " plain Adam without this warning. Where the tree holds only some parameters"
    " (optax.partition, optax.masked), pass"
    " weight_dimension_numbers=fira_jax.default_dimension_numbers(all_params).",
    stacklevel=3,
  )


def _placed_or_warned(path, x: Any, facts: _TreeFacts) -> FiraDimensionNumbers | None:
  if jnp.ndim(x) < 2 or not is_trainable(x):
    return None
  if jnp.ndim(x) >= 3 and sum(n > 1 for n in jnp.shape(x)) < 2:
    return None  # a vector with extra axes of length 1 (e.g. a (1, 1, D) class token)
  spec = _placed(path, tuple(jnp.shape(x)), facts)
  if spec is None and jnp.ndim(x) >= 3:
    _warn_not_placed(path, x)
  return spec


def default_dimension_numbers(tree: Any) -> Any:
  """The default ``weight_dimension_numbers``: attention and MLP kernels, read from shapes.

  Per float leaf of ``tree`` (Flax Linen or NNX parameters, boxed or not):

  * biases, norm scales and embedding tables (leaves named ``bias``, ``scale`` or with
    ``embed`` in their name) are not projected, nor are vectors (leaves of fewer than two
    axes, or of three or more with at most one longer than 1);
  * stacked layers (``nn.scan``, ``nnx.scan``, ``nnx.vmap``) are recognised by their
    norm scales, which gain the same leading axes: in the norm's block (the leaves whose
    path starts with the norm module's parent) those axes are batch axes, one matrix per
    layer;
  * two axes left: an ``(in, out)`` kernel (``Dense``, ``Linear``, an untied head);
  * three or more: a multi-axis kernel (``DenseGeneral``, ``LinearGeneral``, ``Einsum``)
    projected whole, as the model width ``D`` against all its other axes: ``D`` is the
    width of the embedding tables (else the norm scales'); ``(D, heads, head_dim)`` is
    ``D × heads·head_dim``, ``(heads, head_dim, D)`` is ``heads·head_dim × D``, an
    Einsum ``(heads, D, head_dim)`` is ``D × heads·head_dim``;
  * a leaf of three or more axes without a ``D`` axis is not projected and gets a
    warning that names it and what to pass.

  :func:`describe` shows the result for a model before training.

  .. warning::
    Shapes cannot tell every layout apart. A stack of layers without norm scales in its
    blocks, or with the layer axis elsewhere than first (MaxText's ``param_scan_axis=1``),
    reads as one matrix across the layers; a fused ``(2, …)`` key/value or gate/up kernel
    is one matrix (the reference projects each part on its own); any leaf with a ``D``
    axis is read this way, a convolution kernel too. Pass :class:`FiraDimensionNumbers`
    for those leaves (the stack axis left out of both sides makes it a batch axis).

  Args:
    tree: the parameters (or updates); Flax's boxes are read through.

  Returns:
    A tree like ``tree`` (without Flax's boxes) of :class:`FiraDimensionNumbers` and None.

  Example:
    >>> import jax.numpy as jnp, fira_jax
    >>> params = {'embed': {'embedding': jnp.zeros((100, 16))},
    ...           'query': {'kernel': jnp.zeros((16, 4, 4))},    # (D, heads, head_dim)
    ...           'out': {'kernel': jnp.zeros((4, 4, 16))},      # (heads, head_dim, D)
    ...           'norm': {'scale': jnp.zeros(16)}}
    >>> specs = fira_jax.default_dimension_numbers(params)
    >>> specs['query']['kernel'], specs['out']['kernel'], specs['embed']['embedding']
    (FiraDimensionNumbers(reduction_axis=0, output_axis=(1, 2)), \
FiraDimensionNumbers(reduction_axis=(0, 1), output_axis=2), None)
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(boxes.unbox(tree))
  paths = [p for p, _ in flat]
  leaves = [x for _, x in flat]
  facts = _tree_facts(paths, leaves)
  return treedef.unflatten(
    [
      None if _not_projected_by_name(_last_name(p)) else _placed_or_warned(p, x, facts)
      for p, x in flat
    ]
  )


def dimension_numbers_for_paths(
  pattern: str, spec: FiraDimensionNumbers | None = None
) -> Callable[[Any], Any]:
  """A ``weight_dimension_numbers`` callable that projects leaves whose path matches.

  Leaves whose key path (as ``jax.tree_util.keystr`` writes it, e.g.
  ``"['layers']['attn']['q']['kernel']"``) matches the regular expression
  ``pattern`` (``re.search``, case-insensitive) and that have two or more dimensions
  get ``spec``; with ``spec=None``, those that :func:`default_dimension_numbers` would
  project (not biases, norm scales or embeddings) get the axes it would give them
  (attention kernels whole, stacked layers per layer). All others get None.

  Args:
    pattern: a regular expression, searched in each leaf's key path, ignoring case.
    spec: the :class:`FiraDimensionNumbers` of the matching leaves, or None to place
      their axes as the default does (a matching leaf it cannot place gets a warning).

  Returns:
    A callable of the parameters' tree, for ``weight_dimension_numbers``.

  Example:
    >>> import jax.numpy as jnp, fira_jax
    >>> params = {'Attn_0': {'kernel': jnp.zeros((4, 4))}, 'embed': jnp.zeros((10, 4))}
    >>> fn = fira_jax.dimension_numbers_for_paths(r"attn|mlp")
    >>> fn(params)
    {'Attn_0': {'kernel': FiraDimensionNumbers(reduction_axis=0, output_axis=1)}, 'embed': None}
  """
  regex = re.compile(pattern, re.IGNORECASE)

  def select(tree):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    facts = _tree_facts([p for p, _ in flat], [x for _, x in flat])
    chosen = []
    for path, x in flat:
      if jnp.ndim(x) < 2 or not regex.search(jax.tree_util.keystr(path)):
        chosen.append(None)
      elif spec is not None:
        chosen.append(spec)
      elif not _not_projected_by_name(_last_name(path)):
        chosen.append(_placed_or_warned(path, x, facts))
      else:
        chosen.append(None)
    return treedef.unflatten(chosen)

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
