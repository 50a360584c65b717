"""Adam in the reference's form."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fira_jax


def test_uncorrected_adam_with_step_size_equals_optax_adam_without_eps():
  # m̂ / √v̂ = √(1-β2ᵗ)/(1-β1ᵗ) · m / √v exactly, when ε = 0.
  ours = optax.chain(
    fira_jax.scale_by_uncorrected_adam(eps=0.0), fira_jax.scale_by_adam_step_size()
  )
  theirs = optax.scale_by_adam(eps=0.0)
  params = jnp.zeros(6)
  s_ours, s_theirs = ours.init(params), theirs.init(params)
  for t in range(5):
    g = jax.random.normal(jax.random.key(t), (6,))
    u_ours, s_ours = ours.update(g, s_ours)
    u_theirs, s_theirs = theirs.update(g, s_theirs)
    chex.assert_trees_all_close(u_ours, u_theirs, rtol=1e-5)


def test_eps_is_added_outside_the_square_root_of_uncorrected_moments():
  tx = fira_jax.scale_by_uncorrected_adam(b1=0.9, b2=0.999, eps=0.5)
  g = jnp.array([2.0])
  u, state = tx.update(g, tx.init(g))
  m, v = 0.1 * 2.0, 0.001 * 4.0
  np.testing.assert_allclose(u, m / (np.sqrt(v) + 0.5), rtol=1e-6)
  np.testing.assert_allclose(state.mu, [m], rtol=1e-6)


def test_mu_dtype_sets_the_first_moment_dtype():
  tx = fira_jax.scale_by_uncorrected_adam(mu_dtype=jnp.bfloat16)
  state = tx.init(jnp.zeros(3))
  assert state.mu.dtype == jnp.bfloat16 and state.nu.dtype == jnp.float32
  u, state = tx.update(jnp.ones(3), state)
  assert u.dtype == jnp.float32 and state.mu.dtype == jnp.bfloat16


def test_adam_step_size_matches_the_formula():
  for t in (1, 2, 10, 1000):
    expected = np.sqrt(1 - 0.999**t) / (1 - 0.9**t)
    np.testing.assert_allclose(fira_jax.adam_step_size(t, 0.9, 0.999), expected, rtol=1e-5)


def test_float32_second_moment_for_bfloat16_params_keeps_small_increments():
  # v's per-step increment (1 − β₂) g² is below bfloat16's resolution once v ≈ g²: a bfloat16
  # second moment stalls, a float32 one tracks the float32 run.
  grads = jnp.ones((4,), jnp.bfloat16)
  runs = {}
  for name, nu_dtype in (("bf16", None), ("f32", jnp.float32)):
    tx = fira_jax.scale_by_uncorrected_adam(nu_dtype=nu_dtype)
    state, update = tx.init(grads), jax.jit(tx.update)
    for _ in range(1000):
      u, state = update(grads, state)
    assert u.dtype == jnp.bfloat16
    runs[name] = state.nu
  exact = 1 - 0.999**1000
  assert runs["f32"].dtype == jnp.float32 and runs["bf16"].dtype == jnp.bfloat16
  np.testing.assert_allclose(runs["f32"], exact, rtol=1e-4)
  assert float(jnp.max(jnp.abs(runs["bf16"].astype(jnp.float32) - exact))) > 0.1
