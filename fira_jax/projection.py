"""Subspace projection: which axes form a matrix, which side is compressed, the basis.

Every projected leaf is viewed as a batch of matrices ``X`` of shape
``(reduction, output)`` (Flax's ``(in, out)`` kernel layout). One side of each
matrix is compressed to ``r`` dimensions by a projector ``P`` (orthonormal
columns for the SVD bases, ``E[PᵀP] = I`` for the random one):

* compressed reduction side (``axis == 0``): ``R = Pᵀ X``, ``back(N) = P N``;
* compressed output side (``axis == 1``):    ``R = X P``,  ``back(N) = N Pᵀ``.

The reference (``fira`` 1.0.2, on torch ``(out, in)`` weights) compresses the
smaller side and, for square matrices, the input (reduction) side.

Three bases: the exact SVD (the reference's), a randomized SVD (Halko, Martinsson
and Tropp, 2011) and a seeded Gaussian basis (as APOLLO uses; Zhu et al., 2024).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

CompressedSide = Literal["smaller", "larger", "reduction", "output"]
COMPRESSED_SIDES = ("smaller", "larger", "reduction", "output")
Projection = Literal["svd", "randomized_svd", "random"]
PROJECTIONS = ("svd", "randomized_svd", "random")
OVERSAMPLING = 16  # randomized SVD: extra range-finder columns beyond the rank
POWER_ITERATIONS = 2  # randomized SVD: subspace iterations, each QR-stabilised


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
  """How one leaf maps to a batch of ``(reduction, output)`` matrices.

  All fields are static (Python ints and tuples), computed from the leaf's
  shape and its dimension numbers.
  """

  shape: tuple[int, ...]
  permutation: tuple[int, ...]  # batch axes, reduction axes, output axes
  batch_shape: tuple[int, ...]
  reduction: int  # size of the flattened reduction side
  output: int  # size of the flattened output side
  compressed_axis: int  # 0: reduction side compressed, 1: output side
  rank: int  # effective rank, min(rank, reduction, output)

  @property
  def num_matrices(self) -> int:
    return math.prod(self.batch_shape)

  @property
  def compressed_size(self) -> int:
    return self.reduction if self.compressed_axis == 0 else self.output

  @property
  def projector_shape(self) -> tuple[int, ...]:
    return self.batch_shape + (self.compressed_size, self.rank)

  @property
  def low_rank_shape(self) -> tuple[int, ...]:
    if self.compressed_axis == 0:
      return self.batch_shape + (self.rank, self.output)
    return self.batch_shape + (self.reduction, self.rank)

  def to_matrices(self, x: jax.Array) -> jax.Array:
    """``x`` with the leaf's shape -> ``(B, reduction, output)``."""
    return x.transpose(self.permutation).reshape((self.num_matrices, self.reduction, self.output))

  def from_matrices(self, x: jax.Array) -> jax.Array:
    """``(B, reduction, output)`` -> the leaf's shape."""
    permuted_shape = tuple(self.shape[a] for a in self.permutation)
    inverse = tuple(sorted(range(len(self.shape)), key=self.permutation.__getitem__))
    return x.reshape(permuted_shape).transpose(inverse)

  def to_batched(self, x: jax.Array) -> jax.Array:
    """A low-rank or projector array stored with ``batch_shape`` -> ``(B, ...)``."""
    return x.reshape((self.num_matrices,) + x.shape[len(self.batch_shape) :])

  def from_batched(self, x: jax.Array) -> jax.Array:
    return x.reshape(self.batch_shape + x.shape[1:])


def matrix_layout(
  shape: Sequence[int],
  spec: FiraDimensionNumbers,
  rank: int,
  compressed_side: CompressedSide = "smaller",
  name: str = "parameter",
) -> MatrixLayout:
  """Validates ``spec`` against ``shape`` and returns the leaf's layout."""
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
  reduction = math.prod(shape[a] for a in reduction_axes)
  output = math.prod(shape[a] for a in output_axes)
  if compressed_side == "smaller":  # the reference: ties compress the input side
    compressed_axis = 0 if reduction <= output else 1
  elif compressed_side == "larger":  # optax.contrib.galore's choice
    compressed_axis = 0 if reduction >= output else 1
  elif compressed_side == "reduction":
    compressed_axis = 0
  elif compressed_side == "output":
    compressed_axis = 1
  else:
    raise ValueError(f"compressed_side must be one of {COMPRESSED_SIDES}, got {compressed_side!r}.")
  return MatrixLayout(
    shape=shape,
    permutation=batch_axes + reduction_axes + output_axes,
    batch_shape=tuple(shape[a] for a in batch_axes),
    reduction=reduction,
    output=output,
    compressed_axis=compressed_axis,
    rank=min(rank, reduction, output),
  )


