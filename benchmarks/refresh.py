"""Projector refreshes: exact vs randomized SVD on a real gradient, and staggered refreshes.

1. Gradients of a LLaMA-1B-sized SwiGLU MLP block (hidden 2048, ffn 5461; its input is a
   byte's embedding plus its product with the previous byte's) on next-byte prediction over
   the Python standard library's source files (bytes read from this interpreter's
   installation), after ``--train-steps`` Adam steps of 4 × 256 tokens, taken
   on ``--grad-batch`` × 256 tokens (default 32 × 256 = 8192, four times the hidden size, so
   the gradient's rank is not capped below its dimensions): time of the top-512 basis by exact
   SVD and by randomized SVD, and the gradient energy each captures, ‖PᵀG‖² / ‖P_exactᵀG‖²;
   each time with OpenBLAS's threads as they are and with one (``time_both_ways``).
2. LLaMA-60M shapes, ``fira_adamw`` over two gaps (``2T + 1`` steps): the slowest step after
   step 0 against the median step, with and without ``staggered_refresh``.

  python benchmarks/refresh.py [--gap 200] [--train-steps 30] [--grad-batch 32] [--output FILE]
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import sysconfig
import time

import common  # benchmarks/ is on sys.path when a script here runs
import jax
import jax.numpy as jnp
import numpy as np
import optax
import threadpoolctl

import fira_jax

HIDDEN, FFN, RANK = 2048, 5461, 512


def stdlib_bytes(n_tokens, seed=0):
  """``n_tokens`` bytes of Python standard-library source, from shuffled files."""
  files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
  rng = np.random.default_rng(seed)
  chunks, total = [], 0
  for i in rng.permutation(len(files)):
    data = files[i].read_bytes()
    chunks.append(np.frombuffer(data, np.uint8))
    total += len(data)
    if total >= n_tokens:
      break
  return np.concatenate(chunks)[:n_tokens].astype(np.int32)


def rms_norm(x, w):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * w


def mlp_block_loss(params, tokens_BxL):
  # The block's input adds the elementwise product of this and the previous byte's embeddings
  # (a stand-in for attention). A byte's embedding alone, or any linear mix of embeddings, lies
  # in the 256-dimensional span of the embedding table, which caps the `gate`/`up` gradients
  # at rank 256, below the rank-512 basis: every basis would capture all of the energy.
  e_BxLxD = params["embed"][tokens_BxL[:, :-1]]
  prev_BxLxD = jnp.concatenate([e_BxLxD[:, :1], e_BxLxD[:, :-1]], axis=1)
  x_BxLxD = e_BxLxD + e_BxLxD * prev_BxLxD
  h = rms_norm(x_BxLxD, params["norm"])
  gate_BxLxF = h @ params["gate"]
  up_BxLxF = h @ params["up"]
  x_BxLxD = x_BxLxD + (jax.nn.silu(gate_BxLxF) * up_BxLxF) @ params["down"]
  logits_BxLxV = rms_norm(x_BxLxD, params["final_norm"]) @ params["head"]
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, tokens_BxL[:, 1:]).mean()


def real_gradients(train_steps=30, grad_batch=32, batch=4, length=257):
  """The gradient of an MLP block trained ``train_steps`` Adam steps, on ``grad_batch`` rows."""
  keys = jax.random.split(jax.random.key(0), 5)
  init = lambda k, shape, fan_in: jax.random.normal(k, shape) / np.sqrt(fan_in)
  params = {
    "embed": init(keys[0], (256, HIDDEN), 1.0),
    "norm": jnp.ones(HIDDEN),
    "gate": init(keys[1], (HIDDEN, FFN), HIDDEN),
    "up": init(keys[2], (HIDDEN, FFN), HIDDEN),
    "down": init(keys[3], (FFN, HIDDEN), FFN),
    "final_norm": jnp.ones(HIDDEN),
    "head": init(keys[4], (HIDDEN, 256), HIDDEN),
  }
  rows = batch * train_steps + grad_batch
  data = stdlib_bytes(rows * length).reshape(rows, length)
  tx = optax.adam(1e-3)
  state = tx.init(params)
  grad_fn = jax.jit(jax.value_and_grad(mlp_block_loss))
  losses = []
  for t in range(train_steps):
    loss, grads = grad_fn(params, jnp.asarray(data[t * batch : (t + 1) * batch]))
    losses.append(float(loss))
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  # the final gradient: a mean over grad_batch rows, in chunks of `batch` rows (memory)
  held = data[train_steps * batch :]
  chunks = [grad_fn(params, jnp.asarray(held[i : i + batch])) for i in range(0, grad_batch, batch)]
  losses.append(float(np.mean([float(loss) for loss, _ in chunks])))
  grads = jax.tree.map(lambda *g: sum(g) / len(g), *[g for _, g in chunks])
  return grads, losses


def blas_threads():
  """OpenBLAS's thread count now (jaxlib's CPU LAPACK runs through SciPy's OpenBLAS)."""
  return max((info["num_threads"] for info in threadpoolctl.threadpool_info()), default=1)


def time_both_ways(fn, repeats):
  """Median seconds of ``fn()`` with OpenBLAS's threads as they are, and with one thread.

  jaxlib's CPU LAPACK calls (the exact SVD; the randomized SVD's Cholesky and eigh) run on
  OpenBLAS's threads, which spin between calls and compete with XLA's own threads for the
  matrix products around them: more threads help one big SVD and hurt a chain of small
  factorizations between products. The examples run with one thread.
  """
  times = []
  for limit in (None, 1):
    with threadpoolctl.threadpool_limits(limits=limit, user_api="blas"):
      times.append(common.median_time(fn, repeats)[0])
  return times


