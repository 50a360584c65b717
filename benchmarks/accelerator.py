"""Optimizer step time, refresh time, peak memory and compile time on one accelerator.

On LLaMA-60M, 350M and 1B shapes (the paper's ranks 128/256/512; q, k, v, o, gate, up and
down of every layer projected, embeddings, head and norms plain AdamW), in bfloat16, for
``optax.adamw``, ``optax.contrib.galore``, ``fira_jax.galore_adamw``, ``fira_jax.fira_adamw``
with each basis and the bound (the projection products R = Pᵀ G and P N of every projected
matrix plus AdamW on the other leaves: no Fira step on this tree can beat it). Run on a GPU:

  python benchmarks/accelerator.py --output-dir runs/accelerator

It takes at most about 8 minutes on one GPU: ``--time-budget-s`` (default 420) stops adding
work past the budget and says so (compiling the plain steps and measuring their memory, done
first for every shape, stops at half of it; timing rounds stop after the first).
Steps are jitted with parameters and optimizer state donated and apply
the update to the parameters; the gradient is a fixed random tree. Plain steps use the paper's
gap (200); refresh steps use ``update_proj_gap=1`` (every step refreshes every projector);
staggered refresh (``staggered_refresh=True``) and all-at-once refresh with the paper's gap are
timed step by step over two full gaps, reporting the slowest step ÷ the median step.
Candidates are timed round-robin (one step of each per round): medians over rounds, and each
ratio is the median over rounds of the two candidates' times in the same round.

Peak memory: ``peak_bytes_in_use`` of ``jax.devices()[0].memory_stats()`` after two steps of
one candidate, run alone (only the shared gradient tree live besides it), candidates in
ascending order of their compiled footprint and every shape's memory measured before any
timing. The peak counter never decreases, so a value that did not raise it is written
``≤``. Where memory_stats() is None (CPU), the compiled step's ``memory_analysis()``
argument + temp bytes instead. Compile time is the wall time of ``lower`` + ``compile``.
Writes ``accelerator.md`` and ``accelerator.json`` to ``--output-dir``.
"""

from __future__ import annotations

import gc
import json
import math
import pathlib
import statistics
import sys
import time

import common  # benchmarks/ is on sys.path when a script here runs
import jax
import jax.numpy as jnp
import optax
from optax import contrib
from step_time import paired_ratio
from step_time import round_robin

import fira_jax

# hidden, ffn, layers, rank, gap, alpha, vocab (the paper's settings; tiny is for tests).
SHAPES = {
  "tiny": (64, 172, 2, 16, 4, 0.25, 256),
  **{name: (*common.LLAMA[name], common.VOCAB) for name in ("60M", "1B")},
  "350M": (*common.LLAMA.get("350M", (1024, 2736, 24, 256, 200, 0.25)), common.VOCAB),
}
ADAMW = "optax.adamw"
CONTRIB = "optax.contrib.galore"
GALORE = "fira_jax.galore_adamw (svd)"
FIRA = "fira_jax.fira_adamw (svd)"
BOUND = "bound: projection products + AdamW on the unprojected leaves"
BASES = ("svd", "randomized_svd", "random")
ALL_AT_ONCE = "fira_jax.fira_adamw (svd), all-at-once refresh"
STAGGERED = "fira_jax.fira_adamw (svd), staggered refresh"
PHASE_ONE = 0.5  # compiling and measuring memory of the plain steps stops at half the budget


def log(*parts):
  print(*parts, file=sys.stderr, flush=True)


class Budget:
  def __init__(self, seconds):
    self.seconds, self.start, self.skipped = seconds, time.perf_counter(), []

  def elapsed(self):
    return time.perf_counter() - self.start

  def allows(self, what, fraction=1.0):
    if self.seconds is not None and self.elapsed() > fraction * self.seconds:
      self.skipped.append(what)
      log(f"time budget ({self.seconds:.0f} s) exceeded: skipping {what}")
      return False
    return True


