"""User-facing optimizers, shaped like ``optax.adamw``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fira_jax import bases
from fira_jax import fira
from fira_jax import layout as layout_lib
from fira_jax import scaling as scaling_lib
from fira_jax import subspace

MaskOrFn = Any | Callable[[optax.Params], Any] | None


class DecayUpdatedWeightsState(NamedTuple):
  """State of :func:`add_decayed_weights_after_step` with a schedule: ``count`` (int32).

  The number of updates so far, at which the learning-rate schedule is evaluated.
  """

  count: jax.Array  # shape=(), dtype=jnp.int32


def add_decayed_weights_after_step(
  learning_rate: optax.ScalarOrSchedule,
  weight_decay: jax.typing.ArrayLike,
  mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  r"""Decoupled weight decay applied to the already-updated weights.

  .. math::
    w_{t+1} = (w_t + u_t)(1 - η_t λ), \quad\text{i.e.}\quad
    u_t ← u_t - η_t λ (w_t + u_t)

  This is what the reference (and ``transformers``' ``AdamW``) does: it decays
  the parameter after the Adam step. ``optax.add_decayed_weights`` decays the
  old weights instead; the two differ by ``η λ u_t``. Place it after
  ``scale_by_learning_rate``; ``learning_rate`` (η) is the un-negated rate.
  Its state is ``optax.EmptyState()`` for a constant rate and
  :class:`DecayUpdatedWeightsState` (a step count) for a schedule.

  Args:
    learning_rate: ``η``, a fixed learning rate or a schedule (positive, as given to
      ``optax.scale_by_learning_rate``).
    weight_decay: ``λ``, the decay rate.
    mask: a tree of booleans like the parameters (or a callable of the parameters
      returning one) choosing the leaves that are decayed; None: all (integer and
      boolean leaves are never decayed).

  Returns:
    An ``optax.GradientTransformation``; its ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp, fira_jax
    >>> tx = fira_jax.add_decayed_weights_after_step(learning_rate=0.5, weight_decay=0.5)
    >>> w = jnp.array([2.0])
    >>> u, _ = tx.update(jnp.array([-1.0]), tx.init(w), w)  # u: the step, already scaled
    >>> (w + u).tolist()  # (2 - 1) * (1 - 0.5 * 0.5)
    [0.75]

  References:
    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019
  """

  scheduled = callable(learning_rate)

  def init_fn(params):
    del params
    # A constant rate needs no step count (as optax.add_decayed_weights keeps none).
    if not scheduled:
      return optax.EmptyState()
    return DecayUpdatedWeightsState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("weight decay needs the parameters: call update(updates, state, params).")
    lr = learning_rate(state.count) if scheduled else learning_rate
    # Integer and boolean parameters are not trained, so not decayed either.
    updates = jax.tree.map(
      lambda u, p: (
        (u - lr * weight_decay * (p + u)).astype(u.dtype) if layout_lib.is_trainable(p) else u
      ),
      updates,
      params,
    )
    if scheduled:
      state = DecayUpdatedWeightsState(count=optax.safe_int32_increment(state.count))
    return updates, state

  tx = optax.GradientTransformation(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)


def fira_adamw(
  learning_rate: optax.ScalarOrSchedule,
  rank: int = 128,
  update_proj_gap: int = 200,
  scale: jax.typing.ArrayLike = 1.0,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-6,
  weight_decay: jax.typing.ArrayLike = 0.0,
  mask: MaskOrFn = None,
  *,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  norm_growth_limit: jax.typing.ArrayLike | None = 1.01,
  weight_dimension_numbers: layout_lib.DimensionNumbersOrFn = None,
  compressed_side: subspace.CompressedSide = "smaller",
  scaling: scaling_lib.Scaling = "column",
  formulation: fira.Formulation = "reference",
  projection: bases.Projection = "svd",
  projection_seed: int = 0,
  staggered_refresh: bool = False,
) -> optax.GradientTransformation:
  r"""Fira with AdamW: low-rank Adam state, full-rank updates.

  With default arguments this reproduces the reference ``FiraAdamW``
  (``fira`` 1.0.2) step for step:

  .. math::
    w_{t+1} = \left(w_t - η_t \frac{\sqrt{1-β_2^t}}{1-β_1^t}
      \left(α P_t N_t + S_t / λ_t\right)\right)(1 - η_t λ_{wd})

  where ``N_t`` is Adam (uncorrected moments, ``ε`` outside the square root)
  on the projected gradient and ``S_t`` the norm-scaled residual (see
  :func:`scale_by_fira`). Unprojected leaves (biases, norms, and whatever
  ``weight_dimension_numbers`` leaves out) get plain AdamW with the same
  ``ε`` and step-size bias correction.

  Args:
    learning_rate: a fixed learning rate or a schedule.
    rank: the subspace rank (static); the paper uses hidden/4 up to 1B.
    update_proj_gap: steps between projector refreshes (static); 200 in the paper.
    scale: ``α``; the paper uses 0.25 (0.0625 at 1B and 7B).
    b1: Adam's ``β₁``.
    b2: Adam's ``β₂``.
    eps: Adam's ``ε``, added outside the square root (1e-6 as the reference).
    weight_decay: decoupled weight decay, applied after the update as the
      reference does (see :func:`add_decayed_weights_after_step`).
    mask: a tree of booleans (or a callable of the params) choosing the leaves
      that are decayed.
    mu_dtype: optional dtype of Adam's first moment (default: the parameters').
    nu_dtype: optional dtype of Adam's second moment (default: the parameters',
      as the reference); ``jnp.float32`` is advisable for bfloat16 parameters.
    norm_growth_limit: ``γ`` of the norm-growth limiter, or None to disable.
    weight_dimension_numbers: which leaves are projected (default: every 2-D
      leaf as an ``(in, out)`` kernel, except Flax's ``bias``, ``scale`` and
      ``embedding`` leaves; leaves of three or more dimensions get a warning);
      see :class:`Subspace`. To follow the paper, project only attention and
      MLP kernels, e.g. with :func:`dimension_numbers_for_paths`.
    compressed_side: which side of each matrix is compressed; see
      :func:`scale_by_fira`.
    scaling: ``"column"`` or ``"matrix"`` norm-based scaling.
    formulation: ``"reference"`` or ``"paper"``; see :func:`scale_by_fira`.
    projection: ``"svd"`` (the reference), ``"randomized_svd"`` or
      ``"random"`` (no projector stored); see :func:`scale_by_fira`.
    projection_seed: seed of the randomized and random bases.
    staggered_refresh: spread projector refreshes evenly over the gap instead
      of refreshing every matrix on the same step; see :func:`scale_by_fira`.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, fira_jax
    >>> def loss(p): return jnp.sum((p['w'] @ jnp.ones(4) - 1.0) ** 2)
    >>> params = {'w': jnp.full((8, 4), 0.5)}
    >>> tx = fira_jax.fira_adamw(learning_rate=1e-2, rank=2, scale=0.25)
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < 8.0)
    True

  References:
    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024

    Kingma and Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, 2015

    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019
  """
  return _adamw_chain(
    fira.scale_by_fira(
      rank=rank,
      update_proj_gap=update_proj_gap,
      scale=scale,
      b1=b1,
      b2=b2,
      eps=eps,
      mu_dtype=mu_dtype,
      nu_dtype=nu_dtype,
      norm_growth_limit=norm_growth_limit,
      weight_dimension_numbers=weight_dimension_numbers,
      compressed_side=compressed_side,
      scaling=scaling,
      formulation=formulation,
      projection=projection,
      projection_seed=projection_seed,
      staggered_refresh=staggered_refresh,
    ),
    learning_rate,
    weight_decay,
    mask,
  )


def galore_adamw(
  learning_rate: optax.ScalarOrSchedule,
  rank: int = 128,
  update_proj_gap: int = 200,
  scale: jax.typing.ArrayLike = 1.0,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-6,
  weight_decay: jax.typing.ArrayLike = 0.0,
  mask: MaskOrFn = None,
  *,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  weight_dimension_numbers: layout_lib.DimensionNumbersOrFn = None,
  compressed_side: subspace.CompressedSide = "smaller",
  projection: bases.Projection = "svd",
  projection_seed: int = 0,
  staggered_refresh: bool = False,
) -> optax.GradientTransformation:
  r"""GaLore with AdamW: :func:`fira_adamw` with the residual path off.

  .. math::
    w_{t+1} = \left(w_t - η_t \frac{\sqrt{1-β_2^t}}{1-β_1^t}\, α P_t N_t\right)
      (1 - η_t λ_{wd})

  The baseline every Fira comparison needs: same projector (side, refresh,
  sign convention), same Adam, no residual. This is ``galore-torch``'s
  ``GaLoreAdamW`` with the reference's projection side; ``optax.contrib.galore``
  compresses the larger side instead (``compressed_side="larger"``) and uses
  ``optax.scale_by_adam``. The arguments are :func:`fira_adamw`'s, with the same
  defaults.

  Args:
    learning_rate: a fixed learning rate or a schedule.
    rank: the subspace rank (static).
    update_proj_gap: steps between projector refreshes (static).
    scale: ``α``, GaLore's scale of the update.
    b1: Adam's ``β₁``.
    b2: Adam's ``β₂``.
    eps: Adam's ``ε``, added outside the square root.
    weight_decay: decoupled weight decay, applied after the update.
    mask: the leaves that are decayed (a tree of booleans or a callable).
    mu_dtype: optional dtype of Adam's first moment.
    nu_dtype: optional dtype of Adam's second moment.
    weight_dimension_numbers: which leaves are projected (default: 2-D kernels).
    compressed_side: which side of each matrix is compressed.
    projection: ``"svd"``, ``"randomized_svd"`` or ``"random"``.
    projection_seed: seed of the randomized and random bases.
    staggered_refresh: spread projector refreshes evenly over the gap.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, fira_jax
    >>> def loss(p): return jnp.sum((p['w'] @ jnp.ones(4) - 1.0) ** 2)
    >>> params = {'w': jnp.full((8, 4), 0.5)}
    >>> tx = fira_jax.galore_adamw(learning_rate=1e-2, rank=2, scale=0.25)
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < 8.0)
    True
    >>> state[0].residual_norm  # no residual, so no limiter state
    {'w': MaskedNode()}

  References:
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, 2024

    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019
  """
  return _adamw_chain(
    fira.scale_by_fira(
      rank=rank,
      update_proj_gap=update_proj_gap,
      scale=scale,
      b1=b1,
      b2=b2,
      eps=eps,
      mu_dtype=mu_dtype,
      nu_dtype=nu_dtype,
      weight_dimension_numbers=weight_dimension_numbers,
      compressed_side=compressed_side,
      residual=False,
      projection=projection,
      projection_seed=projection_seed,
      staggered_refresh=staggered_refresh,
    ),
    learning_rate,
    weight_decay,
    mask,
  )


def _adamw_chain(core, learning_rate, weight_decay, mask) -> optax.GradientTransformation:
  """``core`` followed by the learning rate and the reference's decoupled weight decay."""
  return optax.chain(
    core,
    optax.scale_by_learning_rate(learning_rate),
    add_decayed_weights_after_step(learning_rate, weight_decay, mask),
  )
