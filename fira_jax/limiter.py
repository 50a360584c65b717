"""Norm-growth limiter: caps how fast an update's norm may grow between steps.

Fira (Chen et al., 2024, Sec. 4.2) limits the residual term ``S_t`` so that its
norm grows by at most a factor ``γ`` per step, which removes the loss spikes
that sudden gradient growth causes:

.. math::
  λ_t = \\frac{\\max(\\lVert S_t \\rVert / (\\lVert S_{t-1} \\rVert + 10^{-8}), γ)}{γ},
  \\qquad S_t ← S_t / λ_t

On the first step the norm is only recorded. ``‖S_{t-1}‖`` is the norm after
limiting. The reference hard-codes ``γ = 1.01``.

Where the reference differs: it records ``‖S_0‖`` even when it is 0 (a zero gradient on
step 0, e.g. a layer whose input is zero-initialised) and from then on lets the norm grow
from ``10⁻⁸`` by ``γ`` per step, which keeps the residual negligible for thousands of
steps. Here a recorded norm of exactly 0 (or a step whose norm was not finite and so not
recorded) means nothing has been recorded yet: the next non-zero norm is recorded
unlimited, as on the first step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fira_jax import checks
from fira_jax import flax_metadata
from fira_jax import layout as layout_lib

LIMITER_EPS = 1e-8  # the reference's constant, added to the previous norm


def norm_growth_divisor(
  norm: jax.Array,
  previous_norm: jax.Array,
  growth_limit: jax.typing.ArrayLike,
  is_first_step: jax.typing.ArrayLike,
) -> tuple[jax.Array, jax.Array]:
  r"""``λ`` and the norm to record, given ``‖x‖`` rather than ``x``.

  .. math::
    λ_t = \max\left(\frac{\lVert x_t \rVert}{\lVert x_{t-1} \rVert + 10^{-8}}, γ\right) / γ

  (``λ = 1`` on the first step and where nothing was recorded). Fira's update never
  forms the residual ``S`` (see :func:`fira_jax.scale_by_fira`), only its norm, so the
  limiter is split into this factor and the division.

  Args:
    norm: float32 norms ``‖x_b‖`` of a batch of matrices, shape ``(B,)``.
    previous_norm: ``(B,)`` float32, each matrix's norm after limiting on the
      previous step.
    growth_limit: ``γ ≥ 1``, the largest allowed ratio of consecutive norms.
    is_first_step: a boolean scalar; on the first step nothing is limited (nor
      where ``previous_norm`` is 0).

  Returns:
    ``(λ, ‖x‖ / λ)``, both ``(B,)`` float32. A non-finite norm is not recorded
    (the previous one is kept), so one bad gradient cannot poison the limiter
    for good.

  Example:
    >>> import jax.numpy as jnp, fira_jax
    >>> divisor, norm = fira_jax.norm_growth_divisor(
    ...   jnp.array([3.0, 0.5]), jnp.array([1.0, 1.0]), growth_limit=1.5, is_first_step=False)
    >>> divisor.tolist(), norm.tolist()  # 3 grew by more than 1.5: divided by 2
    ([2.0, 1.0], [1.5, 0.5])

  References:
    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024
  """
  ratio = norm / (previous_norm + LIMITER_EPS)
  divisor = jnp.maximum(ratio, growth_limit) / growth_limit
  # A zero recorded norm counts as nothing recorded yet (see the module docstring).
  nothing_recorded = is_first_step | (previous_norm == 0)
  divisor = jnp.where(nothing_recorded, jnp.ones_like(divisor), divisor)
  new_norm = norm / divisor
  new_norm = jnp.where(jnp.isfinite(new_norm), new_norm, previous_norm)
  return divisor, new_norm


def limit_norm_growth(
  x: jax.Array,
  previous_norm: jax.Array,
  growth_limit: jax.typing.ArrayLike,
  is_first_step: jax.typing.ArrayLike,
) -> tuple[jax.Array, jax.Array]:
  r"""Limits the growth of the Frobenius norm of each ``x[b]`` of a ``(B, ·, ·)`` batch.

  .. math::
    x_{t,b} ← x_{t,b} / λ_{t,b}, \quad
    λ_{t,b} = \max\left(\frac{\lVert x_{t,b} \rVert_F}{\lVert x_{t-1,b} \rVert_F + 10^{-8}},
      γ\right) / γ

  Args:
    x: a batch of matrices.
    previous_norm: ``(B,)`` float32, each matrix's norm after limiting on the
      previous step.
    growth_limit: ``γ ≥ 1``, the largest allowed ratio of consecutive norms.
    is_first_step: a boolean scalar; on the first step nothing is limited.

  Returns:
    ``(x / λ, ‖x‖ / λ)``; see :func:`norm_growth_divisor`.

  Example:
    >>> import jax.numpy as jnp, fira_jax
    >>> x = jnp.ones((1, 2, 2))  # ‖x‖ = 2, twice the previous norm
    >>> y, norm = fira_jax.limit_norm_growth(x, jnp.array([1.0]), 1.5, False)
    >>> y.tolist(), norm.tolist()  # limited to 1.5 times the previous norm
    ([[[0.75, 0.75], [0.75, 0.75]]], [1.5])

  References:
    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024
  """
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(1, 2)))
  divisor, new_norm = norm_growth_divisor(norm, previous_norm, growth_limit, is_first_step)
  return x / divisor[:, None, None].astype(x.dtype), new_norm


class ClipByNormGrowthState(NamedTuple):
  """State of :func:`clip_by_norm_growth`: ``count`` (int32) and ``previous_norm``.

  ``previous_norm`` holds each leaf's norm after limiting on the previous step: float32,
  a scalar per leaf, or ``batch_shape`` for leaves given :class:`FiraDimensionNumbers`.
  """

  count: jax.Array  # shape=(), dtype=jnp.int32
  previous_norm: optax.Updates  # per leaf: float32, shape=batch_shape


def _as_matrices(x: jax.Array, layout: layout_lib.MatrixLayout | None) -> jax.Array:
  if layout is None:  # the whole leaf is one "matrix"
    return jnp.reshape(x, (1, 1, -1))
  return layout.to_matrices(x)


def _from_matrices(x: jax.Array, shape, layout: layout_lib.MatrixLayout | None):
  if layout is None:
    return jnp.reshape(x, shape)
  return layout.from_matrices(x)


def _norm_shape(layout: layout_lib.MatrixLayout | None) -> tuple[int, ...]:
  return () if layout is None else layout.batch_shape


def clip_by_norm_growth(
  growth_limit: jax.typing.ArrayLike = 1.01,
  weight_dimension_numbers: layout_lib.DimensionNumbersOrFn = None,
) -> optax.GradientTransformation:
  r"""Limits the growth of each update's norm to ``growth_limit`` per step.

  .. math::
    u_t ← u_t / λ_t, \quad
    λ_t = \max\left(\frac{\lVert u_t \rVert}{\lVert u_{t-1} \rVert + 10^{-8}}, γ\right) / γ

  Fira's norm-growth limiter as a standalone transformation, usable in any
  chain (for instance in place of ``optax.clip_by_global_norm``). The norm is
  taken per leaf; leaves given :class:`FiraDimensionNumbers` are limited per
  matrix, each slice of their batch axes on its own (stacked layers).

  Args:
    growth_limit: ``γ ≥ 1``; the paper uses 1.01. Injectable.
    weight_dimension_numbers: None (every leaf limited as a whole), one
      :class:`FiraDimensionNumbers`, a prefix tree of them and None, or a
      callable of the updates returning one of those.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp, optax, fira_jax
    >>> tx = optax.chain(fira_jax.clip_by_norm_growth(1.1), optax.sgd(0.1))
    >>> params = {'w': jnp.ones((3, 2))}
    >>> state = tx.init(params)
    >>> _, state = tx.update({'w': jnp.ones((3, 2))}, state)
    >>> u, state = tx.update({'w': 10 * jnp.ones((3, 2))}, state)
    >>> float(jnp.linalg.norm(u['w']) / jnp.linalg.norm(0.1 * jnp.ones((3, 2))))
    1.1...

  References:
    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024
  """

  checks.check_number("growth_limit", growth_limit, 1.0, True, ">= 1")

  def layouts(tree):
    specs = layout_lib.resolve_dimension_numbers(weight_dimension_numbers, tree)
    names = layout_lib.leaf_names(tree)
    return [
      None if spec is None else layout_lib.matrix_layout(jnp.shape(x), spec, name)
      for x, spec, name in zip(jax.tree.leaves(tree), specs, names, strict=True)
    ]

  def init_fn(params):
    treedef = jax.tree.structure(params)
    norms = [jnp.zeros(_norm_shape(layout), jnp.float32) for layout in layouts(params)]
    return ClipByNormGrowthState(
      count=jnp.zeros([], jnp.int32),
      previous_norm=treedef.unflatten(norms),
    )

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    previous = treedef.flatten_up_to(state.previous_norm)
    is_first = state.count == 0
    new_leaves, new_norms = [], []
    for x, prev, layout in zip(leaves, previous, layouts(updates), strict=True):
      limited, norm = limit_norm_growth(
        _as_matrices(x, layout), jnp.reshape(prev, (-1,)), growth_limit, is_first
      )
      new_leaves.append(_from_matrices(limited, jnp.shape(x), layout))
      new_norms.append(jnp.reshape(norm, _norm_shape(layout)))
    new_state = ClipByNormGrowthState(
      count=optax.safe_int32_increment(state.count),
      previous_norm=treedef.unflatten(new_norms),
    )
    return treedef.unflatten(new_leaves), new_state

  return flax_metadata.keep_flax_metadata(optax.GradientTransformation(init_fn, update_fn))
