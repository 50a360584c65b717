"""scale_by_fira: Fira's learning-rate-free update, fused, across a tree of parameters.

Per projected leaf: refresh the basis when due (:mod:`fira_jax.refresh`), project
(:mod:`fira_jax.subspace`), run the base optimizer on the low-rank matrices, then Fira's
fused update (:mod:`fira_jax.step`). The same algorithm, one piece per transformation,
is :func:`fira_jax.fira_chain` (:mod:`fira_jax.algorithm`).
"""

from __future__ import annotations

from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fira_jax import adam
from fira_jax import bases
from fira_jax import checks
from fira_jax import explicit_sharding
from fira_jax import flax_metadata
from fira_jax import layout as layout_lib
from fira_jax import refresh
from fira_jax import scaling as scaling_lib
from fira_jax import step
from fira_jax import subspace

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
  nu_dtype: jax.typing.DTypeLike | None = None,
  norm_growth_limit: jax.typing.ArrayLike | None = 1.01,
  weight_dimension_numbers: layout_lib.DimensionNumbersOrFn = None,
  compressed_side: subspace.CompressedSide = "smaller",
  scaling: scaling_lib.Scaling = "column",
  formulation: Formulation = "reference",
  residual: bool = True,
  projection: bases.Projection = "svd",
  projection_seed: int = 0,
  staggered_refresh: bool = False,
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
    scale: ``α``. The reference multiplies only the subspace term by it. The
      default 1.0 is the reference's default; the paper trains with 0.25
      (0.0625 at 1B and 7B).
    base_optimizer: a gradient-only transformation run in the subspace (and on
      unprojected leaves at full shape), e.g. ``optax.scale_by_adam()``. It
      must not need ``params``. Default: :func:`scale_by_uncorrected_adam`
      followed by Adam's step-size bias correction (the reference).
    b1: the default Adam's ``β₁`` (0.9); only with ``base_optimizer=None``.
    b2: the default Adam's ``β₂`` (0.999); only with ``base_optimizer=None``.
    eps: the default Adam's ``ε`` (1e-6, the reference's, where optax's
      Adam uses 1e-8); only with ``base_optimizer=None``.
    nu_dtype: the default Adam's second-moment dtype (default: the
      parameters'; ``jnp.float32`` for bfloat16 parameters); only with
      ``base_optimizer=None``.
    mu_dtype: the default Adam's first-moment dtype; only with
      ``base_optimizer=None``.
    norm_growth_limit: ``γ``, the largest growth of ``‖S‖`` per step (1.01 in
      the reference), or None for no limiter.
    weight_dimension_numbers: which leaves are projected and which axes form
      their matrices; see :class:`Subspace`. Static.
    compressed_side: which side of each matrix is compressed; see
      :class:`Subspace`.
    scaling: ``"column"`` (the reference: one factor per channel of the kept
      side) or ``"matrix"`` (one factor per matrix, the paper's ablation).
    formulation: ``"reference"`` (the code that produced the paper's numbers)
      or ``"paper"`` (Algorithm 1: residual ``(I − P Pᵀ) G``, ``α`` on both
      terms).
    residual: False turns Fira's residual path off, which leaves GaLore.
    projection: the basis (static). ``"svd"``: the top-``rank`` singular
      vectors, exact (the reference). ``"randomized_svd"``: the same from a
      randomized range finder (:func:`randomized_svd_projector`, oversampling
      16, 2 power iterations), several times cheaper on large matrices.
      ``"random"``: a seeded Gaussian basis with ``E[PᵀP] = I``
      (:func:`random_projector`), regenerated from its key on every step
      instead of stored: no projector in the state, no SVD, but the basis
      ignores the gradient, and generating it costs time on every step.
    projection_seed: the seed of the randomized and random bases (an int, or
      an integer array under ``optax.inject_hyperparams``);
      matrix ``j``'s ``k``-th basis uses
      ``fold_in(fold_in(key(projection_seed), j), k)`` (see
      :mod:`fira_jax.refresh`).
    staggered_refresh: False (the reference): every projector is refreshed on
      steps 0, T, 2T, …, and those steps stall. True: all projectors are
      computed on step 0, then matrix ``j`` of ``M`` is refreshed on the steps
      ``t ≡ ⌊j T / M⌋ (mod T)``, still once per gap, so the refresh work is
      spread evenly across steps. Trajectories differ from the reference's
      (each matrix's basis is up to ``T`` steps older or newer).

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
    The SVD runs under ``lax.cond`` with an unbatched predicate: only refresh
    steps pay for it, stacked leaves included. With ``staggered_refresh``,
    each leaf has its own ``lax.cond`` and only the due slices are computed.

  .. note::
    This is the fused form of :func:`fira_chain` (the same update, Algorithm 1 as a
    chain of its pieces): the residual ``S`` is never formed, so a step costs
    two matrix products per matrix, as GaLore (see :mod:`fira_jax.step`).

  .. note::
    Under a mesh with explicit axes (``jax.set_mesh``), the update runs under
    ``jax.sharding.auto_axes``: partitioned as on an Auto mesh, its outputs sharded like
    its inputs (:mod:`fira_jax.explicit_sharding`).

  .. warning::
    With ``optax.inject_hyperparams``, pass
    ``static_args=('rank', 'update_proj_gap')``.

  References:
    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024

    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, 2024
  """
  checks.check_positive_int("update_proj_gap", update_proj_gap)
  checks.check_choice("scaling", scaling, scaling_lib.SCALINGS)
  checks.check_choice("formulation", formulation, FORMULATIONS)
  checks.check_choice("projection", projection, bases.PROJECTIONS)
  space = checks.checked_subspace(rank, weight_dimension_numbers, compressed_side)
  hyperparams = checks.checked_fira_hyperparams(scale, norm_growth_limit, projection_seed)
  if base_optimizer is None:
    hyperparams.update(adam.checked_reference_adam_hyperparams(b1, b2, eps))
    base_optimizer = adam.scale_by_uncorrected_adam(
      mu_dtype=mu_dtype, nu_dtype=nu_dtype, **_adam(hyperparams)
    )
  else:
    checks.check_unused_with_base_optimizer(
      b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype
    )
  correct_step_size = "b1" in hyperparams
  stores_projector = projection != "random"
  use_limiter = residual and norm_growth_limit is not None

  def init_fn(params):
    layouts = space.layouts(params)
    new_projector = lambda x, lay: jnp.zeros(lay.projector_shape, x.dtype)
    new_norm = lambda x, lay: jnp.zeros(lay.batch_shape, jnp.float32)
    return FiraState(
      count=jnp.zeros([], jnp.int32),
      base_optimizer_state=base_optimizer.init(subspace.low_rank_inputs(params, layouts)),
      projector=subspace.per_projected_leaf(
        params, layouts, new_projector if stores_projector else None
      ),
      residual_norm=subspace.per_projected_leaf(params, layouts, new_norm if use_limiter else None),
    )

  def leaf_update(x, p, r, n, stored_norm, lay, hp, count):
    """``α P N + S / λ`` (``α P N`` without the residual) and the leaf's new limiter norm."""
    if not residual:  # GaLore
      return subspace.project_back(hp["scale"] * n, p, lay.compressed).astype(x.dtype), stored_norm
    update, norm = step.fira_update(
      x,
      p,
      r,
      n,
      jnp.reshape(stored_norm, (-1,)) if use_limiter else None,
      count == 0,
      lay,
      scale=hp["scale"],
      norm_growth_limit=hp["norm_growth_limit"],
      scaling=scaling,
      paper=formulation == "paper",
      orthonormal=projection != "random" and p.dtype == jnp.float32,
    )
    return update, jnp.reshape(norm, lay.batch_shape) if use_limiter else stored_norm

  def update_fn(updates, state, hp):
    base = base_optimizer
    if correct_step_size:  # rebuilt from hp, the (possibly injected) hyperparameters
      base = adam.scale_by_uncorrected_adam(mu_dtype=mu_dtype, nu_dtype=nu_dtype, **_adam(hp))
    layouts = space.layouts(updates)
    leaves, treedef = jax.tree.flatten(updates)
    stored_projectors, stored_norms = _checked_state(updates, state, layouts, base)
    pairs, x, p, r = refresh.project_leaves(
      state.count,
      leaves,
      stored_projectors if stores_projector else None,
      layouts,
      gap=update_proj_gap,
      projection=projection,
      seed=hp["projection_seed"],
      staggered=staggered_refresh,
    )
    low_rank = {i: rj for (i, _), rj in zip(pairs, r, strict=True)}
    base_outputs, base_state = base.update(
      subspace.low_rank_inputs(updates, layouts, low_rank), state.base_optimizer_state, None
    )
    base_outputs = treedef.flatten_up_to(base_outputs)
    new_leaves = [
      n if layout_lib.is_trainable(g) else _zero_update(g)
      for g, n in zip(leaves, base_outputs, strict=True)
    ]
    new_norms = list(stored_norms)
    for j, (i, lay) in enumerate(pairs):
      n = lay.matrix.to_batched(base_outputs[i])
      update, new_norms[i] = leaf_update(x[j], p[j], r[j], n, stored_norms[i], lay, hp, state.count)
      new_leaves[i] = lay.matrix.from_matrices(update)
    count = optax.safe_int32_increment(state.count)
    if correct_step_size:
      step_size = adam.adam_step_size(count, hp["b1"], hp["b2"])
      new_leaves = [
        (step_size * u).astype(u.dtype) if layout_lib.is_trainable(g) else u
        for u, g in zip(new_leaves, leaves, strict=True)
      ]
    if stores_projector:
      for (i, lay), pj in zip(pairs, p, strict=True):
        stored_projectors[i] = lay.matrix.from_batched(pj)
    new_state = FiraState(
      count=count,
      base_optimizer_state=base_state,
      projector=treedef.unflatten(stored_projectors),
      residual_norm=treedef.unflatten(new_norms),
    )
    return treedef.unflatten(new_leaves), new_state

  return flax_metadata.keep_flax_metadata(
    optax.GradientTransformation(init_fn, explicit_sharding.with_auto_axes(update_fn, hyperparams))
  )


def _adam(hp):
  return dict(b1=hp["b1"], b2=hp["b2"], eps=hp["eps"])


def _zero_update(g):
  """Integer, boolean and float0 leaves are not trained: a zero update."""
  return g if g.dtype == jax.dtypes.float0 else jnp.zeros_like(g)


def _checked_state(updates, state, layouts, base):
  """The stored projectors and norms as lists, after checking the state fits ``updates``."""
  treedef = jax.tree.structure(updates)
  try:
    stored_projectors = treedef.flatten_up_to(state.projector)
    stored_norms = treedef.flatten_up_to(state.residual_norm)
  except (ValueError, TypeError) as e:
    raise ValueError(
      "scale_by_fira: the updates' tree does not match the tree the state was"
      f" initialized with; call init on the parameters you update. ({e})"
    ) from e
  names = layout_lib.leaf_names(updates)
  for name, lay, projector, norm in zip(
    names, layouts, stored_projectors, stored_norms, strict=True
  ):
    if lay is None:
      continue
    for stored, expected, what in (
      (projector, lay.projector_shape, "projector"),
      (norm, lay.batch_shape, "limiter norm"),
    ):
      if not isinstance(stored, optax.MaskedNode) and jnp.shape(stored) != expected:
        raise ValueError(
          f"{name} has shape {lay.matrix.shape}, but the optimizer state holds a {what} of"
          f" shape {jnp.shape(stored)} for it (expected {expected}): the state was"
          " initialized for parameters of another shape, or with other"
          " weight_dimension_numbers, rank or compressed_side."
        )
  checks.check_same_shapes(
    state.base_optimizer_state,
    jax.eval_shape(base.init, subspace.low_rank_inputs(updates, layouts)),
  )
  return stored_projectors, stored_norms
