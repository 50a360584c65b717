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
POWER_ITERATIONS = 2  # randomized SVD: subspace iterations, each Cholesky-QR-stabilised


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


def is_trainable(leaf: Any) -> bool:
  """Floating-point leaves are optimized; integer, boolean and ``float0`` ones are not."""
  return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def layouts_for(
  tree: Any,
  weight_dimension_numbers: DimensionNumbersOrFn,
  rank: int,
  compressed_side: CompressedSide = "smaller",
) -> list[MatrixLayout | None]:
  """The layout of every leaf of ``tree`` (None for leaves not projected).

  Leaves that are not floating point (:func:`is_trainable`) are never projected.
  """
  specs = resolve_dimension_numbers(weight_dimension_numbers, tree)
  leaves = jax.tree.leaves(tree)
  layouts = []
  for leaf, spec, name in zip(leaves, specs, leaf_names(tree), strict=True):
    if spec is None or not is_trainable(leaf):
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
    a = x if compressed_axis == 0 else x.T  # rows: the compressed side
    if a.shape[0] < a.shape[1]:
      # LAPACK (jaxlib's CPU SVD) is ~1.4x faster on a tall matrix than on a wide one:
      # decompose aᵀ = V Σ Uᵀ and read a's left singular vectors off its right ones.
      return jnp.linalg.svd(a.T, full_matrices=False)[2][:rank, :].T
    return jnp.linalg.svd(a, full_matrices=False)[0][:, :rank]

  # lax.map, not one batched SVD: jaxlib's batched CPU LAPACK kernels fan out into the
  # intra-op thread pool they run on, which deadlocks with several CPU devices (pmap or a
  # mesh) on few cores (jax 0.10.2); unbatched ones were also faster (randomized_svd_projector).
  basis = jax.lax.map(one, matrices.astype(jnp.float32))
  return canonical_signs(basis).astype(matrices.dtype)


def project(matrices: jax.Array, projector: jax.Array, compressed_axis: int) -> jax.Array:
  """``R = Pᵀ X`` (compressed reduction side) or ``R = X P`` (output side)."""
  if compressed_axis == 0:
    # (Pᵀ) X with Pᵀ materialized (a copy of the small P). Left to itself, XLA folds the
    # transpose into the dot; its CPU backend then runs a batched dot that contracts the
    # left operand's rows outside YNNPACK's fused dots, and stacked (layers, in, out)
    # leaves stepped 1.11x slower than separate ones (1.06x with the barrier; a profile
    # showed those dots on the dispatching thread). Unbatched, the copy is what XLA chose.
    return jax.lax.optimization_barrier(jnp.swapaxes(projector, 1, 2)) @ matrices
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


def _per_matrix(fn, *args):
  """``fn`` on each ``(ℓ, ℓ)`` slice of ``(B, ℓ, ℓ)`` arguments, never on a batch of them.

  jaxlib's batched CPU LAPACK kernels (Cholesky, eigh, …) split their batch over the
  intra-op thread pool they run in and block until the pieces finish: two of them running
  concurrently (the factorizations of two stacked leaves) can hold every thread of a
  two-thread pool and deadlock (jax 0.10.2, observed on 2 cores). Unbatched calls do not
  fan out, and these matrices are small, so a loop costs little.
  """
  if args[0].shape[0] == 1:
    return jax.tree.map(lambda y: y[None], fn(*(a[0] for a in args)))
  return jax.lax.map(lambda a: fn(*a), args)


def _orthonormal_columns(y: jax.Array, shift: float, relative_to: str) -> jax.Array:
  """One shifted Cholesky-QR pass: ``Y R⁻¹`` with ``RᵀR = YᵀY + s I``, for ``(B, m, ℓ)``.

  Two batched matrix products and an ``ℓ × ℓ`` Cholesky: no Householder QR, so it
  partitions like a matmul. The shift ``s`` (``shift`` times the Gram matrix's trace or
  largest diagonal entry, plus the smallest normal float) keeps the Cholesky
  factorization finite when ``Y`` is rank-deficient or ill-conditioned: directions of
  ``Y`` with ``σ² ≲ s`` come out shrunk towards zero instead of NaN.
  """
  gram = jnp.einsum("bmi,bmj->bij", y, y)
  diagonal = jnp.diagonal(gram, axis1=-2, axis2=-1)
  scale = jnp.sum(diagonal, -1) if relative_to == "trace" else jnp.max(diagonal, -1)
  eye = jnp.eye(y.shape[-1], dtype=y.dtype)
  gram = gram + (shift * scale + jnp.finfo(y.dtype).tiny)[:, None, None] * eye

  def inverse_factor(gram):  # L⁻¹ with gram = L Lᵀ, so Y = (Y L⁻ᵀ) Lᵀ
    lower = jnp.linalg.cholesky(gram)
    return jax.lax.linalg.triangular_solve(lower, eye, left_side=True, lower=True)

  return jnp.einsum("bmi,bji->bmj", y, _per_matrix(inverse_factor, gram))


