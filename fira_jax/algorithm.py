r"""Fira's Algorithm 1 as a chain of optax transformations, one per idea.

.. code-block:: python

  optax.chain(
    subspace_projection(space),              # R = Pᵀ G     (P refreshed every T steps)
    in_subspace(optax.scale_by_adam(), space),  # N = ψ(R)     (Adam's state is rank r)
    norm_based_scaling(scale),               # S = φ ⊙ (G − α P R),  φ = ‖N‖ / ‖R‖
    limit_residual_growth(space),            # S ← S / λ     (‖S‖ grows ≤ γ per step)
    back_projection(scale),                  # u = α P N + S
  )

:func:`fira_chain` builds exactly this. Between the pieces, each projected leaf travels as a
:class:`SubspaceUpdate` that carries what the later pieces need (``G``, ``P``, ``R``, then
``N`` and ``S``); unprojected leaves travel as plain arrays and only the base optimizer
touches them. Every piece is usable on its own: drop :func:`norm_based_scaling` and
:func:`limit_residual_growth` for GaLore, or put any gradient-only transformation inside
:func:`in_subspace`.

Where the reference implementation (``fira`` 1.0.2, which produced the paper's numbers)
differs from the paper, ``formulation="reference"`` (the default) follows the code:

* the residual subtracts ``α`` times the in-subspace part, ``S = φ ⊙ (G − α P R)``, where
  Algorithm 1 writes ``(I − P Pᵀ) G``;
* the update is ``α P N + S``, where the paper writes ``α (P N + S)``;
* Adam's moments are not bias-corrected; the step size ``√(1 − β₂ᵗ) / (1 − β₁ᵗ)`` multiplies
  the whole update, residual included (:func:`fira_chain` appends it).

:func:`fira_jax.scale_by_fira` computes the same update fused, without forming ``S``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fira_jax import adam
from fira_jax import bases
from fira_jax import checks
from fira_jax import layout as layout_lib
from fira_jax import limiter
from fira_jax import refresh
from fira_jax import scaling as scaling_lib
from fira_jax import subspace as subspace_lib


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["gradient", "projector", "projected", "direction", "residual"],
  meta_fields=["layout"],
)
@dataclasses.dataclass(frozen=True)
class SubspaceUpdate:
  """One projected leaf between the pieces of :func:`fira_chain` (``(B, ·, ·)`` batches)."""

  gradient: jax.Array  # G, (B, reduction, output)
  projector: jax.Array  # P, (B, compressed, rank)
  projected: jax.Array  # R = Pᵀ G
  direction: jax.Array | None  # N = ψ(R), once the base optimizer ran
  residual: jax.Array | None  # S, once scaled
  layout: subspace_lib.SubspaceLayout


def _is_subspace_update(x) -> bool:
  return isinstance(x, SubspaceUpdate)


def _map_projected(fn, updates):
  """``fn`` on every :class:`SubspaceUpdate` of ``updates``; other leaves unchanged."""
  return jax.tree.map(
    lambda u: fn(u) if _is_subspace_update(u) else u, updates, is_leaf=_is_subspace_update
  )


class SubspaceProjectionState(NamedTuple):
  """State of :func:`subspace_projection`."""

  count: jax.Array  # shape=(), dtype=jnp.int32
  projector: optax.Updates  # batch_shape + (compressed, rank); MaskedNode if not stored


def subspace_projection(
  subspace: subspace_lib.Subspace,
  update_proj_gap: int = 200,
  projection: bases.Projection = "svd",
  projection_seed: int = 0,
  staggered_refresh: bool = False,
) -> optax.GradientTransformation:
  """``R = Pᵀ G``: projects each selected matrix onto its rank-r subspace.

  The basis ``P`` is refreshed from ``G`` on steps ``0, T, 2T, …`` (see
  :func:`fira_jax.scale_by_fira` for ``projection`` and ``staggered_refresh``).
  Projected leaves come out as :class:`SubspaceUpdate`; the others pass unchanged.
  """
  checks.check_positive_int("update_proj_gap", update_proj_gap)
  checks.check_choice("projection", projection, bases.PROJECTIONS)
  checks.check_seed("projection_seed", projection_seed)
  stores = projection != "random"

  def init_fn(params):
    layouts = subspace.layouts(params)
    new_projector = lambda x, lay: jnp.zeros(lay.projector_shape, x.dtype)
    return SubspaceProjectionState(
      count=jnp.zeros([], jnp.int32),
      projector=subspace_lib.per_projected_leaf(params, layouts, new_projector if stores else None),
    )

  def update_fn(updates, state, params=None):
    del params
    layouts = subspace.layouts(updates)
    leaves, treedef = jax.tree.flatten(updates)
    stored = treedef.flatten_up_to(state.projector)
    projected = [(i, lay) for i, lay in enumerate(layouts) if lay is not None]
    x = [lay.matrix.to_matrices(leaves[i]) for i, lay in projected]
    p = refresh.refresh_projectors(
      state.count,
      x,
      [lay.matrix.to_batched(stored[i]) for i, lay in projected] if stores else None,
      [lay for _, lay in projected],
      gap=update_proj_gap,
      projection=projection,
      seed=projection_seed,
      staggered=staggered_refresh,
    )
    for (i, lay), xj, pj in zip(projected, x, p, strict=True):
      r = subspace_lib.project(xj, pj, lay.compressed)
      leaves[i] = SubspaceUpdate(xj, pj, r, None, None, lay)
      if stores:
        stored[i] = lay.matrix.from_batched(pj)
    new_state = SubspaceProjectionState(
      optax.safe_int32_increment(state.count), treedef.unflatten(stored)
    )
    return treedef.unflatten(leaves), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def in_subspace(
  inner: optax.GradientTransformation, subspace: subspace_lib.Subspace
) -> optax.GradientTransformation:
  """``N = ψ(R)``: runs the gradient-only ``inner`` on the low-rank matrices.

  ``inner`` (e.g. ``optax.scale_by_adam()``) sees each projected leaf as its
  ``batch_shape + low_rank_shape`` matrices ``R`` (so its state is rank r), and the
  unprojected leaves at full shape; it is not given ``params``.
  """

  def init_fn(params):
    return inner.init(subspace_lib.low_rank_inputs(params, subspace.layouts(params)))

  def update_fn(updates, state, params=None):
    del params
    nodes, treedef = jax.tree.flatten(updates, is_leaf=_is_subspace_update)
    inputs = [
      u.layout.matrix.from_batched(u.projected)
      if _is_subspace_update(u)
      else (u if layout_lib.is_trainable(u) else optax.MaskedNode())
      for u in nodes
    ]
    outputs, state = inner.update(treedef.unflatten(inputs), state, None)
    outputs = treedef.flatten_up_to(outputs)
    new_nodes = [
      dataclasses.replace(u, direction=u.layout.matrix.to_batched(n))
      if _is_subspace_update(u)
      else (n if layout_lib.is_trainable(u) else jnp.zeros_like(u))
      for u, n in zip(nodes, outputs, strict=True)
    ]
    return treedef.unflatten(new_nodes), state

  return optax.GradientTransformation(init_fn, update_fn)


def _residual_weight(scale, formulation) -> tuple:
  """``(a, c)``: the residual is ``φ ⊙ (G − a P R)`` and enters the update as ``c S``."""
  return (1.0, scale) if formulation == "paper" else (scale, 1.0)


def norm_based_scaling(
  scale: jax.typing.ArrayLike = 1.0,
  scaling: scaling_lib.Scaling = "column",
  formulation: str = "reference",
) -> optax.GradientTransformation:
  """``S = φ ⊙ (G − α P R)`` with ``φ = ‖N‖ / (‖R‖ + 10⁻⁸)`` per channel (or matrix).

  The base optimizer's effect inside the subspace, the ratio of its output's norm to its
  input's, stands in for its effect on the residual outside it (Sec. 4.1). With
  ``formulation="paper"`` the residual is ``φ ⊙ (I − P Pᵀ) G``.
  """
  checks.check_choice("scaling", scaling, scaling_lib.SCALINGS)

  def scaled_residual(u: SubspaceUpdate) -> SubspaceUpdate:
    # The reference subtracts α P R; Algorithm 1 subtracts the whole in-subspace part P R.
    a, _ = _residual_weight(scale, formulation)
    phi = scaling_lib.norm_based_scaling_factor(
      u.direction, u.projected, u.layout.rank_axis, scaling
    )
    back = subspace_lib.project_back(u.projected, u.projector, u.layout.compressed)
    s = phi * (u.gradient.astype(jnp.float32) - a * back.astype(jnp.float32))
    return dataclasses.replace(u, residual=s)

  return optax.stateless(lambda updates, params=None: _map_projected(scaled_residual, updates))


class LimitResidualGrowthState(NamedTuple):
  """State of :func:`limit_residual_growth`."""

  count: jax.Array  # shape=(), dtype=jnp.int32
  residual_norm: optax.Updates  # float32, batch_shape: ‖S_{t-1}‖ per matrix


def limit_residual_growth(
  subspace: subspace_lib.Subspace, growth_limit: jax.typing.ArrayLike = 1.01
) -> optax.GradientTransformation:
  """``S ← S / λ``: each matrix's residual norm grows at most ``γ`` per step (Sec. 4.2).

  See :func:`fira_jax.clip_by_norm_growth` for ``λ``; this one limits the residuals of
  :class:`SubspaceUpdate` leaves, one norm per matrix.
  """
  checks.check_number("growth_limit", growth_limit, 1.0, True, ">= 1")

  def init_fn(params):
    new_norm = lambda x, lay: jnp.zeros(lay.batch_shape, jnp.float32)
    return LimitResidualGrowthState(
      count=jnp.zeros([], jnp.int32),
      residual_norm=subspace_lib.per_projected_leaf(params, subspace.layouts(params), new_norm),
    )

  def update_fn(updates, state, params=None):
    del params
    nodes, treedef = jax.tree.flatten(updates, is_leaf=_is_subspace_update)
    norms = treedef.flatten_up_to(state.residual_norm)
    for i, u in enumerate(nodes):
      if _is_subspace_update(u):
        s, norm = limiter.limit_norm_growth(
          u.residual, jnp.reshape(norms[i], (-1,)), growth_limit, state.count == 0
        )
        nodes[i] = dataclasses.replace(u, residual=s)
        norms[i] = jnp.reshape(norm, u.layout.batch_shape)
    new_state = LimitResidualGrowthState(
      optax.safe_int32_increment(state.count), treedef.unflatten(norms)
    )
    return treedef.unflatten(nodes), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def back_projection(
  scale: jax.typing.ArrayLike = 1.0, formulation: str = "reference"
) -> optax.GradientTransformation:
  """``u = α P N + S``: back to the parameter's shape (``α P N`` alone without a residual).

  With ``formulation="paper"``: ``α (P N + S)``.
  """

  def full_update(u: SubspaceUpdate) -> jax.Array:
    update = scale * subspace_lib.project_back(u.direction, u.projector, u.layout.compressed)
    if u.residual is not None:
      # The reference adds S as it is; the paper multiplies it by α too.
      _, c = _residual_weight(scale, formulation)
      update = update + c * u.residual
    return u.layout.matrix.from_matrices(update.astype(u.gradient.dtype))

  return optax.stateless(lambda updates, params=None: _map_projected(full_update, updates))


def fira_chain(
  rank: int = 128,
  update_proj_gap: int = 200,
  scale: jax.typing.ArrayLike = 1.0,
  base_optimizer: optax.GradientTransformation | None = None,
  *,
  norm_growth_limit: jax.typing.ArrayLike | None = 1.01,
  weight_dimension_numbers: layout_lib.DimensionNumbersOrFn = None,
  compressed_side: subspace_lib.CompressedSide = "smaller",
  scaling: scaling_lib.Scaling = "column",
  formulation: str = "reference",
  projection: bases.Projection = "svd",
  projection_seed: int = 0,
  staggered_refresh: bool = False,
) -> optax.GradientTransformation:
  r"""Fira's learning-rate-free update as the chain of its pieces (Algorithm 1).

  .. math::
    R_t = P_t^\top G_t, \quad N_t = ψ(R_t), \quad
    S_t = φ_t \odot (G_t - α P_t R_t), \quad
    u_t = α P_t N_t + S_t / λ_t

  The same update as :func:`fira_jax.scale_by_fira` (which fuses it into two matrix
  products per matrix and keeps one state for the whole); use this one to read, modify or
  recombine the algorithm. Arguments as :func:`fira_jax.scale_by_fira`; the default
  ``base_optimizer`` is the reference's Adam (:func:`fira_jax.scale_by_uncorrected_adam`
  with its defaults, its step size :func:`fira_jax.scale_by_adam_step_size` applied last,
  as the reference applies it to the whole update); pass ``base_optimizer`` for any other.

  Example:
    >>> import jax.numpy as jnp, optax, fira_jax
    >>> params = {'w': jnp.ones((8, 4)), 'b': jnp.zeros((4,))}
    >>> tx = optax.chain(fira_jax.fira_chain(rank=2, scale=0.25), optax.sgd(1e-2))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones((8, 4)), 'b': jnp.ones(4)}, state)
    >>> updates['w'].shape
    (8, 4)

  References:
    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024
  """
  space = checks.checked_subspace(rank, weight_dimension_numbers, compressed_side)
  checks.check_number("scale", scale, 0.0, False, "positive")
  step_size = []
  if base_optimizer is None:
    base_optimizer = adam.scale_by_uncorrected_adam()
    step_size = [adam.scale_by_adam_step_size()]
  limit = [] if norm_growth_limit is None else [limit_residual_growth(space, norm_growth_limit)]
  return optax.chain(
    subspace_projection(space, update_proj_gap, projection, projection_seed, staggered_refresh),
    in_subspace(base_optimizer, space),
    norm_based_scaling(scale, scaling, formulation),
    *limit,
    back_projection(scale, formulation),
    *step_size,
  )
