"""Fira: low-rank optimizer state, full-rank update (Chen et al., 2024, Algorithm 1).

For each projected matrix ``G`` with projector ``P`` (refreshed from the SVD of
``G`` every ``update_proj_gap`` steps), the reference implementation computes::

  R = Pᵀ G                              # project into the rank-r subspace
  N = ψ(R)                              # base optimizer (Adam) in the subspace
  φ = ‖N‖ / (‖R‖ + 1e-8)                # norm-based scaling, per column
  S = φ ⊙ (G − α P R)                   # residual outside the subspace (*)
  S = S / λ(‖S‖, ‖S_prev‖, γ)           # norm-growth limiter
  update = α P N + S                    # (**)

(*) the paper's Algorithm 1 writes ``(I − P Pᵀ) G``: the reference subtracts
only ``α`` times the in-subspace part. (**) the paper writes ``α (P N + S)``:
the reference does not multiply ``S`` by ``α``. ``formulation="paper"`` gives
the paper's version of both.
"""

from __future__ import annotations

import numbers
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fira_jax import adam
from fira_jax import limiter
from fira_jax import projection
from fira_jax import scaling as scaling_lib

Formulation = Literal["reference", "paper"]
FORMULATIONS = ("reference", "paper")


class FiraState(NamedTuple):
  """State of :func:`scale_by_fira`.

  Leaves that are not projected hold ``optax.MaskedNode()`` in ``projector``
  and ``residual_norm``; their base-optimizer state has the parameter's shape.
  """

  count: jax.Array  # shape=(), dtype=jnp.int32
  base_optimizer_state: optax.OptState  # on low-rank shapes for projected leaves
  projector: optax.Updates  # batch_shape + (compressed, rank), the param dtype
  residual_norm: optax.Updates  # float32, batch_shape: the limiter's ‖S_{t-1}‖


def check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(
      f"{name} must be a Python int (it fixes shapes or the schedule and is"
      f" static), got {value!r} of type {type(value).__name__}. With"
      " optax.inject_hyperparams, pass static_args=('rank', 'update_proj_gap')."
    )
  if value <= 0:
    raise ValueError(f"{name} must be positive, got {value}.")


def check_number(name: str, value, low: float, low_inclusive: bool, meaning: str) -> None:
  """Checks a concrete hyperparameter; traced or scheduled values pass through."""
  if isinstance(value, numbers.Real) and not isinstance(value, bool):
    if value < low or (value == low and not low_inclusive):
      raise ValueError(f"{name} must be {meaning}, got {value}.")


