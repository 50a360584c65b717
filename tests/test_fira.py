"""scale_by_fira: state, refresh schedule, residual, scaling, limiter, stacked leaves."""

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


def random_grads(params, step, scale=1.0):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(step), len(leaves))
  return treedef.unflatten(
    [
      scale * jax.random.normal(k, jnp.shape(x), jnp.asarray(x).dtype)
      for k, x in zip(keys, leaves, strict=True)
    ]
  )


def run(tx, params, steps, *, jit=True, scales=None):
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  outputs, states = [], []
  for t in range(steps):
    g = random_grads(params, t, 1.0 if scales is None else scales[t])
    u, state = update(g, state, params)
    outputs.append(u)
    states.append(state)
  return outputs, states


PARAMS = {
  "tall": jnp.zeros((12, 6)),  # (in, out): out smaller -> output side compressed
  "wide": jnp.zeros((5, 9)),
  "bias": jnp.zeros(9),
}


class ScaleByFiraTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_state_shapes_and_dtypes(self):
    params = dict(PARAMS, half=jnp.zeros((8, 16), jnp.bfloat16))
    tx = fira_jax.scale_by_fira(rank=3)
    state = self.variant(tx.init)(params)
    chex.assert_shape(state.projector["tall"], (6, 3))
    chex.assert_shape(state.projector["wide"], (5, 3))
    chex.assert_shape(state.projector["half"], (8, 3))
    assert state.projector["half"].dtype == jnp.bfloat16
    assert state.projector["bias"] == optax.MaskedNode()
    adam_state = state.base_optimizer_state
    chex.assert_shape(adam_state.mu["tall"], (12, 3))
    chex.assert_shape(adam_state.nu["wide"], (3, 9))
    chex.assert_shape(adam_state.mu["bias"], (9,))
    assert adam_state.mu["half"].dtype == jnp.bfloat16
    chex.assert_shape(state.residual_norm["tall"], ())
    assert state.residual_norm["tall"].dtype == jnp.float32
    assert state.residual_norm["bias"] == optax.MaskedNode()
    assert state.count.dtype == jnp.int32

  @chex.variants(with_jit=True, without_jit=True)
  def test_update_is_finite_and_shaped_like_params(self):
    tx = fira_jax.scale_by_fira(rank=3, scale=0.25)
    state = tx.init(PARAMS)
    update = self.variant(tx.update)
    for t in range(3):
      u, state = update(random_grads(PARAMS, t), state)
      chex.assert_trees_all_equal_shapes_and_dtypes(u, PARAMS)
      chex.assert_tree_all_finite(u)

  def test_rank_is_clipped_to_the_matrix(self):
    state = fira_jax.scale_by_fira(rank=100).init(PARAMS)
    chex.assert_shape(state.projector["tall"], (6, 6))
    chex.assert_shape(state.base_optimizer_state.mu["wide"], (5, 9))

  def test_refresh_happens_exactly_at_multiples_of_the_gap(self):
    gap = 3
    _, states = run(fira_jax.scale_by_fira(rank=2, update_proj_gap=gap), PARAMS, 10)
    for t in range(1, 10):
      same = np.array_equal(states[t].projector["tall"], states[t - 1].projector["tall"])
      assert same == (t % gap != 0), f"step {t}"

  def test_moments_and_limiter_persist_across_refreshes(self):
    _, states = run(fira_jax.scale_by_fira(rank=2, update_proj_gap=2), PARAMS, 3)
    # step 2 refreshes: moments are updated from their previous value, not reset
    mu1 = states[1].base_optimizer_state.mu["tall"]
    mu2 = states[2].base_optimizer_state.mu["tall"]
    assert float(jnp.linalg.norm(mu1)) > 0
    np.testing.assert_allclose(
      mu2,
      0.9 * mu1 + 0.1 * random_grads(PARAMS, 2)["tall"] @ states[2].projector["tall"],
      rtol=1e-5,
      atol=1e-6,
    )

  def test_one_dimensional_leaves_get_plain_adam(self):
    tx = fira_jax.scale_by_fira(rank=2, b1=0.8, b2=0.99, eps=1e-5)
    adam = optax.chain(
      fira_jax.scale_by_uncorrected_adam(0.8, 0.99, 1e-5),
      fira_jax.scale_by_adam_step_size(0.8, 0.99),
    )
    ours, _ = run(tx, PARAMS, 4)
    state = adam.init(PARAMS["bias"])
    for t in range(4):
      u, state = adam.update(random_grads(PARAMS, t)["bias"], state)
      chex.assert_trees_all_close(ours[t]["bias"], u, rtol=1e-6)

  def test_stacked_leaves_equal_separate_per_layer_leaves(self):
    layers = [jnp.zeros((6, 10)), jnp.zeros((6, 10)), jnp.zeros((6, 10))]
    separate = {f"layer{i}": w for i, w in enumerate(layers)}
    spec = FiraDimensionNumbers(reduction_axis=1, output_axis=2)
    tx_sep = fira_jax.scale_by_fira(rank=3, update_proj_gap=2, scale=0.25)
    tx_stk = fira_jax.scale_by_fira(
      rank=3, update_proj_gap=2, scale=0.25, weight_dimension_numbers=spec
    )
    s_sep, s_stk = tx_sep.init(separate), tx_stk.init(jnp.stack(layers))
    chex.assert_shape(s_stk.projector, (3, 6, 3))
    chex.assert_shape(s_stk.residual_norm, (3,))
    for t in range(5):
      scales = jnp.array([1.0, 3.0**t, 0.5])  # layer 1 grows fast: its limiter acts alone
      g = jax.random.normal(jax.random.key(t), (3, 6, 10)) * scales[:, None, None]
      u_sep, s_sep = tx_sep.update({f"layer{i}": g[i] for i in range(3)}, s_sep)
      u_stk, s_stk = tx_stk.update(g, s_stk)
      chex.assert_trees_all_close(
        u_stk, jnp.stack([u_sep[f"layer{i}"] for i in range(3)]), rtol=1e-5, atol=1e-6
      )

  def test_residual_off_update_lies_in_the_projected_subspace(self):
    tx = fira_jax.scale_by_fira(rank=2, residual=False)
    outputs, states = run(tx, PARAMS, 3)
    for u, s in zip(outputs, states, strict=True):
      p = s.projector["tall"]  # output side: u = N Pᵀ, so u (I - P Pᵀ) = 0
      np.testing.assert_allclose(u["tall"] - u["tall"] @ p @ p.T, 0.0, atol=1e-6)
      p = s.projector["wide"]  # reduction side: (I - P Pᵀ) u = 0
      np.testing.assert_allclose(u["wide"] - p @ p.T @ u["wide"], 0.0, atol=1e-6)
      assert s.residual_norm["tall"] == optax.MaskedNode()

  def test_residual_adds_the_part_outside_the_subspace(self):
    fira_out, states = run(fira_jax.scale_by_fira(rank=2), PARAMS, 1)
    p = states[0].projector["tall"]
    outside = fira_out[0]["tall"] - fira_out[0]["tall"] @ p @ p.T
    assert float(jnp.linalg.norm(outside)) > 0.1 * float(jnp.linalg.norm(fira_out[0]["tall"]))

  def test_random_basis_state_holds_no_projector(self):
    tx = fira_jax.scale_by_fira(rank=3, projection="random")
    state = tx.init(PARAMS)
    assert all(
      p == optax.MaskedNode()
      for p in jax.tree.leaves(state.projector, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    )
    chex.assert_shape(state.base_optimizer_state.mu["tall"], (12, 3))
    chex.assert_shape(state.residual_norm["wide"], ())
    u, _ = jax.jit(tx.update)(random_grads(PARAMS, 0), state)
    chex.assert_trees_all_equal_shapes_and_dtypes(u, PARAMS)

  @chex.variants(with_jit=True, without_jit=True)
  def test_bfloat16_updates_stay_close_to_float32(self):
    params32 = {"w": jnp.zeros((16, 24))}
    params16 = {"w": jnp.zeros((16, 24), jnp.bfloat16)}
    for kind in ("svd", "random"):
      tx = fira_jax.scale_by_fira(rank=4, scale=0.25, projection=kind)
      g = random_grads(params32, 0)
      u32, _ = self.variant(tx.update)(g, tx.init(params32))
      u16, _ = self.variant(tx.update)(
        jax.tree.map(lambda x: x.astype(jnp.bfloat16), g), tx.init(params16)
      )
      assert u16["w"].dtype == jnp.bfloat16
      error = jnp.linalg.norm(u16["w"].astype(jnp.float32) - u32["w"]) / jnp.linalg.norm(u32["w"])
      assert float(error) < 0.05, kind

  def test_limiter_bounds_residual_growth_to_the_factor_given(self):
    scales = [1.0, 10.0, 100.0, 1.0, 1000.0, 1.0]
    _, states = run(
      fira_jax.scale_by_fira(rank=2, norm_growth_limit=1.05), PARAMS, 6, scales=scales
    )
    norms = [float(s.residual_norm["tall"]) for s in states]
    for prev, cur in itertools.pairwise(norms):
      assert cur <= 1.05 * (prev + 1e-8) * (1 + 1e-5)
    assert norms[1] == pytest.approx(1.05 * norms[0], rel=1e-5)  # 10x growth was cut

  def test_limiter_none_keeps_no_limiter_state(self):
    tx = fira_jax.scale_by_fira(rank=2, norm_growth_limit=None)
    state = tx.init(PARAMS)
    assert state.residual_norm["tall"] == optax.MaskedNode()
    u, _ = tx.update(random_grads(PARAMS, 0), state)
    chex.assert_tree_all_finite(u)

  def test_custom_base_optimizer_runs_in_the_subspace(self):
    tx = fira_jax.scale_by_fira(rank=2, base_optimizer=optax.scale_by_adam())
    state = tx.init(PARAMS)
    chex.assert_shape(state.base_optimizer_state.mu["tall"], (12, 2))
    u, _ = tx.update(random_grads(PARAMS, 0), state)
    chex.assert_trees_all_equal_shapes(u, PARAMS)

  def test_default_adam_arguments_with_a_custom_base_optimizer_are_rejected(self):
    with pytest.raises(ValueError, match="b1 configure the default Adam"):
      fira_jax.scale_by_fira(base_optimizer=optax.scale_by_adam(), b1=0.8)

  def test_second_step_does_not_recompile(self):
    tx = fira_jax.scale_by_fira(rank=2, update_proj_gap=2)
    traces = []

    @jax.jit
    def step(g, state):
      traces.append(1)
      return tx.update(g, state)

    state = tx.init(PARAMS)
    for t in range(4):
      _, state = step(random_grads(PARAMS, t), state)
    assert len(traces) == 1

  def test_init_works_under_eval_shape(self):
    tx = fira_jax.scale_by_fira(rank=4)
    abstract = jax.eval_shape(tx.init, PARAMS)
    concrete = tx.init(PARAMS)
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract, concrete)

  def test_empty_tree_is_accepted(self):
    tx = fira_jax.scale_by_fira()
    state = tx.init({})
    u, _ = tx.update({}, state)
    assert u == {}


@pytest.mark.parametrize(
  ("kwargs", "error", "message"),
  [
    (dict(rank=0), ValueError, "rank must be positive"),
    (dict(rank=2.5), TypeError, "rank must be a Python int"),
    (dict(update_proj_gap=0), ValueError, "update_proj_gap must be positive"),
    (dict(scale=0.0), ValueError, "scale must be positive"),
    (dict(norm_growth_limit=0.9), ValueError, "norm_growth_limit must be >= 1"),
    (dict(norm_growth_limit=float("nan")), ValueError, "norm_growth_limit must be >= 1"),
    (dict(scale=float("nan")), ValueError, "scale must be positive"),
    (dict(scaling="row"), ValueError, "scaling must be one of"),
    (dict(formulation="x"), ValueError, "formulation must be one of"),
    (dict(compressed_side="left"), ValueError, "compressed_side must be one of"),
    (dict(projection="qr"), ValueError, "projection must be one of"),
    (dict(projection_seed=1.5), TypeError, "projection_seed must be an int"),
  ],
)
def test_bad_arguments_name_the_argument(kwargs, error, message):
  with pytest.raises(error, match=message):
    fira_jax.scale_by_fira(**kwargs)
