"""Subspace bases: exact SVD, randomized SVD, seeded Gaussian; one sign convention.

Three bases for the projector ``P`` of a batch of ``(reduction, output)`` matrices: the
exact SVD (the reference's), a randomized SVD (Halko, Martinsson and Tropp, 2011) and a
seeded Gaussian basis (as APOLLO uses; Zhu et al., 2024). Each returns
``(B, compressed, rank)`` in the matrices' dtype.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from fira_jax import platform
from fira_jax import subspace

Projection = Literal["svd", "randomized_svd", "random"]
PROJECTIONS = ("svd", "randomized_svd", "random")
OVERSAMPLING = 16  # randomized SVD: extra range-finder columns beyond the rank
POWER_ITERATIONS = 2  # randomized SVD: subspace iterations, each Cholesky-QR-stabilised


def canonical_signs(projector: jax.Array) -> jax.Array:
  r"""Flips each column of ``projector`` so its largest-magnitude entry is positive.

  .. math::
    P_{:,j} ← \operatorname{sign}(P_{i_j, j})\, P_{:,j}, \quad
    i_j = \operatorname{argmax}_i \lvert P_{i,j} \rvert

  Singular vectors are defined up to sign, and LAPACK builds differ (torch and
  JAX disagree on this very machine). Since Adam's moments persist across
  projector refreshes, a flipped vector changes the trajectory, so fira_jax
  fixes this convention; ties go to the first such entry.

  Args:
    projector: ``(..., compressed, rank)``, the basis vectors as columns.

  Returns:
    ``projector`` with some columns negated, in the same shape and dtype.

  Example:
    >>> import jax.numpy as jnp, fira_jax
    >>> fira_jax.canonical_signs(jnp.array([[1.0, -3.0], [-2.0, 1.0]])).tolist()
    [[-1.0, 3.0], [2.0, -1.0]]
  """
  index = jnp.argmax(jnp.abs(projector), axis=-2, keepdims=True)
  pivot = jnp.take_along_axis(projector, index, axis=-2)
  return projector * jnp.where(pivot < 0, -1, 1).astype(projector.dtype)


def svd_projector(matrices: jax.Array, rank: int, compressed: subspace.Side) -> jax.Array:
  r"""Top-``rank`` singular vectors of a ``(B, reduction, output)`` batch.

  .. math::
    X_b = U Σ V^\top, \quad P_b = U_{:, :r} \ (\text{reduction side}) \text{ or }
    V_{:, :r} \ (\text{output side})

  As the reference does, the SVD runs in float32 on the raw gradient and the
  basis is cast back to the gradient's dtype.

  Args:
    matrices: ``(B, reduction, output)``.
    rank: ``r``, the number of vectors kept (at most the matrices' smaller dimension).
    compressed: ``"reduction"`` or ``"output"``, the side the basis spans.

  Returns:
    ``(B, compressed, rank)`` with orthonormal columns in the canonical sign convention
    (:func:`canonical_signs`), in the matrices' dtype.

  Example:
    >>> import jax.numpy as jnp, fira_jax
    >>> x = jnp.outer(jnp.arange(1.0, 7.0), jnp.array([1.0, 0.0, 2.0, 1.0]))
    >>> x = (x + jnp.outer(jnp.ones(6), jnp.array([0.0, 3.0, -1.0, 1.0])))[None]
    >>> p = fira_jax.svd_projector(x, 2, "output")  # x: (1, 6, 4), of rank 2
    >>> p.shape
    (1, 4, 2)
    >>> bool(jnp.allclose(x @ p @ p[0].T, x, atol=1e-4))  # P Pᵀ keeps all of x
    True

  References:
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, 2024
  """
  rows = matrices if compressed == "reduction" else jnp.swapaxes(matrices, 1, 2)
  rows = rows.astype(jnp.float32)  # rows: the compressed side
  basis = platform.on_cpu_or_else(
    lambda a: jax.lax.map(lambda m: _left_singular_vectors(m, rank), a),
    lambda a: _left_singular_vectors(a, rank),
    rows,
  )
  return canonical_signs(basis).astype(matrices.dtype)


def _left_singular_vectors(a: jax.Array, rank: int) -> jax.Array:
  """The top-``rank`` left singular vectors of ``a`` (a matrix or a batch of them)."""
  if a.shape[-2] < a.shape[-1]:
    # LAPACK (jaxlib's CPU SVD) is ~1.4x faster on a tall matrix than on a wide one:
    # decompose aᵀ = V Σ Uᵀ and read a's left singular vectors off its right ones.
    vh = jnp.linalg.svd(jnp.swapaxes(a, -1, -2), full_matrices=False)[2]
    return jnp.swapaxes(vh[..., :rank, :], -1, -2)
  return jnp.linalg.svd(a, full_matrices=False)[0][..., :rank]


def random_projector(key: jax.Array, compressed_size: int, rank: int, dtype) -> jax.Array:
  r"""A Gaussian ``(compressed_size, rank)`` basis with ``E[PᵀP] = I``.

  .. math::
    P_{ij} \sim \mathcal{N}(0, 1/c) \ \text{i.i.d.}, \quad \mathbb{E}[P^\top P] = I

  with ``c = compressed_size``. Each column has unit expected squared norm and distinct
  columns are uncorrelated: ``P Pᵀ X`` is an unbiased sketch of ``X`` scaled by
  ``rank / compressed_size``. The basis is not orthonormal; :func:`fira_jax.scale_by_fira`
  accounts for ``PᵀP`` where it matters (the residual's norm). The same key gives the
  same basis, so the optimizer regenerates it instead of storing it.

  Args:
    key: a PRNG key.
    compressed_size: ``c``, the size of the compressed side.
    rank: the number of columns.
    dtype: the basis' dtype (drawn in float32, then cast).

  Returns:
    ``(compressed_size, rank)`` in ``dtype``.

  Example:
    >>> import jax, jax.numpy as jnp, fira_jax
    >>> key = jax.random.key(0)
    >>> p = fira_jax.random_projector(key, 512, 4, jnp.float32)
    >>> p.shape
    (512, 4)
    >>> bool(jnp.allclose(p.T @ p, jnp.eye(4), atol=0.2))  # close to orthonormal
    True
    >>> bool((p == fira_jax.random_projector(key, 512, 4, jnp.float32)).all())
    True

  References:
    Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
    <https://arxiv.org/abs/2412.05270>`_, 2024
  """
  scale = 1.0 / math.sqrt(compressed_size)
  return (scale * jax.random.normal(key, (compressed_size, rank), jnp.float32)).astype(dtype)


def _per_matrix(fn, *args):
  """``fn`` on a batch of small ``(B, ℓ, ℓ)`` factorizations: one at a time on CPU.

  jaxlib's batched CPU LAPACK kernels split their batch over the intra-op thread pool
  they run in and block on it: two at once (two stacked leaves) can deadlock a
  two-thread pool. Other backends get the batched kernel.
  """
  return platform.on_cpu_or_else(lambda *a: jax.lax.map(lambda m: fn(*m), a), jax.vmap(fn), *args)


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
  compressed: subspace.Side,
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
  eigendecompositions (one at a time on CPU, see :func:`_per_matrix`), no Householder QR and
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
    compressed: ``"reduction"`` or ``"output"``, the side the basis spans.
    keys: ``(B,)`` PRNG keys, one per matrix, for ``Ω``.
    oversampling: ``p``, extra columns of ``Ω`` (default 16). The error beyond
      the best rank-``r`` approximation falls like ``σ_{r+p}`` with ``p``.
    power_iterations: ``q ≥ 0`` (default 2), passes of ``Aᵀ`` then ``A``. Each
      sharpens the spectrum by ``σ²``; gradients' singular values decay slowly, so
      ``q = 0`` is poor.

  Returns:
    ``(B, compressed, rank)`` with orthonormal columns (up to the rank-deficient
    case above), canonical signs, in the gradient's dtype.

  Example:
    >>> import jax, jax.numpy as jnp, fira_jax
    >>> x = jnp.outer(jnp.arange(1.0, 7.0), jnp.array([1.0, 0.0, 2.0, 1.0]))
    >>> x = (x + jnp.outer(jnp.ones(6), jnp.array([0.0, 3.0, -1.0, 1.0])))[None]
    >>> keys = jax.random.split(jax.random.key(0), 1)  # one per matrix
    >>> p = fira_jax.randomized_svd_projector(x, 2, "output", keys)
    >>> p.shape
    (1, 4, 2)
    >>> exact = fira_jax.svd_projector(x, 2, "output")
    >>> bool(jnp.allclose(p, exact, atol=1e-4))  # x has rank 2: the same basis
    True

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
  if compressed == "reduction":  # A = X
    times, times_transposed = "bko,bol->bkl", "bko,bkl->bol"
  else:  # A = Xᵀ
    times, times_transposed = "bko,bkl->bol", "bko,bol->bkl"
  compressed, other = (x.shape[1], x.shape[2])[:: 1 if compressed == "reduction" else -1]
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


def basis(
  projection: Projection,
  matrices: jax.Array,
  layout: subspace.SubspaceLayout,
  keys: jax.Array | None,
) -> jax.Array:
  """The ``(B, compressed, rank)`` basis named by ``projection`` (``keys``: one per matrix)."""
  if projection == "svd":
    return svd_projector(matrices, layout.rank, layout.compressed)
  if projection == "randomized_svd":
    return randomized_svd_projector(matrices, layout.rank, layout.compressed, keys)
  return jax.vmap(
    lambda k: random_projector(k, layout.compressed_size, layout.rank, matrices.dtype)
  )(keys)
