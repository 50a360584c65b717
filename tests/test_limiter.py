"""The norm-growth limiter, as a function and as clip_by_norm_growth."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fira_jax
from fira_jax import limiter


def test_first_step_is_recorded_but_not_limited():
  x = jnp.full((1, 2, 2), 3.0)
  limited, norm = limiter.limit_norm_growth(x, jnp.zeros(1), 1.01, True)
  chex.assert_trees_all_equal(limited, x)
  np.testing.assert_allclose(norm, [6.0])


def test_growth_is_bounded_by_the_limit_and_shrinking_is_untouched():
  x = jnp.ones((2, 3, 3))  # norm 3 each
  previous = jnp.array([1.0, 10.0])
  limited, norm = limiter.limit_norm_growth(x, previous, 1.5, False)
  np.testing.assert_allclose(norm, [1.5 * (1.0 + 1e-8), 3.0], rtol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(limited[0]), 1.5, rtol=1e-6)
  chex.assert_trees_all_equal(limited[1], x[1])  # 3 < 1.5 * 10: untouched


def test_non_finite_norm_is_not_recorded():
  x = jnp.full((1, 2, 2), jnp.nan)
  _, norm = limiter.limit_norm_growth(x, jnp.array([2.0]), 1.01, False)
  np.testing.assert_array_equal(norm, [2.0])


class ClipByNormGrowthTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_update_norm_grows_at_most_by_the_limit_per_step(self):
    tx = fira_jax.clip_by_norm_growth(1.1)
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    state = tx.init(params)
    update = self.variant(tx.update)
    norms = []
    for t in range(6):
      grads = jax.tree.map(lambda p, t=t: jnp.full_like(p, 3.0**t), params)
      out, state = update(grads, state)
      norms.append({k: float(jnp.linalg.norm(v)) for k, v in out.items()})
    for prev, cur in itertools.pairwise(norms):
      for k in prev:
        assert cur[k] <= 1.1 * prev[k] * (1 + 1e-5)
        assert cur[k] >= 1.1 * prev[k] * (1 - 1e-5)  # 3x growth is always cut to 1.1x

  def test_stacked_leaves_are_limited_per_slice(self):
    spec = fira_jax.FiraDimensionNumbers(1, 2)
    tx = fira_jax.clip_by_norm_growth(1.01, weight_dimension_numbers=spec)
    params = jnp.zeros((2, 3, 3))
    state = tx.init(params)
    chex.assert_shape(state.previous_norm, (2,))
    _, state = tx.update(jnp.ones((2, 3, 3)), state)
    # layer 0 grows 10x, layer 1 stays: only layer 0 is limited
    out, state = tx.update(jnp.stack([10 * jnp.ones((3, 3)), jnp.ones((3, 3))]), state)
    np.testing.assert_allclose(jnp.linalg.norm(out[0]), 3.0 * 1.01, rtol=1e-5)
    chex.assert_trees_all_equal(out[1], jnp.ones((3, 3)))

  def test_composes_in_a_chain_with_sgd(self):
    tx = optax.chain(fira_jax.clip_by_norm_growth(1.01), optax.sgd(1.0))
    params = jnp.zeros(5)
    state = tx.init(params)
    _, state = tx.update(jnp.ones(5), state)
    u, _ = tx.update(100 * jnp.ones(5), state)
    np.testing.assert_allclose(jnp.linalg.norm(u), 1.01 * jnp.sqrt(5.0), rtol=1e-5)
