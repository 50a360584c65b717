"""describe: what an optimizer projects and what its state costs, before training."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

import fira_jax
from fira_jax import FiraDimensionNumbers

PARAMS = {
  "bias": jnp.zeros(32),
  "kernel": jnp.zeros((64, 32)),  # output side compressed
  "stack": jnp.zeros((3, 16, 48)),  # (layers, in, out): reduction side compressed
}
DIMS = {"bias": None, "kernel": FiraDimensionNumbers(), "stack": FiraDimensionNumbers(1, 2)}


def test_each_leaf_reports_its_matrices_side_rank_and_state_bytes_computed_by_hand():
  report = fira_jax.describe(
    fira_jax.fira_adamw(1e-3, rank=8, weight_dimension_numbers=DIMS), PARAMS
  )
  bias, kernel, stack = report.leaves
  assert (bias.path, bias.matrices, bias.rank) == ("['bias']", None, None)
  assert bias.state_bytes == 2 * 32 * 4  # AdamW's two moments
  assert (kernel.matrices, kernel.compressed, kernel.rank) == ((1, 64, 32), "output", 8)
  # projector (32, 8), two moments (64, 8), one limiter norm
  assert kernel.state_bytes == 4 * (32 * 8 + 2 * 64 * 8 + 1)
  assert (stack.matrices, stack.compressed, stack.rank) == ((3, 16, 48), "reduction", 8)
  assert stack.state_bytes == 4 * (3 * 16 * 8 + 2 * 3 * 8 * 48 + 3)
  counts = 4  # scale_by_fira's step count (a constant learning rate keeps no other)
  assert report.state_bytes == bias.state_bytes + kernel.state_bytes + stack.state_bytes + counts
  adamw_bytes = 2 * 4 * sum(math.prod(x.shape) for x in PARAMS.values()) + 4
  assert report.adamw_state_bytes == adamw_bytes


def test_the_table_names_every_leaf_and_the_ratio_to_adamw():
  report = fira_jax.describe(
    fira_jax.fira_adamw(1e-3, rank=8, weight_dimension_numbers=DIMS), PARAMS
  )
  table = str(report)
  for leaf in ("['bias']", "['kernel']", "['stack']", "3×16×48", "reduction", "output"):
    assert leaf in table
  ratio = report.state_bytes / report.adamw_state_bytes
  assert f"{ratio:.3f}× optax.adamw's" in table
  assert "2 of 3 parameters projected" in table


def test_wrapped_optimizers_are_described_through_their_init():
  multi = optax.MultiSteps(fira_jax.fira_adamw(1e-3, rank=8, weight_dimension_numbers=DIMS), 2)
  report = fira_jax.describe(multi, PARAMS)
  assert report.leaves[1].compressed == "output"
  # MultiSteps adds full-size accumulated gradients to every leaf's state.
  plain = fira_jax.describe(
    fira_jax.fira_adamw(1e-3, rank=8, weight_dimension_numbers=DIMS), PARAMS
  )
  assert report.leaves[1].state_bytes == plain.leaves[1].state_bytes + 64 * 32 * 4
  # ... and so does it to the AdamW it is compared with: the same MultiSteps around optax.adamw.
  gradients = sum(x.size * 4 for x in jax.tree.leaves(PARAMS))
  mini_step_counters = 2 * 4
  assert report.adamw_state_bytes == plain.adamw_state_bytes + gradients + mini_step_counters
  as_passed_to_train_state = fira_jax.describe(multi.gradient_transformation(), PARAMS)
  assert as_passed_to_train_state.adamw_state_bytes == report.adamw_state_bytes


def test_an_optimizer_without_fira_projects_nothing():
  report = fira_jax.describe(optax.adamw(1e-3), PARAMS)
  assert all(leaf.matrices is None for leaf in report.leaves)
  assert report.state_bytes == report.adamw_state_bytes
