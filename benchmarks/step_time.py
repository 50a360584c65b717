"""Optimizer step time on LLaMA-60M shapes: plain steps and projector-refresh steps.

JAX steps are jitted with parameters and optimizer state donated, as training runs them, and
apply the update to the parameters; the gradient is a fixed random tree. A refresh step is timed
with ``update_proj_gap=1`` (every step refreshes). Torch optimizers (when importable) run on the
same shapes in torch's (out, in) layout, timing ``optimizer.step()``. The floor is the two
projection products alone (R = Pᵀ G and P N for every projected matrix); the bound adds
AdamW on the leaves Fira does not project, work every Fira step also does. "GaLore plus two
more reads" is our GaLore with the two extra passes over each projected gradient that exact
Fira needs (separate leaves only; see ``with_two_more_reads``). Candidates are timed
round-robin (one step of each in turn, ``--repeats`` rounds): the table gives medians, and each
ratio is the median over rounds of the two candidates' times in the same round, so that load
from other processes hits both alike.

  python benchmarks/step_time.py [--repeats 7] [--refresh-repeats 3] [--output FILE]
"""

from __future__ import annotations

import gc
import re
import statistics
import sys
import time

import common  # benchmarks/ is on sys.path when a script here runs
import jax
import jax.numpy as jnp
import optax
from optax import contrib

import fira_jax

HIDDEN, FFN, LAYERS, RANK, GAP, ALPHA = common.LLAMA["60M"]
FIRA = "fira_jax.fira_adamw (svd)"
STACKED = ", stacked (8, in, out) leaves"
FLOOR = "floor: the projection products alone"
BOUND = "bound: the floor plus AdamW on the unprojected leaves"
GALORE_READS = "fira_jax.galore_adamw plus two more reads of each projected G"
TORCH_FIRA = "reference torch FiraAdamW (fira 1.0.2)"


def jax_optimizers(gap, stacked=False):
  kw = dict(
    rank=RANK,
    update_proj_gap=gap,
    scale=ALPHA,
    weight_dimension_numbers=common.fira_dimension_numbers(stacked),
  )
  txs = {
    "optax.adamw": optax.adamw(0.01),
    "fira_jax.galore_adamw": fira_jax.galore_adamw(0.01, **kw),
    FIRA: fira_jax.fira_adamw(0.01, **kw),
    "fira_jax.fira_adamw (randomized_svd)": fira_jax.fira_adamw(
      0.01, **kw, projection="randomized_svd"
    ),
    "fira_jax.fira_adamw (random)": fira_jax.fira_adamw(0.01, **kw, projection="random"),
    "fira_jax.fira_adamw (svd, staggered)": fira_jax.fira_adamw(0.01, **kw, staggered_refresh=True),
  }
  if not stacked:
    txs[GALORE_READS] = with_two_more_reads(
      txs["fira_jax.galore_adamw"], kw["weight_dimension_numbers"]
    )
    txs["optax.contrib.galore"] = contrib.galore(
      0.01, RANK, gap, ALPHA, weight_dimension_numbers=common.galore_dimension_numbers()
    )
  return txs


def with_two_more_reads(tx, dimension_numbers):
  """``tx``, then the memory traffic that Fira's residual adds to GaLore's, without its math.

  Per projected matrix, one reduction of ``G²`` over the compressed axis (as Fira's
  ``‖φ⊙G‖²`` for the limiter) and one more read of ``G`` in the update that depends on it
  (as Fira's ``(φ / λ) ⊙ G`` term). Not an optimizer: it measures what those two passes
  cost on top of GaLore, since no exact Fira step can skip them.
  """

  def update_fn(grads, state, params=None):
    updates, state = tx.update(grads, state, params)
    leaves, treedef = jax.tree.flatten(grads)
    layouts = fira_jax.Subspace(RANK, dimension_numbers).layouts(grads)
    out = treedef.flatten_up_to(updates)
    for i, lay in enumerate(layouts):
      if lay is not None:
        g = lay.matrix.to_matrices(leaves[i])
        g_sq = jnp.sum(jnp.square(g), axis=lay.rank_axis, keepdims=True)
        out[i] = out[i] + lay.matrix.from_matrices(1e-6 * jax.lax.rsqrt(g_sq + 1.0) * g)
    return treedef.unflatten(out), state

  return optax.GradientTransformation(tx.init, update_fn)


