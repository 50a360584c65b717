"""Per-backend paths: what a CPU lowering runs, and that the other backends' path agrees."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fira_jax
from fira_jax import bases
from fira_jax import platform
from fira_jax import subspace


def fresh_jit(fn):
  """``jax.jit`` of a new function object: traced anew, never taken from jit's cache."""
  return jax.jit(lambda *args: fn(*args))


def compiled_text(fn, *args) -> str:
  return fresh_jit(fn).lower(*args).compile().as_text()


def lapack_operand_ranks(hlo: str) -> list[int]:
  """The rank of the first operand of each LAPACK custom call in compiled CPU HLO."""
  ranks = []
  for line in hlo.splitlines():
    if "custom_call_target=" in line and "lapack" in line:
      operand = re.search(r"operand_layout_constraints=\{f32\[([0-9,]*)\]", line)
      if operand:
        ranks.append(len(operand.group(1).split(",")))
  return ranks


MATRICES = jax.random.normal(jax.random.key(0), (3, 24, 40))
KEYS = jax.random.split(jax.random.key(1), 3)


def test_cpu_lowering_runs_svds_one_matrix_at_a_time():
  svd = lambda x: bases.svd_projector(x, 4, "reduction")
  cpu = compiled_text(svd, MATRICES)
  with platform.default_paths():
    batched = compiled_text(svd, MATRICES)
  assert set(lapack_operand_ranks(cpu)) == {2}
  assert set(lapack_operand_ranks(batched)) == {3}


def test_cpu_lowering_runs_small_factorizations_one_matrix_at_a_time():
  randomized = lambda x: bases.randomized_svd_projector(x, 4, "reduction", KEYS)
  cpu = compiled_text(randomized, MATRICES)
  with platform.default_paths():
    batched = compiled_text(randomized, MATRICES)
  assert lapack_operand_ranks(cpu) and set(lapack_operand_ranks(cpu)) == {2}
  assert set(lapack_operand_ranks(batched)) == {3}


def test_cpu_lowering_materializes_the_transposed_projector():
  p = bases.svd_projector(MATRICES, 4, "reduction")
  project = lambda x, p: subspace.project(x, p, "reduction")
  lowered = fresh_jit(project).lower(MATRICES, p).as_text()
  with platform.default_paths():
    plain = fresh_jit(project).lower(MATRICES, p).as_text()
  assert "optimization_barrier" in lowered
  assert "optimization_barrier" not in plain


@pytest.mark.parametrize("projection", ["svd", "randomized_svd"])
def test_default_paths_give_the_cpu_paths_result(projection):
  fn = {
    "svd": lambda x: bases.svd_projector(x, 4, "output"),
    "randomized_svd": lambda x: bases.randomized_svd_projector(x, 4, "output", KEYS),
  }[projection]
  cpu = fresh_jit(fn)(MATRICES)
  with platform.default_paths():
    default = fresh_jit(fn)(MATRICES)
  np.testing.assert_allclose(default, cpu, atol=1e-5)


@pytest.mark.parametrize("projection", fira_jax.PROJECTIONS)
def test_fira_steps_on_default_paths_match_the_cpu_paths(projection):
  params = {"w": jnp.zeros((12, 6)), "stacked": jnp.zeros((2, 8, 16))}
  dims = {"w": fira_jax.FiraDimensionNumbers(), "stacked": fira_jax.FiraDimensionNumbers(1, 2)}

  def run():
    tx = fira_jax.fira_adamw(
      1e-2, rank=3, update_proj_gap=2, weight_dimension_numbers=dims, projection=projection
    )
    state, update = tx.init(params), jax.jit(tx.update)
    outputs = []
    for t in range(3):
      keys = dict(zip(params, jax.random.split(jax.random.key(t), len(params)), strict=True))
      grads = {name: jax.random.normal(keys[name], x.shape) for name, x in params.items()}
      u, state = update(grads, state, params)
      outputs.append(u)
    return outputs

  cpu = run()
  with platform.default_paths():
    default = run()
  chex.assert_trees_all_close(default, cpu, rtol=1e-4, atol=1e-6)
