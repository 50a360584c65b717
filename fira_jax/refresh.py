"""When each projector is refreshed, and the keys of randomized and random bases.

The reference refreshes every projector on steps ``0, T, 2T, …``: one step in
``T`` pays for an SVD of every matrix, a stall of 20× a plain step on LLaMA
shapes. A *staggered* schedule gives the ``j``-th of ``M`` projected matrices
(counting the slices of stacked leaves, in flattening order) the offset

.. math::
  o_j = \\lfloor j T / M \\rfloor

and refreshes it on step 0 and on every step ``t`` with ``t ≡ o_j (mod T)``:
each matrix still gets one refresh per gap, but at most ``⌈M / T⌉`` matrices
share a step. Its ``k``-th refresh (counting from 0) happens on step ``t`` with

.. math::
  k_j(t) = \\lfloor (t + (-o_j \\bmod T)) / T \\rfloor,

which is ``⌊t / T⌋`` without staggering. Randomized and random bases draw from
``fold_in(fold_in(key(seed), j), k_j(t))``: the same matrix and refresh always
get the same basis, so a random basis need not be stored, and a stacked leaf
draws exactly what the same layers as separate leaves would.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fira_jax import bases
from fira_jax import subspace


@dataclasses.dataclass(frozen=True)
class RefreshSchedule:
  """Static per-matrix ids and offsets of the projected leaves of one tree."""

  gap: int
  matrix_ids: list[np.ndarray]  # per projected leaf: (B,) global matrix ids
  offsets: list[np.ndarray]  # per projected leaf: (B,) offsets in [0, gap)

  def is_due(self, count: jax.Array, leaf: int) -> jax.Array:
    """``(B,)`` booleans: which slices of projected leaf ``leaf`` refresh on step ``count``."""
    return (count == 0) | (count % self.gap == jnp.asarray(self.offsets[leaf]))

  def refresh_index(self, count: jax.Array, leaf: int) -> jax.Array:
    """``(B,)`` int32: ``k_j(count)``, the index of each slice's latest refresh."""
    shift = jnp.asarray((-self.offsets[leaf]) % self.gap, jnp.int32)
    return (count + shift) // self.gap


