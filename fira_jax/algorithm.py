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
:func:`limit_residual_growth` for GaLore, or put another transformation inside
:func:`in_subspace` (one that needs of ``params`` only their shape, such as Adafactor's
``optax.scale_by_factored_rms``, works too).

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
from fira_jax import flax_metadata
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
  """One projected leaf between the pieces of :func:`fira_chain` (``(B, ·, ·)`` batches).

  :func:`subspace_projection` makes one from each projected gradient leaf, the later
  pieces fill in its fields, and :func:`back_projection` turns it back into an array of
  the leaf's shape. A JAX pytree: the arrays are its children, ``layout`` is static.

  Its fields:

  * ``gradient``: ``G``, the leaf as ``(B, reduction, output)`` matrices;
  * ``projector``: ``P``, ``(B, compressed, rank)``;
  * ``projected``: ``R = Pᵀ G`` (``G P`` when the output side is compressed);
  * ``direction``: ``N = ψ(R)``, on ``R``'s shape; None before :func:`in_subspace`;
  * ``residual``: ``S``, float32, on ``G``'s shape; None before
    :func:`norm_based_scaling`;
  * ``layout``: the leaf's :class:`SubspaceLayout`.

  Example:
    >>> import jax.numpy as jnp, fira_jax
    >>> tx = fira_jax.subspace_projection(fira_jax.Subspace(rank=2))
    >>> g = {'w': jnp.ones((8, 4))}
    >>> out, _ = tx.update(g, tx.init(g))
    >>> u = out['w']
    >>> u.gradient.shape, u.projector.shape, u.projected.shape, u.direction
    ((1, 8, 4), (1, 4, 2), (1, 8, 2), None)
    >>> u.layout.compressed  # the smaller side, the 4 outputs
    'output'
  """

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
  """State of :func:`subspace_projection`: ``count`` (int32) and the bases ``projector``.

  ``projector`` holds each projected leaf's ``P``, ``batch_shape + (compressed, rank)``,
  and ``optax.MaskedNode()`` at the other leaves (at every leaf with
  ``projection="random"``, whose basis is regenerated rather than stored).
  """

  count: jax.Array  # shape=(), dtype=jnp.int32
  projector: optax.Updates  # batch_shape + (compressed, rank); MaskedNode if not stored


