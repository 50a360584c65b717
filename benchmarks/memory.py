"""Optimizer-state memory on the paper's LLaMA shapes, and the compiled update's temporaries.

State sizes come from ``jax.eval_shape`` (nothing is allocated); Fira and GaLore project the
attention and MLP matrices with the paper's rank, Adam runs everywhere else. The second table
compiles one update on LLaMA-60M shapes and reads XLA's memory analysis.

  python benchmarks/memory.py [--output FILE]
"""

from __future__ import annotations

import math

import common  # benchmarks/ is on sys.path when a script here runs
import jax
import jax.numpy as jnp
import optax
from optax import contrib

import fira_jax


def state_bytes(tx, params):
  state = jax.eval_shape(tx.init, params)
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))


def optimizers(rank, gap, alpha, stacked=False):
  dims = common.fira_dimension_numbers(stacked)
  kw = dict(rank=rank, update_proj_gap=gap, scale=alpha, weight_dimension_numbers=dims)
  return {
    "Adam": optax.adamw(0.01),
    "GaLore": fira_jax.galore_adamw(0.01, **kw),
    "Fira (svd)": fira_jax.fira_adamw(0.01, **kw),
    "Fira (random basis)": fira_jax.fira_adamw(0.01, **kw, projection="random"),
    "Fira (svd, bf16 μ)": fira_jax.fira_adamw(0.01, **kw, mu_dtype=jnp.bfloat16),
  }


def state_table():
  header = ["model", "params", "Adam", "GaLore", "Fira (svd)", "Fira (random basis)"]
  header += ["Fira (svd, bf16 μ)"]
  rows = []
  for name, (hidden, ffn, layers, rank, gap, alpha) in common.LLAMA.items():
    params = common.abstract(common.llama_shapes(hidden, ffn, layers))
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    sizes = {k: state_bytes(tx, params) for k, tx in optimizers(rank, gap, alpha).items()}
    adam = sizes["Adam"]
    cells = [f"{sizes[k] / 2**30:.3f} GiB ({sizes[k] / adam:.3f}×)" for k in header[3:]]
    rows.append([name, f"{n_params / 1e6:.0f}M", f"{adam / 2**30:.3f} GiB", *cells])
  return common.markdown_table(header, rows)


def temp_table():
  hidden, ffn, layers, rank, gap, alpha = common.LLAMA["60M"]
  rows = []
  for stacked in (False, True):
    params = common.abstract(common.llama_shapes(hidden, ffn, layers, stacked=stacked))
    dims = common.fira_dimension_numbers(stacked)
    kw = dict(rank=rank, update_proj_gap=gap, scale=alpha, weight_dimension_numbers=dims)
    txs = {
      "fira_jax.fira_adamw (svd)": fira_jax.fira_adamw(0.01, **kw),
      "fira_jax.fira_adamw (random)": fira_jax.fira_adamw(0.01, **kw, projection="random"),
      "fira_jax.fira_adamw (staggered)": fira_jax.fira_adamw(0.01, **kw, staggered_refresh=True),
      "fira_jax.galore_adamw": fira_jax.galore_adamw(0.01, **kw),
    }
    if not stacked:  # optax.contrib.galore cannot give stacked layers their own projectors
      txs["optax.contrib.galore"] = contrib.galore(
        0.01, rank, gap, alpha, weight_dimension_numbers=common.galore_dimension_numbers()
      )
    for name, tx in txs.items():
      state = jax.eval_shape(tx.init, params)
      compiled = jax.jit(tx.update).lower(params, state, params).compile()
      stats = compiled.memory_analysis()
      rows.append(
        [
          name,
          "stacked (layers, in, out)" if stacked else "separate leaves",
          f"{stats.temp_size_in_bytes / 2**20:.1f} MiB",
          f"{state_bytes(tx, params) / 2**20:.1f} MiB",
        ]
      )
  header = ["update (LLaMA-60M, rank 128)", "layers", "XLA temp memory", "state"]
  return common.markdown_table(header, rows)


def main():
  args = common.parser(__doc__).parse_args()
  text = "\n\n".join(
    [
      "Optimizer state (jax.eval_shape, float32 parameters; ratio to Adam's state):",
      state_table(),
      "Compiled update, XLA memory analysis (temporaries beyond arguments and outputs):",
      temp_table(),
    ]
  )
  common.emit(text, args.output)


if __name__ == "__main__":
  main()
