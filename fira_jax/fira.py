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

from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fira_jax import adam
from fira_jax import checks
from fira_jax import explicit_sharding
from fira_jax import limiter
from fira_jax import projection as projection_lib
from fira_jax import refresh
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


def check_state_shapes(updates, layouts, stored_projectors, stored_norms) -> None:
  """Raises a ValueError naming the leaf whose shape differs from the one at init."""
  names = projection_lib.leaf_names(updates)
  for i, layout in enumerate(layouts):
    if layout is None:
      continue
    for stored, expected, what in (
      (stored_projectors[i], layout.projector_shape, "projector"),
      (stored_norms[i], layout.batch_shape, "limiter norm"),
    ):
      if not isinstance(stored, optax.MaskedNode) and jnp.shape(stored) != expected:
        raise ValueError(
          f"{names[i]} has shape {layout.shape}, but the optimizer state holds a {what} of"
          f" shape {jnp.shape(stored)} for it (expected {expected}): the state was"
          " initialized for parameters of another shape, or with other"
          " weight_dimension_numbers, rank or compressed_side."
        )


def check_base_state_shapes(state, expected) -> None:
  """Raises a ValueError naming the first base-optimizer state leaf of the wrong shape."""
  got, got_def = jax.tree_util.tree_flatten_with_path(state)
  want, want_def = jax.tree_util.tree_flatten_with_path(expected)
  if got_def != want_def:
    raise ValueError(
      "scale_by_fira: the base optimizer's state does not have the structure that the"
      " updates call for; call init on the parameters you update."
    )
  for (path, x), (_, y) in zip(got, want, strict=True):
    if jnp.shape(x) != jnp.shape(y):
      raise ValueError(
        f"optimizer state leaf base_optimizer_state{jax.tree_util.keystr(path)} has shape"
        f" {jnp.shape(x)}, but the updates call for {jnp.shape(y)}: the state was"
        " initialized for parameters of another shape, or with other"
        " weight_dimension_numbers, rank or compressed_side."
      )


CANCELLATION = 1e-3  # ‖S‖² below this share of ‖φ⊙G‖² is recomputed from S itself