def check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def scale_by_fira(
  rank: int = 128,
  update_proj_gap: int = 200,
  scale: jax.typing.ArrayLike = 1.0,
  base_optimizer: optax.GradientTransformation | None = None,
  *,
  b1: jax.typing.ArrayLike | None = None,
  b2: jax.typing.ArrayLike | None = None,
  eps: jax.typing.ArrayLike | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  norm_growth_limit: jax.typing.ArrayLike | None = 1.01,
  weight_dimension_numbers: projection.DimensionNumbersOrFn = None,
  compressed_side: projection.CompressedSide = "smaller",
  scaling: scaling_lib.Scaling = "column",
  formulation: Formulation = "reference",
  residual: bool = True,
) -> optax.GradientTransformation:
  r"""Fira's learning-rate-free update: subspace optimizer plus scaled residual.

  .. math::
    R_t = P_t^\top G_t, \quad N_t = ψ(R_t), \quad
    φ_t = \frac{\lVert N_t \rVert}{\lVert R_t \rVert + 10^{-8}}, \quad
    S_t = φ_t \odot (G_t - α P_t R_t), \quad
    u_t = α P_t N_t + S_t / λ_t

  with ``P_t`` the top-``rank`` singular vectors of ``G_t`` on the compressed
  side, recomputed on steps 0, T, 2T, … (moments and limiter state persist),
  and ``λ_t`` the norm-growth limiter (see :func:`clip_by_norm_growth`).

  With the default base optimizer (Adam as the reference runs it: uncorrected
  moments, ``ε`` outside the square root) the whole update, residual included,
  is multiplied by the step size ``√(1 − β₂ᵗ) / (1 − β₁ᵗ)`` after the limiter,
  as in the reference. Parameters that are not projected go through the same
  base optimizer at full shape, so one transformation covers a whole model.

  Args:
    rank: the subspace rank ``r`` (static). Clipped to each matrix's smaller
      dimension.
    update_proj_gap: ``T``, steps between projector refreshes (static).
    scale: ``α``. The reference multiplies only the subspace term by it.
    base_optimizer: a gradient-only transformation run in the subspace (and on
      unprojected leaves at full shape), e.g. ``optax.scale_by_adam()``. It
      must not need ``params``. Default: :func:`scale_by_uncorrected_adam`
      followed by Adam's step-size bias correction (the reference).
    b1: the default Adam's ``β₁`` (0.9); only with ``base_optimizer=None``.
    b2: the default Adam's ``β₂`` (0.999); only with ``base_optimizer=None``.
    eps: the default Adam's ``ε`` (1e-6); only with ``base_optimizer=None``.
    mu_dtype: the default Adam's first-moment dtype; only with
      ``base_optimizer=None``.
    norm_growth_limit: ``γ``, the largest growth of ``‖S‖`` per step (1.01 in
      the reference), or None for no limiter.
    weight_dimension_numbers: which leaves are projected and which axes form
      their matrices: None (every 2-D leaf, as ``(in, out)``), one
      :class:`FiraDimensionNumbers` (every leaf with ≥ 2 dimensions), a
      prefix tree of them and None, or a callable of the updates returning
      one of those. Static.
    compressed_side: ``"smaller"`` (the reference: the smaller side, the
      input side of square matrices), ``"larger"`` (``optax.contrib.galore``),
      ``"reduction"`` or ``"output"``.
    scaling: ``"column"`` (the reference: one factor per channel of the kept
      side) or ``"matrix"`` (one factor per matrix, the paper's ablation).
    formulation: ``"reference"`` (the code that produced the paper's numbers)
      or ``"paper"`` (Algorithm 1: residual ``(I − P Pᵀ) G``, ``α`` on both
      terms).
    residual: False turns Fira's residual path off, which leaves GaLore.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`FiraState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, fira_jax
    >>> params = {'w': jnp.ones((8, 4)), 'b': jnp.zeros((4,))}
    >>> tx = optax.chain(fira_jax.scale_by_fira(rank=2, scale=0.25),
    ...                  optax.scale_by_learning_rate(1e-2))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state)
    >>> state[0].projector['w'].shape  # (in, out) = (8, 4): compress the 4 outputs
    (4, 2)

  .. note::
    The SVD runs under ``lax.cond``: only refresh steps pay for it.

  .. warning::
    With ``optax.inject_hyperparams``, pass
    ``static_args=('rank', 'update_proj_gap')``.

  References:
    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024

    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, 2024
  """
  check_positive_int("rank", rank)
  check_positive_int("update_proj_gap", update_proj_gap)
  check_number("scale", scale, 0.0, False, "positive")
  check_choice("compressed_side", compressed_side, projection.COMPRESSED_SIDES)
  check_choice("scaling", scaling, scaling_lib.SCALINGS)
  check_choice("formulation", formulation, FORMULATIONS)
  if norm_growth_limit is not None:
    check_number("norm_growth_limit", norm_growth_limit, 1.0, True, ">= 1 (or None)")
  if base_optimizer is None:
    b1 = 0.9 if b1 is None else b1
    b2 = 0.999 if b2 is None else b2
    eps = 1e-6 if eps is None else eps
    base_optimizer = adam.scale_by_uncorrected_adam(b1, b2, eps, mu_dtype)
    correct_step_size = True
  else:
    given = [
      n for n, v in (("b1", b1), ("b2", b2), ("eps", eps), ("mu_dtype", mu_dtype)) if v is not None
    ]
    if given:
      raise ValueError(
        f"{', '.join(given)} configure the default Adam and cannot be combined"
        " with base_optimizer; configure the base optimizer instead."
      )
    correct_step_size = False
  use_limiter = residual and norm_growth_limit is not None

  def layouts_of(tree):
    return projection.layouts_for(tree, weight_dimension_numbers, rank, compressed_side)

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    layouts = layouts_of(params)
    proxies = [
      x if layout is None else jnp.zeros(layout.low_rank_shape, jnp.asarray(x).dtype)
      for x, layout in zip(leaves, layouts, strict=True)
    ]
    projectors = projection.masked_like(
      leaves, layouts, lambda x, lay: jnp.zeros(lay.projector_shape, jnp.asarray(x).dtype)
    )
    norms = projection.masked_like(
      leaves,
      layouts,
      lambda x, lay: jnp.zeros(lay.batch_shape, jnp.float32) if use_limiter else optax.MaskedNode(),
    )
    return FiraState(
      count=jnp.zeros([], jnp.int32),
      base_optimizer_state=base_optimizer.init(treedef.unflatten(proxies)),
      projector=treedef.unflatten(projectors),
      residual_norm=treedef.unflatten(norms),
    )

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    layouts = layouts_of(updates)
    projected = [i for i, layout in enumerate(layouts) if layout is not None]
    stored_projectors = treedef.flatten_up_to(state.projector)
    stored_norms = treedef.flatten_up_to(state.residual_norm)
    matrices = {i: layouts[i].to_matrices(leaves[i]) for i in projected}

    # Refresh every projector on steps 0, T, 2T, ... (one cond for the tree).
    def refreshed():
      return [
        projection.svd_projector(matrices[i], layouts[i].rank, layouts[i].compressed_axis)
        for i in projected
      ]

    def kept():
      return [layouts[i].to_batched(stored_projectors[i]) for i in projected]

    new_projectors = dict(
      zip(projected, jax.lax.cond(state.count % update_proj_gap == 0, refreshed, kept), strict=True)
    )

    low_rank = {
      i: projection.project(matrices[i], new_projectors[i], layouts[i].compressed_axis)
      for i in projected
    }
    base_inputs = [
      layouts[i].from_batched(low_rank[i]) if i in low_rank else g for i, g in enumerate(leaves)
    ]
    base_outputs, base_state = base_optimizer.update(
      treedef.unflatten(base_inputs), state.base_optimizer_state, None
    )
    base_outputs = treedef.flatten_up_to(base_outputs)

    is_first_step = state.count == 0
    new_leaves = list(base_outputs)
    new_norms = list(stored_norms)
    for i in projected:
      layout, p, r, x = layouts[i], new_projectors[i], low_rank[i], matrices[i]
      n = layout.to_batched(base_outputs[i])
      update = projection.project_back(n, p, layout.compressed_axis)
      if residual:
        phi = scaling_lib.norm_based_scaling_factor(
          n, r, projection.rank_axis(layout.compressed_axis), scaling
        )
        in_subspace = projection.project_back(r, p, layout.compressed_axis)
        alpha = scale if formulation == "reference" else 1.0
        s = (phi * (x - alpha * in_subspace)).astype(x.dtype)
        if use_limiter:
          s, norm = limiter.limit_norm_growth(
            s, jnp.reshape(stored_norms[i], (-1,)), norm_growth_limit, is_first_step
          )
          new_norms[i] = jnp.reshape(norm, layout.batch_shape)
        update = scale * update + s if formulation == "reference" else scale * (update + s)
      else:
        update = scale * update
      new_leaves[i] = layout.from_matrices(update.astype(x.dtype))

    count = optax.safe_int32_increment(state.count)
    if correct_step_size:
      step_size = adam.adam_step_size(count, b1, b2)
      new_leaves = [(step_size * u).astype(u.dtype) for u in new_leaves]
    new_state = FiraState(
      count=count,
      base_optimizer_state=base_state,
      projector=treedef.unflatten(
        [
          layouts[i].from_batched(new_projectors[i])
          if i in new_projectors
          else stored_projectors[i]
          for i in range(len(leaves))
        ]
      ),
      residual_norm=treedef.unflatten(new_norms),
    )
    return treedef.unflatten(new_leaves), new_state

  return optax.GradientTransformation(init_fn, update_fn)