def resolve_dimension_numbers(
  weight_dimension_numbers: DimensionNumbersOrFn, tree: Any
) -> list[FiraDimensionNumbers | None]:
  """Returns one spec (or None) per leaf of ``tree``, in flattening order.

  ``weight_dimension_numbers`` is None (every 2-D leaf, default spec), one
  spec (every leaf with two or more dimensions), a prefix tree of specs and
  None, or a callable of the tree returning one of those.
  """
  if callable(weight_dimension_numbers) and not isinstance(
    weight_dimension_numbers, FiraDimensionNumbers
  ):
    weight_dimension_numbers = weight_dimension_numbers(tree)
  leaves, treedef = jax.tree.flatten(tree)
  if weight_dimension_numbers is None:
    return [FiraDimensionNumbers() if jnp.ndim(x) == 2 else None for x in leaves]
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


def dimension_numbers_for_paths(
  pattern: str, spec: FiraDimensionNumbers | None = None
) -> Callable[[Any], Any]:
  """A ``weight_dimension_numbers`` callable that projects leaves whose path matches.

  Leaves whose key path (as ``jax.tree_util.keystr`` writes it, e.g.
  ``"['layers']['attn']['q']['kernel']"``) matches the regular expression
  ``pattern`` (``re.search``) and that have two or more dimensions get ``spec``
  (default ``FiraDimensionNumbers()``); all others get None.

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


def leaf_names(tree: Any) -> list[str]:
  """Readable key paths of the leaves of ``tree``, for error messages."""
  paths, _ = jax.tree_util.tree_flatten_with_path(tree)
  return ["parameter " + (jax.tree_util.keystr(path) or "<root>") for path, _ in paths]


def layouts_for(
  tree: Any,
  weight_dimension_numbers: DimensionNumbersOrFn,
  rank: int,
  compressed_side: CompressedSide = "smaller",
) -> list[MatrixLayout | None]:
  """The layout of every leaf of ``tree`` (None for leaves not projected)."""
  specs = resolve_dimension_numbers(weight_dimension_numbers, tree)
  leaves = jax.tree.leaves(tree)
  layouts = []
  for leaf, spec, name in zip(leaves, specs, leaf_names(tree), strict=True):
    if spec is None:
      layouts.append(None)
      continue
    layout = matrix_layout(jnp.shape(leaf), spec, rank, compressed_side, name)
    # A zero-size matrix has no subspace; leave it to the base optimizer.
    layouts.append(layout if layout.rank > 0 else None)
  return layouts


def canonical_signs(projector: jax.Array) -> jax.Array:
  """Flips each column of ``projector`` so its largest-magnitude entry is positive.

  Singular vectors are defined up to sign, and LAPACK builds differ (torch and
  JAX disagree on this very machine). Since Adam's moments persist across
  projector refreshes, a flipped vector changes the trajectory, so fira_jax
  fixes this convention; ties go to the first such entry.
  """
  index = jnp.argmax(jnp.abs(projector), axis=-2, keepdims=True)
  pivot = jnp.take_along_axis(projector, index, axis=-2)
  return projector * jnp.where(pivot < 0, -1, 1).astype(projector.dtype)


def svd_projector(matrices: jax.Array, rank: int, compressed_axis: int) -> jax.Array:
  """Top-``rank`` singular vectors of a ``(B, reduction, output)`` batch.

  As the reference does, the SVD runs in float32 on the raw gradient and the
  basis is cast back to the gradient's dtype. Returns ``(B, compressed, rank)``
  with orthonormal columns in the canonical sign convention.
  """

  def one(x):
    u, _, vh = jnp.linalg.svd(x, full_matrices=False)
    return u[:, :rank] if compressed_axis == 0 else vh[:rank, :].T

  # lax.map, not one batched SVD: jaxlib's batched CPU LAPACK kernels fan out into the
  # intra-op thread pool they run on, which deadlocks with several CPU devices (pmap or a
  # mesh) on few cores (jax 0.10.2); unbatched ones were also faster (randomized_svd_projector).
  basis = jax.lax.map(one, matrices.astype(jnp.float32))
  return canonical_signs(basis).astype(matrices.dtype)


def project(matrices: jax.Array, projector: jax.Array, compressed_axis: int) -> jax.Array:
  """``R = Pᵀ X`` (compressed reduction side) or ``R = X P`` (output side)."""
  if compressed_axis == 0:
    return jnp.einsum("bkr,bko->bro", projector, matrices)
  return jnp.einsum("bko,bor->bkr", matrices, projector)


def project_back(low_rank: jax.Array, projector: jax.Array, compressed_axis: int) -> jax.Array:
  """``P N`` (compressed reduction side) or ``N Pᵀ`` (output side)."""
  if compressed_axis == 0:
    return jnp.einsum("bkr,bro->bko", projector, low_rank)
  return jnp.einsum("bkr,bor->bko", low_rank, projector)


def rank_axis(compressed_axis: int) -> int:
  """The axis of a ``(B, ·, ·)`` low-rank matrix that holds the rank."""
  return 1 if compressed_axis == 0 else 2


def masked_like(tree_leaves: list[Any], layouts: list[MatrixLayout | None], fn) -> list[Any]:
  """``fn(leaf, layout)`` for projected leaves, ``optax.MaskedNode()`` elsewhere."""
  return [
    optax.MaskedNode() if layout is None else fn(leaf, layout)
    for leaf, layout in zip(tree_leaves, layouts, strict=True)
  ]


def random_projector(key: jax.Array, compressed_size: int, rank: int, dtype) -> jax.Array:
  """A Gaussian ``(compressed_size, rank)`` basis with ``E[PᵀP] = I``.

  Entries are i.i.d. ``N(0, 1 / compressed_size)``, so each column has unit
  expected squared norm and distinct columns are uncorrelated: ``P Pᵀ X`` is an
  unbiased sketch of ``X`` scaled by ``rank / compressed_size``. The basis is
  not orthonormal; :func:`fira_jax.scale_by_fira` accounts for ``PᵀP`` where
  it matters (the residual's norm). The same key gives the same basis, so the
  optimizer regenerates it instead of storing it.
  """
  scale = 1.0 / math.sqrt(compressed_size)
  return (scale * jax.random.normal(key, (compressed_size, rank), jnp.float32)).astype(dtype)


def randomized_svd_projector(
  matrices: jax.Array,
  rank: int,
  compressed_axis: int,
  keys: jax.Array,
  oversampling: int = OVERSAMPLING,
  power_iterations: int = POWER_ITERATIONS,
) -> jax.Array:
  r"""Approximate top-``rank`` singular vectors of a ``(B, reduction, output)`` batch.

  With ``A`` the matrix oriented so its rows are the compressed side
  (``A = X`` or ``Xᵀ``), ``ℓ = rank + oversampling`` and a Gaussian ``Ω``:

  .. math::
    Y = A Ω, \quad
    Y ← A\, \mathrm{qr}(A^\top \mathrm{qr}(Y)) \ (\text{power\_iterations times}), \quad
    Y = Ũ Σ Ṽ^\top, \quad P = Ũ_{:, :r}

  ``Y = A Z`` with ``Z`` an orthonormal basis of (approximately) ``A``'s top
  right singular subspace, so ``A ≈ Y Zᵀ`` and ``Y``'s left singular vectors
  are ``A``'s; the last SVD is of a thin ``compressed × ℓ`` matrix. Each power
  iteration sharpens the spectrum by ``σ²``; the QRs between products keep the
  columns from collapsing onto the top singular vector in float32. Cost:
  ``1 + 2q`` products of ``A`` with ``ℓ`` columns and thin QRs/SVD, against a
  full SVD's ``O(m n min(m, n))`` with a large constant.

  Args:
    matrices: ``(B, reduction, output)``; the basis is computed in float32.
    rank: the number of vectors kept.
    compressed_axis: 0 (reduction side) or 1 (output side).
    keys: ``(B,)`` PRNG keys, one per matrix, for ``Ω``.
    oversampling: ``p``, extra columns of ``Ω`` (default 16). The error beyond
      the best rank-``r`` approximation falls like ``σ_{r+p}`` with ``p``.
    power_iterations: ``q ≥ 1`` (default 2), passes of ``Aᵀ`` then ``A``; the
      last one also makes ``Y = A Z`` with ``Z`` orthonormal, which the final
      SVD needs. More are needed for gradients, whose singular
      values decay slowly (one iteration captured about 98.9% of the exact
      basis's energy on LLaMA-1B MLP shapes, two 99.6%).

  Returns:
    ``(B, compressed, rank)`` with orthonormal columns, canonical signs, in the
    gradient's dtype.

  References:
    Halko, Martinsson and Tropp, `Finding Structure with Randomness
    <https://arxiv.org/abs/0909.4061>`_, 2011
  """

  if power_iterations < 1:
    # Y = A Ω's left singular vectors are not A's: Ω is not orthonormal.
    raise ValueError(f"power_iterations must be >= 1, got {power_iterations}.")

  def one(x, key):
    a = x if compressed_axis == 0 else x.T  # (compressed, other)
    width = min(rank + oversampling, *a.shape)
    y = a @ jax.random.normal(key, (a.shape[1], width), jnp.float32)
    for _ in range(power_iterations):
      y = a @ jnp.linalg.qr(a.T @ jnp.linalg.qr(y)[0])[0]
    return jnp.linalg.svd(y, full_matrices=False)[0][:, :rank]

  # lax.map, not vmap: batched QR/SVD on CPU were minutes slower than a loop of unbatched ones
  # on LLaMA-60M stacked layers (jax 0.10.2).
  basis = jax.lax.map(lambda args: one(*args), (matrices.astype(jnp.float32), keys))
  return canonical_signs(basis).astype(matrices.dtype)