def optimizers(rank, gap, alpha, refresh):
  kw = dict(
    rank=rank,
    update_proj_gap=gap,
    scale=alpha,
    weight_dimension_numbers=common.fira_dimension_numbers(),
  )
  txs = {} if refresh else {ADAMW: optax.adamw(0.01)}
  txs[CONTRIB] = contrib.galore(
    0.01, rank, gap, alpha, weight_dimension_numbers=common.galore_dimension_numbers()
  )
  txs[GALORE] = fira_jax.galore_adamw(0.01, **kw)
  for basis in BASES:
    txs[f"fira_jax.fira_adamw ({basis})"] = fira_jax.fira_adamw(0.01, **kw, projection=basis)
  return txs


class Candidate:
  """A donated, jitted step, compiled ahead of time; ``start()`` makes fresh params and state."""

  def __init__(self, name, step, make_carry, shared):
    self.name, self.make_carry, self.shared = name, make_carry, shared
    abstract = jax.eval_shape(make_carry)
    start = time.perf_counter()
    self.compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*abstract, shared).compile()
    self.compile_s = time.perf_counter() - start
    self.carry = None
    try:
      ma = self.compiled.memory_analysis()
      self.memory_analysis = {
        k: int(getattr(ma, f"{k}_size_in_bytes"))
        for k in ("argument", "output", "alias", "temp", "generated_code")
      }
    except Exception:  # not every backend reports it
      self.memory_analysis = None

  def footprint(self):
    ma = self.memory_analysis
    return 0 if ma is None else ma["argument"] + ma["temp"]

  def start(self):
    self.carry = list(jax.jit(self.make_carry)())
    jax.block_until_ready(self.carry)

  def __call__(self):
    out = self.compiled(*self.carry, self.shared)
    self.carry = list(out[:2])
    jax.block_until_ready(out)

  def stop(self):
    self.carry = None
    gc.collect()


