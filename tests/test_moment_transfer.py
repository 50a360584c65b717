"""transfer_moments: Adam's moments rotated into the new basis at a refresh (LDAdam's rule)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import fira_jax
from fira_jax import FiraDimensionNumbers
from fira_jax import moment_transfer

B1, B2 = 0.9, 0.999
STACKED = FiraDimensionNumbers(reduction_axis=1, output_axis=2)
PARAMS = {"stack": jnp.zeros((3, 10, 6)), "wide": jnp.zeros((5, 9)), "b": jnp.zeros(9)}
SPECS = {"stack": STACKED, "wide": FiraDimensionNumbers(), "b": None}


def grads_at(step):
  leaves, treedef = jax.tree.flatten(PARAMS)
  keys = jax.random.split(jax.random.key(100 + step), len(leaves))
  return treedef.unflatten(
    [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
  )


def orthonormal(key, shape):
  return jnp.linalg.qr(jax.random.normal(key, shape))[0]


def moments(key, low_rank_shape):
  k1, k2 = jax.random.split(key)
  mu = 0.1 * jax.random.normal(k1, low_rank_shape)
  return mu, jnp.square(mu) * 0.2 + 0.01 * jax.random.uniform(k2, low_rank_shape)


@pytest.mark.parametrize("compressed", ["reduction", "output"])
def test_a_signed_permutation_of_the_basis_permutes_the_moments_exactly(compressed):
  old = orthonormal(jax.random.key(0), (2, 8, 4))
  perm, signs = np.array([2, 0, 3, 1]), np.array([1.0, -1.0, -1.0, 1.0])
  new = old[:, :, perm] * signs
  shape = (2, 4, 7) if compressed == "reduction" else (2, 7, 4)
  mu, nu = moments(jax.random.key(1), shape)
  q = moment_transfer.change_of_basis(new, old)
  m2, v2 = moment_transfer.transferred_moments(mu, nu, q, compressed, 50, B1, B2)
  axis = 1 if compressed == "reduction" else 2
  sign_shape = (1, 4, 1) if compressed == "reduction" else (1, 1, 4)
  np.testing.assert_allclose(
    m2, np.take(np.asarray(mu), perm, axis) * signs.reshape(sign_shape), atol=1e-6
  )
  np.testing.assert_allclose(v2, np.take(np.asarray(nu), perm, axis), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("compressed", ["reduction", "output"])
def test_a_rotated_basis_of_the_same_span_keeps_the_full_space_first_moment(compressed):
  old = orthonormal(jax.random.key(2), (3, 9, 3))
  rotation = orthonormal(jax.random.key(3), (3, 3, 3))
  new = old @ rotation
  shape = (3, 3, 5) if compressed == "reduction" else (3, 5, 3)
  mu, nu = moments(jax.random.key(4), shape)
  q = moment_transfer.change_of_basis(new, old)
  m2, v2 = moment_transfer.transferred_moments(mu, nu, q, compressed, 300, B1, B2)
  full = lambda m, p: fira_jax.project_back(m, p, compressed)
  np.testing.assert_allclose(full(m2, new), full(mu, old), atol=1e-5)
  assert bool(jnp.all(v2 >= 0))


def test_an_orthogonal_new_basis_leaves_only_the_variance_it_can_carry():
  old = jnp.eye(6)[None, :, :2]
  new = jnp.eye(6)[None, :, 2:4]  # orthogonal to the old span: Q = 0
  mu, nu = moments(jax.random.key(5), (1, 2, 4))
  q = moment_transfer.change_of_basis(new, old)
  m2, v2 = moment_transfer.transferred_moments(mu, nu, q, "reduction", 10, B1, B2)
  chex.assert_trees_all_equal(m2, jnp.zeros_like(mu))
  chex.assert_trees_all_equal(v2, jnp.zeros_like(nu))


class ScaleByFiraTransferTest(parameterized.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_moments_change_only_on_refresh_steps_and_follow_the_rule(self):
    gap = 3
    plain = fira_jax.scale_by_fira(rank=2, update_proj_gap=gap, weight_dimension_numbers=SPECS)
    moved = fira_jax.scale_by_fira(
      rank=2, update_proj_gap=gap, weight_dimension_numbers=SPECS, transfer_moments=True
    )
    update_plain, update_moved = self.variant(plain.update), self.variant(moved.update)
    s_plain, s_moved = plain.init(PARAMS), moved.init(PARAMS)
    for t in range(2 * gap + 1):
      before = s_moved
      u_plain, s_plain = update_plain(grads_at(t), s_plain)
      u_moved, s_moved = update_moved(grads_at(t), s_moved)
      if t < gap:  # up to the first refresh after step 0, the same trajectory bit for bit
        chex.assert_trees_all_equal(u_plain, u_moved)
        chex.assert_trees_all_equal(s_plain, s_moved)
      if t % gap or t == 0:
        continue
      # A refresh step: m_t = β₁ Q m_{t-1} + (1 − β₁) Pᵀ G for each projected matrix.
      for name, compressed in (("stack", "output"), ("wide", "reduction")):  # the smaller
        old = before.projector[name].reshape((-1,) + before.projector[name].shape[-2:])
        new = s_moved.projector[name].reshape(old.shape)
        assert not np.allclose(old, new)
        mu = before.base_optimizer_state.mu[name]
        mu = mu.reshape((-1,) + mu.shape[-2:])
        g = grads_at(t)[name].reshape((-1,) + grads_at(t)[name].shape[-2:])
        rotated = moment_transfer.rotate(mu, moment_transfer.change_of_basis(new, old), compressed)
        expected = B1 * rotated + (1 - B1) * fira_jax.project(g, new, compressed)
        got = s_moved.base_optimizer_state.mu[name].reshape(expected.shape)
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)
      # Unprojected leaves are never rotated.
      np.testing.assert_allclose(
        s_moved.base_optimizer_state.mu["b"], s_plain.base_optimizer_state.mu["b"], rtol=1e-6
      )

  def test_fira_adamw_trains_with_transfer_moments(self):
    tx = fira_jax.fira_adamw(
      1e-2, rank=2, update_proj_gap=2, weight_dimension_numbers=SPECS, transfer_moments=True
    )
    params = jax.tree.map(lambda x: x + 1.0, PARAMS)
    loss = lambda p: sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(p))
    state = tx.init(params)
    start = loss(params)
    for _ in range(6):
      updates, state = jax.jit(tx.update)(jax.grad(loss)(params), state, params)
      params = optax.apply_updates(params, updates)
    chex.assert_tree_all_finite(params)
    assert loss(params) < start


def test_transfer_moments_with_a_base_optimizer_is_an_error_naming_it():
  with pytest.raises(ValueError, match=r"transfer_moments.*base_optimizer"):
    fira_jax.scale_by_fira(base_optimizer=optax.scale_by_adam(), transfer_moments=True)


def test_transfer_moments_with_the_random_basis_is_an_error_naming_it():
  with pytest.raises(ValueError, match=r"transfer_moments.*projection='random'"):
    fira_jax.fira_adamw(1e-3, projection="random", transfer_moments=True)
