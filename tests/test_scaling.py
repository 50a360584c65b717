"""Norm-based scaling factors."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fira_jax import scaling


def test_column_scaling_is_one_factor_per_kept_channel():
  key_n, key_r = jax.random.split(jax.random.key(0))
  n = jax.random.normal(key_n, (2, 3, 7))  # (B, rank, output): rank axis 1
  r = jax.random.normal(key_r, (2, 3, 7))
  phi = scaling.norm_based_scaling_factor(n, r, rank_axis=1)
  assert phi.shape == (2, 1, 7)
  expected = np.linalg.norm(n, axis=1) / (np.linalg.norm(r, axis=1) + 1e-8)
  np.testing.assert_allclose(phi[:, 0, :], expected, rtol=1e-6)


def test_column_scaling_along_the_output_rank_axis():
  n = jax.random.normal(jax.random.key(1), (1, 5, 2))  # (B, reduction, rank): rank axis 2
  r = 2.0 * n
  phi = scaling.norm_based_scaling_factor(n, r, rank_axis=2)
  assert phi.shape == (1, 5, 1)
  np.testing.assert_allclose(phi, 0.5, rtol=1e-6)


def test_matrix_scaling_is_one_factor_per_matrix():
  n = jax.random.normal(jax.random.key(2), (4, 3, 5))
  r = jax.random.normal(jax.random.key(3), (4, 3, 5))
  phi = scaling.norm_based_scaling_factor(n, r, rank_axis=1, scaling="matrix")
  assert phi.shape == (4, 1, 1)
  expected = np.linalg.norm(n.reshape(4, -1), axis=1) / np.linalg.norm(r.reshape(4, -1), axis=1)
  np.testing.assert_allclose(phi[:, 0, 0], expected, rtol=1e-5)


def test_zero_input_gives_a_finite_factor():
  n = np.zeros((1, 2, 3), np.float32)
  phi = scaling.norm_based_scaling_factor(n, n, rank_axis=1)
  np.testing.assert_array_equal(phi, 0.0)


def test_unknown_scaling_is_rejected():
  with pytest.raises(ValueError, match="scaling must be one of"):
    scaling.norm_based_scaling_factor(np.ones((1, 2, 2)), np.ones((1, 2, 2)), 1, "row")


@pytest.mark.parametrize("scaling_kind", ["column", "matrix"])
@pytest.mark.parametrize("rank_axis", [1, 2])
def test_input_channel_norms_are_the_squared_norms_along_the_rank_axis(scaling_kind, rank_axis):
  # The second output feeds ‖φ⊙R‖² = Σ_j φ_j² ‖R_j‖² in Fira's residual norm: per channel of
  # the kept side for either scaling, in float32 even for bf16 inputs.
  key_n, key_r = jax.random.split(jax.random.key(4))
  n = jax.random.normal(key_n, (3, 4, 6)).astype(jnp.bfloat16)
  r = jax.random.normal(key_r, (3, 4, 6)).astype(jnp.bfloat16)
  _, r_sq = scaling.scaling_factor_and_input_norms(n, r, rank_axis, scaling_kind)
  assert r_sq.dtype == jnp.float32
  expected = np.sum(np.square(np.asarray(r, np.float32)), axis=rank_axis, keepdims=True)
  chex.assert_trees_all_close(r_sq, expected, rtol=1e-6)