def optimizer_candidate(name, tx, shapes, grads, dtype):
  def make_carry():
    params = jax.tree.map(lambda x: x.astype(dtype), common.concrete(shapes))
    return params, tx.init(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return Candidate(name, step, make_carry, grads)


def bound_candidate(shapes, grads, rank, dtype):
  """AdamW on the unprojected leaves plus both projection products of every projected one."""
  layouts = fira_jax.Subspace(rank, common.fira_dimension_numbers()).layouts(grads)
  leaves = jax.tree.leaves(grads)
  projected = [i for i, lay in enumerate(layouts) if lay is not None]
  rest = [i for i, lay in enumerate(layouts) if lay is None]
  adam = optax.adamw(0.01)

  def make_carry():
    params = [0.02 * jnp.ones(leaves[i].shape, dtype) for i in rest]
    return params, adam.init(params)

  def step(params, state, grads):
    flat = jax.tree.leaves(grads)
    updates, state = adam.update([flat[i] for i in rest], state, params)
    out = []
    for i in projected:
      lay = layouts[i]
      p = jnp.full(lay.projector_shape, 0.1, dtype)[None]
      r = fira_jax.project(lay.matrix.to_matrices(flat[i]), p, lay.compressed)
      out.append(fira_jax.project_back(r, p, lay.compressed))
    return optax.apply_updates(params, updates), state, out

  return Candidate(BOUND, step, make_carry, grads)


def shape_setup(name, dtype):
  hidden, ffn, layers, rank, gap, alpha, vocab = SHAPES[name]
  shapes = common.llama_shapes(hidden, ffn, layers, vocab=vocab)
  grads = jax.tree.map(lambda x: x.astype(dtype), common.concrete(shapes, seed=1, scale=1e-3))
  grads = jax.block_until_ready(grads)
  info = dict(hidden=hidden, ffn=ffn, layers=layers, rank=rank, gap=gap, alpha=alpha, vocab=vocab)
  info["params"] = sum(math.prod(s) for s in jax.tree.leaves(shapes, is_leaf=common.is_shape))
  return info, shapes, grads


def plain_makers(shapes, grads, info, dtype):
  makers = {
    n: (lambda n=n, tx=tx: optimizer_candidate(n, tx, shapes, grads, dtype))
    for n, tx in optimizers(info["rank"], info["gap"], info["alpha"], refresh=False).items()
  }
  makers[BOUND] = lambda: bound_candidate(shapes, grads, info["rank"], dtype)
  return makers


def compile_all(makers, budget, where, fraction=1.0):
  out = {}
  for name, make in makers.items():
    if not budget.allows(f"{where}: {name}", fraction):
      break
    out[name] = make()
    log(f"{where}: compiled {name} in {out[name].compile_s:.1f} s")
  return out


def measure_memory(cands, device):
  """Peak memory of two steps of each candidate alone, in ascending compiled footprint."""
  result = {}
  for cand in sorted(cands.values(), key=Candidate.footprint):
    stats = device.memory_stats()
    if stats is None or "peak_bytes_in_use" not in stats:
      ma = cand.memory_analysis
      result[cand.name] = dict(
        source="memory_analysis",
        bytes=None if ma is None else ma["argument"] + ma["temp"],
        exact=ma is not None,
        memory_analysis=ma,
      )
      continue
    before = stats["peak_bytes_in_use"]
    cand.start()
    cand()
    cand()
    cand.stop()
    peak = device.memory_stats()["peak_bytes_in_use"]
    result[cand.name] = dict(
      source="peak_bytes_in_use", bytes=int(peak), exact=peak > before, memory_analysis=None
    )
    result[cand.name]["memory_analysis"] = cand.memory_analysis
  return result


def summarize(times):
  return dict(median_s=statistics.median(times), times_s=times)


def time_round_robin(cands, repeats, budget, what):
  """``round_robin`` one round at a time, stopping (after one round at least) past the budget."""
  for cand in cands.values():
    cand.start()
  times = round_robin(cands, 1)  # with one warm-up round
  for done in range(1, repeats):
    if not budget.allows(f"{what}: rounds {done + 1}-{repeats}"):
      break
    for n, ts in round_robin(cands, 1, warmup=0).items():
      times[n] += ts
  for cand in cands.values():
    cand.stop()
  return times


def ratios(times, pairs):
  out = {}
  for a, b in pairs:
    if a in times and b in times and a != b:
      out[f"{a} ÷ {b}"] = paired_ratio(times[a], times[b])
  return out


def step_by_step(cand, steps):
  """Per-step times of ``steps`` steps after step 0 (the first refresh, not counted)."""
  cand.start()
  median, times = common.median_time(cand, steps, warmup=1)
  cand.stop()
  return dict(
    median_s=median,
    slowest_s=max(times),
    slowest_over_median=max(times) / median,
    steps=steps,
    compile_s=cand.compile_s,
  )


def run_shape_timings(name, setup, plain, args, budget):
  info, shapes, grads = setup
  rank, gap, alpha = info["rank"], info["gap"], info["alpha"]
  res = {}
  if plain and budget.allows(f"{name}: plain steps"):
    log(f"{name}: timing {len(plain)} plain steps x {args.repeats} rounds")
    times = time_round_robin(plain, args.repeats, budget, f"{name}: plain steps")
    res["plain"] = {n: summarize(t) | {"compile_s": plain[n].compile_s} for n, t in times.items()}
    names = list(times)
    pairs = [(n, ADAMW) for n in names] + [(n, BOUND) for n in names if "fira_adamw" in n]
    pairs += [(FIRA, GALORE), (FIRA, CONTRIB), (GALORE, CONTRIB)]
    res["plain_ratios"] = ratios(times, pairs)

  if budget.allows(f"{name}: refresh steps"):
    makers = {
      n: (lambda n=n, tx=tx: optimizer_candidate(n, tx, shapes, grads, args.dtype))
      for n, tx in optimizers(rank, 1, alpha, refresh=True).items()
    }
    cands = compile_all(makers, budget, f"{name} refresh")
    if cands:
      log(f"{name}: timing {len(cands)} refresh steps x {args.refresh_repeats} rounds")
      times = time_round_robin(cands, args.refresh_repeats, budget, f"{name}: refresh steps")
      res["refresh"] = {
        n: summarize(t) | {"compile_s": cands[n].compile_s} for n, t in times.items()
      }
      res["refresh_ratios"] = ratios(times, [(n, GALORE) for n in times] + [(FIRA, CONTRIB)])
    del cands
    gc.collect()

  gap_steps = args.stagger_gap or gap
  res["staggered"] = {"gap": gap_steps, "steps": 2 * gap_steps}
  kw = dict(rank=rank, update_proj_gap=gap_steps, scale=alpha)
  kw["weight_dimension_numbers"] = common.fira_dimension_numbers()
  for label, staggered in ((ALL_AT_ONCE, False), (STAGGERED, True)):
    if not budget.allows(f"{name}: {label}"):
      continue
    if not staggered and gap_steps == gap and FIRA in plain:
      cand = plain[FIRA]  # the plain step already refreshes all at once every gap
    else:
      tx = fira_jax.fira_adamw(0.01, **kw, staggered_refresh=staggered)
      cand = optimizer_candidate(label, tx, shapes, grads, args.dtype)
    log(f"{name}: {label} compiled in {cand.compile_s:.1f} s; timing {2 * gap_steps} steps")
    res["staggered"][label] = step_by_step(cand, 2 * gap_steps)
    del cand
    gc.collect()
  return res


def fmt_ms(x):
  return "–" if x is None else f"{1e3 * x:,.2f} ms"


def fmt_bytes(m):
  if m is None or m.get("bytes") is None:
    return "n/a"
  prefix = "" if m["exact"] else "≤ "
  if m["bytes"] < 2**30:
    return f"{prefix}{m['bytes'] / 2**20:,.2f} MiB"
  return f"{prefix}{m['bytes'] / 2**30:,.3f} GiB"


def markdown(report):
  parts = [
    f"Device: {report['device']}, jax {report['jax']}, {report['dtype']}, medians of "
    f"{report['repeats']} plain / {report['refresh_repeats']} refresh rounds, round-robin; "
    f"memory from {report['memory_source']}; {report['elapsed_s']:.0f} s in all."
  ]
  if report["budget_exceeded"]:
    parts.append(
      f"**Time budget of {report['time_budget_s']:.0f} s exceeded: skipped** "
      + "; ".join(report["skipped"])
    )
  for name, res in report["shapes"].items():
    title = f"LLaMA-{name} shapes (rank {res['info']['rank']}, gap {res['info']['gap']})"
    plain, refresh = res.get("plain", {}), res.get("refresh", {})
    memory = res.get("memory", {})
    adam_mem = memory.get(ADAMW, {}).get("bytes")
    rows = []
    for n in res.get("compiled", []):
      m = memory.get(n)
      rel = "–"
      if m and m.get("bytes") and adam_mem:
        rel = f"{m['bytes'] / adam_mem:.3f}×"
      ratio = res.get("plain_ratios", {}).get(f"{n} ÷ {ADAMW}")
      rows.append(
        [
          n,
          fmt_ms(plain.get(n, {}).get("median_s")),
          "–" if ratio is None else f"{ratio:.3f}×",
          fmt_ms(refresh.get(n, {}).get("median_s")),
          fmt_bytes(m),
          rel,
          f"{res['compile_s'][n]:.1f} s",
          "–" if n not in refresh else f"{refresh[n]['compile_s']:.1f} s",
        ]
      )
    header = [
      title,
      "plain step",
      "÷ AdamW (paired)",
      "refresh step (gap 1)",
      "peak memory",
      "÷ AdamW memory",
      "compile (plain)",
      "compile (refresh)",
    ]
    parts.append(common.markdown_table(header, rows))
    ratio_rows = [[k, f"{v:.3f}×", "plain"] for k, v in res.get("plain_ratios", {}).items()]
    ratio_rows += [[k, f"{v:.3f}×", "refresh"] for k, v in res.get("refresh_ratios", {}).items()]
    if ratio_rows:
      parts.append(common.markdown_table([f"{name}: paired ratio", "median", "step"], ratio_rows))
    st = res.get("staggered", {})
    st_rows = [
      [
        label,
        fmt_ms(st[label]["median_s"]),
        fmt_ms(st[label]["slowest_s"]),
        f"{st[label]['slowest_over_median']:.2f}×",
        f"{st[label]['compile_s']:.1f} s",
      ]
      for label in (ALL_AT_ONCE, STAGGERED)
      if label in st
    ]
    if st_rows:
      header = [
        f"{name}: gap {st['gap']}, {st['steps']} steps",
        "median step",
        "slowest step",
        "slowest ÷ median",
        "compile",
      ]
      parts.append(common.markdown_table(header, st_rows))
  return "\n\n".join(parts)


def main():
  p = common.parser(__doc__)
  p.add_argument("--shapes", default="60M,350M,1B", help=f"comma-separated, of {list(SHAPES)}")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--refresh-repeats", type=int, default=3)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--output-dir", type=pathlib.Path, default=pathlib.Path("runs/accelerator"))
  p.add_argument("--time-budget-s", type=float, default=420.0)
  p.add_argument("--stagger-gap", type=int, help="gap of the staggered runs (default: the shape's)")
  args = p.parse_args()
  args.dtype = jnp.dtype(args.dtype)
  shape_names = [s.strip() for s in args.shapes.split(",") if s.strip()]
  for s in shape_names:
    if s not in SHAPES:
      p.error(f"unknown shape {s!r}; choose from {list(SHAPES)}")
  budget = Budget(args.time_budget_s)
  device = jax.devices()[0]
  log(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}")
  stats = device.memory_stats()
  report = dict(
    device=device.device_kind,
    platform=device.platform,
    jax=jax.__version__,
    optax=optax.__version__,
    dtype=str(args.dtype),
    repeats=args.repeats,
    refresh_repeats=args.refresh_repeats,
    time_budget_s=args.time_budget_s,
    memory_source="peak_bytes_in_use"
    if stats and "peak_bytes_in_use" in stats
    else "memory_analysis (argument + temp)",
    shapes={},
  )

  # Phase 1, every shape: compile the plain steps and measure their memory alone.
  setups, plains = {}, {}
  for name in shape_names:
    if not budget.allows(f"{name}: everything", PHASE_ONE):
      continue
    setups[name] = setup = shape_setup(name, args.dtype)
    info, shapes, grads = setup
    log(f"{name}: {info['params'] / 1e6:,.1f}M parameters, rank {info['rank']}")
    makers = plain_makers(shapes, grads, info, args.dtype)
    plains[name] = compile_all(makers, budget, f"{name} plain", PHASE_ONE)
    res = report["shapes"][name] = {"info": info, "compiled": list(plains[name])}
    res["compile_s"] = {n: c.compile_s for n, c in plains[name].items()}
    log(f"{name}: measuring memory")
    res["memory"] = measure_memory(plains[name], device)

  # Phase 2, every shape: plain round-robin, refresh round-robin, staggered.
  for name in setups:
    res = report["shapes"][name]
    res.update(run_shape_timings(name, setups[name], plains.pop(name), args, budget))
    gc.collect()

  report["elapsed_s"] = budget.elapsed()
  report["budget_exceeded"] = bool(budget.skipped)
  report["skipped"] = budget.skipped
  text = markdown(report)
  args.output_dir.mkdir(parents=True, exist_ok=True)
  common.emit(text, args.output_dir / "accelerator.md")
  if args.output is not None:
    args.output.write_text(text + "\n")
  (args.output_dir / "accelerator.json").write_text(json.dumps(report, indent=2) + "\n")
  log(
    f"wrote {args.output_dir / 'accelerator.md'} and accelerator.json in {budget.elapsed():.0f} s"
  )


if __name__ == "__main__":
  main()
