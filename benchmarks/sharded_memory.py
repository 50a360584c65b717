"""Per-device memory of a sharded optimizer update: Fira vs AdamW on an 8-device mesh.

LLaMA shapes (float32, separate leaves) on a ``data=2 x fsdp=4`` mesh of 8 CPU devices: every
matrix is split along its input dimension over ``fsdp`` (FSDP), norms are replicated, and the
optimizer state takes ``fira_jax.state_shardings``. State bytes per device come from the
shardings (nothing allocated); the update is compiled with those shardings and XLA's memory
analysis gives its per-device arguments and temporaries. The last rows compile the same
update for one device, for comparison.

  python benchmarks/sharded_memory.py [--model 60M] [--output FILE]
"""

from __future__ import annotations

import math

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any backend starts

import common  # noqa: E402  (benchmarks/ is on sys.path when a script here runs)
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import fira_jax  # noqa: E402

MESH = {"data": 2, "fsdp": 4}


def fsdp_spec(x) -> P:
  if x.ndim < 2 or x.shape[-2] % MESH["fsdp"]:
    return P()
  return P(*([None] * (x.ndim - 2)), "fsdp", None)


def per_device_bytes(abstract_tree, shardings) -> int:
  leaves = jax.tree.leaves(abstract_tree)
  sh = jax.tree.leaves(shardings)
  return sum(
    math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
    for x, s in zip(leaves, sh, strict=True)
  )


def total_bytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def main():
  p = common.parser(__doc__)
  p.add_argument("--model", default="60M", choices=sorted(common.LLAMA))
  args = p.parse_args()
  hidden, ffn, layers, rank, gap, alpha = common.LLAMA[args.model]
  auto = (jax.sharding.AxisType.Auto,) * len(MESH)
  mesh = jax.make_mesh(tuple(MESH.values()), tuple(MESH), axis_types=auto)
  params = common.abstract(common.llama_shapes(hidden, ffn, layers))
  param_sh = jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x)), params)
  dims = common.fira_dimension_numbers()
  kw = dict(rank=rank, update_proj_gap=gap, scale=alpha, weight_dimension_numbers=dims)
  txs = {
    "optax.adamw": (optax.adamw(0.01), {}),
    "fira_adamw (svd)": (fira_jax.fira_adamw(0.01, **kw), kw),
    "fira_adamw (randomized_svd)": (
      fira_jax.fira_adamw(0.01, **kw, projection="randomized_svd"),
      kw,
    ),
    "fira_adamw (random)": (fira_jax.fira_adamw(0.01, **kw, projection="random"), kw),
    "fira_adamw (svd), spread_moments=False": (
      fira_jax.fira_adamw(0.01, **kw),
      dict(kw, spread_moments=False),
    ),
  }
  mib = lambda n: f"{n / 2**20:.1f} MiB"
  rows = []
  for name, (tx, options) in txs.items():
    state = jax.eval_shape(tx.init, params)
    state_sh = fira_jax.state_shardings(
      tx, params, param_sh, spread_moments=options.get("spread_moments", True)
    )
    update = jax.jit(
      tx.update,
      in_shardings=(param_sh, state_sh, param_sh),
      out_shardings=(param_sh, state_sh),
      donate_argnums=(0, 1),
    )
    stats = update.lower(params, state, params).compile().memory_analysis()
    rows.append(
      [
        name,
        mib(total_bytes(state)),
        mib(per_device_bytes(state, state_sh)),
        mib(stats.argument_size_in_bytes),
        mib(stats.temp_size_in_bytes),
        mib(stats.argument_size_in_bytes + stats.temp_size_in_bytes),
      ]
    )
  for name in ("optax.adamw", "fira_adamw (svd)", "fira_adamw (random)"):  # for comparison
    tx, _ = txs[name]
    state = jax.eval_shape(tx.init, params)
    update = jax.jit(tx.update, donate_argnums=(0, 1))
    stats = update.lower(params, state, params).compile().memory_analysis()
    args_bytes, temp = stats.argument_size_in_bytes, stats.temp_size_in_bytes
    rows.append(
      [
        f"{name}, one device",
        mib(total_bytes(state)),
        "",
        mib(args_bytes),
        mib(temp),
        mib(args_bytes + temp),
      ]
    )
  header = [
    f"LLaMA-{args.model}, rank {rank}, mesh data=2 × fsdp=4",
    "state (all devices)",
    "state per device",
    "update arguments per device",
    "update temporaries per device",
    "peak ≈ arguments + temporaries",
  ]
  params_line = (
    f"parameters: {mib(total_bytes(params))} in all, "
    f"{mib(per_device_bytes(params, param_sh))} per device"
  )
  common.emit(params_line + "\n\n" + common.markdown_table(header, rows), args.output)


if __name__ == "__main__":
  main()
