"""Subspace bases: exact and randomized SVD, the random basis, the sign convention."""

from __future__ import annotations

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from fira_jax import bases
from fira_jax import subspace


def test_canonical_signs_make_the_largest_entry_of_each_column_positive():
  basis = jnp.array([[0.6, -0.1], [-0.8, 0.3], [0.0, -0.9]])
  fixed = bases.canonical_signs(basis)
  np.testing.assert_allclose(fixed, jnp.array([[-0.6, 0.1], [0.8, -0.3], [0.0, 0.9]]))


def test_canonical_signs_break_ties_at_the_first_entry():
  fixed = bases.canonical_signs(jnp.array([[-0.5], [0.5]]))
  np.testing.assert_allclose(fixed, jnp.array([[0.5], [-0.5]]))


@pytest.mark.parametrize("compressed", ["reduction", "output"])
def test_svd_projector_is_orthonormal_and_spans_the_top_subspace(compressed):
  key_u, key_v = jax.random.split(jax.random.key(0))
  u = jnp.linalg.qr(jax.random.normal(key_u, (12, 3)))[0]
  v = jnp.linalg.qr(jax.random.normal(key_v, (9, 3)))[0]
  x = (u * jnp.array([5.0, 3.0, 2.0])) @ v.T  # exact rank 3, (reduction, output) = (12, 9)
  p = bases.svd_projector(x[None], 3, compressed)[0]
  assert p.shape == ((12, 3) if compressed == "reduction" else (9, 3))
  np.testing.assert_allclose(p.T @ p, jnp.eye(3), atol=1e-5)
  # projecting and back-projecting a matrix in the subspace loses nothing
  r = subspace.project(x[None], p[None], compressed)
  back = subspace.project_back(r, p[None], compressed)[0]
  np.testing.assert_allclose(back, x, atol=1e-4)


def test_svd_projector_does_not_depend_on_the_input_sign():
  x = jax.random.normal(jax.random.key(1), (1, 7, 5))
  chex.assert_trees_all_close(
    bases.svd_projector(x, 3, "reduction"), bases.svd_projector(-x, 3, "reduction"), atol=1e-5
  )


def test_svd_projector_keeps_the_gradient_dtype():
  x = jax.random.normal(jax.random.key(2), (2, 6, 4)).astype(jnp.bfloat16)
  assert bases.svd_projector(x, 2, "output").dtype == jnp.bfloat16


@pytest.mark.parametrize("power_iterations", [0, 1, 2])
@pytest.mark.parametrize("compressed", ["reduction", "output"])
def test_randomized_and_exact_bases_agree_on_a_matrix_of_exact_rank(compressed, power_iterations):
  key_u, key_v, key_o = jax.random.split(jax.random.key(3), 3)
  u = jnp.linalg.qr(jax.random.normal(key_u, (2, 40, 4)))[0]
  v = jnp.linalg.qr(jax.random.normal(key_v, (2, 30, 4)))[0]
  x = jnp.einsum("bkr,r,bor->bko", u, jnp.array([9.0, 5.0, 2.0, 1.0]), v)  # rank 4
  keys = jax.random.split(key_o, 2)
  exact = bases.svd_projector(x, 4, compressed)
  approx = bases.randomized_svd_projector(x, 4, compressed, keys, power_iterations=power_iterations)
  # same vectors (distinct singular values, canonical signs), hence the same subspace
  np.testing.assert_allclose(approx, exact, atol=1e-4)
  np.testing.assert_allclose(
    jnp.einsum("bkr,bsr->bks", approx, approx), jnp.einsum("bkr,bsr->bks", exact, exact), atol=1e-5
  )


