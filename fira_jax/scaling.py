"""Norm-based scaling: Adam's effect on the subspace stands in for its effect outside it.

Fira (Chen et al., 2024, Sec. 4.1) observes that the ratio between the norm of
the base optimizer's output ``N = ψ(R)`` and the norm of its input ``R`` is
similar inside and outside the subspace, so the residual gradient is scaled by

.. math::
  φ_j = \\frac{\\lVert N_{:,j} \\rVert}{\\lVert R_{:,j} \\rVert + 10^{-8}}

one factor per channel ``j`` of the kept (uncompressed) side ("column-level",
the default), or one factor per matrix ("matrix-level", the paper's ablation).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Scaling = Literal["column", "matrix"]
SCALINGS = ("column", "matrix")
SCALING_EPS = 1e-8  # the reference's constant, added to the denominator


def norm_based_scaling_factor(
  base_output: jax.Array,
  base_input: jax.Array,
  rank_axis: int,
  scaling: Scaling = "column",
) -> jax.Array:
  r"""``φ = ‖ψ(R)‖ / (‖R‖ + 1e-8)`` for a batch of ``(B, ·, ·)`` low-rank matrices.

  .. math::
    φ_j = \frac{\lVert N_{:,j} \rVert}{\lVert R_{:,j} \rVert + 10^{-8}}
    \ (\text{column}), \qquad
    φ = \frac{\lVert N \rVert_F}{\lVert R \rVert_F + 10^{-8}} \ (\text{matrix})

  Args:
    base_output: the base optimizer's output ``N = ψ(R)``.
    base_input: the projected gradient ``R``.
    rank_axis: the axis of the rank dimension (1 or 2).
    scaling: ``"column"``: one factor per channel of the kept side, the norms
      taken over the rank axis (the reference's choice). ``"matrix"``: one
      factor per matrix, Frobenius norms.

  Returns:
    float32 factors broadcastable against the full ``(B, reduction, output)`` matrices,
    with the rank axis (and for ``"matrix"`` both matrix axes) kept with size 1.

  Example:
    >>> import jax.numpy as jnp, fira_jax
    >>> r = jnp.ones((1, 2, 3))  # rank 2 on axis 1, 3 channels
    >>> fira_jax.norm_based_scaling_factor(2 * r, r, rank_axis=1).tolist()
    [[[2.0, 2.0, 2.0]]]
    >>> fira_jax.norm_based_scaling_factor(2 * r, r, rank_axis=1, scaling="matrix").shape
    (1, 1, 1)

  References:
    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024
  """
  return scaling_factor_and_input_norms(base_output, base_input, rank_axis, scaling)[0]


def scaling_factor_and_input_norms(
  base_output: jax.Array,
  base_input: jax.Array,
  rank_axis: int,
  scaling: Scaling = "column",
) -> tuple[jax.Array, jax.Array]:
  """``φ`` (as :func:`norm_based_scaling_factor`) and ``‖R_{:,j}‖²`` per channel.

  The channels' squared input norms (float32, the rank axis kept with size 1) come
  for free here and give ``‖φ ⊙ R‖² = Σ_j φ_j² ‖R_{:,j}‖²`` without another pass
  over ``R``.
  """
  if scaling not in SCALINGS:
    raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}.")

  # Norms accumulate in float32 so that bf16 moments do not lose the ratio.
  def channel_sq(x):
    return jnp.sum(jnp.square(x.astype(jnp.float32)), axis=rank_axis, keepdims=True)

  output_sq, input_sq = channel_sq(base_output), channel_sq(base_input)
  if scaling == "matrix":
    output_sq = jnp.sum(output_sq, axis=(1, 2), keepdims=True)
    total_input_sq = jnp.sum(input_sq, axis=(1, 2), keepdims=True)
  else:
    total_input_sq = input_sq
  return jnp.sqrt(output_sq) / (jnp.sqrt(total_input_sq) + SCALING_EPS), input_sq
