"""Layouts: dimension numbers, matrices of a leaf, compressed side and rank."""

from __future__ import annotations

import warnings

import chex
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fira_jax
from fira_jax import FiraDimensionNumbers
from fira_jax import Subspace
from fira_jax import matrix_layout
from fira_jax.layout import resolve_dimension_numbers


@pytest.mark.parametrize(
  ("shape", "side", "compressed"),
  [
    ((10, 20), "smaller", "reduction"),  # (in, out): in is smaller -> compress the input side
    ((20, 10), "smaller", "output"),
    ((12, 12), "smaller", "reduction"),  # square: the reference compresses the input side
    ((10, 20), "larger", "output"),
    ((12, 12), "larger", "reduction"),  # optax.contrib.galore: ties compress the reduction side
    ((10, 20), "output", "output"),
    ((20, 10), "reduction", "reduction"),
  ],
)
def test_compressed_side_follows_the_rule(shape, side, compressed):
  (layout,) = Subspace(4, None, side).layouts(jnp.zeros(shape))
  assert layout.compressed == compressed


def test_rank_is_clipped_to_the_smaller_dimension():
  (layout,) = Subspace(64).layouts(jnp.zeros((5, 9)))
  assert layout.rank == 5
  assert layout.projector_shape == (5, 5)
  assert layout.low_rank_shape == (5, 9)


def test_batch_axes_are_kept_in_state_shapes():
  # A stacked (layers, in, out) kernel: layers is a batch axis.
  (layout,) = Subspace(4, FiraDimensionNumbers(1, 2)).layouts(jnp.zeros((3, 8, 16)))
  assert layout.batch_shape == (3,)
  assert layout.projector_shape == (3, 8, 4)
  assert layout.low_rank_shape == (3, 4, 16)


def test_to_matrices_round_trips_with_multi_axis_specs():
  x = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
  spec = FiraDimensionNumbers(reduction_axis=2, output_axis=(3, 0))
  layout = matrix_layout(x.shape, spec)
  matrices = layout.to_matrices(x)
  assert matrices.shape == (3, 4, 10)
  chex.assert_trees_all_equal(layout.from_matrices(matrices), x)
  # matrices[b, i, o] with o = (axis 3, axis 0) flattened in order: o = a3 * 2 + a0
  np.testing.assert_array_equal(matrices[1, 2, 3 * 2 + 1], x[1, 1, 2, 3])


@pytest.mark.parametrize(
  ("shape", "spec", "message"),
  [
    ((4,), FiraDimensionNumbers(), "fewer than two dimensions"),
    ((4, 5), FiraDimensionNumbers(0, 2), "does not exist"),
    ((4, 5), FiraDimensionNumbers(0, 0), "more than once"),
    ((4, 5, 6), FiraDimensionNumbers((), 1), "at least one reduction"),
  ],
)
def test_bad_dimension_numbers_name_the_parameter(shape, spec, message):
  with pytest.raises(ValueError, match=message) as info:
    matrix_layout(shape, spec, name="parameter ['w']")
  assert "parameter ['w']" in str(info.value)
  assert str(shape) in str(info.value)


def test_layouts_name_the_parameter_path_on_error():
  params = {"layer": {"kernel": jnp.zeros((4, 5)), "bias": jnp.zeros(5)}}
  specs = {"layer": {"kernel": FiraDimensionNumbers(), "bias": FiraDimensionNumbers()}}
  with pytest.raises(ValueError, match=r"\['layer'\]\['bias'\]"):
    Subspace(2, specs).layouts(params)


def test_resolve_accepts_none_spec_prefix_tree_and_callable():
  params = {"a": {"w": jnp.zeros((4, 5)), "b": jnp.zeros(5)}, "c": jnp.zeros((2, 3, 4))}
  with pytest.warns(UserWarning, match=r"\['c'\] with shape \(2, 3, 4\) is not projected"):
    default = resolve_dimension_numbers(None, params)
  assert default == [None, FiraDimensionNumbers(), None]  # only 2-D leaves
  spec = FiraDimensionNumbers(1, 2)
  single = resolve_dimension_numbers(spec, params)
  assert single == [None, spec, spec]  # every leaf with >= 2 dims
  prefix = resolve_dimension_numbers({"a": None, "c": spec}, params)
  assert prefix == [None, None, spec]
  from_fn = resolve_dimension_numbers(lambda p: {"a": spec, "c": None}, params)
  assert from_fn == [spec, spec, None]