def subspace_projection(
  subspace: subspace_lib.Subspace,
  update_proj_gap: int = 200,
  projection: bases.Projection = "svd",
  projection_seed: int = 0,
  staggered_refresh: bool = False,
) -> optax.GradientTransformation:
  r"""``R = Pᵀ G``: projects each selected matrix onto its rank-r subspace.

  .. math::
    R_t = P_t^\top G_t, \quad
    P_t = \begin{cases} \text{the top-}r\text{ singular vectors of } G_t
      & t \equiv 0 \pmod T \\ P_{t-1} & \text{otherwise} \end{cases}

  (``R = G P`` when the output side is compressed). The basis ``P`` is refreshed from
  ``G`` on steps ``0, T, 2T, …`` (see :func:`fira_jax.scale_by_fira` for ``projection``
  and ``staggered_refresh``). Projected leaves come out as :class:`SubspaceUpdate`; the
  others pass unchanged.

  Args:
    subspace: the :class:`Subspace`: which leaves are projected, how, to which rank.
    update_proj_gap: ``T``, steps between projector refreshes (static).
    projection: ``"svd"``, ``"randomized_svd"`` or ``"random"`` (see
      :data:`PROJECTIONS`).
    projection_seed: the seed of the randomized and random bases (an int).
    staggered_refresh: spread the refreshes evenly over the gap instead of refreshing
      every matrix on the same step.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`SubspaceProjectionState`.

  Example:
    >>> import jax.numpy as jnp, fira_jax
    >>> tx = fira_jax.subspace_projection(fira_jax.Subspace(rank=2))
    >>> params = {'w': jnp.ones((8, 4)), 'b': jnp.zeros(4)}
    >>> grads = {'w': jnp.arange(32.0).reshape(8, 4) % 5, 'b': jnp.ones(4)}
    >>> out, state = tx.update(grads, tx.init(params))
    >>> out['w'].projected.shape, out['b'].shape  # R = G P, (B, 8, rank); b as it is
    ((1, 8, 2), (4,))
    >>> p = state.projector['w']  # (4, 2): the top-2 right singular vectors of G
    >>> bool(jnp.allclose(p.T @ p, jnp.eye(2), atol=1e-5))
    True

  References:
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, 2024

    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024
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
    projected, x, p, r = refresh.project_leaves(
      state.count,
      leaves,
      stored if stores else None,
      layouts,
      gap=update_proj_gap,
      projection=projection,
      seed=projection_seed,
      staggered=staggered_refresh,
    )
    for (i, lay), xj, pj, rj in zip(projected, x, p, r, strict=True):
      leaves[i] = SubspaceUpdate(xj, pj, rj, None, None, lay)
      if stores:
        stored[i] = lay.matrix.from_batched(pj)
    new_state = SubspaceProjectionState(
      optax.safe_int32_increment(state.count), treedef.unflatten(stored)
    )
    return treedef.unflatten(leaves), new_state

  return flax_metadata.keep_flax_metadata(
    optax.GradientTransformation(init_fn, update_fn), _is_subspace_update
  )


def in_subspace(
  inner: optax.GradientTransformation, subspace: subspace_lib.Subspace
) -> optax.GradientTransformation:
  r"""``N = ψ(R)``: runs ``inner`` on the low-rank matrices.

  .. math::
    N_t = ψ(R_t)

  ``inner`` (``ψ``, e.g. ``optax.scale_by_adam()``) sees each projected leaf as its
  ``batch_shape + low_rank_shape`` matrices ``R`` (so its state is rank r), and the
  unprojected leaves at full shape.

  When ``params`` are given, ``inner`` gets them too, with each projected leaf replaced by
  zeros of ``R``'s shape and the parameter's dtype: the parameter has no rank-r
  counterpart, and what transformations such as ``optax.scale_by_factored_rms``
  (Adafactor's factored second moment) read from ``params`` is their shape and dtype,
  which must be the subspace's for their state to be rank r. Unprojected leaves get their
  parameters as they are. Without ``params``, ``inner`` gets None.

  Args:
    inner: an ``optax.GradientTransformation`` that reads of ``params`` at most their
      shape and dtype.
    subspace: the :class:`Subspace` of the :func:`subspace_projection` before it.

  Returns:
    An ``optax.GradientTransformation`` whose state is ``inner``'s. It sets each
    :class:`SubspaceUpdate`'s ``direction``; unprojected leaves become ``inner``'s
    output (zeros for integer and boolean leaves).

  Example:
    >>> import jax.numpy as jnp, optax, fira_jax
    >>> space = fira_jax.Subspace(rank=2)
    >>> tx = optax.chain(fira_jax.subspace_projection(space),
    ...                  fira_jax.in_subspace(optax.scale_by_adam(), space))
    >>> params = {'w': jnp.ones((8, 4)), 'b': jnp.zeros(4)}
    >>> state = tx.init(params)
    >>> state[1].mu['w'].shape, state[1].mu['b'].shape  # Adam's moments: rank 2 for w
    ((8, 2), (4,))
    >>> out, state = tx.update({'w': jnp.ones((8, 4)), 'b': jnp.ones(4)}, state)
    >>> out['w'].direction.shape
    (1, 8, 2)

  .. warning::
    A transformation that reads parameter *values* (``optax.add_decayed_weights``,
    Adafactor's ``multiply_by_parameter_scale``) sees zeros in the subspace: apply it
    outside :func:`in_subspace`, on the full-rank update.

  References:
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, 2024
  """

  def init_fn(params):
    return inner.init(subspace_lib.low_rank_inputs(params, subspace.layouts(params)))

  def update_fn(updates, state, params=None):
    nodes, treedef = jax.tree.flatten(updates, is_leaf=_is_subspace_update)
    inputs = [
      u.layout.matrix.from_batched(u.projected)
      if _is_subspace_update(u)
      else (u if layout_lib.is_trainable(u) else optax.MaskedNode())
      for u in nodes
    ]
    low_rank_params = None
    if params is not None:
      # Stand-ins with the subspace's shape and the parameter's dtype (see the docstring).
      low_rank_params = treedef.unflatten(
        [
          jnp.zeros(r.shape, p.dtype)
          if _is_subspace_update(u)
          else (p if layout_lib.is_trainable(u) else optax.MaskedNode())
          for u, r, p in zip(nodes, inputs, treedef.flatten_up_to(params), strict=True)
        ]
      )
    outputs, state = inner.update(treedef.unflatten(inputs), state, low_rank_params)
    outputs = treedef.flatten_up_to(outputs)
    new_nodes = [
      dataclasses.replace(u, direction=u.layout.matrix.to_batched(n))
      if _is_subspace_update(u)
      else (n if layout_lib.is_trainable(u) else jnp.zeros_like(u))
      for u, n in zip(nodes, outputs, strict=True)
    ]
    return treedef.unflatten(new_nodes), state

  return flax_metadata.keep_flax_metadata(
    optax.GradientTransformation(init_fn, update_fn), _is_subspace_update
  )


def _residual_weight(scale, formulation) -> tuple:
  """``(a, c)``: the residual is ``φ ⊙ (G − a P R)`` and enters the update as ``c S``."""
  return (1.0, scale) if formulation == "paper" else (scale, 1.0)


def norm_based_scaling(
  scale: jax.typing.ArrayLike = 1.0,
  scaling: scaling_lib.Scaling = "column",
  formulation: str = "reference",
) -> optax.GradientTransformation:
  r"""``S = φ ⊙ (G − α P R)`` with ``φ = ‖N‖ / (‖R‖ + 10⁻⁸)`` per channel (or matrix).

  .. math::
    φ_j = \frac{\lVert N_{:,j} \rVert}{\lVert R_{:,j} \rVert + 10^{-8}}, \quad
    S = φ \odot (G - α P R)

  with ``j`` a channel of the kept side (``scaling="column"``) or Frobenius norms
  (``"matrix"``). The base optimizer's effect inside the subspace, the ratio of its
  output's norm to its input's, stands in for its effect on the residual outside it
  (Sec. 4.1). With ``formulation="paper"`` the residual is ``φ ⊙ (I − P Pᵀ) G``.

  Args:
    scale: ``α``, as given to :func:`back_projection`.
    scaling: ``"column"`` or ``"matrix"`` (see :data:`SCALINGS`).
    formulation: ``"reference"`` or ``"paper"`` (see :data:`FORMULATIONS`).

  Returns:
    A stateless ``optax.GradientTransformation`` that sets each
    :class:`SubspaceUpdate`'s ``residual`` (its ``direction`` must be set).

  Example:
    >>> import jax.numpy as jnp, optax, fira_jax
    >>> space = fira_jax.Subspace(rank=2)
    >>> tx = optax.chain(fira_jax.subspace_projection(space),
    ...                  fira_jax.in_subspace(optax.scale_by_adam(), space),
    ...                  fira_jax.norm_based_scaling(scale=1.0))
    >>> g = {'w': jnp.arange(32.0).reshape(8, 4) % 5}
    >>> out, _ = tx.update(g, tx.init(g))
    >>> s, p = out['w'].residual, out['w'].projector
    >>> s.shape, s.dtype
    ((1, 8, 4), dtype('float32'))
    >>> bool(jnp.abs(s @ p).max() < 1e-5)  # α = 1: S lies outside the subspace
    True

  References:
    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024
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

  piece = optax.stateless(lambda updates, params=None: _map_projected(scaled_residual, updates))
  return flax_metadata.keep_flax_metadata(piece, _is_subspace_update)


class LimitResidualGrowthState(NamedTuple):
  """State of :func:`limit_residual_growth`: ``count`` (int32) and ``residual_norm``.

  ``residual_norm`` holds each projected leaf's ``‖S_{t−1}‖`` after limiting, one per
  matrix (float32, ``batch_shape``), and ``optax.MaskedNode()`` at the other leaves.
  """

  count: jax.Array  # shape=(), dtype=jnp.int32
  residual_norm: optax.Updates  # float32, batch_shape: ‖S_{t-1}‖ per matrix


def limit_residual_growth(
  subspace: subspace_lib.Subspace, growth_limit: jax.typing.ArrayLike = 1.01
) -> optax.GradientTransformation:
  r"""``S ← S / λ``: each matrix's residual norm grows at most ``γ`` per step (Sec. 4.2).

  .. math::
    λ_t = \max\left(\frac{\lVert S_t \rVert}{\lVert S_{t-1} \rVert + 10^{-8}}, γ\right)
      / γ, \quad S_t ← S_t / λ_t

  See :func:`fira_jax.clip_by_norm_growth` for ``λ``; this one limits the residuals of
  :class:`SubspaceUpdate` leaves, one norm per matrix. On the first step the norm is
  only recorded.

  Args:
    subspace: the :class:`Subspace` of the :func:`subspace_projection` before it.
    growth_limit: ``γ ≥ 1``; the reference uses 1.01.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`LimitResidualGrowthState`.

  Example:
    >>> import jax.numpy as jnp, optax, fira_jax
    >>> space = fira_jax.Subspace(rank=2)
    >>> tx = optax.chain(fira_jax.subspace_projection(space),
    ...                  fira_jax.in_subspace(optax.identity(), space),
    ...                  fira_jax.norm_based_scaling(),
    ...                  fira_jax.limit_residual_growth(space, growth_limit=1.01))
    >>> g = jnp.arange(32.0).reshape(8, 4) % 5
    >>> state = tx.init({'w': g})
    >>> first, state = tx.update({'w': g}, state)  # recorded, not limited
    >>> second, state = tx.update({'w': 10 * g}, state)  # ten times larger: limited
    >>> norm = lambda out: jnp.linalg.norm(out['w'].residual)
    >>> round(float(norm(second) / norm(first)), 4)
    1.01

  References:
    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024
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

  return flax_metadata.keep_flax_metadata(
    optax.GradientTransformation(init_fn, update_fn), _is_subspace_update
  )


def back_projection(
  scale: jax.typing.ArrayLike = 1.0, formulation: str = "reference"
) -> optax.GradientTransformation:
  r"""``u = α P N + S``: back to the parameter's shape (``α P N`` alone without a residual).

  .. math::
    u_t = α P_t N_t + S_t

  (``N Pᵀ`` when the output side is compressed). With ``formulation="paper"``:
  ``α (P N + S)``.

  Args:
    scale: ``α``, the subspace term's weight.
    formulation: ``"reference"`` or ``"paper"`` (see :data:`FORMULATIONS`).

  Returns:
    A stateless ``optax.GradientTransformation`` that turns each
    :class:`SubspaceUpdate` into an array of its leaf's shape and dtype.

  Example:
    >>> import jax.numpy as jnp, optax, fira_jax
    >>> space = fira_jax.Subspace(rank=2)
    >>> chain = optax.chain(fira_jax.subspace_projection(space),
    ...                     fira_jax.in_subspace(optax.scale_by_adam(), space),
    ...                     fira_jax.norm_based_scaling(0.25),
    ...                     fira_jax.limit_residual_growth(space),
    ...                     fira_jax.back_projection(0.25))
    >>> params = {'w': jnp.ones((8, 4)), 'b': jnp.zeros(4)}
    >>> grads = {'w': jnp.arange(32.0).reshape(8, 4) % 5, 'b': jnp.ones(4)}
    >>> u, _ = chain.update(grads, chain.init(params))
    >>> u['w'].shape  # the parameter's shape again
    (8, 4)
    >>> fused = fira_jax.scale_by_fira(rank=2, scale=0.25, base_optimizer=optax.scale_by_adam())
    >>> v, _ = fused.update(grads, fused.init(params))
    >>> bool(jnp.allclose(u['w'], v['w'], atol=1e-5))  # the same update, fused
    True

  References:
    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024
  """

  def full_update(u: SubspaceUpdate) -> jax.Array:
    update = scale * subspace_lib.project_back(u.direction, u.projector, u.layout.compressed)
    if u.residual is not None:
      # The reference adds S as it is; the paper multiplies it by α too.
      _, c = _residual_weight(scale, formulation)
      update = update + c * u.residual
    return u.layout.matrix.from_matrices(update.astype(u.gradient.dtype))

  back = optax.stateless(lambda updates, params=None: _map_projected(full_update, updates))
  return flax_metadata.keep_flax_metadata(back, _is_subspace_update)


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
  recombine the algorithm. The default ``base_optimizer`` is the reference's Adam
  (:func:`fira_jax.scale_by_uncorrected_adam` with its defaults, its step size
  :func:`fira_jax.scale_by_adam_step_size` applied last, as the reference applies it to the
  whole update); pass ``base_optimizer`` for any other.

  Args:
    rank: the subspace rank ``r`` (static), clipped to each matrix's smaller dimension.
    update_proj_gap: ``T``, steps between projector refreshes (static).
    scale: ``α`` (positive).
    base_optimizer: ``ψ``, a transformation run in the subspace (and on unprojected
      leaves at full shape; see :func:`in_subspace` for what it sees of ``params``);
      default: the reference's Adam, as above.
    norm_growth_limit: ``γ`` of :func:`limit_residual_growth`, or None to leave that
      piece out.
    weight_dimension_numbers: which leaves are projected and which axes form their
      matrices; see :class:`Subspace`.
    compressed_side: which side of each matrix is compressed; see :class:`Subspace`.
    scaling: ``"column"`` or ``"matrix"``; see :func:`norm_based_scaling`.
    formulation: ``"reference"`` or ``"paper"``; see :data:`FORMULATIONS`.
    projection: the basis; see :func:`subspace_projection`.
    projection_seed: the seed of the randomized and random bases.
    staggered_refresh: spread projector refreshes evenly over the gap.

  Returns:
    An ``optax.GradientTransformation``, the ``optax.chain`` of the pieces; its state is a
    tuple with one entry per piece.

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
