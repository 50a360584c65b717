"""Fira with default arguments on decoders written like public Flax LLM code (one device).

The models are in ``tests/decoder_models.py``: a nanodo-like Linen decoder (``DenseGeneral``
attention, tied embedding, ``nn.scan``, ``nn.with_partitioning``) and a gemma-like NNX one
(``nnx.Einsum`` attention, ``nnx.vmap``/``nnx.scan``, ``nnx.with_partitioning``). The same
models are trained sharded over 4 devices in ``tests/multidevice/test_real_models.py``.
"""

from __future__ import annotations

import math
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from decoder_models import ATTENTION_AND_MLP
from decoder_models import Config
from decoder_models import LinenDecoder
from decoder_models import NnxDecoder
from decoder_models import arrays
from decoder_models import linen_params
from decoder_models import next_token_loss
from decoder_models import tokens
from flax import nnx

import fira_jax

RANK = 4


def one_device_mesh():
  return jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def nnx_params():
  with jax.set_mesh(one_device_mesh()):
    return nnx.state(NnxDecoder(Config(), rngs=nnx.Rngs(0)), nnx.Param)


PARAMS = {"linen": linen_params, "nnx": nnx_params}


def flat_by_path(tree) -> dict:
  """``{"a/b/c": leaf}`` over the unboxed tree (NNX's ``.value`` and Linen's boxes hidden)."""
  plain = arrays(tree)
  return {
    "/".join(str(getattr(k, "key", k)) for k in path): x
    for path, x in jax.tree_util.tree_flatten_with_path(plain)[0]
  }


@pytest.mark.parametrize("model", ["linen", "nnx"])
def test_default_projects_exactly_the_attention_and_mlp_matrices_whole_and_per_layer(model):
  leaves = flat_by_path(PARAMS[model]())
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # nothing left to a warning: every leaf is placed
    specs = fira_jax.default_dimension_numbers(leaves)
  placed = {}
  for path, spec in specs.items():
    if spec is not None:
      lay = fira_jax.matrix_layout(leaves[path].shape, spec)
      placed[path] = (lay.batch_axes, lay.reduction_axes, lay.output_axes)
  assert placed == ATTENTION_AND_MLP[model]


def hand_count_bytes(params, model) -> int:
  """Fira's state in bytes from the shapes alone: per projected (N, m, n) kernel a projector
  N·c·r (c the smaller side, the input side on a tie), two moments N·r·k (k the other side)
  and N limiter norms; two moments per other parameter; one int32 step count."""
  floats = 0
  leaves = flat_by_path(params)
  for path, x in leaves.items():
    if path not in ATTENTION_AND_MLP[model]:
      floats += 2 * x.size
      continue
    batch, reduction, output = ATTENTION_AND_MLP[model][path]
    n_matrices = math.prod(x.shape[a] for a in batch)
    m = math.prod(x.shape[a] for a in reduction)
    n = math.prod(x.shape[a] for a in output)
    c, k = (m, n) if m <= n else (n, m)
    floats += n_matrices * (c * RANK + 2 * RANK * k + 1)
  return 4 * floats + 4


@pytest.mark.parametrize("model", ["linen", "nnx"])
def test_state_bytes_equal_the_count_by_hand_from_the_shapes(model):
  params = PARAMS[model]()
  tx = fira_jax.fira_adamw(1e-2, rank=RANK)
  state = tx.init(params)
  stored = sum(x.nbytes for x in jax.tree.leaves(state))
  report = fira_jax.describe(tx, params)
  assert stored == report.state_bytes == hand_count_bytes(params, model)
  assert report.state_bytes < 0.35 * report.adamw_state_bytes


def test_linen_state_carries_partition_names_for_its_own_shapes():
  params = linen_params()
  tx = optax.MultiSteps(fira_jax.fira_adamw(1e-2, rank=RANK), every_k_schedule=2)
  specs = nn.get_partition_spec(jax.eval_shape(tx.init, params))
  fira = specs.inner_opt_state[0]
  # (N, D, H, Dh) query, named (None, 'data', None, None): D (compressed, a tie) keeps 'data'.
  assert fira.projector["blocks"]["query"]["kernel"] == jax.P(None, "data", None)
  # (N, H, Dh, D) output, named (None, None, None, 'data'): its moments keep D's name.
  assert fira.base_optimizer_state.mu["blocks"]["attn_out_proj"]["kernel"] == jax.P(
    None, None, "data"
  )
  assert fira.residual_norm["blocks"]["mlp_in"]["kernel"] == jax.P(None)
  assert fira.base_optimizer_state.nu["embed"]["embedding"] == jax.P(None, "data")
  # The same names as fira_jax.state_shardings gives from the parameters' names.
  assert fira_jax.state_shardings(tx, params, nn.get_partition_spec(params)) == specs


