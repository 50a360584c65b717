r"""Carrying Adam's moments into a new basis when the projector is refreshed (optional).

Without it (the reference), a refresh leaves the moments in the old basis's coordinates:
row ``i`` of ``m`` then weighs the new basis's ``i``-th direction with statistics of the
old one's. With ``transfer_moments=True``, each refreshed matrix's moments are rotated by
``Q = P_newᵀ P_old`` (``(r, r)``), as LDAdam does:

.. math::
  m' = Q m, \qquad
  v' = (Q \odot Q)\,\max(v - c\, m^2, 0) + c\,(Q m)^2, \qquad
  c = \frac{1 - β_2^t}{(1 - β_1^t)^2}

(for a compressed output side, ``m Qᵀ`` and ``max(·) (Q⊙Q)ᵀ``): the second moment is split
into a variance, carried element-wise by ``Q⊙Q`` as if the coordinates were independent,
and the squared mean, recomputed from the rotated mean. The moments are uncorrected (see
:mod:`fira_jax.adam`), so ``c`` puts ``m²`` on ``v``'s scale. Matrices whose basis did not
change keep their moments bit for bit.

References:
  Robert et al., `LDAdam: Adaptive Optimization from Low-Dimensional Gradient Statistics
  <https://arxiv.org/abs/2410.16103>`_, 2024
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fira_jax import adam
from fira_jax import subspace


def change_of_basis(new: jax.Array, old: jax.Array) -> jax.Array:
  """``Q = P_newᵀ P_old``, ``(B, r, r)``, from two ``(B, compressed, r)`` bases."""
  return jnp.einsum("bcr,bcs->brs", new.astype(jnp.float32), old.astype(jnp.float32))


def rotate(moment: jax.Array, q: jax.Array, compressed: subspace.Side) -> jax.Array:
  """``Q M`` (compressed reduction side, ``M`` is ``(B, r, out)``) or ``M Qᵀ`` (``(B, in, r)``)."""
  if compressed == "reduction":
    return jnp.einsum("brs,bso->bro", q, moment)
  return jnp.einsum("bis,brs->bir", moment, q)


def transferred_moments(mu, nu, q, compressed: subspace.Side, count, b1, b2):
  """One leaf's ``(m', v')`` in the new basis, float32, ``(B, ·, ·)``; formulas above."""
  t = jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)  # before step 1 both are zero
  c = adam._one_minus_power(b2, t) / jnp.square(adam._one_minus_power(b1, t))
  mu, nu = mu.astype(jnp.float32), nu.astype(jnp.float32)
  new_mu = rotate(mu, q, compressed)
  variance = jnp.maximum(nu - c * jnp.square(mu), 0.0)
  new_nu = rotate(variance, jnp.square(q), compressed) + c * jnp.square(new_mu)
  return new_mu, new_nu


def transfer(
  state: adam.ScaleByUncorrectedAdamState,
  treedef: jax.tree_util.PyTreeDef,
  projected: list[tuple[int, subspace.SubspaceLayout]],
  old: list[jax.Array],
  new: list[jax.Array],
  count: jax.Array,
  b1: jax.typing.ArrayLike,
  b2: jax.typing.ArrayLike,
) -> adam.ScaleByUncorrectedAdamState:
  """The base Adam state with each refreshed matrix's moments in its new basis.

  Args:
    state: the default base optimizer's state, trees like the low-rank inputs.
    treedef: the updates' tree structure (frozen leaves hold ``MaskedNode`` in ``state``).
    projected: ``(leaf index, layout)`` of each projected leaf, in order.
    old: the bases the moments were accumulated in, ``(B, compressed, r)`` per leaf.
    new: this step's bases, aligned with ``old``.
    count: the number of updates so far (the moments' age).
    b1: ``β₁``.
    b2: ``β₂``.
  """
  mu, nu = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
  changed = [jnp.any(pn != po, axis=(1, 2)) for pn, po in zip(new, old, strict=True)]

  def carried(mu, nu):
    mu, nu = list(mu), list(nu)
    for (i, lay), pn, po, ch in zip(projected, new, old, changed, strict=True):
      m, v = lay.matrix.to_batched(mu[i]), lay.matrix.to_batched(nu[i])
      m2, v2 = transferred_moments(m, v, change_of_basis(pn, po), lay.compressed, count, b1, b2)
      mu[i] = lay.matrix.from_batched(_where_changed(ch, m2, m))
      nu[i] = lay.matrix.from_batched(_where_changed(ch, v2, v))
    return mu, nu

  # Only refresh steps pay for the products (the predicate is unbatched).
  any_changed = jnp.any(jnp.stack([jnp.any(ch) for ch in changed] or [jnp.bool_(False)]))
  mu, nu = jax.lax.cond(any_changed, carried, lambda m, v: (list(m), list(v)), mu, nu)
  return adam.ScaleByUncorrectedAdamState(mu=treedef.unflatten(mu), nu=treedef.unflatten(nu))


def _where_changed(changed, fresh, stored):
  """``fresh[b]`` where matrix ``b``'s basis changed, else ``stored[b]`` bit for bit."""
  return jnp.where(changed[:, None, None], fresh.astype(stored.dtype), stored)
