"""Paired A/B of fira_adamw step times between two checkouts of this repository.

Each round runs one process per checkout, in turn (A, B, A, B, …), so that load from other
processes hits both alike; each process times plain steps (separate and stacked leaves) and
refresh steps (``update_proj_gap=1``) on LLaMA-60M shapes with that checkout's fira_jax. The
table gives medians over all rounds and B's median ÷ A's.

  git worktree add /tmp/base <commit>
  python benchmarks/paired_checkouts.py /tmp/base . [--rounds 2] [--steps 15]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

KINDS = {"plain": (200, False), "plain, stacked leaves": (200, True), "refresh": (1, False)}


def time_steps(steps: int) -> dict[str, list[float]]:
  """In a child: step times of the fira_jax that is first on sys.path."""
  import common  # the checkout's own benchmarks/common.py
  import jax
  import optax

  import fira_jax

  hidden, ffn, layers, rank, _, alpha = common.LLAMA["60M"]
  times = {}
  for kind, (gap, stacked) in KINDS.items():
    shapes = common.llama_shapes(hidden, ffn, layers, stacked=stacked)
    dims = common.fira_dimension_numbers(stacked)
    tx = fira_jax.fira_adamw(
      0.01, rank=rank, update_proj_gap=gap, scale=alpha, weight_dimension_numbers=dims
    )

    def step(params, state, grads, tx=tx):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    step = jax.jit(step, donate_argnums=(0, 1))
    params, grads = common.concrete(shapes), common.concrete(shapes, seed=1, scale=1e-3)
    carry = step(params, tx.init(params), grads)  # compile, first projectors
    jax.block_until_ready(carry)
    times[kind] = []
    for _ in range(max(3, steps // 5) if gap == 1 else steps):
      start = time.perf_counter()
      carry = jax.block_until_ready(step(*carry, grads))
      times[kind].append(time.perf_counter() - start)
  return times


def run_child(checkout: pathlib.Path, steps: int) -> dict[str, list[float]]:
  code = (
    f"import sys; sys.path[:0] = [{str(checkout)!r}, {str(checkout / 'benchmarks')!r}];"
    f" sys.path.append({str(pathlib.Path(__file__).parent)!r});"
    f" import json, paired_checkouts; print(json.dumps(paired_checkouts.time_steps({steps})))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("a", type=pathlib.Path, help="the baseline checkout")
  p.add_argument("b", type=pathlib.Path, help="the checkout compared with it")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--steps", type=int, default=15, help="plain steps timed per process")
  args = p.parse_args()
  times = {"a": {k: [] for k in KINDS}, "b": {k: [] for k in KINDS}}
  for r in range(args.rounds):
    for side in ("a", "b"):
      print(f"round {r + 1}/{args.rounds}: {getattr(args, side)}", file=sys.stderr, flush=True)
      for kind, values in run_child(getattr(args, side).resolve(), args.steps).items():
        times[side][kind].extend(values)
  print(f"| step | {args.a} | {args.b} | ratio |\n|---|---|---|---|")
  for kind in KINDS:
    a, b = (statistics.median(times[s][kind]) for s in ("a", "b"))
    print(f"| {kind} | {1e3 * a:.1f} ms | {1e3 * b:.1f} ms | {b / a:.3f}× |")


if __name__ == "__main__":
  main()
