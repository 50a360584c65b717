"""Bad input and bad gradients: clear errors, defined behaviour, no state poisoned for good."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fira_jax
from fira_jax import bases

PROJECTIONS = ("svd", "randomized_svd", "random")
PARAMS = {"w": jnp.zeros((12, 8)), "b": jnp.zeros(8)}


def gaussian(params, step, scale=1.0):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(step), len(leaves))
  return treedef.unflatten(
    [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
  )


def poisoned(grads, value, where=(0, 0)):
  """``grads`` with one entry of the matrix ``w`` set to ``value``."""
  return dict(grads, w=grads["w"].at[where].set(value))


def all_finite(tree) -> bool:
  return all(
    bool(jnp.all(jnp.isfinite(x)))
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
  )


def fira(**kwargs):
  return fira_jax.scale_by_fira(**{"rank": 4, "update_proj_gap": 3, **kwargs})


def run(tx, grads_per_step, params=PARAMS):
  state = tx.init(params)
  update = jax.jit(tx.update)
  updates, states = [], []
  for grads in grads_per_step:
    u, state = update(grads, state, params)
    updates.append(u)
    states.append(state)
  return updates, states


# --- Bad arguments and mismatched trees get errors that name what is wrong. -------------


@pytest.mark.parametrize(
  ("make", "error", "message"),
  [
    (lambda: fira_jax.scale_by_fira(rank=True), TypeError, "rank must be a Python int"),
    (lambda: fira_jax.scale_by_fira(rank=-3), ValueError, "rank must be positive, got -3"),
    (lambda: fira_jax.scale_by_fira(update_proj_gap=2.0), TypeError, "update_proj_gap must be"),
    (lambda: fira_jax.scale_by_fira(update_proj_gap=-1), ValueError, "update_proj_gap must be"),
    (lambda: fira_jax.scale_by_fira(scale=-0.25), ValueError, "scale must be positive"),
    (lambda: fira_jax.fira_adamw(1e-3, b1=1.0), ValueError, r"b1 must be in \[0, 1\)"),
    (lambda: fira_jax.fira_adamw(1e-3, b2=-0.1), ValueError, r"b2 must be in \[0, 1\)"),
    (lambda: fira_jax.fira_adamw(1e-3, eps=-1e-8), ValueError, "eps must be >= 0"),
    (lambda: fira_jax.galore_adamw(1e-3, rank=0), ValueError, "rank must be positive"),
    (lambda: fira_jax.clip_by_norm_growth(0.5), ValueError, "growth_limit must be >= 1"),
    (lambda: fira_jax.clip_by_norm_growth(np.float32(0.5)), ValueError, "growth_limit must"),
    (lambda: fira_jax.clip_by_norm_growth(float("nan")), ValueError, "growth_limit must be >= 1"),
    (lambda: fira_jax.fira_adamw(1e-3, projection="svd2"), ValueError, "projection must be"),
  ],
)
def test_bad_hyperparameters_are_rejected_naming_the_argument(make, error, message):
  with pytest.raises(error, match=message):
    make()


def test_updates_of_another_tree_name_the_mismatch():
  tx = fira()
  state = tx.init(PARAMS)
  other = {"v": jnp.zeros((12, 8)), "b": jnp.zeros(8)}
  with pytest.raises(ValueError, match="does not match the tree the state was initialized"):
    tx.update(other, state)


def test_updates_of_another_shape_name_the_parameter_and_shapes():
  tx = fira()
  state = tx.init(PARAMS)
  wider = {"w": jnp.zeros((12, 10)), "b": jnp.zeros(8)}
  with pytest.raises(ValueError, match=r"parameter \['w'\] has shape \(12, 10\).*\(8, 4\)"):
    tx.update(wider, state)


def test_updates_of_another_uncompressed_size_name_the_state_leaf():
  tx = fira()
  state = tx.init(PARAMS)
  taller = {"w": jnp.zeros((16, 8)), "b": jnp.zeros(8)}  # same projector, other moments
  with pytest.raises(ValueError, match=r"base_optimizer_state\.mu\['w'\].*\(12, 4\).*\(16, 4\)"):
    tx.update(taller, state)


# --- Degenerate gradients. -------------------------------------------------------------


@pytest.mark.parametrize("projection_name", PROJECTIONS)
def test_all_zero_gradients_give_zero_updates_and_finite_state(projection_name):
  zeros = jax.tree.map(jnp.zeros_like, PARAMS)
  updates, states = run(fira(projection=projection_name), [zeros] * 4)
  for u in updates:
    chex.assert_trees_all_equal(u, zeros)
  chex.assert_tree_all_finite(states[-1])


@pytest.mark.parametrize("projection_name", PROJECTIONS)
def test_a_zero_column_gets_a_zero_update_and_the_rest_is_finite(projection_name):
  grads = [gaussian(PARAMS, t) for t in range(4)]
  grads = [dict(g, w=g["w"].at[:, 3].set(0.0)) for g in grads]
  updates, states = run(fira(projection=projection_name), grads)
  chex.assert_tree_all_finite((updates, states[-1]))
  # The column's Adam state is built from zeros; with the default "smaller" side the
  # uncompressed side is the 12 inputs, so column 3 of the outputs is compressed.
  assert float(jnp.max(jnp.abs(updates[-1]["w"]))) > 0


def test_first_nonzero_residual_after_zero_gradients_is_not_throttled_by_the_limiter():
  # The reference records ‖S₀‖ = 0 and then lets ‖S‖ grow from 1e-8 by 1% a step.
  zeros = jax.tree.map(jnp.zeros_like, PARAMS)
  g = gaussian(PARAMS, 1)
  _, after_zero = run(fira(update_proj_gap=1), [zeros, g])
  _, fresh = run(fira(update_proj_gap=1), [g])
  np.testing.assert_allclose(
    after_zero[-1].residual_norm["w"], fresh[-1].residual_norm["w"], rtol=1e-5
  )
  assert float(fresh[-1].residual_norm["w"]) > 0.1


# --- Non-finite gradients: the step is NaN, the state is not. -------------------------


@pytest.mark.parametrize("bad_value", [jnp.nan, jnp.inf, -jnp.inf, 1e30])
@pytest.mark.parametrize("projection_name", PROJECTIONS)
def test_one_bad_gradient_gives_a_non_finite_step_but_a_finite_projector_and_limiter(
  bad_value, projection_name
):
  grads = [gaussian(PARAMS, t) for t in range(6)]
  grads[2] = poisoned(grads[2], bad_value)
  updates, states = run(fira(projection=projection_name), grads)
  assert not bool(jnp.all(jnp.isfinite(updates[2]["w"])))  # visible, for apply_if_finite
  for state in states:
    chex.assert_tree_all_finite((state.projector, state.residual_norm))


@pytest.mark.parametrize("bad_value", [jnp.nan, jnp.inf])
@pytest.mark.parametrize("projection_name", PROJECTIONS)
def test_apply_if_finite_skips_bad_steps_and_training_continues(bad_value, projection_name):
  tx = optax.apply_if_finite(
    fira_jax.fira_adamw(1e-2, rank=4, update_proj_gap=3, projection=projection_name),
    max_consecutive_errors=3,
  )
  params = PARAMS
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(7):
    g = gaussian(params, t)
    if t in (0, 3, 4):  # the first step, a refresh step and the one after
      g = poisoned(g, bad_value, (t, 1))
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
  chex.assert_tree_all_finite((params, state))
  assert int(state.total_notfinite) == 3
  assert float(jnp.max(jnp.abs(params["w"]))) > 0  # the good steps trained


def test_nan_gradient_on_a_refresh_step_keeps_the_previous_projector():
  grads = [gaussian(PARAMS, t) for t in range(4)]
  grads[3] = poisoned(grads[3], jnp.nan)  # step 3 refreshes (gap 3)
  _, states = run(fira(), grads)
  chex.assert_trees_all_equal(states[3].projector, states[2].projector)


def test_nan_gradient_on_step_zero_refreshes_on_the_next_step():
  grads = [poisoned(gaussian(PARAMS, 0), jnp.nan), gaussian(PARAMS, 1), gaussian(PARAMS, 2)]
  _, states = run(fira(), grads)
  np.testing.assert_array_equal(states[0].projector["w"], 0.0)
  expected = fira_jax.svd_projector(grads[1]["w"][None], 4, "output")[0]
  np.testing.assert_allclose(states[1].projector["w"], expected, atol=1e-6)
  chex.assert_trees_all_equal(states[2].projector, states[1].projector)  # back on schedule


@pytest.mark.parametrize("staggered", [False, True])
def test_svd_that_never_converges_leaves_finite_updates_and_no_projector(monkeypatch, staggered):
  # LAPACK's gesdd reports non-convergence through NaN outputs under JAX.
  failing = lambda x, rank, side: jnp.full(
    x.shape[:1] + ((x.shape[1], rank) if side == "reduction" else (x.shape[2], rank)),
    jnp.nan,
    x.dtype,
  )
  monkeypatch.setattr(bases, "svd_projector", failing)
  grads = [gaussian(PARAMS, t) for t in range(5)]
  updates, states = run(fira(staggered_refresh=staggered), grads)
  chex.assert_tree_all_finite((updates, states[-1]))
  np.testing.assert_array_equal(states[-1].projector["w"], 0.0)  # retried every step


def test_svd_failing_after_a_good_refresh_keeps_that_refresh(monkeypatch):
  grads = [gaussian(PARAMS, t) for t in range(5)]
  tx = fira()
  state = tx.init(PARAMS)
  state = tx.update(grads[0], state)[1]
  good = state.projector["w"]
  monkeypatch.setattr(bases, "svd_projector", lambda x, rank, side: jnp.full((1, 8, rank), jnp.nan))
  for g in grads[1:]:  # step 3 is a refresh that fails
    u, state = tx.update(g, state)
    chex.assert_tree_all_finite((u, state))
  np.testing.assert_array_equal(state.projector["w"], good)


@pytest.mark.parametrize("projection_name", PROJECTIONS)
def test_huge_but_representable_gradients_give_the_same_updates_as_unit_ones(projection_name):
  # Adam's normalisation makes the step scale-free while g² and column norms fit in float32.
  grads = [gaussian(PARAMS, t) for t in range(4)]
  huge = [jax.tree.map(lambda x: 1e15 * x, g) for g in grads]
  updates, _ = run(fira(projection=projection_name), grads)
  updates_huge, states = run(fira(projection=projection_name), huge)
  chex.assert_tree_all_finite((updates_huge, states[-1]))
  chex.assert_trees_all_close(updates_huge, updates, rtol=5e-3, atol=3e-4)  # ε differs in effect


# --- Precisions and shapes. -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("projection_name", PROJECTIONS)
def test_half_precision_params_train_with_finite_state(dtype, projection_name):
  params = jax.tree.map(lambda x: x.astype(dtype), PARAMS)
  # 1000: g² overflows float16 (max 65504); the moments are computed in float32.
  grads = [gaussian(params, t, scale=1000.0) for t in range(5)]
  updates, states = run(fira(projection=projection_name), grads, params)
  chex.assert_trees_all_equal_dtypes(updates[-1], params)
  chex.assert_tree_all_finite((updates, states[-1]))
  updates32, _ = run(
    fira(projection=projection_name),
    [jax.tree.map(lambda x: x.astype(jnp.float32), g) for g in grads],
  )
  chex.assert_trees_all_close(
    jax.tree.map(lambda x: x.astype(jnp.float32), updates[-1]), updates32[-1], atol=0.05, rtol=0.05
  )


@pytest.mark.parametrize("projection_name", PROJECTIONS)
def test_degenerate_shapes_and_non_float_leaves_are_handled(projection_name):
  params = {
    "row": jnp.zeros((1, 9)),
    "column": jnp.zeros((9, 1)),
    "small": jnp.zeros((3, 2)),  # rank 4 > both sides
    "empty": jnp.zeros((0, 5)),
    "step": jnp.zeros((2, 3), jnp.int32),
    "flag": jnp.zeros((4,), jnp.bool_),
  }
  tx = fira_jax.fira_adamw(1e-2, rank=4, weight_decay=0.1, projection=projection_name)
  state = tx.init(params)
  grads = {
    k: (jnp.ones_like(v) if jnp.issubdtype(v.dtype, jnp.inexact) else v) for k, v in params.items()
  }
  new = params
  for _ in range(3):
    updates, state = jax.jit(tx.update)(grads, state, new)
    new = optax.apply_updates(new, updates)
  chex.assert_trees_all_equal_shapes_and_dtypes(new, params)
  chex.assert_tree_all_finite(jax.tree.map(lambda x: x.astype(jnp.float32), new))
  np.testing.assert_array_equal(new["step"], params["step"])  # not trained
  np.testing.assert_array_equal(new["flag"], params["flag"])
  for k in ("row", "column", "small"):
    assert float(jnp.min(jnp.abs(new[k]))) > 0, k  # trained
  fira_state = state[0]
  assert fira_state.base_optimizer_state.mu["step"] == optax.MaskedNode()
  assert fira_state.projector["empty"] == optax.MaskedNode()