def basis_rows(name, g, repeats):
  rows = []
  (layout,) = fira_jax.Subspace(RANK).layouts(g)
  x = g[None]
  axis = layout.compressed
  keys = jax.random.split(jax.random.key(0), 1)
  exact_fn = jax.jit(lambda x, axis=axis: fira_jax.svd_projector(x, RANK, axis))
  exact = exact_fn(x)
  exact_times = time_both_ways(lambda: jax.block_until_ready(exact_fn(x)), repeats)
  energy = lambda p: float(jnp.sum(jnp.square(fira_jax.project(x, p, axis))))
  best = energy(exact)
  total = float(jnp.sum(jnp.square(g)))
  label = f"`{name}` {g.shape}"

  def row(basis, times, captured):
    same = " / ".join(f"{e / t:.1f}×" for e, t in zip(exact_times, times, strict=True))
    # residual energies with two significant digits: on a gradient whose top-r directions
    # hold nearly all of its energy, four decimals of the captured fraction all read 1.0000
    return [
      label,
      basis,
      *(f"{t:.2f} s" for t in times),
      same,
      f"{min(exact_times) / min(times):.1f}×",
      f"{captured / best:.6f}",
      f"{1 - captured / total:.1e}",
    ]

  rows.append(row("exact SVD", exact_times, best))
  for q in (0, 1, 2, 3):
    fn = jax.jit(
      lambda x, k, axis=axis, q=q: fira_jax.randomized_svd_projector(
        x, RANK, axis, k, power_iterations=q
      )
    )
    p = fn(x, keys)
    times = time_both_ways(lambda fn=fn: jax.block_until_ready(fn(x, keys)), repeats)
    rows.append(row(f"randomized SVD, p = 16, q = {q}", times, energy(p)))
  return rows


def basis_table(train_steps, grad_batch, repeats=3):
  threads = blas_threads()
  grads, losses = real_gradients(train_steps, grad_batch)
  rows = [r for name in ("gate", "down") for r in basis_rows(name, grads[name], repeats)]
  header = [
    "gradient (Flax in, out)",
    "basis (rank 512)",
    f"time, {threads} OpenBLAS threads",
    "time, 1 OpenBLAS thread",
    f"speed-up over exact, same threads ({threads} / 1)",
    "speed-up over exact, each at its faster setting",
    "‖PᵀG‖² / ‖P_exactᵀG‖²",
    "1 − ‖PᵀG‖² / ‖G‖²",
  ]
  print(common.markdown_table(header, rows), file=sys.stderr, flush=True)
  note = (
    f"MLP block trained {train_steps} Adam steps (4 × 256 tokens each) on stdlib bytes, loss"
    f" {losses[0]:.3f} → {losses[-1]:.3f}; gradient over {grad_batch} × 256 held-out tokens."
  )
  return note + "\n\n" + common.markdown_table(header, rows)


def step_times(tx, steps):
  hidden, ffn, layers, *_ = common.LLAMA["60M"]
  shapes = common.llama_shapes(hidden, ffn, layers)
  params = common.concrete(shapes)
  grads = common.concrete(shapes, seed=1, scale=1e-3)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  carry = [params, tx.init(params)]
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    carry[0], carry[1] = step(carry[0], carry[1], grads)
    jax.block_until_ready(carry)
    times.append(time.perf_counter() - start)
  return times[1:]  # step 0 compiles and initialises every projector


def stagger_table(gap, projections):
  *_, rank, _, alpha = common.LLAMA["60M"]
  rows = []
  for projection_name in projections:
    for staggered in (False, True):
      tx = fira_jax.fira_adamw(
        0.01,
        rank=rank,
        update_proj_gap=gap,
        scale=alpha,
        weight_dimension_numbers=common.fira_dimension_numbers(),
        projection=projection_name,
        staggered_refresh=staggered,
      )
      times = step_times(tx, 2 * gap + 1)  # steps 1 .. 2T
      median, slowest = statistics.median(times), max(times)
      # Steps t and t + T do the same work (the schedule repeats every gap): the faster of
      # the two is that step's cost without one-off load from other processes.
      per_offset = [min(a, b) for a, b in zip(times[:gap], times[gap:], strict=True)]
      print(projection_name, staggered, median, slowest, file=sys.stderr, flush=True)
      rows.append(
        [
          projection_name,
          "staggered" if staggered else "all at once (reference)",
          f"{1e3 * median:.0f} ms",
          f"{1e3 * slowest:,.0f} ms",
          f"{slowest / median:.2f}×",
          f"{max(per_offset) / statistics.median(per_offset):.2f}×",
          f"{1e3 * sum(times):,.0f} ms",
        ]
      )
  header = [
    "basis",
    "refreshes",
    "median step",
    "slowest step",
    "slowest ÷ median",
    "slowest ÷ median, each step the faster of t and t + T",
    f"total, steps 1..{2 * gap}",
  ]
  note = f"fira_adamw on LLaMA-60M shapes (56 projected matrices), rank 128, gap T = {gap}."
  return note + "\n\n" + common.markdown_table(header, rows)


def main():
  p = common.parser(__doc__)
  p.add_argument("--gap", type=int, default=200)
  p.add_argument("--train-steps", type=int, default=30)
  p.add_argument("--grad-batch", type=int, default=32)
  p.add_argument("--skip-basis", action="store_true")
  p.add_argument("--projections", default="svd,randomized_svd")
  p.add_argument("--skip-stagger", action="store_true")
  args = p.parse_args()
  parts = []
  if not args.skip_basis:
    parts.append(basis_table(args.train_steps, args.grad_batch))
  if not args.skip_stagger:
    parts.append(stagger_table(args.gap, args.projections.split(",")))
  common.emit("\n\n".join(parts), args.output)


if __name__ == "__main__":
  main()