def test_randomized_basis_captures_the_top_energy_of_a_decaying_spectrum():
  key_u, key_v, key_o = jax.random.split(jax.random.key(4), 3)
  u = jnp.linalg.qr(jax.random.normal(key_u, (200, 60)))[0]
  v = jnp.linalg.qr(jax.random.normal(key_v, (150, 60)))[0]
  x = ((u / (1.0 + jnp.arange(60.0))) @ v.T)[None]  # σ_i = 1 / i: slow decay
  exact = bases.svd_projector(x, 10, "reduction")[0]
  approx = bases.randomized_svd_projector(x, 10, "reduction", jax.random.split(key_o, 1))[0]
  ratio = jnp.linalg.norm(approx.T @ x[0]) / jnp.linalg.norm(exact.T @ x[0])
  assert 0.99 <= float(ratio) <= 1.0 + 1e-6
  np.testing.assert_allclose(approx.T @ approx, jnp.eye(10), atol=1e-5)


def test_randomized_basis_keeps_the_gradient_dtype_and_rank():
  x = jax.random.normal(jax.random.key(5), (3, 16, 7)).astype(jnp.bfloat16)
  keys = jax.random.split(jax.random.key(0), 3)
  p = bases.randomized_svd_projector(x, 5, "output", keys)
  assert p.shape == (3, 7, 5)
  assert p.dtype == jnp.bfloat16


def test_random_basis_has_identity_expected_gram():
  keys = jax.random.split(jax.random.key(6), 2000)
  grams = jax.vmap(lambda k: (p := bases.random_projector(k, 32, 4, jnp.float32)).T @ p)(keys)
  np.testing.assert_allclose(grams.mean(0), jnp.eye(4), atol=0.02)
  assert float(grams[:, 0, 0].std()) > 0.1  # each draw is not orthonormal, only on average


def test_random_basis_is_a_function_of_its_key():
  key = jax.random.key(9)
  a = bases.random_projector(key, 12, 3, jnp.float32)
  b = bases.random_projector(key, 12, 3, jnp.float32)
  chex.assert_trees_all_equal(a, b)
  c = bases.random_projector(jax.random.key(10), 12, 3, jnp.float32)
  assert not np.allclose(a, c)


def test_randomized_basis_rejects_negative_power_iterations():
  x, keys = jnp.ones((1, 4, 4)), jax.random.split(jax.random.key(0), 1)
  with pytest.raises(ValueError, match="power_iterations must be >= 0"):
    bases.randomized_svd_projector(x, 2, "reduction", keys, power_iterations=-1)


def low_rank_matrix(key, shape, singular_values):
  key_u, key_v = jax.random.split(key)
  k = len(singular_values)
  u = jnp.linalg.qr(jax.random.normal(key_u, (shape[0], k)))[0]
  v = jnp.linalg.qr(jax.random.normal(key_v, (shape[1], k)))[0]
  return (u * jnp.asarray(singular_values, jnp.float32)) @ v.T


@pytest.mark.parametrize("true_rank", [3, 18])  # rank 10 + oversampling 16 = 26 > both
def test_randomized_basis_of_a_rank_deficient_matrix_is_finite_and_captures_it(true_rank):
  # Cholesky-QR's usual failure: Y = A Ω has rank < its width, so YᵀY is singular.
  x = low_rank_matrix(jax.random.key(7), (120, 90), 1.0 + jnp.arange(true_rank))[None]
  p = bases.randomized_svd_projector(x, 10, "reduction", jax.random.split(jax.random.key(8), 1))[0]
  assert bool(jnp.all(jnp.isfinite(p)))
  exact = bases.svd_projector(x, 10, "reduction")[0]
  captured = jnp.linalg.norm(p.T @ x[0]) / jnp.linalg.norm(exact.T @ x[0])
  np.testing.assert_allclose(captured, 1.0, atol=1e-5)
  kept = min(true_rank, 10)  # columns in the matrix's range are orthonormal
  np.testing.assert_allclose(p[:, :kept].T @ p[:, :kept], jnp.eye(kept), atol=1e-5)
  assert float(jnp.max(jnp.linalg.norm(p, axis=0))) <= 1.0 + 1e-5  # the rest: shrunk


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e30])
def test_randomized_basis_is_finite_for_zero_tiny_and_huge_gradients(scale):
  x = scale * jax.random.normal(jax.random.key(9), (1, 40, 30))
  p = bases.randomized_svd_projector(x, 4, "output", jax.random.split(jax.random.key(0), 1))
  assert bool(jnp.all(jnp.isfinite(p)))
  if scale:  # the basis does not depend on the gradient's scale
    unit = bases.randomized_svd_projector(
      x / scale, 4, "output", jax.random.split(jax.random.key(0), 1)
    )
    np.testing.assert_allclose(p, unit, atol=1e-5)


