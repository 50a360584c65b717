"""Adam in the form the reference runs it: bias correction as a step-size factor.

The reference (``fira`` 1.0.2, like ``transformers``' old ``AdamW`` and
``galore-torch``) computes ``N = m / (√v + ε)`` from *uncorrected* moments and
folds bias correction into the step size, ``√(1 − β₂ᵗ) / (1 − β₁ᵗ)``, which it
applies to the whole Fira update, residual included. This differs from
``optax.scale_by_adam`` (which corrects the moments) in where ε enters.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fira_jax import checks


class ScaleByUncorrectedAdamState(NamedTuple):
  """State of :func:`scale_by_uncorrected_adam`: the moments ``mu`` (``m``) and ``nu`` (``v``).

  Both are trees like the parameters, uncorrected, in ``mu_dtype`` / ``nu_dtype`` or the
  parameters' dtype; there is no step count (the step size keeps its own).
  """

  mu: optax.Updates  # first moments, dtype mu_dtype or the updates'
  nu: optax.Updates  # second moments, dtype nu_dtype or the updates'


def scale_by_uncorrected_adam(
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-6,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  r"""Adam's direction without bias correction, ``m / (√v + ε)``.

  .. math::
    m_t = β_1 m_{t-1} + (1 - β_1) g_t, \quad
    v_t = β_2 v_{t-1} + (1 - β_2) g_t^2, \quad
    N_t = m_t / (\sqrt{v_t} + ε)

  Chain it with :func:`scale_by_adam_step_size` (or use it as the base
  optimizer of :func:`fira_jax.scale_by_fira`, which does so by default) to get
  the reference's bias-corrected Adam.

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to ``√v`` (outside the square root); the reference uses 1e-6.
    mu_dtype: optional dtype of the first moment (default: the parameters').
    nu_dtype: optional dtype of the second moment (default: the parameters', as the
      reference stores it). With bfloat16 parameters, ``jnp.float32`` keeps ``v``'s
      small increments ``(1 − β₂) g²`` from rounding away (bfloat16 has 8 bits).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ScaleByUncorrectedAdamState`.

  Example:
    >>> import jax.numpy as jnp, optax, fira_jax
    >>> g = jnp.array([2.0, -0.5])
    >>> tx = fira_jax.scale_by_uncorrected_adam()
    >>> n, _ = tx.update(g, tx.init(g))  # m = 0.1 g, v = 0.001 g²: N ≈ 0.1 sign(g) / √0.001
    >>> [round(v, 3) for v in n.tolist()]
    [3.162, -3.162]
    >>> tx = optax.chain(tx, fira_jax.scale_by_adam_step_size())  # the reference's Adam
    >>> u, _ = tx.update(g, tx.init(g))
    >>> [round(v, 3) for v in u.tolist()]
    [1.0, -1.0]

  References:
    Kingma and Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, 2015
  """
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
  nu_dtype = None if nu_dtype is None else jnp.dtype(nu_dtype)

  def init_fn(params):
    return ScaleByUncorrectedAdamState(
      mu=optax.tree.zeros_like(params, dtype=mu_dtype),
      nu=optax.tree.zeros_like(params, dtype=nu_dtype),
    )

  def update_fn(updates, state, params=None):
    del params
    # Moments are computed in float32 and stored in their own dtype, as torch does
    # (its "opmath"): a float16 g² would overflow already at |g| > 256.
    wide = lambda tree: jax.tree.map(
      lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), tree
    )
    g = wide(updates)
    mu = optax.tree.update_moment(g, wide(state.mu), b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(g, wide(state.nu), b2, 2)
    direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
    direction = optax.tree.cast_like(direction, updates)
    # No finiteness guard here: an element-wise select doubled this memory-bound step on
    # CPU. As with optax.adam, a NaN gradient makes its moments NaN; optax.apply_if_finite
    # skips such steps and keeps the whole state.
    mu = jax.tree.map(lambda new, old: new.astype(old.dtype), mu, state.mu)
    nu = jax.tree.map(lambda new, old: new.astype(old.dtype), nu, state.nu)
    return direction, ScaleByUncorrectedAdamState(mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def checked_reference_adam_hyperparams(b1=None, b2=None, eps=None) -> dict:
  """The reference Adam's ``b1``, ``b2``, ``eps`` (defaults 0.9, 0.999, 1e-6), checked."""
  b1 = 0.9 if b1 is None else b1
  b2 = 0.999 if b2 is None else b2
  eps = 1e-6 if eps is None else eps
  checks.check_decay("b1", b1)
  checks.check_decay("b2", b2)
  checks.check_number("eps", eps, 0.0, True, ">= 0")
  return dict(b1=b1, b2=b2, eps=eps)


def _one_minus_power(b: jax.typing.ArrayLike, t: jax.Array) -> jax.Array:
  """``1 - bᵗ`` as ``-expm1(t log b)``: float32 ``1 - 0.999**t`` loses digits early on."""
  if isinstance(b, (int, float)):
    log_b = jnp.float32(np.log(b))  # in float64, before rounding to float32
  else:
    log_b = jnp.log(jnp.asarray(b, jnp.float32))
  return -jnp.expm1(t * log_b)


def adam_step_size(
  count: jax.typing.ArrayLike, b1: jax.typing.ArrayLike, b2: jax.typing.ArrayLike
) -> jax.Array:
  r"""``√(1 − β₂ᵗ) / (1 − β₁ᵗ)`` for the ``count``-th step (``t = count ≥ 1``), in float32.

  .. math::
    η_t = \frac{\sqrt{1 - β_2^t}}{1 - β_1^t}

  Adam's bias correction folded into the step size (Sec. 2 of the paper), as the
  reference applies it; ``1 − βᵗ`` is computed as ``−expm1(t log β)`` so that float32
  keeps its digits on early steps.

  Args:
    count: ``t``, the number of the step (1 on the first update); an integer or array.
    b1: ``β₁``, the first moment's decay.
    b2: ``β₂``, the second moment's decay.

  Returns:
    A float32 scalar (or an array like ``count``).

  Example:
    >>> import fira_jax
    >>> round(float(fira_jax.adam_step_size(1, 0.9, 0.999)), 4)  # √0.001 / 0.1
    0.3162
    >>> round(float(fira_jax.adam_step_size(10_000, 0.9, 0.999)), 4)
    1.0

  References:
    Kingma and Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, 2015
  """
  t = jnp.asarray(count, jnp.float32)
  return jnp.sqrt(_one_minus_power(b2, t)) / _one_minus_power(b1, t)


class ScaleByAdamStepSizeState(NamedTuple):
  """State of :func:`scale_by_adam_step_size`: ``count``, the updates so far (int32)."""

  count: jax.Array  # shape=(), dtype=jnp.int32


def scale_by_adam_step_size(
  b1: jax.typing.ArrayLike = 0.9, b2: jax.typing.ArrayLike = 0.999
) -> optax.GradientTransformation:
  r"""Multiplies updates by Adam's bias-correction step size ``√(1 − β₂ᵗ) / (1 − β₁ᵗ)``.

  .. math::
    u_t ← \frac{\sqrt{1 - β_2^t}}{1 - β_1^t}\, u_t, \quad t = 1, 2, …

  Placed after :func:`scale_by_uncorrected_adam`, it makes the reference's
  bias-corrected Adam (see :func:`adam_step_size`).

  Args:
    b1: ``β₁``, the first moment's decay.
    b2: ``β₂``, the second moment's decay.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ScaleByAdamStepSizeState`.

  Example:
    >>> import jax.numpy as jnp, fira_jax
    >>> tx = fira_jax.scale_by_adam_step_size()
    >>> state = tx.init(jnp.ones(2))
    >>> u, state = tx.update(jnp.ones(2), state)  # t = 1: √0.001 / 0.1
    >>> [round(v, 4) for v in u.tolist()]
    [0.3162, 0.3162]
    >>> int(state.count)
    1

  References:
    Kingma and Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, 2015
  """

  def init_fn(params):
    del params
    return ScaleByAdamStepSizeState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_int32_increment(state.count)
    step_size = adam_step_size(count, b1, b2)
    updates = jax.tree.map(lambda u: (step_size * u).astype(u.dtype), updates)
    return updates, ScaleByAdamStepSizeState(count=count)

  return optax.GradientTransformation(init_fn, update_fn)
