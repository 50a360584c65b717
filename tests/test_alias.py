"""fira_adamw and galore_adamw, and their compositions with the optax/flax ecosystem."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fira_jax

PARAMS = {"tall": jnp.ones((12, 6)), "wide": jnp.ones((5, 9)), "bias": jnp.ones(9)}


def grads_at(step, params=PARAMS, scale=1.0):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(100 + step), len(leaves))
  return treedef.unflatten(
    [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
  )


def trajectory(tx, steps, params=PARAMS, grads=grads_at):
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for t in range(steps):
    u, state = update(grads(t), state, params)
    params = optax.apply_updates(params, u)
    out.append(params)
  return out, state


class FiraAdamWTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_weight_decay_is_applied_to_the_updated_weights(self):
    lr, wd = 0.05, 0.1
    plain = fira_jax.fira_adamw(lr, rank=2)
    decayed = fira_jax.fira_adamw(lr, rank=2, weight_decay=wd)
    u0, _ = self.variant(plain.update)(grads_at(0), plain.init(PARAMS), PARAMS)
    u1, _ = self.variant(decayed.update)(grads_at(0), decayed.init(PARAMS), PARAMS)
    expected = jax.tree.map(lambda u, p: u - lr * wd * (p + u), u0, PARAMS)
    chex.assert_trees_all_close(u1, expected, rtol=1e-6)

  def test_weight_decay_mask_selects_the_leaves(self):
    tx = fira_jax.fira_adamw(
      0.05, rank=2, weight_decay=0.1, mask={"tall": True, "wide": False, "bias": False}
    )
    plain = fira_jax.fira_adamw(0.05, rank=2)
    u, _ = tx.update(grads_at(0), tx.init(PARAMS), PARAMS)
    u0, _ = plain.update(grads_at(0), plain.init(PARAMS), PARAMS)
    chex.assert_trees_all_equal(u["wide"], u0["wide"])
    assert not np.allclose(u["tall"], u0["tall"])

  def test_learning_rate_schedule_is_followed(self):
    schedule = optax.linear_schedule(0.1, 0.0, 4)
    tx = fira_jax.fira_adamw(schedule, rank=2)
    const = fira_jax.fira_adamw(1.0, rank=2)
    state, cstate = tx.init(PARAMS), const.init(PARAMS)
    for t in range(3):
      u, state = tx.update(grads_at(t), state, PARAMS)
      c, cstate = const.update(grads_at(t), cstate, PARAMS)
      chex.assert_trees_all_close(u, jax.tree.map(lambda x, t=t: schedule(t) * x, c), rtol=1e-6)

  def test_inject_hyperparams_reproduces_and_changes_the_run(self):
    kwargs = dict(rank=2, update_proj_gap=2, scale=0.25, norm_growth_limit=1.01)
    injected = optax.inject_hyperparams(
      fira_jax.fira_adamw, static_args=("rank", "update_proj_gap")
    )(learning_rate=0.01, **kwargs)
    plain = fira_jax.fira_adamw(0.01, **kwargs)
    ours, state = trajectory(injected, 4)
    theirs, _ = trajectory(plain, 4)
    chex.assert_trees_all_close(ours[-1], theirs[-1], rtol=1e-5)
    assert set(state.hyperparams) >= {"learning_rate", "scale", "b1", "b2", "eps"}
    state.hyperparams["scale"] = jnp.asarray(1.0)
    u_changed, _ = injected.update(grads_at(9), state, PARAMS)
    state.hyperparams["scale"] = jnp.asarray(0.25)
    u_same, _ = injected.update(grads_at(9), state, PARAMS)
    assert not np.allclose(u_changed["tall"], u_same["tall"])

  def test_injected_and_plain_optimizers_store_the_same_state(self):
    # The inner state of the injected optimizer, limiter norms included, equals the plain
    # one's: a vanishing residual (α = 1, step 0 inside the rank-1 subspace) is where a
    # difference of squares once made them differ.
    params = {"w": jnp.zeros((8, 6))}
    kwargs = dict(rank=1, update_proj_gap=200, scale=1.0)
    grads = lambda t: {"w": jnp.ones((8, 6)) if t == 0 else grads_at(t, params)["w"]}
    injected = optax.inject_hyperparams(
      fira_jax.fira_adamw, static_args=("rank", "update_proj_gap")
    )(learning_rate=1e-3, **kwargs)
    plain = fira_jax.fira_adamw(1e-3, **kwargs)
    _, injected_state = trajectory(injected, 40, params, grads)
    _, plain_state = trajectory(plain, 40, params, grads)
    chex.assert_trees_all_close(injected_state.inner_state, plain_state, rtol=1e-4, atol=1e-6)

  def test_count_is_found_once_in_the_state_as_in_optax_adamw(self):
    for tx in (fira_jax.fira_adamw(1e-3, rank=2), optax.adamw(1e-3)):
      count = optax.tree_utils.tree_get(tx.init(PARAMS), "count")
      assert int(count) == 0
    scheduled = fira_jax.fira_adamw(optax.linear_schedule(1e-3, 0.0, 10), rank=2)
    assert isinstance(scheduled.init(PARAMS)[2], fira_jax.DecayUpdatedWeightsState)

  def test_inject_hyperparams_without_static_rank_explains_the_fix(self):
    with pytest.raises(TypeError, match="static_args"):
      optax.inject_hyperparams(fira_jax.fira_adamw)(learning_rate=0.01, rank=2).init(PARAMS)

  def test_multi_steps_accumulates_gradients_before_one_fira_step(self):
    k = 2
    multi = optax.MultiSteps(fira_jax.fira_adamw(0.01, rank=2, update_proj_gap=2), k)
    single = fira_jax.fira_adamw(0.01, rank=2, update_proj_gap=2)
    ours, _ = trajectory(multi, 8)
    mean_grads = lambda t: jax.tree.map(
      lambda a, b: (a + b) / 2, grads_at(2 * t), grads_at(2 * t + 1)
    )
    theirs, _ = trajectory(single, 4, grads=mean_grads)
    for t in range(4):
      chex.assert_trees_all_close(ours[2 * t + 1], theirs[t], rtol=1e-5, atol=1e-6)

  def test_partition_routes_a_subtree_to_fira(self):
    labels = {"tall": "fira", "wide": "fira", "bias": "sgd"}
    tx = optax.partition({"fira": fira_jax.fira_adamw(0.01, rank=2), "sgd": optax.sgd(0.1)}, labels)
    params, state = trajectory(tx, 3)
    fira_state = state.inner_states["fira"].inner_state[0]
    chex.assert_shape(fira_state.projector["tall"], (6, 2))
    expected_bias = PARAMS["bias"] - 0.1 * sum(grads_at(t)["bias"] for t in range(3))
    chex.assert_trees_all_close(params[-1]["bias"], expected_bias, rtol=1e-5)

  def test_apply_if_finite_skips_a_nan_step_and_keeps_the_state_finite(self):
    tx = optax.apply_if_finite(fira_jax.fira_adamw(0.01, rank=2), max_consecutive_errors=5)
    clean = fira_jax.fira_adamw(0.01, rank=2)
    bad = lambda t: jax.tree.map(lambda g: g * jnp.nan, grads_at(t)) if t == 1 else grads_at(t)
    shifted = lambda t: grads_at(t if t == 0 else t + 1)  # the same run without step 1
    ours, state = trajectory(tx, 4, grads=bad)
    theirs, _ = trajectory(clean, 3, grads=shifted)
    chex.assert_trees_all_close(ours[-1], theirs[-1], rtol=1e-5)
    chex.assert_tree_all_finite(state.inner_state)
    assert int(state.total_notfinite) == 1


class TinyMLP(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(8, 16, rngs=rngs)
    self.down = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.relu(self.up(x)))


def test_nnx_optimizer_trains_with_fira_on_kernels_only():
  model = TinyMLP(nnx.Rngs(0))
  tx = fira_jax.fira_adamw(
    1e-2,
    rank=2,
    scale=0.25,
    weight_dimension_numbers=fira_jax.dimension_numbers_for_paths("kernel"),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(0), (32, 8))
  y = jnp.sin(x[:, :4])
  loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer)) for _ in range(30)]
  assert losses[-1] < 0.7 * losses[0]
  fira_state = optimizer.opt_state[0]
  chex.assert_shape(fira_state.projector["up"]["kernel"][...], (8, 2))
  assert fira_state.projector["up"]["bias"] == optax.MaskedNode()


SHAPES = {"square": (8, 8), "tall": (12, 6), "wide": (5, 9), "bias": (9,)}


def galore_pair(rank, gap, scale, base):
  ours = optax.chain(
    fira_jax.scale_by_fira(
      rank, gap, scale, base_optimizer=base, compressed_side="larger", residual=False
    ),
    optax.scale_by_learning_rate(0.01),
  )
  theirs = optax.contrib.galore(0.01, rank, gap, scale, base_optimizer=base)
  return ours, theirs


@pytest.mark.parametrize("shape", ["square", "tall", "wide"])
def test_galore_path_agrees_with_optax_contrib_galore_within_a_gap(shape):
  # With Adam's moments carried across a refresh, SVD sign conventions differ (optax
  # fixes none), so compare within the first gap, where signs cancel exactly.
  params = {"w": jnp.ones(SHAPES[shape]), "bias": jnp.ones(9)}
  ours, theirs = galore_pair(3, 100, 0.5, optax.scale_by_adam())
  grads = lambda t: grads_at(t, params)
  a, _ = trajectory(ours, 6, params, grads)
  b, _ = trajectory(theirs, 6, params, grads)
  chex.assert_trees_all_close(a, b, rtol=2e-5, atol=1e-6)


def test_galore_path_agrees_with_optax_contrib_galore_across_refreshes():
  # A stateless, sign-equivariant base optimizer makes the comparison independent of signs.
  params = {k: jnp.ones(s) for k, s in SHAPES.items()}
  ours, theirs = galore_pair(3, 2, 0.25, optax.scale_by_rms(decay=0.0, eps=1e-3))
  grads = lambda t: grads_at(t, params)
  a, _ = trajectory(ours, 7, params, grads)
  b, _ = trajectory(theirs, 7, params, grads)
  chex.assert_trees_all_close(a, b, rtol=2e-5, atol=1e-6)


def test_galore_adamw_is_fira_adamw_without_the_residual():
  galore = fira_jax.galore_adamw(0.01, rank=2, scale=0.25)
  fira = fira_jax.fira_adamw(0.01, rank=2, scale=0.25)
  (g_params, g_state), (f_params, _) = trajectory(galore, 3), trajectory(fira, 3)
  assert g_state[0].residual_norm["tall"] == optax.MaskedNode()
  assert not np.allclose(g_params[-1]["tall"], f_params[-1]["tall"])
  chex.assert_trees_all_close(g_params[-1]["bias"], f_params[-1]["bias"], rtol=1e-6)