def test_randomized_basis_is_orthonormal_on_an_ill_conditioned_matrix():
  # σ from 1 to 1e-5 over the range finder's 26 columns: one Cholesky-QR loses
  # orthogonality like ε κ² ≫ 1 here; the three-pass one must not.
  x = low_rank_matrix(jax.random.key(10), (200, 150), 10.0 ** (-jnp.arange(60) / 5))[None]
  p = bases.randomized_svd_projector(x, 10, "reduction", jax.random.split(jax.random.key(1), 1))[0]
  np.testing.assert_allclose(p.T @ p, jnp.eye(10), atol=1e-5)
  exact = bases.svd_projector(x, 10, "reduction")[0]
  captured = jnp.linalg.norm(p.T @ x[0]) / jnp.linalg.norm(exact.T @ x[0])
  np.testing.assert_allclose(captured, 1.0, atol=1e-5)


def test_randomized_basis_of_a_batch_equals_each_matrix_alone():
  x = jax.random.normal(jax.random.key(11), (3, 30, 20))
  keys = jax.random.split(jax.random.key(12), 3)
  batched = bases.randomized_svd_projector(x, 4, "reduction", keys)
  for b in range(3):
    alone = bases.randomized_svd_projector(x[b : b + 1], 4, "reduction", keys[b : b + 1])
    np.testing.assert_allclose(batched[b : b + 1], alone, atol=1e-5)


def test_randomized_basis_uses_no_qr_or_svd():
  # Matrix products and small Cholesky/eigh only, so that no primitive forces a sharded
  # gradient to be gathered.
  x = jnp.zeros((4, 24, 40))
  keys = jax.random.split(jax.random.key(0), 4)
  jaxpr = jax.make_jaxpr(lambda x: bases.randomized_svd_projector(x, 4, "reduction", keys))(x)

  def collect(jaxpr):
    for eqn in jaxpr.eqns:
      names.add(eqn.primitive.name)
      for sub in jax_core.jaxprs_in_params(eqn.params):
        collect(sub)

  names = set()
  collect(jaxpr.jaxpr)
  assert names.isdisjoint({"householder_product", "geqrf", "qr", "svd"}), names
  assert {"cholesky", "eigh", "dot_general"} <= names


def test_stacked_randomized_bases_do_not_deadlock_on_two_threads():
  # Four stacked LLaMA-60M-sized leaves refreshed in one jitted function, in a child
  # limited to two CPUs: with batched Cholesky calls this hung on every try (the
  # factorizations start from the intra-op pool threads that finish the products).
  code = (
    "import os; os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2]);"
    "import jax; from fira_jax import bases as p;"
    "k = jax.random.split(jax.random.key(0), 4);"
    "f = jax.jit(lambda xs: [p.randomized_svd_projector(x, 128, 'reduction', k) for x in xs]);"
    "xs = [jax.random.normal(jax.random.key(i), (4, 512, 1376 + i)) for i in range(4)];"
    "[jax.block_until_ready(f(xs)) for _ in range(3)]; print('done')"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  try:
    proc = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
  except subprocess.TimeoutExpired:
    pytest.fail("the refresh of four stacked leaves did not finish in 120 s (deadlock?)")
  assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-2000:]
