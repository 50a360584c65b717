"""A one-minute tour: Fira, GaLore and AdamW fit the same small least-squares problem.

    pip install -e . && python examples/quickstart.py

The problem is a linear map whose full-rank target the optimizers must learn with
rank-2 optimizer state: Fira's residual path reaches directions GaLore's subspace
does not, which shows up as a lower final loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import fira_jax


def main(steps: int = 300) -> None:
  k_x, k_w, k_init = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k_x, (256, 32))
  target = jax.random.normal(k_w, (32, 16)) / jnp.sqrt(32.0)  # full rank
  params = {"kernel": 0.01 * jax.random.normal(k_init, (32, 16)), "bias": jnp.zeros(16)}

  def loss_fn(p):
    return jnp.mean((x @ p["kernel"] + p["bias"] - x @ target) ** 2)

  optimizers = {
    "fira_adamw (rank 2)": fira_jax.fira_adamw(1e-2, rank=2, update_proj_gap=50, scale=0.25),
    "galore_adamw (rank 2)": fira_jax.galore_adamw(1e-2, rank=2, update_proj_gap=50, scale=0.25),
    "optax.adamw (full rank)": optax.adamw(1e-2, weight_decay=0.0),
  }
  for name, tx in optimizers.items():
    state = tx.init(params)

    @jax.jit
    def step(p, state, tx=tx):
      grads = jax.grad(loss_fn)(p)
      updates, state = tx.update(grads, state, p)
      return optax.apply_updates(p, updates), state

    p = params
    for _ in range(steps):
      p, state = step(p, state)
    print(f"{name:26s} loss after {steps} steps: {float(loss_fn(p)):.2e}")


if __name__ == "__main__":
  main()
