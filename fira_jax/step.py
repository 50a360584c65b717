"""Fira's fused update of one leaf's matrices: two matrix products per matrix, as GaLore.

Algorithm 1 (see :mod:`fira_jax.algorithm`) forms the residual ``S = φ ⊙ (X − a P R)``
with a third product. Since ``φ`` scales whole channels of the kept side, which ``P``
does not mix, ``φ ⊙ (P R) = P (φ ⊙ R)``, and the update needs ``S`` only through

.. math::
  \\lVert S \\rVert^2 = \\lVert φ⊙X \\rVert^2 - 2a \\lVert φ⊙R \\rVert^2
    + a^2 \\operatorname{tr}((φ⊙R)^\\top P^\\top P (φ⊙R)), \\qquad
  u = α P N + \\frac{c}{λ} S = \\frac{c φ}{λ} ⊙ X + P \\left(α N - \\frac{α}{λ} φ⊙R\\right),

with ``a = α, c = 1`` (the reference) or ``a = 1, c = α`` (the paper), ``c a = α`` in both,
and ``Pᵀ(φ⊙X) = φ⊙R`` for any ``P``. All arrays are ``(B, ·, ·)`` batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fira_jax import limiter
from fira_jax import scaling as scaling_lib
from fira_jax import subspace

CANCELLATION = 1e-3  # ‖S‖² below this share of ‖φ⊙X‖² is recomputed from S itself


def fira_update(
  x: jax.Array,
  p: jax.Array,
  r: jax.Array,
  n: jax.Array,
  previous_norm: jax.Array | None,
  is_first_step: jax.Array,
  layout: subspace.SubspaceLayout,
  *,
  scale: jax.typing.ArrayLike,
  norm_growth_limit: jax.typing.ArrayLike | None,
  scaling: scaling_lib.Scaling,
  paper: bool,
  orthonormal: bool,
) -> tuple[jax.Array, jax.Array | None]:
  """One leaf's update ``α P N + S / λ`` and the limiter's new ``‖S‖`` (or None).

  Args:
    x: the gradient's matrices ``X``.
    p: the basis ``P``.
    r: ``R``, ``X`` projected.
    n: ``N = ψ(R)``, the base optimizer's output.
    previous_norm: ``(B,)`` float32 ``‖S_{t-1}‖``, or None for no limiter.
    is_first_step: a boolean scalar; the limiter only records on the first step.
    layout: the leaf's subspace layout.
    scale: ``α``.
    norm_growth_limit: ``γ``.
    scaling: ``"column"`` or ``"matrix"`` norm-based scaling.
    paper: the paper's formulation (``(I − P Pᵀ) G``, ``α`` on both terms).
    orthonormal: ``PᵀP = I`` to working precision (float32 SVD bases).
  """
  a, c = (1.0, scale) if paper else (scale, 1.0)
  phi, r_sq = scaling_lib.scaling_factor_and_input_norms(
    n, r, layout.rank_axis, scaling
  )  # φ, ‖R_j‖²
  s_sq = residual_norm_sq(x, p, r, phi, r_sq, a, layout, orthonormal)  # ‖S‖²
  divisor, new_norm = 1.0, None
  if previous_norm is not None:  # λ
    divisor, new_norm = limiter.norm_growth_divisor(
      jnp.sqrt(s_sq), previous_norm, norm_growth_limit, is_first_step
    )
    divisor = divisor[:, None, None]
  phi_r = phi * r.astype(jnp.float32)
  low = (scale * n.astype(jnp.float32) - (scale / divisor) * phi_r).astype(n.dtype)
  update = (c * phi / divisor) * x + subspace.project_back(low, p, layout.compressed)
  return update.astype(x.dtype), new_norm


def residual_norm_sq(x, p, r, phi, r_sq, a, layout: subspace.SubspaceLayout, orthonormal: bool):
  """``‖S‖²`` per matrix, ``S = φ ⊙ (X − a back(R))``, from per-channel sums.

  ``r_sq`` holds ``‖R_j‖²`` per channel (from the scaling); ``‖X_j‖²`` is one pass over X.
  """
  # Per channel j of the kept side: ‖X_j‖² summed over the compressed side.
  x_sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=layout.rank_axis, keepdims=True)
  phi_sq = jnp.square(phi)
  if orthonormal:  # ‖P(φ⊙R)‖² = ‖φ⊙R‖²
    s_sq = jnp.sum(phi_sq * (x_sq - (2 * a - a * a) * r_sq), axis=(1, 2))
  else:
    phi_r = phi * r.astype(jnp.float32)
    gram = jnp.einsum("bkr,bks->brs", p, p, preferred_element_type=jnp.float32)
    applied = gram @ phi_r if layout.compressed == "reduction" else phi_r @ gram
    quad = jnp.sum(applied * phi_r, axis=(1, 2))
    s_sq = jnp.sum(phi_sq * (x_sq - 2 * a * r_sq), axis=(1, 2)) + a * a * quad
  return _exact_where_cancelled(s_sq, jnp.sum(phi_sq * x_sq, axis=(1, 2)), phi, x, a, r, p, layout)


def _exact_where_cancelled(s_sq, phi_x_sq, phi, x, a, r, p, layout):
  """Recomputes ``‖S‖²`` from ``S`` itself where the difference of squares cancels.

  There (a residual far below ``φ⊙X``, e.g. α = 1 and a gradient inside the subspace)
  float32 rounding exceeds ``‖S‖²``, and the limiter would record noise that then governs
  many steps. The extra product runs only on steps where some matrix cancels.
  """
  cancelled = s_sq <= CANCELLATION * phi_x_sq

  def from_residual():
    back = subspace.project_back(r.astype(jnp.float32), p.astype(jnp.float32), layout.compressed)
    exact = jnp.sum(jnp.square(phi * (x.astype(jnp.float32) - a * back)), axis=(1, 2))
    return jnp.where(cancelled, exact, s_sq)

  return jax.lax.cond(jnp.any(cancelled), from_residual, lambda: jnp.maximum(s_sq, 0.0))
