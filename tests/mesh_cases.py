"""The tiny network that the mesh tests train, sharded and on one device.

Used by ``tests/multidevice/test_sharding.py`` (8 CPU devices in one process) and
``tests/test_multiprocess.py`` (2 processes of 4 CPU devices each), which compare a run on a
``data=2 x fsdp=4`` mesh with :func:`single_device_run`; also :func:`pretrain`, which runs
``examples/pretrain.py`` in a child process. Nothing here starts a JAX backend on import.
"""

from __future__ import annotations

import functools
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

import fira_jax
from fira_jax import FiraDimensionNumbers

# A tiny network with every kind of projected leaf: a kernel whose compressed (input) side is
# FSDP-sharded, a stacked (layers, in, out) kernel, one compressed on its unsharded output
# side (so its low-rank moments are sharded), and a bias.
SHAPES = {"w1": (16, 32), "ws": (2, 32, 32), "w2": (32, 8), "b": (32,)}
SPECS = {"w1": P("fsdp", None), "ws": P(None, "fsdp", None), "w2": P("fsdp", None), "b": P()}
DIMS = {
  "w1": FiraDimensionNumbers(),
  "ws": FiraDimensionNumbers(1, 2),
  "w2": FiraDimensionNumbers(),
  "b": None,
}
RANK = 4
GAP = 2  # refreshes on steps 0 and 2 of the 3 steps
BATCH = 16

MESH_SHAPE = {"data": 2, "fsdp": 4}
BATCH_SPEC = P(("data", "fsdp"))  # data parallel over the whole mesh, FSDP over "fsdp"


def make_tx(
  projection: str, injected: bool = False, staggered: bool = False
) -> optax.GradientTransformation:
  """fira_adamw; ``injected``: its hyperparameters as arrays in the state."""
  factory = fira_jax.fira_adamw
  if injected:
    factory = optax.inject_hyperparams(factory, static_args=("rank", "update_proj_gap"))
  return factory(
    learning_rate=1e-2,
    rank=RANK,
    update_proj_gap=GAP,
    scale=0.25,
    weight_decay=0.1,
    weight_dimension_numbers=DIMS,
    projection=projection,
    staggered_refresh=staggered,
  )


def init_params():
  keys = jax.random.split(jax.random.key(0), len(SHAPES))
  return {
    name: 0.3 * jax.random.normal(k, shape)
    for k, (name, shape) in zip(keys, SHAPES.items(), strict=True)
  }


def batches(steps: int):
  keys = jax.random.split(jax.random.key(1), steps)
  return [
    (jax.random.normal(k, (BATCH, 16)), jax.random.normal(jax.random.fold_in(k, 1), (BATCH, 8)))
    for k in keys
  ]


def loss_fn(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b"])
  for layer in range(SHAPES["ws"][0]):
    h = jnp.tanh(h @ params["ws"][layer])
  return jnp.mean(jnp.square(h @ params["w2"] - y))


def train_step(tx, params, state, batch):
  grads = jax.grad(loss_fn)(params, batch)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def single_device_run(projection: str, steps: int):
  """The parameters and state after ``steps`` steps of ``make_tx(projection)``, unsharded."""
  tx = make_tx(projection)
  params = init_params()
  state = tx.init(params)
  step = jax.jit(functools.partial(train_step, tx))
  for batch in batches(steps):
    params, state = step(params, state, batch)
  return params, state


# ------------------------------------------------------------------ examples/pretrain.py

PRETRAIN = pathlib.Path(__file__).resolve().parents[1] / "examples" / "pretrain.py"

PRETRAIN_FLAGS = (
  *("--steps", "4", "--log-every", "1", "--eval-every", "4", "--checkpoint-every", "2"),
  *("--batch-size", "8", "--seq-len", "16", "--eval-batches", "1", "--update-proj-gap", "2"),
  *("--no-progress", "--no-plot"),
)


def pretrain(workdir, corpus, *flags):
  """Runs examples/pretrain.py in a child process; returns its logged losses by step."""
  args = [sys.executable, str(PRETRAIN), "--workdir", str(workdir), "--data", str(corpus)]
  args += [*PRETRAIN_FLAGS, *flags]
  proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in records if "loss" in r}
