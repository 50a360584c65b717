"""Sharding the trainer over a device mesh: ``--mesh data=2,fsdp=4``.

Axes: ``data`` (batch only) and ``fsdp`` (batch, and every matrix split along its input
dimension, the second-to-last). The batch is split over all axes; norms stay replicated.
The optimizer state follows the parameters through ``fira_jax.state_shardings``.
On CPU the trainer asks JAX for as many host devices as the mesh needs.
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fira_jax

AXES = ("data", "fsdp")


def parse_mesh(text: str) -> dict[str, int]:
  """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}``."""
  shape = {}
  for part in text.split(","):
    name, _, size = part.partition("=")
    name = name.strip()
    if name not in AXES or not size.strip().isdigit() or int(size) < 1 or name in shape:
      raise ValueError(
        f"--mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS in {AXES}, e.g."
        " data=2,fsdp=4."
      )
    shape[name] = int(size)
  return shape


def request_cpu_devices(shape: dict[str, int], processes: int = 1) -> None:
  """Gives the CPU backend enough devices for the mesh (before JAX starts a backend)."""
  try:
    jax.config.update("jax_num_cpu_devices", max(1, math.prod(shape.values()) // processes))
  except RuntimeError:
    pass  # a backend already exists: the device count is what it is


def make_mesh(shape: dict[str, int]) -> jax.sharding.Mesh:
  n = math.prod(shape.values())
  if n > jax.device_count():
    raise ValueError(
      f"--mesh needs {n} devices, JAX sees {jax.device_count()} ({jax.default_backend()})."
    )
  auto = (jax.sharding.AxisType.Auto,) * len(shape)
  return jax.make_mesh(tuple(shape.values()), tuple(shape), axis_types=auto)


def param_spec(x, mesh: jax.sharding.Mesh) -> P:
  """FSDP: a matrix's input dimension (second-to-last) over ``fsdp`` when it divides."""
  fsdp = mesh.shape.get("fsdp", 1)
  if x.ndim < 2 or fsdp == 1 or x.shape[-2] % fsdp:
    return P()
  return P(*([None] * (x.ndim - 2)), "fsdp", None)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def variables(tree) -> list[nnx.Variable]:
  """The Variables holding arrays, in the order of ``jax.tree.leaves`` of the pure tree."""
  found = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return [v for v in found if jax.tree.leaves(v.get_value())]  # not optax.MaskedNode()


class Placement:
  """The shardings of a model's trainable parameters and its optimizer's state."""

  def __init__(self, mesh, model, optimizer, config, model_config):
    self.mesh = mesh
    params = nnx.as_pure(nnx.state(model, optimizer.wrt))
    param_sh = jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x, mesh)), params)
    state_sh = fira_jax.state_shardings(optimizer.tx, params, param_sh)
    self.param_shardings = jax.tree.leaves(param_sh)
    self.state_shardings = jax.tree.leaves(state_sh)

  def pairs(self, model, optimizer):
    params = variables(nnx.state(model, optimizer.wrt))
    state = variables(optimizer.opt_state)
    if len(state) != len(self.state_shardings):
      raise ValueError("the optimizer state does not match its shardings")
    replicated = NamedSharding(self.mesh, P())
    pairs = zip(params + state, self.param_shardings + self.state_shardings, strict=True)
    return [*pairs, (optimizer.step, replicated)]

  def place(self, model, optimizer) -> None:
    """Moves the parameters and optimizer state onto the mesh (outside jit)."""
    for var, sharding in self.pairs(model, optimizer):
      var.set_value(jax.device_put(var.get_value(), sharding))

  def constrain(self, model, optimizer) -> None:
    """Inside the jitted step: keep the updated values sharded as placed."""
    for var, sharding in self.pairs(model, optimizer):
      var.set_value(jax.lax.with_sharding_constraint(var.get_value(), sharding))
