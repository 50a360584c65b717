"""Fira's update under explicit sharding: partitioned as on an Auto mesh, typed like its inputs.

Under a mesh with ``AxisType.Explicit`` axes (``jax.make_mesh``'s default), an array's
sharding is part of its type, and operations whose output sharding would be ambiguous
raise: the exact SVD refuses an operand sharded on its matrix dimensions, and a product
that contracts a sharded axis (``Pᵀ G`` with the compressed side FSDP-sharded) needs its
output sharding spelled out. Fira's update therefore runs with the mesh's axes treated as
Auto (``jax.sharding.auto_axes``), where XLA partitions it exactly as on an Auto mesh (it
gathers a gradient for its SVD and partitions the randomized basis's products), and its
outputs take the shardings of its inputs: the updates those of the gradients, the new state
those of the old.
"""

from __future__ import annotations

from typing import Any

import jax
import optax


def with_auto_axes(update_fn, hyperparams: dict[str, Any]) -> optax.TransformUpdateFn:
  """An optax update function from ``update_fn(updates, state, hyperparams)``.

  With no mesh or an Auto one, it calls ``update_fn`` as it is. When the context mesh has
  explicit axes, it runs ``update_fn`` under ``jax.sharding.auto_axes``, its outputs typed
  like its inputs. Hyperparameters that are arrays (``optax.inject_hyperparams``) go in as
  arguments, so that they are re-typed for the Auto context like the updates and the state;
  arrays that ``update_fn`` closes over otherwise would be rejected there. ``params`` are
  not passed on: Fira's update does not use them.
  """

  def update(updates, state, params=None):
    del params
    # Explicit sharding's API exists in recent jax only; an older one has no explicit axes.
    get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = None if get_mesh is None else get_mesh()
    explicit_axes = () if mesh is None or mesh.empty else getattr(mesh, "explicit_axes", ())
    if not explicit_axes:
      return update_fn(updates, state, hyperparams)
    arrays = {k: v for k, v in hyperparams.items() if isinstance(v, jax.Array)}

    def specs(tree):
      return jax.tree.map(lambda x: jax.typeof(x).sharding.spec, tree)

    def run(updates, state, arrays):
      return update_fn(updates, state, {**hyperparams, **arrays})

    # Only the explicit axes turn Auto: axes that shard_map made Manual stay Manual.
    return jax.sharding.auto_axes(
      run, axes=explicit_axes, out_sharding=(specs(updates), specs(state))
    )(updates, state, arrays)

  return update