def jax_step(tx, stacked):
  """A function running one donated, jitted step; it is called once here (compile, step 0)."""
  shapes = common.llama_shapes(HIDDEN, FFN, LAYERS, stacked=stacked)
  params = common.concrete(shapes)
  grads = common.concrete(shapes, seed=1, scale=1e-3)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  carry = [params, tx.init(params)]

  def once():
    carry[0], carry[1] = step(carry[0], carry[1], grads)
    jax.block_until_ready(carry)

  once()  # step 0: compile and first projectors
  return once


def floor_step(adam_on_the_rest=False):
  """The two projection products of every projected matrix, nothing else.

  With ``adam_on_the_rest``, also a donated ``optax.adamw`` step on the leaves that Fira does
  not project (embedding, head, norms), which every Fira step runs too: a bound that no
  Fira step on this tree can beat, whatever its low-rank part costs.
  """
  shapes = common.llama_shapes(HIDDEN, FFN, LAYERS)
  grads = common.concrete(shapes, seed=1)
  layouts = fira_jax.Subspace(RANK, common.fira_dimension_numbers()).layouts(grads)
  leaves = jax.tree.leaves(grads)
  pairs = [(leaf, lay) for leaf, lay in zip(leaves, layouts, strict=True) if lay is not None]
  projectors = [jnp.ones(lay.projector_shape) / 10 for _, lay in pairs]
  rest = [leaf for leaf, lay in zip(leaves, layouts, strict=True) if lay is None]
  adam = optax.adamw(0.01)

  def products(xs, ps):
    out = []
    for (_, lay), x, p in zip(pairs, xs, ps, strict=True):
      m = lay.matrix.to_matrices(x)
      r = fira_jax.project(m, p[None], lay.compressed)
      out.append(fira_jax.project_back(r, p[None], lay.compressed))
    return out

  def step(params, state, xs, ps, grads):
    updates, state = adam.update(grads, state, params)
    return optax.apply_updates(params, updates), state, products(xs, ps)

  xs = [x for x, _ in pairs]
  if not adam_on_the_rest:
    products_only = jax.jit(products)
    once = lambda: jax.block_until_ready(products_only(xs, projectors))
  else:
    step = jax.jit(step, donate_argnums=(0, 1))
    carry = [[0.02 * g for g in rest], adam.init(rest)]

    def once():
      carry[0], carry[1], out = step(carry[0], carry[1], xs, projectors, rest)
      jax.block_until_ready((carry, out))

  once()
  return once


def torch_optimizers():
  try:
    import torch
  except ImportError:
    return None, {}
  makers = {"torch AdamW": lambda low, reg, gap: torch.optim.AdamW(low + reg, lr=0.01)}
  try:
    from fira import FiraAdamW

    makers[TORCH_FIRA] = lambda low, reg, gap: FiraAdamW(
      [
        {"params": reg},
        {"params": low, "rank": RANK, "update_proj_gap": gap, "alpha": ALPHA, "proj_type": "std"},
      ],
      lr=0.01,
      no_deprecation_warning=True,
    )
  except ImportError:
    pass
  return torch, makers


def torch_step(torch, make, gap):
  torch.manual_seed(0)
  shapes = common.llama_shapes(HIDDEN, FFN, LAYERS)
  flat = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=common.is_shape)[0]
  regex = re.compile(common.ATTN_MLP)
  low, reg = [], []
  for path, shape in flat:
    torch_shape = shape[::-1] if len(shape) == 2 else shape  # (out, in)
    p = torch.nn.Parameter(0.02 * torch.randn(torch_shape))
    p.grad = 1e-3 * torch.randn(torch_shape)
    (low if len(shape) == 2 and regex.search(jax.tree_util.keystr(path)) else reg).append(p)
  opt = make(low, reg, gap)
  opt.step()  # first step: state creation (and the first SVDs)
  return opt.step


