"""Refresh schedules: staggering, keys of random bases, SVDs only on refresh steps."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fira_jax
from fira_jax import FiraDimensionNumbers
from fira_jax import Subspace
from fira_jax import bases
from fira_jax import refresh

STACKED = FiraDimensionNumbers(reduction_axis=1, output_axis=2)
PARAMS = {"stack": jnp.zeros((4, 10, 6)), "wide": jnp.zeros((5, 9)), "tall": jnp.zeros((8, 3))}
SPECS = {"stack": STACKED, "wide": FiraDimensionNumbers(), "tall": FiraDimensionNumbers()}
MATRICES = 6  # 4 slices of "stack", "tall", "wide"


def grads_at(step, params=PARAMS):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1000 + step), len(leaves))
  return treedef.unflatten(
    [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
  )


def refreshed_matrices_per_step(tx, steps):
  """For steps 1..steps-1, the set of (leaf, slice) whose stored projector changed."""
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  previous, changed = None, []
  for t in range(steps):
    _, state = update(grads_at(t), state)
    current = {k: np.asarray(v).reshape((-1,) + v.shape[-2:]) for k, v in state.projector.items()}
    if previous is not None:
      changed.append(
        {
          (k, b)
          for k in current
          for b in range(current[k].shape[0])
          if not np.array_equal(current[k][b], previous[k][b])
        }
      )
    previous = current
  return changed


@pytest.mark.parametrize("gap", [3, 4, 6, 10])
def test_staggered_refresh_visits_every_matrix_once_per_gap(gap):
  tx = fira_jax.scale_by_fira(
    rank=2, update_proj_gap=gap, weight_dimension_numbers=SPECS, staggered_refresh=True
  )
  changed = refreshed_matrices_per_step(tx, 2 * gap + 1)  # steps 1 .. 2T
  everything = {("stack", b) for b in range(4)} | {("tall", 0), ("wide", 0)}
  for window in (changed[:gap], changed[gap:]):
    visits = [m for step in window for m in step]
    assert sorted(visits) == sorted(everything), f"gap {gap}: {window}"
  assert max(len(step) for step in changed) == math.ceil(MATRICES / gap)


def test_unstaggered_refresh_changes_every_matrix_on_multiples_of_the_gap_only():
  tx = fira_jax.scale_by_fira(rank=2, update_proj_gap=3, weight_dimension_numbers=SPECS)
  changed = refreshed_matrices_per_step(tx, 7)
  assert [len(c) for c in changed] == [0, 0, MATRICES, 0, 0, MATRICES]


def test_staggered_offsets_spread_evenly_and_start_at_zero():
  layouts = [lay for lay in Subspace(2, SPECS).layouts(PARAMS) if lay is not None]
  schedule = refresh.schedule_for(layouts, 200, staggered=True)
  offsets = np.concatenate(schedule.offsets)
  np.testing.assert_array_equal(offsets, np.arange(MATRICES) * 200 // MATRICES)
  for t in (0,):  # every projector is initialised on step 0
    assert all(
      bool(jnp.all(schedule.is_due(jnp.int32(t), i))) for i in range(len(schedule.offsets))
    )


def test_refresh_index_counts_each_matrix_refreshes():
  layouts = [lay for lay in Subspace(2, SPECS).layouts(PARAMS) if lay is not None]
  gap = 4
  schedule = refresh.schedule_for(layouts, gap, staggered=True)
  for i in range(len(schedule.offsets)):
    index = [np.asarray(schedule.refresh_index(jnp.int32(t), i)) for t in range(3 * gap)]
    due = [np.asarray(schedule.is_due(jnp.int32(t), i)) for t in range(3 * gap)]
    # the index starts at 0 and increases by one exactly on the due steps after step 0
    np.testing.assert_array_equal(index[0], 0)
    for t in range(1, 3 * gap):
      np.testing.assert_array_equal(index[t] - index[t - 1], due[t].astype(int))


class SvdCounter:
  """Wraps ``svd_projector`` so that every execution (not trace) of it is counted."""

  def __init__(self, monkeypatch):
    self.calls = 0
    original = bases.svd_projector

    def counted(matrices, rank, compressed):
      jax.debug.callback(self.increment, matrices)
      return original(matrices, rank, compressed)

    monkeypatch.setattr(bases, "svd_projector", counted)

  def increment(self, matrices):
    # under vmap the callback may see the batched array: count its matrices
    self.calls += math.prod(np.shape(matrices)[:-2])


@pytest.mark.parametrize("staggered", [False, True])
def test_svd_runs_only_on_refresh_steps_under_jit_also_for_stacked_leaves(monkeypatch, staggered):
  counter = SvdCounter(monkeypatch)
  gap, steps = 3, 7  # steps 1..6: two gaps
  tx = fira_jax.fira_adamw(
    0.01, rank=2, update_proj_gap=gap, weight_dimension_numbers=SPECS, staggered_refresh=staggered
  )
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  for t in range(steps):
    _, state = update(grads_at(t), state, PARAMS)
  jax.effects_barrier()
  # one SVD per matrix at step 0, then one per matrix per gap (steps 3 and 6, or spread)
  refreshes = 1 + (steps - 1) // gap
  assert counter.calls == MATRICES * refreshes


def test_svd_counter_detects_a_cond_turned_into_a_select(monkeypatch):
  # Guards the test above: a batched predicate under vmap runs both branches.
  counter = SvdCounter(monkeypatch)
  x = jax.random.normal(jax.random.key(0), (4, 1, 6, 5))
  keep = jnp.zeros((4, 1, 6, 2))

  @jax.jit
  @jax.vmap
  def per_slice(due, x, p):
    return jax.lax.cond(due, lambda: bases.svd_projector(x, 2, "reduction"), lambda: p)

  per_slice(jnp.array([True, False, False, False]), x, keep)
  jax.effects_barrier()
  assert counter.calls == 4  # every slice's SVD, though only one was due


@pytest.mark.parametrize("shape", [(10, 4), (4, 10)])
def test_random_basis_is_the_documented_key_and_constant_within_a_gap(shape):
  # GaLore with the identity as base optimizer returns α P Pᵀ G (or α G P Pᵀ).
  gap, seed, alpha = 3, 7, 0.5
  tx = fira_jax.scale_by_fira(
    rank=2,
    update_proj_gap=gap,
    scale=alpha,
    base_optimizer=optax.identity(),
    residual=False,
    projection="random",
    projection_seed=seed,
  )
  params = {"w": jnp.zeros(shape)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  compressed = min(shape)
  for t in range(2 * gap + 1):
    g = jax.random.normal(jax.random.key(t), shape)
    u, state = update({"w": g}, state)
    key = refresh.projection_keys(seed, jnp.array([0]), jnp.array([t // gap]))[0]
    p = bases.random_projector(key, compressed, 2, jnp.float32)
    expected = alpha * (p @ p.T @ g if shape[0] == compressed else g @ p @ p.T)
    np.testing.assert_allclose(u["w"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["random", "randomized_svd"])
def test_seeded_bases_continue_identically_after_a_restart(kind):
  kwargs = dict(rank=2, update_proj_gap=2, weight_dimension_numbers=SPECS, projection=kind)
  tx = fira_jax.fira_adamw(0.01, **kwargs, staggered_refresh=True)
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  for t in range(3):
    _, state = update(grads_at(t), state, PARAMS)
  saved = jax.tree.map(np.asarray, state)  # what a checkpoint holds
  expected, _ = update(grads_at(3), state, PARAMS)
  # a new process: fresh optimizer and init, the checkpoint's arrays put back
  restarted = fira_jax.fira_adamw(0.01, **kwargs, staggered_refresh=True)
  template = restarted.init(PARAMS)
  restored = jax.tree.map(lambda _, x: jnp.asarray(x), template, saved)
  got, _ = jax.jit(restarted.update)(grads_at(3), restored, PARAMS)
  chex.assert_trees_all_equal(got, expected)


def test_different_seeds_give_different_random_bases():
  outs = []
  for seed in (0, 1):
    tx = fira_jax.scale_by_fira(rank=2, projection="random", projection_seed=seed)
    u, _ = tx.update(grads_at(0), tx.init(PARAMS))
    outs.append(u["wide"])
  assert not np.allclose(outs[0], outs[1])


@pytest.mark.parametrize("kind", ["svd", "randomized_svd", "random"])
@pytest.mark.parametrize("staggered", [False, True])
def test_stacked_leaves_equal_separate_leaves_for_every_basis(kind, staggered):
  layers = 3
  kwargs = dict(rank=2, update_proj_gap=2, scale=0.25, projection=kind)
  kwargs["staggered_refresh"] = staggered
  tx_sep = fira_jax.scale_by_fira(**kwargs)
  tx_stk = fira_jax.scale_by_fira(**kwargs, weight_dimension_numbers=STACKED)
  separate = {f"l{i}": jnp.zeros((6, 10)) for i in range(layers)}
  s_sep, s_stk = tx_sep.init(separate), tx_stk.init(jnp.zeros((layers, 6, 10)))
  for t in range(5):
    g = jax.random.normal(jax.random.key(t), (layers, 6, 10)) * (1.0 + t)
    u_sep, s_sep = tx_sep.update({f"l{i}": g[i] for i in range(layers)}, s_sep)
    u_stk, s_stk = tx_stk.update(g, s_stk)
    chex.assert_trees_all_close(
      u_stk, jnp.stack([u_sep[f"l{i}"] for i in range(layers)]), rtol=1e-5, atol=1e-6
    )
