"""Properties of scale_by_fira and fira_adamw over shapes, ranks, dtypes, layouts and options.

Hypothesis draws each configuration from small sets: every new shape or option costs a jit
compile, which dominates the run time. Examples are derandomized, so CI sees the same ones on
every run. Each example runs a few steps with a gap of 2, so projectors are refreshed mid-run.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import fira_jax
from fira_jax import FiraDimensionNumbers
from fira_jax import limiter
from fira_jax import refresh

CI = settings(
  max_examples=15,
  deadline=None,
  derandomize=True,
  database=None,
  suppress_health_check=[HealthCheck.too_slow],
)

GAP = 2
STEPS = 4
REDUCTION_SIZES = (1, 3, 8, 12)
OUTPUT_SIZES = (1, 5, 16)
LAYERS = (1, 2, 3)
RANKS = (1, 2, 4, 32)  # 32 exceeds every matrix's smaller side: the rank is clipped
GRADIENT_SCALES = (0.0, 1e-3, 1.0, 1e3)  # per step: zero gradients and sudden growth
LAYOUTS = ("in_out", "torch", "stacked")
SPECS = {
  "in_out": FiraDimensionNumbers(),
  "torch": FiraDimensionNumbers(reduction_axis=1, output_axis=0),  # (out, in)
  "stacked": FiraDimensionNumbers(reduction_axis=1, output_axis=2),  # (layers, in, out)
}


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
  # XLA compiles dominate the run time, and its optimisation passes double them for these
  # tiny programs; no property here depends on them (tests/test_fira.py runs the optimised
  # programs). Restored for the other modules.
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


@dataclasses.dataclass(frozen=True)
class Config:
  layout: str
  reduction: int
  output: int
  layers: int
  rank: int
  dtype: jnp.dtype
  compressed_side: str
  projection: str
  scaling: str
  formulation: str
  staggered_refresh: bool
  alpha: float
  seed: int
  scales: tuple[float, ...]  # the gradient's scale on each step

  @property
  def weight_shape(self) -> tuple[int, ...]:
    if self.layout == "in_out":
      return (self.reduction, self.output)
    if self.layout == "torch":
      return (self.output, self.reduction)
    return (self.layers, self.reduction, self.output)

  def params(self):
    return {
      "w": jnp.zeros(self.weight_shape, self.dtype),
      "bias": jnp.zeros((self.output,), self.dtype),  # not projected: plain Adam
    }

  def dimension_numbers(self):
    # (in, out) uses the default: None projects every 2-D leaf as (in, out).
    return None if self.layout == "in_out" else {"w": SPECS[self.layout], "bias": None}

  def layout_of_w(self) -> fira_jax.SubspaceLayout:
    space = fira_jax.Subspace(self.rank, SPECS[self.layout], self.compressed_side)
    (layout,) = space.layouts(jnp.zeros(self.weight_shape))
    return layout

  def fira_kwargs(self) -> dict:
    return dict(
      rank=self.rank,
      update_proj_gap=GAP,
      scale=self.alpha,
      weight_dimension_numbers=self.dimension_numbers(),
      compressed_side=self.compressed_side,
      scaling=self.scaling,
      formulation=self.formulation,
      projection=self.projection,
      staggered_refresh=self.staggered_refresh,
    )

  def gradients(self):
    rng = np.random.default_rng(self.seed)
    for scale in self.scales:
      yield {
        k: jnp.asarray(scale * rng.standard_normal(jnp.shape(x)), self.dtype)
        for k, x in self.params().items()
      }


@st.composite
def configs(
  draw,
  projections=fira_jax.PROJECTIONS,
  dtypes=(jnp.float32, jnp.bfloat16),
  alphas=(0.25, 1.0),
  scales=GRADIENT_SCALES,
):
  return Config(
    layout=draw(st.sampled_from(LAYOUTS)),
    reduction=draw(st.sampled_from(REDUCTION_SIZES)),
    output=draw(st.sampled_from(OUTPUT_SIZES)),
    layers=draw(st.sampled_from(LAYERS)),
    rank=draw(st.sampled_from(RANKS)),
    dtype=draw(st.sampled_from(dtypes)),
    compressed_side=draw(st.sampled_from(fira_jax.COMPRESSED_SIDES)),
    projection=draw(st.sampled_from(projections)),
    scaling=draw(st.sampled_from(("column", "matrix"))),
    formulation=draw(st.sampled_from(("reference", "paper"))),
    staggered_refresh=draw(st.booleans()),
    alpha=draw(st.sampled_from(alphas)),
    seed=draw(st.integers(0, 2**16)),
    scales=tuple(draw(st.lists(st.sampled_from(scales), min_size=STEPS, max_size=STEPS))),
  )


def batched_projector(config: Config, layout, state, step: int) -> np.ndarray:
  """The ``(B, compressed, rank)`` basis used on ``step``, as float64."""
  if config.projection != "random":
    return layout.matrix.to_batched(np.asarray(state.projector["w"], np.float64))
  # A random basis is not stored: regenerate it from its key, as the optimizer does.
  schedule = refresh.schedule_for([layout], GAP, config.staggered_refresh)
  keys = refresh.projection_keys(
    0, schedule.matrix_ids[0], schedule.refresh_index(jnp.int32(step), 0)
  )
  p = jax.vmap(
    lambda k: fira_jax.random_projector(k, layout.compressed_size, layout.rank, config.dtype)
  )(keys)
  return np.asarray(p, np.float64)


def project_back(low_rank: np.ndarray, p: np.ndarray, compressed: str) -> np.ndarray:
  return p @ low_rank if compressed == "reduction" else low_rank @ np.swapaxes(p, 1, 2)


def matrix_norms(x: np.ndarray) -> np.ndarray:
  return np.sqrt(np.sum(np.square(x), axis=(1, 2)))


@CI
@given(config=configs(), use_alias=st.booleans())
def test_updates_are_finite_with_the_params_shapes_and_dtypes_across_refreshes(config, use_alias):
  if use_alias:
    tx = fira_jax.fira_adamw(1e-2, weight_decay=0.1, **config.fira_kwargs())
  else:
    tx = fira_jax.scale_by_fira(**config.fira_kwargs())
  params = config.params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in config.gradients():
    u, state = update(g, state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(u, params)
    chex.assert_tree_all_finite(u)


@CI
@given(
  config=configs(alphas=(0.25, 0.5)),
  growth_limit=st.sampled_from((1.0, 1.01, 1.5)),
)
def test_limiter_never_lets_the_residual_norm_grow_faster_than_the_factor_given(
  config, growth_limit
):
  tx = fira_jax.scale_by_fira(norm_growth_limit=growth_limit, **config.fira_kwargs())
  layout = config.layout_of_w()
  state = tx.init(config.params())
  update = jax.jit(tx.update)
  previous = None
  for t, g in enumerate(config.gradients()):
    u, state = update(g, state)
    recorded = np.asarray(state.residual_norm["w"], np.float64).reshape(-1)
    if previous is not None:
      # ‖S_t / λ_t‖ ≤ γ (‖S_{t-1} / λ_{t-1}‖ + 1e-8); a recorded 0 means nothing recorded yet
      # (see fira_jax/limiter.py), after which the next norm is recorded unlimited.
      bound = growth_limit * (previous + limiter.LIMITER_EPS) * (1 + 1e-5)
      had_norm = previous > 0
      assert np.all(recorded[had_norm] <= bound[had_norm]), (t, recorded, bound)
    if config.dtype == jnp.float32:
      # The recorded norm is that of the residual actually applied, recovered from the
      # update: u / η = α P N + S / λ (reference) or α (P N + S / λ) (paper).
      adam_state = jax.tree.map(lambda x: np.asarray(x, np.float64), state.base_optimizer_state)
      mu, nu = (
        layout.matrix.to_batched(adam_state.mu["w"]),
        layout.matrix.to_batched(adam_state.nu["w"]),
      )
      n = mu / (np.sqrt(nu) + 1e-6)
      back = project_back(n, batched_projector(config, layout, state, t), layout.compressed)
      step_size = np.sqrt(1 - 0.999 ** (t + 1)) / (1 - 0.9 ** (t + 1))
      full = layout.matrix.to_matrices(np.asarray(u["w"], np.float64)) / step_size
      if config.formulation == "reference":
        applied = full - config.alpha * back
      else:
        applied = full / config.alpha - back
      # atol: ‖S‖² is a difference of squares down to 1e-3 ‖φ⊙G‖², where its float32
      # rounding is a few 1e-4 of ‖φ⊙G‖ ≈ ‖N‖ (paper formulation, full rank).
      np.testing.assert_allclose(
        matrix_norms(applied), recorded, rtol=2e-3, atol=1e-3 * np.max(matrix_norms(n)) + 1e-6
      )
    previous = recorded


@settings(CI, max_examples=12)
@given(config=configs(projections=("svd", "randomized_svd")))
def test_update_without_residual_lies_in_the_projected_subspace(config):
  tx = fira_jax.scale_by_fira(residual=False, **config.fira_kwargs())
  layout = config.layout_of_w()
  state = tx.init(config.params())
  update = jax.jit(tx.update)
  tolerance = 1e-5 if config.dtype == jnp.float32 else 3e-2
  for t, g in enumerate(config.gradients()):
    u, state = update(g, state)
    p = batched_projector(config, layout, state, t)  # orthonormal columns
    x = layout.matrix.to_matrices(np.asarray(u["w"], np.float64))
    if layout.compressed == "reduction":  # P Pᵀ u = u
      inside = p @ (np.swapaxes(p, 1, 2) @ x)
    else:  # u P Pᵀ = u
      inside = (x @ p) @ np.swapaxes(p, 1, 2)
    outside = matrix_norms(x - inside)
    assert np.all(outside <= tolerance * matrix_norms(x) + 1e-30), (t, outside)


@settings(CI, max_examples=10)
@given(
  config=configs(dtypes=(jnp.float32,), scales=(1.0,)),
  layer_growth=st.lists(st.sampled_from((0.1, 1.0, 10.0)), min_size=3, max_size=3),
)
def test_stacked_leaf_equals_its_layers_as_separate_leaves(config, layer_growth):
  config = dataclasses.replace(config, layout="stacked")
  layers = config.layers
  names = [f"layer{i}" for i in range(layers)]
  # Matrix ids (the staggered schedule, the random keys) count slices in flattening order:
  # the separate leaves must flatten in layer order for both trees to number them alike.
  assert jax.tree.leaves({k: i for i, k in enumerate(names)}) == list(range(layers))
  kwargs = config.fira_kwargs()
  tx_stacked = fira_jax.scale_by_fira(**dict(kwargs, weight_dimension_numbers=SPECS["stacked"]))
  tx_separate = fira_jax.scale_by_fira(**dict(kwargs, weight_dimension_numbers=None))
  stacked = jnp.zeros(config.weight_shape)
  s_stacked = tx_stacked.init(stacked)
  s_separate = tx_separate.init({k: stacked[i] for i, k in enumerate(names)})
  update_stacked, update_separate = jax.jit(tx_stacked.update), jax.jit(tx_separate.update)
  rng = np.random.default_rng(config.seed)
  for t in range(STEPS):
    # Each layer's gradient grows at its own rate: each limiter acts on its own.
    scales = np.power(layer_growth[:layers], t)[:, None, None]
    g = jnp.asarray(scales * rng.standard_normal(config.weight_shape), jnp.float32)
    u_stacked, s_stacked = update_stacked(g, s_stacked)
    u_separate, s_separate = update_separate({k: g[i] for i, k in enumerate(names)}, s_separate)
    # Batched and single-matrix products round differently (float32), and Adam's
    # m / (√v + ε) magnifies that in entries of R near ε: hence 1e-4, not 1e-6. A slice
    # mixed up with another, or a limiter shared across layers, is off by O(1).
    chex.assert_trees_all_close(
      u_stacked, jnp.stack([u_separate[k] for k in names]), rtol=1e-4, atol=1e-5
    )