def _cholesky_qr(y: jax.Array, passes: int) -> jax.Array:
  """Orthonormal columns spanning ``Y`` (the ``Q`` of a QR), from ``passes`` Cholesky-QRs.

  The first pass is shifted by ``ε tr(YᵀY)``, enough for any float32 ``Y``; later passes
  see an already well-conditioned matrix and use the much smaller ``ε max diag``, which
  restores orthonormality to working precision (shifted CholeskyQR3 with
  ``passes=3``; Fukaya et al., 2020) while still guarding the columns that the first
  pass shrank, where ``Y`` is rank-deficient.
  """
  eps = float(jnp.finfo(y.dtype).eps)
  y = _orthonormal_columns(y, eps, "trace")
  for _ in range(passes - 1):
    y = _orthonormal_columns(y, eps, "max")
  return y


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
    Q = \mathrm{orth}(A Ω), \quad
    Q ← \mathrm{orth}(A\, \mathrm{orth}(A^\top Q)) \ (\text{power\_iterations times}),

  then, with ``B = QᵀA`` and ``B Bᵀ = U Λ Uᵀ`` (eigenvalues descending),
  ``P = Q U_{:, :r}`` (Rayleigh-Ritz: the best rank-``r`` basis inside ``Q``'s span).
  ``orth`` is a shifted Cholesky-QR (three passes for the final ``Q``, one in between,
  where only the span matters): batched matrix products and ``ℓ × ℓ`` Cholesky and
  eigendecompositions (one at a time, see :func:`_per_matrix`), no Householder QR and
  no SVD of a large matrix, so the products of a stacked ``(layers, ·, ·)`` leaf are
  batched and a sharded gradient is never gathered. Cost: ``2 + 2q`` products of ``A``
  with ``ℓ`` columns.

  Where ``A`` has numerical rank below ``ℓ`` (a rank-deficient or zero gradient), the
  shifts keep everything finite; the basis then still captures all of ``A``'s energy,
  but its columns beyond that rank are shrunk towards zero rather than arbitrary
  orthonormal completions (``Pᵀ X`` is then zero on them, as it would be with any
  completion).

  Args:
    matrices: ``(B, reduction, output)``; the basis is computed in float32, on the
      matrix divided by its largest magnitude (so that no Gram matrix under- or
      overflows).
    rank: the number of vectors kept.
    compressed_axis: 0 (reduction side) or 1 (output side).
    keys: ``(B,)`` PRNG keys, one per matrix, for ``Ω``.
    oversampling: ``p``, extra columns of ``Ω`` (default 16). The error beyond
      the best rank-``r`` approximation falls like ``σ_{r+p}`` with ``p``.
    power_iterations: ``q ≥ 0`` (default 2), passes of ``Aᵀ`` then ``A``. Each
      sharpens the spectrum by ``σ²``; gradients' singular values decay slowly, so
      ``q = 0`` is poor.

  Returns:
    ``(B, compressed, rank)`` with orthonormal columns (up to the rank-deficient
    case above), canonical signs, in the gradient's dtype.

  References:
    Halko, Martinsson and Tropp, `Finding Structure with Randomness
    <https://arxiv.org/abs/0909.4061>`_, 2011; Fukaya, Kannan, Nakatsukasa, Yamamoto and
    Yanagisawa, `Shifted Cholesky QR for computing the QR factorization of
    ill-conditioned matrices <https://arxiv.org/abs/1809.11085>`_, 2020
  """

  if power_iterations < 0:
    raise ValueError(f"power_iterations must be >= 0, got {power_iterations}.")
  x = matrices.astype(jnp.float32)
  peak = jnp.max(jnp.abs(x), axis=(1, 2), keepdims=True)
  x = x / jnp.where(peak > 0, peak, 1.0)
  if compressed_axis == 0:  # A = X
    times, times_transposed = "bko,bol->bkl", "bko,bkl->bol"
  else:  # A = Xᵀ
    times, times_transposed = "bko,bkl->bol", "bko,bol->bkl"
  compressed, other = (x.shape[1], x.shape[2])[:: 1 if compressed_axis == 0 else -1]
  width = min(rank + oversampling, compressed, other)
  omega = jax.vmap(lambda key: jax.random.normal(key, (other, width), jnp.float32))(keys)
  final_passes = 3
  q = _cholesky_qr(jnp.einsum(times, x, omega), final_passes if power_iterations == 0 else 1)
  for i in range(power_iterations):
    z = _cholesky_qr(jnp.einsum(times_transposed, x, q), 1)
    last = i == power_iterations - 1
    q = _cholesky_qr(jnp.einsum(times, x, z), final_passes if last else 1)
  b = jnp.einsum(times_transposed, x, q)  # Bᵀ = Aᵀ Q, (B, other, ℓ)
  _, vectors = _per_matrix(jnp.linalg.eigh, jnp.einsum("bnl,bnk->blk", b, b))  # ascending
  basis = jnp.einsum("bml,blr->bmr", q, vectors[..., ::-1][..., :rank])
  return canonical_signs(basis).astype(matrices.dtype)