def test_resolve_rejects_a_tree_that_does_not_match():
  params = {"w": jnp.zeros((4, 5))}
  with pytest.raises(ValueError, match="prefix of the parameters"):
    resolve_dimension_numbers({"v": None}, params)


def test_complex_matrices_are_rejected_at_init_naming_the_leaf():
  params = {"w": jnp.zeros((4, 6), jnp.complex64), "b": jnp.zeros(6, jnp.complex64)}
  for tx in (fira_jax.fira_adamw(1e-3, rank=2), fira_jax.fira_chain(rank=2)):
    with pytest.raises(ValueError, match=r"\['w'\] is complex"):
      tx.init(params)


def test_galore_dimension_numbers_select_the_same_matrices_for_optax_galore():
  params = {"attn": {"kernel": jnp.zeros((4, 4))}, "embed": jnp.zeros((10, 4))}
  specs = fira_jax.galore_dimension_numbers(fira_jax.dimension_numbers_for_paths("attn"))(params)
  assert specs == {"attn": {"kernel": optax.contrib.GaLoreDimensionNumbers()}, "embed": None}
  stacked = fira_jax.galore_dimension_numbers(FiraDimensionNumbers(1, 2))
  with pytest.raises(ValueError, match="2-D"):
    stacked({"w": jnp.zeros((2, 4, 4))})


def test_default_projects_kernels_but_never_biases_norm_scales_or_embeddings():
  params = {
    "attn": {"kernel": jnp.zeros((8, 8)), "bias": jnp.zeros((2, 4))},  # (heads, head_dim) bias
    "norm": {"scale": jnp.zeros((4, 8))},
    "embed": {"embedding": jnp.zeros((16, 8))},
    "w": jnp.zeros((8, 4)),
  }
  specs = dict(
    zip(
      ["attn.bias", "attn.kernel", "embed", "norm", "w"],
      resolve_dimension_numbers(None, params),
      strict=True,
    )
  )
  assert specs == {
    "attn.bias": None,
    "attn.kernel": FiraDimensionNumbers(),
    "embed": None,
    "norm": None,
    "w": FiraDimensionNumbers(),
  }


def test_default_reports_a_leaf_of_three_dimensions_instead_of_guessing_its_axes():
  params = {"query": {"kernel": jnp.zeros((16, 2, 8))}, "w": jnp.zeros((8, 4))}
  with pytest.warns(
    UserWarning, match=r"\['query'\]\['kernel'\].*FiraDimensionNumbers\(0, \(1, 2\)\)"
  ):
    state = fira_jax.fira_adamw(1e-3, rank=2).init(params)
  assert state[0].projector["query"]["kernel"] == optax.MaskedNode()
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a choice made explicitly is not reported
    fira_jax.fira_adamw(
      1e-3, rank=2, weight_dimension_numbers={"query": None, "w": FiraDimensionNumbers()}
    ).init(params)


def test_stack_axes_apply_only_inside_the_stacked_norms_block():
  # An unscanned (heads, head_dim, D) kernel next to 4 scanned layers, with heads == layers.
  params = {
    "params": {
      "embed": {"embedding": jnp.zeros((50, 32))},
      "blocks": {"norm": {"scale": jnp.zeros((4, 32))}, "up": {"kernel": jnp.zeros((4, 32, 64))}},
      "pool": {"out": {"kernel": jnp.zeros((4, 8, 32))}},
    }
  }
  specs = fira_jax.default_dimension_numbers(params)["params"]
  assert specs["blocks"]["up"]["kernel"] == FiraDimensionNumbers(1, 2)  # one matrix per layer
  assert specs["pool"]["out"]["kernel"] == FiraDimensionNumbers((0, 1), 2)  # one 32 × 32


def test_vectors_with_axes_of_length_one_are_neither_projected_nor_reported():
  params = {"embed": {"embedding": jnp.zeros((50, 32))}, "cls": jnp.zeros((1, 1, 32))}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert fira_jax.default_dimension_numbers(params)["cls"] is None


def test_paths_helper_without_a_spec_skips_what_the_default_never_projects():
  params = {"attn": {"query": {"kernel": jnp.zeros((32, 4, 8)), "bias": jnp.zeros((4, 8))}}}
  params["embed"] = {"embedding": jnp.zeros((50, 32))}
  specs = fira_jax.dimension_numbers_for_paths(r"ATTN|embed")(params)
  assert specs["attn"]["query"]["kernel"] == FiraDimensionNumbers(0, (1, 2))
  assert specs["attn"]["query"]["bias"] is None and specs["embed"]["embedding"] is None