def linen_train(params, tx, steps):
  model = LinenDecoder(Config())
  data = tokens(Config(), batch=8)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(
      lambda p: next_token_loss(model.apply({"params": p}, data[:, :-1]), data[:, 1:])
    )(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params)
  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return params, losses


@pytest.mark.parametrize("multi_steps", [False, True], ids=["plain", "multisteps"])
def test_boxed_linen_params_train_exactly_like_unboxed_ones(multi_steps):
  def make():
    tx = fira_jax.fira_adamw(1e-2, rank=RANK, update_proj_gap=2)
    return optax.MultiSteps(tx, every_k_schedule=2) if multi_steps else tx

  boxed, boxed_losses = linen_train(linen_params(), make(), 6)
  plain, plain_losses = linen_train(nn.unbox(linen_params()), make(), 6)
  assert isinstance(boxed["blocks"]["query"]["kernel"], nn.Partitioned)
  chex.assert_trees_all_close(nn.unbox(boxed), plain, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(boxed_losses, plain_losses, rtol=1e-6)
  assert boxed_losses[-1] < boxed_losses[0]


def test_nnx_optimizer_state_metadata_fits_every_state_array_and_trains():
  with jax.set_mesh(one_device_mesh()):
    model = NnxDecoder(Config(), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, fira_jax.fira_adamw(1e-2, rank=RANK), wrt=nnx.Param)
  variables = jax.tree.leaves(optimizer.opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  for v in variables:
    names = v.get_metadata().get("out_sharding")
    assert names is None or len(names) == v.get_value().ndim, (v.get_value().shape, names)
  projector = optimizer.opt_state[0].projector["blocks"]["kv_einsum"]["kernel"]
  assert projector.get_metadata()["out_sharding"] == (None, "data", None)  # (layers, D, r)

  data = tokens(Config(), batch=8)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: next_token_loss(m(data[:, :-1]), data[:, 1:]))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(5)]
  assert losses[-1] < losses[0]


def test_masked_fira_places_kernels_with_the_whole_trees_dimension_numbers():
  params = flat_by_path(linen_params())
  kernels = lambda tree: {k: "kernel" in k for k in tree}
  tx = optax.partition(
    {
      True: fira_jax.fira_adamw(
        1e-2, rank=RANK, weight_dimension_numbers=fira_jax.default_dimension_numbers(params)
      ),
      False: optax.adamw(1e-2),
    },
    kernels,
  )
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    report = fira_jax.describe(tx, params)
  projected = {leaf.path for leaf in report.leaves if leaf.matrices is not None}
  assert projected == {f"['{k}']" for k in ATTENTION_AND_MLP["linen"]}


def test_a_mask_mapped_through_linen_boxes_trains_like_the_unboxed_mask():
  # x.ndim > 2 leaves the boxed embeddings out: optax.masked puts its MaskedNode in their box.
  def run(params):
    dims = fira_jax.default_dimension_numbers(params)  # of the whole tree, as documented
    masked = optax.masked(
      fira_jax.fira_adamw(1e-2, rank=RANK, weight_dimension_numbers=dims),
      lambda p: jax.tree.map(lambda x: x.ndim > 2, p),
    )
    state = masked.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(masked.update)(grads, state, params)
    return updates

  boxed = run(linen_params())
  chex.assert_trees_all_close(nn.unbox(boxed), run(nn.unbox(linen_params())))


def test_moments_are_spread_only_over_a_kept_side_that_the_mesh_axes_divide():
  d, vocab = 64, 50257  # an untied head: vocab is not a multiple of the sharded D
  params = {
    "head": {"kernel": nn.Partitioned(jnp.zeros((d, vocab)), names=("data", None))},
    "mlp": {"kernel": nn.Partitioned(jnp.zeros((d, 4 * d)), names=("data", None))},
  }
  specs = nn.get_partition_spec(jax.eval_shape(fira_jax.fira_adamw(1e-3, rank=8).init, params))
  mu = specs[0].base_optimizer_state.mu
  assert mu["head"]["kernel"] == jax.P(None, None)  # (8, vocab): kept whole
  assert mu["mlp"]["kernel"] == jax.P(None, "data")  # (8, 256): spread over the FSDP axis
