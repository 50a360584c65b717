"""Optimizer-state size on the paper's LLaMA shapes, from jax.eval_shape (nothing allocated)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
import pytest

import fira_jax

# hidden, ffn, layers, rank (the paper's settings); vocabulary 32000, untied embeddings.
LLAMA = {"60m": (512, 1376, 8, 128), "1b": (2048, 5461, 24, 512), "7b": (4096, 11008, 32, 64)}
MATRICES_PER_LAYER = 7  # q, k, v, o, gate, up, down


def llama_params(hidden, ffn, layers, vocab=32000):
  """Abstract LLaMA parameters in Flax (in, out) layout."""
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  layer = {
    "attn": {name: f32(hidden, hidden) for name in ("q", "k", "v", "o")},
    "mlp": {"gate": f32(hidden, ffn), "up": f32(hidden, ffn), "down": f32(ffn, hidden)},
    "attn_norm": f32(hidden),
    "mlp_norm": f32(hidden),
  }
  return {
    "embed": f32(vocab, hidden),
    "layers": [layer] * layers,
    "final_norm": f32(hidden),
    "lm_head": f32(hidden, vocab),
  }


def state_elements(tx, params):
  state = jax.eval_shape(tx.init, params)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state) if x.ndim > 0), state


ATTN_MLP = fira_jax.dimension_numbers_for_paths(r"\['(attn|mlp)'\]")


@pytest.mark.parametrize("size", sorted(LLAMA))
def test_fira_state_is_galore_state_plus_one_scalar_per_matrix(size):
  hidden, ffn, layers, rank = LLAMA[size]
  params = llama_params(hidden, ffn, layers)
  kwargs = dict(rank=rank, weight_dimension_numbers=ATTN_MLP)
  fira_elems, fira_state = state_elements(fira_jax.fira_adamw(0.01, **kwargs), params)
  galore_elems, _ = state_elements(fira_jax.galore_adamw(0.01, **kwargs), params)
  scalars = [x for x in jax.tree.leaves(fira_state[0].residual_norm)]
  assert len(scalars) == MATRICES_PER_LAYER * layers
  assert all(x.shape == () for x in scalars)
  n_scalars = len(jax.tree.leaves(fira_state)) - len(
    jax.tree.leaves(jax.eval_shape(fira_jax.galore_adamw(0.01, **kwargs).init, params))
  )
  assert n_scalars == MATRICES_PER_LAYER * layers
  assert fira_elems == galore_elems  # the scalars are 0-d and counted separately above


def test_no_full_size_buffer_for_projected_matrices():
  params = llama_params(2048, 5461, 2)
  _, state = state_elements(
    fira_jax.fira_adamw(0.01, rank=512, weight_dimension_numbers=ATTN_MLP), params
  )
  full_shapes = {(2048, 2048), (2048, 5461), (5461, 2048)}
  offending = [x.shape for x in jax.tree.leaves(state) if x.shape in full_shapes]
  assert not offending


def test_llama_1b_state_is_0389_of_adams():
  hidden, ffn, layers, rank = LLAMA["1b"]
  params = llama_params(hidden, ffn, layers)
  fira_elems, fira_state = state_elements(
    fira_jax.fira_adamw(0.01, rank=rank, weight_dimension_numbers=ATTN_MLP), params
  )
  adam_elems, _ = state_elements(optax.adamw(0.01), params)
  scalars = len(jax.tree.leaves(fira_state[0].residual_norm))
  ratio = (fira_elems + scalars) / adam_elems
  assert ratio == pytest.approx(0.389, abs=5e-4)  # the paper: a 61.1% saving at 1B


def test_random_basis_state_is_the_svd_state_without_the_projectors():
  hidden, ffn, layers, rank = LLAMA["60m"]
  params = llama_params(hidden, ffn, layers)
  kwargs = dict(rank=rank, weight_dimension_numbers=ATTN_MLP)
  svd_elems, svd_state = state_elements(fira_jax.fira_adamw(0.01, **kwargs), params)
  rnd_elems, rnd_state = state_elements(
    fira_jax.fira_adamw(0.01, **kwargs, projection="random"), params
  )
  projector_elems = sum(math.prod(x.shape) for x in jax.tree.leaves(svd_state[0].projector))
  assert projector_elems == layers * (4 * hidden * rank + 3 * hidden * rank)
  assert rnd_elems == svd_elems - projector_elems
  assert not jax.tree.leaves(rnd_state[0].projector)  # MaskedNodes only
  chex_shapes = jax.tree.map(lambda x: x.shape, rnd_state[0].base_optimizer_state)
  assert chex_shapes == jax.tree.map(lambda x: x.shape, svd_state[0].base_optimizer_state)