def schedule_for(
  layouts: list[subspace.SubspaceLayout], gap: int, staggered: bool
) -> RefreshSchedule:
  """The schedule of the matrices of a tree's projected leaves, in order."""
  total = sum(layout.matrix.num_matrices for layout in layouts)
  ids, offsets, start = [], [], 0
  for layout in layouts:
    size = layout.matrix.num_matrices
    ids.append(np.arange(start, start + size, dtype=np.int32))
    offsets.append(ids[-1] * gap // total if staggered else np.zeros(size, np.int32))
    start += size
  return RefreshSchedule(gap=gap, matrix_ids=ids, offsets=offsets)


def projection_keys(seed: int, matrix_ids: jax.Array, refresh_ids: jax.Array) -> jax.Array:
  """``(B,)`` keys ``fold_in(fold_in(key(seed), j), k)`` for matrices ``j``, refreshes ``k``."""
  base = jax.random.key(seed)
  return jax.vmap(lambda j, k: jax.random.fold_in(jax.random.fold_in(base, j), k))(
    jnp.asarray(matrix_ids), jnp.asarray(refresh_ids)
  )


def keep_finite(fresh: jax.Array, stored: jax.Array, due: jax.Array) -> jax.Array:
  """``fresh[b]`` where slice ``b`` is due and its new basis is finite, else ``stored[b]``.

  An SVD of a gradient with NaN/Inf entries, or one that fails to converge (LAPACK then
  returns NaN), must not replace a good basis: the projector would stay NaN until the
  next refresh, ``T`` steps later.
  """
  ok = due & jnp.all(jnp.isfinite(fresh), axis=(1, 2))
  return jnp.where(ok[:, None, None], fresh.astype(stored.dtype), stored)


def refresh_due_slices(matrices: jax.Array, projectors: jax.Array, due: jax.Array, compute):
  """Recomputes ``projectors[b]`` for the slices ``b`` that are due, and only those.

  A slice whose new basis is not finite keeps its stored one.

  A ``fori_loop`` over the slices with one ``lax.cond`` each (scalar
  predicates: never turned into a select), inside one ``lax.cond`` that skips
  the loop on steps where no slice is due. Computing every slice's basis and
  selecting would pay for all of them on every step.

  Args:
    matrices: ``(B, reduction, output)``.
    projectors: ``(B, compressed, rank)``, the stored bases.
    due: ``(B,)`` booleans.
    compute: ``compute(x, b)`` returns the ``(1, compressed, rank)`` basis of
      ``x = matrices[b:b + 1]``.
  """

  def refresh_slice(b, current):
    def refreshed():
      x = jax.lax.dynamic_slice_in_dim(matrices, b, 1, axis=0)
      old = jax.lax.dynamic_slice_in_dim(current, b, 1, axis=0)
      fresh = keep_finite(compute(x, b), old, jnp.ones(1, bool))
      return jax.lax.dynamic_update_slice_in_dim(current, fresh, b, axis=0)

    return jax.lax.cond(due[b], refreshed, lambda: current)

  return jax.lax.cond(
    jnp.any(due),
    lambda: jax.lax.fori_loop(0, projectors.shape[0], refresh_slice, projectors),
    lambda: projectors,
  )


def project_leaves(
  count: jax.Array,
  leaves: list[jax.Array],
  stored: list | None,
  layouts: list[subspace.SubspaceLayout | None],
  *,
  gap: int,
  projection: bases.Projection,
  seed: jax.typing.ArrayLike,
  staggered: bool,
) -> tuple[list[tuple[int, subspace.SubspaceLayout]], list, list, list]:
  """``R = project(X, P)`` for each projected leaf of a flattened tree, ``P`` refreshed when due.

  ``leaves``, ``stored`` (the stored projector leaves; None for the random basis) and
  ``layouts`` are aligned with the tree's leaves. Returns ``(index, layout)`` of each
  projected leaf and, for those in the same order, the ``(B, ·, ·)`` matrices ``X``, the
  bases ``P`` and ``R``.
  """
  projected = [(i, lay) for i, lay in enumerate(layouts) if lay is not None]
  x = [lay.matrix.to_matrices(leaves[i]) for i, lay in projected]
  p = refresh_projectors(
    count,
    x,
    None if stored is None else [lay.matrix.to_batched(stored[i]) for i, lay in projected],
    [lay for _, lay in projected],
    gap=gap,
    projection=projection,
    seed=seed,
    staggered=staggered,
  )
  r = [
    subspace.project(xj, pj, lay.compressed)
    for (_, lay), xj, pj in zip(projected, x, p, strict=True)
  ]
  return projected, x, p, r


def refresh_projectors(
  count: jax.Array,
  matrices: list[jax.Array],
  stored: list[jax.Array] | None,
  layouts: list[subspace.SubspaceLayout],
  *,
  gap: int,
  projection: bases.Projection,
  seed: jax.typing.ArrayLike,
  staggered: bool,
) -> list[jax.Array]:
  """Each projected leaf's ``(B, compressed, rank)`` basis for step ``count``.

  ``matrices`` and ``stored`` (the bases from the state, batched; None for the random
  basis, which is never stored) list the projected leaves in order. A basis is recomputed
  when due: on steps ``0, T, 2T, …`` (or its staggered offset), and off schedule while its
  stored basis was never computed from a finite gradient. A new basis that is not finite
  keeps the stored one.
  """
  schedule = schedule_for(layouts, gap, staggered)

  def compute(j, x, matrix_ids, refresh_ids):
    keys = None if projection == "svd" else projection_keys(seed, matrix_ids, refresh_ids)
    return bases.basis(projection, x, layouts[j], keys)

  if stored is None:  # the random basis: regenerated from its key on every step
    return [
      compute(j, x, schedule.matrix_ids[j], schedule.refresh_index(count, j))
      for j, x in enumerate(matrices)
    ]
  # A zero first column: never computed from a finite gradient (init, or every refresh
  # so far saw NaN/Inf).
  missing = [jnp.all(p[..., 0] == 0, axis=-1) for p in stored]
  if staggered:  # each leaf refreshes its due slices, under its own cond
    return [
      refresh_due_slices(
        x,
        p,
        schedule.is_due(count, j) | missing[j],
        lambda xb, b, j=j: compute(
          j,
          xb,
          jnp.asarray(schedule.matrix_ids[j])[b][None],
          schedule.refresh_index(count, j)[b][None],
        ),
      )
      for j, (x, p) in enumerate(zip(matrices, stored, strict=True))
    ]
  # One cond for the whole tree, with an unbatched predicate: the SVDs run only then.
  on_schedule = count % gap == 0

  def refreshed():
    return [
      keep_finite(
        compute(j, x, schedule.matrix_ids[j], schedule.refresh_index(count, j)),
        p,
        on_schedule | missing[j],
      )
      for j, (x, p) in enumerate(zip(matrices, stored, strict=True))
    ]

  any_missing = jnp.any(jnp.stack([jnp.any(m) for m in missing] or [jnp.bool_(False)]))
  return jax.lax.cond(on_schedule | any_missing, refreshed, lambda: list(stored))