def exact_where_cancelled(s_sq, phi_x_sq, phi, x, a, r, p, axis):
  """``‖S‖²`` per matrix, recomputed from ``S = φ ⊙ (X − a back(R))`` where the
  difference of squares ``‖φ⊙X‖² − …`` cancels (a residual far smaller than ``φ⊙X``).

  There, float32 rounding of the difference is larger than ``‖S‖²`` itself, and the limiter
  would record noise that then governs many steps. The extra back-projection runs only on
  steps where some matrix of the leaf cancels (a ``lax.cond``).
  """
  cancelled = s_sq <= CANCELLATION * phi_x_sq

  def from_residual():
    back = projection_lib.project_back(r.astype(jnp.float32), p.astype(jnp.float32), axis)
    exact = jnp.sum(jnp.square(phi * (x.astype(jnp.float32) - a * back)), axis=(1, 2))
    return jnp.where(cancelled, exact, s_sq)

  return jax.lax.cond(jnp.any(cancelled), from_residual, lambda: jnp.maximum(s_sq, 0.0))


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
  weight_dimension_numbers: projection_lib.DimensionNumbersOrFn = None,
  compressed_side: projection_lib.CompressedSide = "smaller",
  scaling: scaling_lib.Scaling = "column",
  formulation: Formulation = "reference",
  residual: bool = True,
  projection: projection_lib.Projection = "svd",
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
    The residual ``S`` is never formed: since ``φ`` scales whole columns of
    the kept side, ``φ ⊙ (P R) = P (φ ⊙ R)``, so the update is
    ``(φ / λ) ⊙ G + P (α N − (α / λ) φ ⊙ R)`` and
    ``‖S‖² = ‖φ⊙G‖² − 2α‖φ⊙R‖² + α² tr((φ⊙R)ᵀ PᵀP (φ⊙R))``: two matrix
    products per matrix, as GaLore. ``‖φ⊙G‖²`` and ``‖φ⊙R‖²`` are sums over
    channels of ``φ_j²`` times the channels' squared norms, the latter already
    computed for ``φ``. ``PᵀP`` is taken as ``I`` for float32 SVD bases and
    computed for the others. A difference of squares cancels when ``‖S‖²`` is
    below ``10⁻³ ‖φ⊙G‖²`` (α near 1 and a gradient almost inside the
    subspace): on such steps ``‖S‖`` is recomputed from ``S`` itself, as the
    reference computes it (one more product, under a ``lax.cond``).

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
  checks.check_positive_int("rank", rank)
  checks.check_positive_int("update_proj_gap", update_proj_gap)
  checks.check_number("scale", scale, 0.0, False, "positive")
  checks.check_choice("compressed_side", compressed_side, projection_lib.COMPRESSED_SIDES)
  checks.check_choice("scaling", scaling, scaling_lib.SCALINGS)
  checks.check_choice("formulation", formulation, FORMULATIONS)
  checks.check_choice("projection", projection, projection_lib.PROJECTIONS)
  if isinstance(projection_seed, (bool, float)):
    raise TypeError(f"projection_seed must be an int, got {projection_seed!r}.")
  if norm_growth_limit is not None:
    checks.check_number("norm_growth_limit", norm_growth_limit, 1.0, True, ">= 1 (or None)")
  if base_optimizer is None:
    b1 = 0.9 if b1 is None else b1
    b2 = 0.999 if b2 is None else b2
    eps = 1e-6 if eps is None else eps
    checks.check_decay("b1", b1)
    checks.check_decay("b2", b2)
    checks.check_number("eps", eps, 0.0, True, ">= 0")
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
  # Numeric hyperparameters (arrays under optax.inject_hyperparams). The update takes them as
  # an argument instead of closing over them, so that under an explicit-axes mesh it can run
  # under auto_axes with them re-typed like its other inputs (see explicit_sharding).
  hyperparams = dict(
    scale=scale, norm_growth_limit=norm_growth_limit, projection_seed=projection_seed
  )
  if correct_step_size:
    hyperparams.update(b1=b1, b2=b2, eps=eps)

  def layouts_of(tree):
    return projection_lib.layouts_for(tree, weight_dimension_numbers, rank, compressed_side)

  stores_projector = projection != "random"

  def low_rank_proxies(tree, layouts):
    """What the base optimizer sees: low-rank zeros for projected leaves, no frozen ones."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten(
      [
        (x if projection_lib.is_trainable(x) else optax.MaskedNode())
        if layout is None
        else jnp.zeros(layout.low_rank_shape, jnp.asarray(x).dtype)
        for x, layout in zip(leaves, layouts, strict=True)
      ]
    )

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    layouts = layouts_of(params)
    projectors = projection_lib.masked_like(
      leaves,
      layouts,
      lambda x, lay: (
        jnp.zeros(lay.projector_shape, jnp.asarray(x).dtype)
        if stores_projector
        else optax.MaskedNode()
      ),
    )
    norms = projection_lib.masked_like(
      leaves,
      layouts,
      lambda x, lay: jnp.zeros(lay.batch_shape, jnp.float32) if use_limiter else optax.MaskedNode(),
    )
    return FiraState(
      count=jnp.zeros([], jnp.int32),
      base_optimizer_state=base_optimizer.init(low_rank_proxies(params, layouts)),
      projector=treedef.unflatten(projectors),
      residual_norm=treedef.unflatten(norms),
    )

  def basis(matrices, layout, matrix_ids, refresh_ids, seed):
    """The basis of ``(n, reduction, output)`` matrices with global ids ``matrix_ids``."""
    if projection == "svd":
      return projection_lib.svd_projector(matrices, layout.rank, layout.compressed_axis)
    keys = refresh.projection_keys(seed, matrix_ids, refresh_ids)
    if projection == "randomized_svd":
      return projection_lib.randomized_svd_projector(
        matrices, layout.rank, layout.compressed_axis, keys
      )
    return jax.vmap(
      lambda k: projection_lib.random_projector(
        k, layout.compressed_size, layout.rank, matrices.dtype
      )
    )(keys)

  def update_fn(updates, state, hp):
    # Every numeric hyperparameter from hp (they shadow the factory's arguments on purpose).
    scale, norm_growth_limit, seed = hp["scale"], hp["norm_growth_limit"], hp["projection_seed"]
    if correct_step_size:
      b1, b2, eps = hp["b1"], hp["b2"], hp["eps"]
      base = adam.scale_by_uncorrected_adam(b1, b2, eps, mu_dtype)
    else:
      base = base_optimizer
    leaves, treedef = jax.tree.flatten(updates)
    layouts = layouts_of(updates)
    projected = [i for i, layout in enumerate(layouts) if layout is not None]
    try:
      stored_projectors = treedef.flatten_up_to(state.projector)
      stored_norms = treedef.flatten_up_to(state.residual_norm)
    except (ValueError, TypeError) as e:
      raise ValueError(
        "scale_by_fira: the updates' tree does not match the tree the state was"
        f" initialized with; call init on the parameters you update. ({e})"
      ) from e
    check_state_shapes(updates, layouts, stored_projectors, stored_norms)
    check_base_state_shapes(
      state.base_optimizer_state,
      jax.eval_shape(base.init, low_rank_proxies(updates, layouts)),
    )
    matrices = {i: layouts[i].to_matrices(leaves[i]) for i in projected}
    schedule = refresh.schedule_for(layouts, update_proj_gap, staggered_refresh)
    count = state.count

    if projection == "random":
      # Nothing stored: every step regenerates each basis from its key.
      new_projectors = {
        i: basis(
          matrices[i],
          layouts[i],
          schedule.matrix_ids[i],
          schedule.refresh_index(count, i),
          seed,
        )
        for i in projected
      }
    else:
      stored = {i: layouts[i].to_batched(stored_projectors[i]) for i in projected}
      # A zero first column: never computed from a finite gradient (init, or every
      # refresh so far saw NaN/Inf). Such slices refresh on the next step, off schedule.
      missing = {i: jnp.all(stored[i][..., 0] == 0, axis=-1) for i in projected}
      if not staggered_refresh:
        # Refresh every projector on steps 0, T, 2T, ... (one cond for the tree, with an
        # unbatched predicate, so the SVDs run only on those steps).
        on_schedule = count % update_proj_gap == 0

        def refreshed():
          return [
            refresh.keep_finite(
              basis(
                matrices[i],
                layouts[i],
                schedule.matrix_ids[i],
                schedule.refresh_index(count, i),
                seed,
              ),
              stored[i],
              on_schedule | missing[i],
            )
            for i in projected
          ]

        any_missing = jnp.any(jnp.stack([jnp.any(m) for m in missing.values()] or [False]))
        new_projectors = dict(
          zip(
            projected,
            jax.lax.cond(
              on_schedule | any_missing, refreshed, lambda: [stored[i] for i in projected]
            ),
            strict=True,
          )
        )
      else:
        new_projectors = {
          i: refresh.refresh_due_slices(
            matrices[i],
            stored[i],
            schedule.is_due(count, i) | missing[i],
            lambda x, b, i=i: basis(
              x,
              layouts[i],
              jnp.asarray(schedule.matrix_ids[i])[b][None],
              schedule.refresh_index(count, i)[b][None],
              seed,
            ),
          )
          for i in projected
        }

    low_rank = {
      i: projection_lib.project(matrices[i], new_projectors[i], layouts[i].compressed_axis)
      for i in projected
    }
    # Integer, boolean and float0 leaves are not trained: no state, a zero update.
    frozen = [i for i, g in enumerate(leaves) if not projection_lib.is_trainable(g)]
    base_inputs = [
      layouts[i].from_batched(low_rank[i])
      if i in low_rank
      else (optax.MaskedNode() if i in frozen else g)
      for i, g in enumerate(leaves)
    ]
    base_outputs, base_state = base.update(
      treedef.unflatten(base_inputs), state.base_optimizer_state, None
    )
    base_outputs = treedef.flatten_up_to(base_outputs)

    is_first_step = count == 0
    new_leaves = list(base_outputs)
    for i in frozen:
      new_leaves[i] = (
        leaves[i] if leaves[i].dtype == jax.dtypes.float0 else jnp.zeros_like(leaves[i])
      )
    new_norms = list(stored_norms)
    for i in projected:
      layout, p, r, x = layouts[i], new_projectors[i], low_rank[i], matrices[i]
      axis = layout.compressed_axis
      n = layout.to_batched(base_outputs[i])
      if not residual:
        update = projection_lib.project_back(scale * n, p, axis)
      else:
        phi, r_sq = scaling_lib.norm_based_scaling(n, r, projection_lib.rank_axis(axis), scaling)
        # S = φ ⊙ (X − a P R) with a = α (reference) or 1 (paper). φ scales whole
        # columns of the kept side, which P does not mix, so φ ⊙ (P R) = P (φ ⊙ R):
        #   ‖S‖² = ‖φ⊙X‖² − 2a ⟨φ⊙X, P(φ⊙R)⟩ + a² ‖P(φ⊙R)‖²
        #        = ‖φ⊙X‖² − 2a ‖φ⊙R‖²        + a² tr((φ⊙R)ᵀ PᵀP (φ⊙R)),
        # since Pᵀ(φ⊙X) = φ⊙R by definition of R (any P), and
        #   update = α P N + c S / λ = (c φ / λ) ⊙ X + P (α N − (α / λ) φ⊙R),
        # with c = 1 (reference) or α (paper), for which c·a = α in both. Two
        # matrix products in all (R and one back-projection): no third one for P R.
        a = scale if formulation == "reference" else 1.0
        c = 1.0 if formulation == "reference" else scale
        # Per channel j of the kept side: ‖X_j‖² here, ‖R_j‖² from the scaling, so that
        # ‖φ⊙X‖² and ‖φ⊙R‖² are sums over channels, not passes over X or R.
        x_sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis + 1, keepdims=True)
        phi_sq = jnp.square(phi)
        if projection == "random" or p.dtype != jnp.float32:
          phi_r = phi * r.astype(jnp.float32)
          gram = jnp.einsum("bkr,bks->brs", p, p, preferred_element_type=jnp.float32)
          applied = gram @ phi_r if axis == 0 else phi_r @ gram
          quad = jnp.sum(applied * phi_r, axis=(1, 2))
          s_sq = jnp.sum(phi_sq * (x_sq - 2 * a * r_sq), axis=(1, 2)) + a * a * quad
        else:  # a float32 SVD basis is orthonormal to working precision: PᵀP = I
          s_sq = jnp.sum(phi_sq * (x_sq - (2 * a - a * a) * r_sq), axis=(1, 2))
        s_sq = exact_where_cancelled(
          s_sq, jnp.sum(phi_sq * x_sq, axis=(1, 2)), phi, x, a, r, p, axis
        )
        if use_limiter:
          divisor, norm = limiter.norm_growth_divisor(
            jnp.sqrt(s_sq), jnp.reshape(stored_norms[i], (-1,)), norm_growth_limit, is_first_step
          )
          new_norms[i] = jnp.reshape(norm, layout.batch_shape)
          divisor = divisor[:, None, None]
        else:
          divisor = 1.0
        low = scale * n.astype(jnp.float32) - (scale / divisor) * phi * r.astype(jnp.float32)
        low = low.astype(n.dtype)
        update = (c * phi / divisor) * x + projection_lib.project_back(low, p, axis)
      new_leaves[i] = layout.from_matrices(update.astype(x.dtype))

    count = optax.safe_int32_increment(count)
    if correct_step_size:
      step_size = adam.adam_step_size(count, b1, b2)
      new_leaves = [
        u if i in frozen else (step_size * u).astype(u.dtype) for i, u in enumerate(new_leaves)
      ]
    new_state = FiraState(
      count=count,
      base_optimizer_state=base_state,
      projector=treedef.unflatten(
        [
          layouts[i].from_batched(new_projectors[i])
          if i in new_projectors and stores_projector
          else stored_projectors[i]
          for i in range(len(leaves))
        ]
      ),
      residual_norm=treedef.unflatten(new_norms),
    )
    return treedef.unflatten(new_leaves), new_state

  return optax.GradientTransformation(
    init_fn, explicit_sharding.with_auto_axes(update_fn, hyperparams)
  )
