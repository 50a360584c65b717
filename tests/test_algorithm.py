"""Algorithm 1 as a chain of pieces: it agrees with the fused step, and each piece stands alone."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fira_jax
from fira_jax import FiraDimensionNumbers

PARAMS = {
  "tall": jnp.zeros((12, 6)),  # output side compressed
  "wide": jnp.zeros((5, 9)),  # reduction side compressed
  "stacked": jnp.zeros((3, 6, 10)),  # (layers, in, out): one projector per layer
  "bias": jnp.zeros(9),  # not projected: plain Adam
}
DIMS = {
  "tall": FiraDimensionNumbers(),
  "wide": FiraDimensionNumbers(),
  "stacked": FiraDimensionNumbers(1, 2),
  "bias": None,
}
GROWTH = (1.0, 1.0, 8.0, 1.0, 0.1, 20.0)  # per step: sudden growth makes the limiter act


def gradients(step: int):
  keys = jax.random.split(jax.random.key(step), len(PARAMS))
  return {
    name: GROWTH[step] * jax.random.normal(key, x.shape)
    for key, (name, x) in zip(keys, PARAMS.items(), strict=True)
  }


def trajectories(tx):
  state, update = tx.init(PARAMS), jax.jit(tx.update)
  outputs = []
  for step in range(len(GROWTH)):
    u, state = update(gradients(step), state)
    outputs.append(u)
  return outputs


CASES = [
  dict(projection=projection, staggered_refresh=staggered, formulation=formulation, scaling=s)
  for projection, staggered, (formulation, s) in itertools.product(
    fira_jax.PROJECTIONS,
    (False, True),
    (("reference", "column"), ("paper", "matrix")),
  )
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(map(str, o.values())))
def test_chain_of_pieces_agrees_with_the_fused_step(options):
  kwargs = dict(rank=3, update_proj_gap=2, scale=0.25, weight_dimension_numbers=DIMS, **options)
  fused = trajectories(fira_jax.scale_by_fira(**kwargs))
  chained = trajectories(fira_jax.fira_chain(**kwargs))
  for step, (a, b) in enumerate(zip(fused, chained, strict=True)):
    chex.assert_trees_all_close(a, b, rtol=2e-5, atol=1e-6, custom_message=f"step {step}")


def test_galore_is_the_chain_without_scaling_and_limiter():
  space = fira_jax.Subspace(rank=3, weight_dimension_numbers=DIMS)
  galore = optax.chain(
    fira_jax.subspace_projection(space, update_proj_gap=2),
    fira_jax.in_subspace(fira_jax.scale_by_uncorrected_adam(), space),
    fira_jax.back_projection(scale=0.25),
    fira_jax.scale_by_adam_step_size(),
  )
  fused = fira_jax.scale_by_fira(
    rank=3, update_proj_gap=2, scale=0.25, weight_dimension_numbers=DIMS, residual=False
  )
  for a, b in zip(trajectories(fused), trajectories(galore), strict=True):
    chex.assert_trees_all_close(a, b, rtol=2e-5, atol=1e-6)


def test_base_optimizer_in_the_subspace_holds_only_low_rank_moments():
  space = fira_jax.Subspace(rank=3, weight_dimension_numbers=DIMS)
  state = fira_jax.in_subspace(optax.scale_by_adam(), space).init(PARAMS)
  chex.assert_shape(state.mu["tall"], (12, 3))
  chex.assert_shape(state.nu["wide"], (3, 9))
  chex.assert_shape(state.mu["stacked"], (3, 3, 10))
  chex.assert_shape(state.mu["bias"], (9,))


def test_norm_based_scaling_over_a_random_basis_with_another_base_optimizer():
  # A stateless random basis, RMSProp in the subspace, Fira's residual:
  # each piece composes with what optax offers.
  space = fira_jax.Subspace(rank=3, weight_dimension_numbers=DIMS)
  tx = optax.chain(
    fira_jax.subspace_projection(space, projection="random"),
    fira_jax.in_subspace(optax.scale_by_rms(), space),
    fira_jax.norm_based_scaling(scale=0.25),
    fira_jax.limit_residual_growth(space, growth_limit=1.01),
    fira_jax.back_projection(scale=0.25),
  )
  outputs = trajectories(tx)
  for u in outputs:
    chex.assert_trees_all_equal_shapes_and_dtypes(u, PARAMS)
    chex.assert_tree_all_finite(u)
  assert all(float(jnp.linalg.norm(u["tall"])) > 0 for u in outputs)


def test_limiter_piece_caps_the_residual_growth_per_matrix():
  space = fira_jax.Subspace(rank=3, weight_dimension_numbers=DIMS)
  tx = optax.chain(
    fira_jax.subspace_projection(space),
    fira_jax.in_subspace(fira_jax.scale_by_uncorrected_adam(), space),
    fira_jax.norm_based_scaling(scale=0.25),
    fira_jax.limit_residual_growth(space, growth_limit=1.01),
  )
  state, update = tx.init(PARAMS), jax.jit(tx.update)
  norms = []
  for step in range(len(GROWTH)):
    _, state = update(gradients(step), state)
    norms.append(np.asarray(state[3].residual_norm["stacked"]))
  assert norms[0].shape == (3,)
  for previous, current in itertools.pairwise(norms):
    assert np.all(current <= 1.01 * (previous + 1e-8) * (1 + 1e-5))


def test_pieces_pass_unprojected_leaves_to_the_base_optimizer_only():
  space = fira_jax.Subspace(rank=3, weight_dimension_numbers=DIMS)
  tx = fira_jax.fira_chain(rank=3, weight_dimension_numbers=DIMS, base_optimizer=optax.sgd(1.0))
  u, _ = tx.update(gradients(0), tx.init(PARAMS))
  np.testing.assert_allclose(u["bias"], -gradients(0)["bias"], rtol=1e-6)
  assert space.layouts(PARAMS)[0] is None  # "bias" flattens first: not projected


def test_fira_with_adafactor_factored_second_moment_keeps_rank_r_factors_and_trains():
  # optax.scale_by_factored_rms needs params (their shape): in_subspace gives it the
  # subspace's shape, so its row/column factors are those of the rank-r matrices.
  target = {"w": jax.random.normal(jax.random.key(0), (32, 24)), "b": jnp.ones(24)}
  params = jax.tree.map(jnp.zeros_like, target)
  loss = lambda p: sum(0.5 * jnp.sum((p[k] - target[k]) ** 2) for k in p)
  tx = optax.chain(
    fira_jax.fira_chain(
      rank=4, scale=0.25, base_optimizer=optax.scale_by_factored_rms(min_dim_size_to_factor=2)
    ),
    optax.scale(-0.05),
  )
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  losses = [float(loss(params))]
  for _ in range(40):
    params, state = step(params, state)
    losses.append(float(loss(params)))
  factored = state[0][1]  # in_subspace's state: Adafactor's FactoredState
  # w is (32, 24): the output side (24) is compressed, R = G P is (32, 4).
  # Adafactor keeps one factor per side of R: 32 + 4 floats, not 32 x 4 (nor 32 x 24).
  assert sorted([factored.v_row["w"].shape, factored.v_col["w"].shape]) == [(4,), (32,)]
  assert factored.v["w"].size == 1  # no full (or rank-r) second moment kept
  assert factored.v["b"].shape == (24,)  # vectors are not factored
  assert int(factored.count) == 40
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.2 * losses[0], losses[::8]