def round_robin(steps, repeats, warmup=1):
  """Each ``steps[name]()`` timed once per round, ``repeats`` rounds: ``{name: [seconds]}``."""
  times = {name: [] for name in steps}
  for _ in range(warmup):
    for step in steps.values():
      step()
  for _ in range(repeats):
    for name, step in steps.items():
      start = time.perf_counter()
      step()
      times[name].append(time.perf_counter() - start)
  for name, ts in times.items():
    print(f"{name}: {[round(1e3 * t) for t in ts]} ms", file=sys.stderr, flush=True)
  return times


def paired_ratio(a, b):
  """Median over rounds of ``a / b``: both timed in the same round, so under the same load."""
  return statistics.median(x / y for x, y in zip(a, b, strict=True))


def candidates(gap, refresh):
  log = lambda name: print(f"compiled {name}", file=sys.stderr, flush=True)
  steps = {}
  for stacked in (False, True):
    for name, tx in jax_optimizers(gap, stacked).items():
      if refresh and (name in ("optax.adamw", GALORE_READS) or "staggered" in name):
        continue
      if stacked and name == "optax.adamw":
        continue
      name = name + (STACKED if stacked else "")
      steps[name] = jax_step(tx, stacked)
      log(name)
  if not refresh:
    steps[FLOOR] = floor_step()
    steps[BOUND] = floor_step(adam_on_the_rest=True)
  torch, makers = torch_optimizers()
  for name, make in makers.items():
    if not refresh or "Fira" in name:
      steps[name] = torch_step(torch, make, gap)
      log(name)
  return steps


def main():
  p = common.parser(__doc__)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--refresh-repeats", type=int, default=3)
  p.add_argument("--skip-refresh", action="store_true")
  args = p.parse_args()
  plain = round_robin(candidates(GAP, refresh=False), args.repeats)
  gc.collect()
  refresh = {}
  if not args.skip_refresh:
    refresh = round_robin(candidates(1, refresh=True), args.refresh_repeats)

  ms = lambda ts: "–" if ts is None else f"{1e3 * statistics.median(ts):,.0f} ms"
  rows = [[name, ms(ts), ms(refresh.get(name))] for name, ts in plain.items()]
  table = common.markdown_table(
    ["optimizer (LLaMA-60M shapes, rank 128)", "plain step", "refresh step"], rows
  )
  ratios = [["optax.contrib.galore", 1.0], ["fira_jax.galore_adamw", 1.05], [TORCH_FIRA, 0.4]]
  ratios += [["optax.adamw", None], [GALORE_READS, None], [FLOOR, None], [BOUND, None]]
  ratio_rows = []
  for name, goal in ratios:
    if name in plain:
      r = paired_ratio(plain[FIRA], plain[name])
      verdict = "" if goal is None else ("met" if r <= goal else "NOT met")
      ratio_rows.append(
        [f"{FIRA} ÷ {name}", f"{r:.3f}×", "–" if goal is None else f"≤ {goal}×", verdict]
      )
  for name in plain:
    if name.endswith(STACKED):
      separate = name.removesuffix(STACKED)
      for kind, times in (("plain", plain), ("refresh", refresh)):
        if name in times and separate in times:
          r = paired_ratio(times[name], times[separate])
          ratio_rows.append([f"{name} ÷ separate leaves ({kind} step)", f"{r:.3f}×", "≈ 1×", ""])
  if BOUND in plain and TORCH_FIRA in plain:
    r = paired_ratio(plain[BOUND], plain[TORCH_FIRA])
    ratio_rows.append(
      [f"{BOUND} ÷ {TORCH_FIRA}", f"{r:.3f}×", "–", "the best ratio this tree allows"]
    )
  ratio_table = common.markdown_table(["plain step unless stated", "ratio", "goal", ""], ratio_rows)
  header = (
    f"Machine: {jax.devices()[0].device_kind}, jax {jax.__version__}, medians of"
    f" {args.repeats} plain / {args.refresh_repeats} refresh steps, round-robin"
  )
  common.emit("\n\n".join([header, table, ratio_table]), args.output)


if __name__ == "__main__":
  main()
