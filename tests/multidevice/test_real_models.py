"""The decoders of ``tests/decoder_models.py`` trained sharded over 4 CPU devices, their
optimizer state sharded through Flax's own metadata, against the same run on one device.

Linen the way nanodo does it (``nn.get_sharding(jax.eval_shape(init), mesh)`` as the
``out_shardings`` of a jitted init); NNX the way the flax guides do it (model and
``nnx.Optimizer`` made under ``jax.set_mesh``, each Variable sharded by its metadata).
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from decoder_models import Config
from decoder_models import LinenDecoder
from decoder_models import NnxDecoder
from decoder_models import arrays
from decoder_models import next_token_loss
from decoder_models import tokens
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fira_jax

STEPS = 5
DEVICES = 4


def mesh_of(n: int):
  return jax.make_mesh(
    (n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n]
  )


def make_tx(multi_steps: bool):
  # gap 2: the 5 steps include refreshes of the projectors on sharded gradients.
  tx = fira_jax.fira_adamw(1e-2, rank=4, update_proj_gap=2)
  return optax.MultiSteps(tx, every_k_schedule=2) if multi_steps else tx


def linen_run(mesh, multi_steps: bool):
  """nanodo's set-up: shardings from the boxes of an abstract init, then jitted steps."""
  cfg = Config()
  model, data, tx = LinenDecoder(cfg), tokens(cfg, batch=8), make_tx(multi_steps)

  def init():
    params = model.init(jax.random.key(0), data[:, :-1])["params"]
    return params, tx.init(params)

  shardings = nn.get_sharding(jax.eval_shape(init), mesh)
  params, state = jax.jit(init, out_shardings=shardings)()

  @jax.jit
  def step(params, state):
    batch = jax.lax.with_sharding_constraint(data, NamedSharding(mesh, P("data")))
    loss, grads = jax.value_and_grad(
      lambda p: next_token_loss(model.apply({"params": p}, batch[:, :-1]), batch[:, 1:])
    )(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(STEPS):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return params, state, losses


def nnx_run(mesh, multi_steps: bool):
  """The flax guides' set-up: Variables sharded as they are made, under the mesh."""
  cfg = Config()
  data = tokens(cfg, batch=8)
  with jax.set_mesh(mesh):
    model = NnxDecoder(cfg, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, make_tx(multi_steps), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
      loss, grads = nnx.value_and_grad(lambda m: next_token_loss(m(data[:, :-1]), data[:, 1:]))(
        model
      )
      optimizer.update(model, grads)
      return loss

    losses = [float(step(model, optimizer)) for _ in range(STEPS)]
  return nnx.state(model, nnx.Param), optimizer.opt_state, losses


def fira_state(state, multi_steps):
  state = arrays(state)
  return (state.inner_opt_state if multi_steps else state)[0]


@pytest.mark.parametrize("multi_steps", [False, True], ids=["plain", "multisteps"])
@pytest.mark.parametrize("run", [linen_run, nnx_run], ids=["linen", "nnx"])
def test_sharded_training_through_flax_metadata_matches_one_device(run, multi_steps):
  params, state, losses = run(mesh_of(DEVICES), multi_steps)
  one_params, one_state, one_losses = run(mesh_of(1), multi_steps)
  np.testing.assert_allclose(losses, one_losses, rtol=2e-5)
  assert losses[-1] < losses[0]
  chex.assert_trees_all_close(arrays(params), arrays(one_params), rtol=2e-4, atol=2e-5)

  # The Fira state is split over the devices along the parameters' FSDP axis, not replicated.
  fira = fira_state(state, multi_steps)
  kernels = fira.projector["blocks"]
  query = kernels["query" if run is linen_run else "q_einsum"]["kernel"]
  cfg = Config()
  assert query.shape == (cfg.N, cfg.D, 4)  # (layers, D, r): D split 4 ways
  assert query.addressable_shards[0].data.shape == (cfg.N, cfg.D // DEVICES, 4)
  mu = fira.base_optimizer_state.mu["blocks"]["mlp_in"]["kernel"]  # (layers, r, F)
  assert mu.shape == (cfg.N, 4, cfg.F)  # kept side spread over the FSDP axis
  assert mu.addressable_shards[0].data.shape == (cfg.N, 4, cfg.F // DEVICES)
  chex.assert_trees_all_close(
    fira.projector, fira_state(one_state, multi_steps).projector, atol=1e-4
  )
