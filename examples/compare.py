"""Which optimizer at which memory: a seeded quality-versus-memory study, tuned the same for all.

    pip install -e ".[examples]" && python examples/compare.py

Every optimizer trains the same model on the same batches, seeds, token budget and schedule
(cosine with 10% warm-up to 10% of the peak). The protocol:

1. Tuning, seed 0, the same for every optimizer: two peak learning rates, one for the
   attention/MLP matrices and one for embeddings, head and norms (``--embed-lr``). Both move
   on the ladder 1e-5, 3e-5, …, 0.3, 1. The matrix lr starts on a 3-point grid per optimizer
   (``KINDS``) with the embeddings' lr at 0.01; then, until the best point has an evaluated
   neighbour on both sides in both lrs, the missing neighbours are run (an optimum at a grid
   edge extends the grid), at most ``--max-sweep-runs`` runs per optimizer. A run whose loss
   becomes NaN counts as diverged (worse than any finite loss).
2. Each optimizer's best setting rerun on ``--seeds`` seeds: mean ± standard deviation.
3. Rank sweep (hidden/16, hidden/8; hidden/4 is step 2) for ``--rank-sweep-kinds`` at their
   best setting on ``--rank-sweep-seeds`` seeds. Runs of Fira and GaLore in steps 2-4 end
   with a diagnostic: at the final weights, Fira's pieces (``fira_jax.subspace_projection``,
   ``in_subspace``, ``norm_based_scaling``, ``limit_residual_growth``, ``back_projection``)
   run on ``DIAGNOSTIC_BATCHES`` further training batches (the weights held, the state warmed
   on the first half, the basis fresh where training's is up to a gap old) and measure, over
   the attention/MLP matrices, the share of the update's norm that comes from the scaled
   residual, ‖S‖/‖u‖, and the share of the gradient's norm inside the subspace, ‖PᵀG‖/‖G‖.
4. With ``--confirm-model``: each optimizer's best setting from step 1, unchanged, on the
   larger model (``--confirm-steps`` × ``--confirm-batch-size`` sequences, 2.05M tokens by
   default) and ``--confirm-seeds`` seeds, every optimizer's first seed before any second.

Each call writes ``best_settings.json``, the settings its searches found. ``--settings FILE``
takes an optimizer's setting from such a file instead of searching for it (its seed 0 then
runs in step 2); ``examples/compare_settings.json`` holds the ones the ``tiny`` study found.
``--confirm-only`` runs step 4 alone.

The whole study is resumable and runs in parts: each call continues where the last one
stopped, ``--max-runs`` sets the size of a part. On 2 CPU cores a run takes 0.7-1.6 min at
the defaults (``tiny``, 500 steps × 8 × 128) and 5-14 min on a 3.3M-parameter model at
1000 steps × 16 × 128, depending on the machine; steps 1-3 are about 90 runs, step 4 is 18:

    python examples/compare.py --max-runs 20    # repeat until it prints the tables
    python examples/compare.py --confirm-model 3m --max-runs 4    # repeat

or, for the larger model alone at the shipped settings:

    python examples/compare.py --confirm-model 3m --confirm-only \\
      --settings examples/compare_settings.json --max-runs 4

where ``3m`` (hidden 256, ffn 688, 4 heads, 4 layers) has 3.30M parameters with the
byte-level vocabulary.

Runs are recorded one per line in ``--out``/``results.jsonl`` as they finish. Writes
``compare.md`` (the tables), ``memory.png`` (validation loss against optimizer-state MiB,
error bars over seeds, the Pareto front), ``curves.png`` (training and validation loss),
``step_time.png`` and, for the larger model, ``memory_MODEL.png`` and ``curves_MODEL.png``
(``--confirm-only`` writes the larger model's figures and ``step_time.png`` only).
"""

from __future__ import annotations

import os

# Before numpy/jaxlib load OpenBLAS: its LAPACK threads (the SVD refresh) would compete
# with XLA's inside a step (benchmarks/README.md, "Latest numbers").
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import dataclasses
import json
import math
import pathlib
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import optim
import train

import fira_jax


@dataclasses.dataclass(frozen=True)
class Kind:
  label: str
  optimizer: str  # train.Config.optimizer
  lrs: tuple[float, ...]  # the matrix-lr grid the search starts from
  options: tuple[tuple[str, object], ...] = ()  # other train.Config fields


# Starting grids: centred where the previous comparison (examples/README.md) found each
# optimizer's best single lr, and for the new ones where 150-step calibration runs (`tiny`,
# embeddings at 0.01) put it: Adafactor 0.1 (its steps are relative to each weight's RMS),
# Muon 0.03, Fira with a random basis or with Adafactor's moment 3e-3 (lowest of 3e-3, 0.01,
# 0.03; Fira's own was too, at 150 steps). The search moves off them when it must.
KINDS = {
  "adamw": Kind("AdamW, full rank", "adamw", (3e-4, 1e-3, 3e-3)),
  "fira": Kind("Fira (fira_adamw, SVD basis)", "fira", (3e-3, 1e-2, 3e-2)),
  "fira-random": Kind(
    "Fira, random basis (fira_adamw, projection='random')",
    "fira",
    (1e-3, 3e-3, 1e-2),
    (("projection", "random"),),
  ),
  "fira-adafactor": Kind(
    "Fira, Adafactor's factored 2nd moment as base (fira_chain)",
    "fira-adafactor",
    (1e-3, 3e-3, 1e-2),
  ),
  "galore": Kind("GaLore (fira_jax.galore_adamw)", "galore", (3e-3, 1e-2, 3e-2)),
  "galore-optax": Kind("GaLore (optax.contrib.galore)", "galore-optax", (1e-2, 3e-2, 1e-1)),
  "adafactor": Kind("Adafactor (optax.adafactor)", "adafactor", (3e-2, 1e-1, 3e-1)),
  "muon": Kind("Muon (optax.contrib.muon; AdamW off the matrices)", "muon", (1e-2, 3e-2, 1e-1)),
  "lora": Kind("LoRA (nnx.LoRA adapters)", "lora", (1e-3, 3e-3, 1e-2)),
}
LADDER = tuple(float(f"{m}e{e}") for e in range(-5, 1) for m in (1, 3))[:-1]  # 1e-5, …, 0.3, 1
START_EMBED_LR = 0.01  # the embeddings/head/norms lr every search starts from
PAPER_LR = 0.01  # the paper's single setting (matrices and the rest)
DIAGNOSED = ("fira", "fira-random", "fira-adafactor", "galore")  # kinds with the diagnostic
DIAGNOSTIC_BATCHES = 20  # the first half warms the state, the second half is measured
COLORS = {kind: f"C{i}" for i, kind in enumerate(KINDS)}  # the same in every figure


def rung(lr: float) -> int:
  """``lr``'s index on ``LADDER``."""
  return min(range(len(LADDER)), key=lambda i: abs(math.log(LADDER[i] / lr)))


def neighbours(i: int, j: int) -> dict[str, tuple[int, int]]:
  """The search point (matrix rung i, embed rung j)'s neighbours on the ladder, by name."""
  named = {
    "lower lr": (i - 1, j),
    "higher lr": (i + 1, j),
    "lower embed lr": (i, j - 1),
    "higher embed lr": (i, j + 1),
  }
  return {name: p for name, p in named.items() if all(0 <= k < len(LADDER) for k in p)}


@dataclasses.dataclass(frozen=True)
class Run:
  kind: str  # a KINDS key
  lr: float  # the matrices' peak lr
  embed_lr: float  # embeddings/head/norms' peak lr
  seed: int = 0
  rank: int = 0  # 0: hidden / 4
  model: str | None = None  # None: --model (the sweep); else --confirm-model
  diagnose: bool = dataclasses.field(default=False, compare=False)

  @property
  def name(self) -> str:
    parts = [self.kind, f"lr{self.lr:g}", f"elr{self.embed_lr:g}", f"seed{self.seed}"]
    if self.rank:
      parts.append(f"rank{self.rank}")
    if self.model:
      parts.append(f"at-{self.model}")
    return "_".join(parts)


def load_results(path: pathlib.Path) -> dict[str, dict]:
  """The recorded runs by name; records of the earlier protocol (one lr, other optimizer
  names) are left out, with a note."""
  if not path.exists():
    return {}
  records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  kept = {r["name"]: r for r in records if r["kind"] in KINDS and r.get("embed_lr") is not None}
  if len(kept) < len(records):
    print(f"{path}: left out {len(records) - len(kept)} runs of an earlier protocol")
  return kept


def loss_of(result: dict | None) -> float:
  """The final validation loss; inf for a diverged run (and nan when not run)."""
  if result is None:
    return math.nan
  loss = result.get("final_eval_loss")
  return math.inf if loss is None or not math.isfinite(loss) else loss


class Plan:
  """The runs of the protocol; later phases depend on the results of earlier ones."""

  def __init__(self, args):
    self.args = args
    hidden = train.model_lib.make_config(args.model).hidden
    self.ranks = [hidden // 16, hidden // 8]  # hidden // 4 is the default rank
    self.seeds = list(range(args.seeds))
    self.settings = args.settings or {}  # kind -> (lr, embed_lr)

  def searched(self, kind: str) -> bool:
    """Whether step 1 runs for ``kind`` (not for kinds in ``--settings``)."""
    return kind not in self.settings

  def tried(self, kind: str, results: dict) -> dict[tuple[int, int], float]:
    """Seed-0 points of ``kind``'s search so far: (matrix rung, embed rung) -> loss."""
    return {
      (rung(r["lr"]), rung(r["embed_lr"])): loss_of(r)
      for r in results.values()
      if r["kind"] == kind and r["seed"] == 0 and not r["rank"] and not r.get("model")
    }

  def best(self, kind: str, results: dict) -> Run | None:
    """``kind``'s best seed-0 setting so far (None before any finite result)."""
    if not self.searched(kind):
      return Run(kind, *self.settings[kind])
    tried = {p: loss for p, loss in self.tried(kind, results).items() if math.isfinite(loss)}
    if not tried:
      return None
    i, j = min(tried, key=tried.get)
    return Run(kind, LADDER[i], LADDER[j])

  def next_sweep_runs(self, kind: str, results: dict) -> list[Run]:
    """The next runs of ``kind``'s search, [] once it is done."""
    if not self.searched(kind):
      return []
    grid = KINDS[kind].lrs[1:2] if self.args.smoke else KINDS[kind].lrs
    j0 = rung(START_EMBED_LR)
    tried = self.tried(kind, results)
    wanted = [(rung(lr), j0) for lr in grid]
    if all(p in tried for p in wanted) and not self.args.smoke:
      finite = {p: loss for p, loss in tried.items() if math.isfinite(loss)}
      if finite:
        i, j = min(finite, key=finite.get)
        wanted = list(neighbours(i, j).values())
      else:  # everything diverged so far: lower the matrix lr
        wanted = [(min(i for i, _ in tried) - 1, j0)]
    missing = [
      (i, j)
      for i, j in wanted
      if (i, j) not in tried and 0 <= i < len(LADDER) and 0 <= j < len(LADDER)
    ]
    missing = missing[: max(0, self.args.max_sweep_runs - len(tried))]
    return [Run(kind, LADDER[i], LADDER[j]) for i, j in missing]

  def sweep_done(self, kind: str, results: dict) -> bool:
    return not self.next_sweep_runs(kind, results)

  def phases(self, results: dict):
    """Yields (phase name, runs); reads ``results`` again before each yield."""
    kinds = self.args.kinds
    while not self.args.confirm_only:
      runs = [run for kind in kinds for run in self.next_sweep_runs(kind, results)]
      if not runs:
        break
      yield "sweep", runs
    best = {kind: self.best(kind, results) for kind in kinds}
    best = {kind: run for kind, run in best.items() if run is not None}
    if self.args.confirm_only:
      yield "confirm", self.confirm_runs(best)
      return
    yield (
      "seeds",
      [  # seed 0 ran in the search, where there was one
        dataclasses.replace(run, seed=s, diagnose=run.kind in DIAGNOSED)
        for run in best.values()
        for s in (self.seeds[1:] if self.searched(run.kind) else self.seeds)
      ],
    )
    yield (
      "ranks",
      [
        dataclasses.replace(best[kind], rank=r, seed=s, diagnose=kind in DIAGNOSED)
        for kind in self.args.rank_sweep_kinds
        if kind in best
        for r in self.ranks
        for s in range(self.args.rank_sweep_seeds)
      ],
    )
    if self.args.confirm_model:
      yield "confirm", self.confirm_runs(best)

  def confirm_runs(self, best: dict[str, Run]) -> list[Run]:
    """Step 4: the best settings on ``--confirm-model``, seed by seed (all optimizers'
    first seed before any second one, so a part of the study covers every optimizer)."""
    return [
      dataclasses.replace(
        run, model=self.args.confirm_model, seed=s, diagnose=run.kind in DIAGNOSED
      )
      for s in range(self.args.confirm_seeds)
      for run in best.values()
    ]


def run_shape(args, run: Run) -> tuple[str, int, int, int]:
  """(model, steps, batch size, eval every) of the run's scale."""
  if run.model is None:
    return args.model, args.steps, args.batch_size, args.eval_every
  every = max(1, args.confirm_steps * args.eval_every // args.steps)
  return run.model, args.confirm_steps, args.confirm_batch_size, every


def train_config(args, run: Run) -> train.Config:
  model, steps, batch_size, eval_every = run_shape(args, run)
  kind = KINDS[run.kind]
  return train.Config(
    model=model,
    optimizer=kind.optimizer,
    lr=run.lr,
    embed_lr=run.embed_lr,
    rank=run.rank or None,  # None: hidden / 4
    seed=run.seed,
    steps=steps,
    batch_size=batch_size,
    seq_len=args.seq_len,
    eval_every=eval_every,
    eval_batches=args.eval_batches,
    checkpoints=run.diagnose,  # the diagnostic reads the final weights
    checkpoint_every=steps,
    update_proj_gap=args.update_proj_gap,
    log_every=max(1, min(10, steps // 3)),  # at least 3 records: the step time skips the first
    progress=False,
    plot=False,
    data=args.data,
    **dict(kind.options),
  )


def subspace_diagnostics(config: train.Config, workdir: pathlib.Path) -> dict:
  """How much of Fira's update comes from the residual, at a finished run's final weights.

  Runs the pieces of Fira's Algorithm 1 (GaLore: without the residual) with the run's
  settings on ``DIAGNOSTIC_BATCHES`` training batches after the run's last, at fixed
  weights: the basis is computed on the first batch, the first half warms the base
  optimizer's state and the limiter, the second half is measured. Norms are summed over all
  projected matrices. Returns the means over the measured batches of ‖S‖/‖u‖ (the scaled,
  limited residual's share of the update, before the learning rate; 0 for GaLore),
  ‖α P N‖/‖u‖ (the subspace term's) and ‖PᵀG‖/‖G‖ (the gradient's share in the subspace,
  for the orthonormal SVD basis; not a share for a random basis).
  """
  corpus, model, model_config = train.build_run(
    dataclasses.replace(config, init_from=str(workdir)), workdir
  )
  rank, matrices = optim.low_rank_layout(config, model_config)
  space = fira_jax.Subspace(
    rank=rank, weight_dimension_numbers=matrices, compressed_side=config.compressed_side
  )
  pieces = [
    fira_jax.subspace_projection(
      space,
      config.update_proj_gap,
      config.projection,
      config.projection_seed,
      config.staggered_refresh,
    ),
    fira_jax.in_subspace(optim.subspace_base_optimizer(config), space),
  ]
  if config.optimizer != "galore":
    pieces.append(fira_jax.norm_based_scaling(config.scale, config.scaling, config.formulation))
    if config.norm_growth_limit is not None:
      pieces.append(fira_jax.limit_residual_growth(space, config.norm_growth_limit))
  tx = optax.chain(*pieces)
  back = fira_jax.back_projection(config.scale, config.formulation)
  is_update = lambda x: isinstance(x, fira_jax.SubspaceUpdate)
  sq = lambda xs: sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in xs)

  @jax.jit
  def measure(grads, state, params):
    out, state = tx.update(grads, state, params)
    nodes = [u for u in jax.tree.leaves(out, is_leaf=is_update) if is_update(u)]
    without_residual = jax.tree.map(
      lambda u: dataclasses.replace(u, residual=None) if is_update(u) else u, out, is_leaf=is_update
    )
    projected = [is_update(u) for u in jax.tree.leaves(out, is_leaf=is_update)]
    pick = lambda tree: [x for x, p in zip(jax.tree.leaves(tree), projected, strict=True) if p]
    full = pick(back.update(out, optax.EmptyState())[0])
    sub = pick(back.update(without_residual, optax.EmptyState())[0])
    u2 = sq(full)
    stats = {
      "residual_share": jnp.sqrt(sq([f - s for f, s in zip(full, sub, strict=True)]) / u2),
      "subspace_share": jnp.sqrt(sq(sub) / u2),
      "gradient_in_subspace": jnp.sqrt(
        sq([u.projected for u in nodes]) / sq([u.gradient for u in nodes])
      ),
    }
    return stats, state

  grad_fn = nnx.jit(lambda m, b: nnx.grad(train.model_lib.next_token_loss)(m, b))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  state = tx.init(params)
  batches = corpus.batches(config.steps, config.seed, config.batch_size, config.seq_len)
  measured = []
  for i in range(DIAGNOSTIC_BATCHES):
    grads = nnx.to_pure_dict(grad_fn(model, jnp.asarray(next(batches))))
    stats, state = measure(grads, state, params)
    if i >= DIAGNOSTIC_BATCHES // 2:
      measured.append({k: float(v) for k, v in stats.items()})
  result = {k: float(np.mean([m[k] for m in measured])) for k in measured[0]}
  result["batches"] = len(measured)
  return result


def execute(args, run: Run, results_path: pathlib.Path) -> dict:
  workdir = args.out / "runs" / run.name
  if workdir.exists():
    shutil.rmtree(workdir)  # a run that did not finish last time starts again
  config = train_config(args, run)
  start = time.perf_counter()
  try:
    summary = train.train_and_evaluate(config, workdir)
    diverged = summary["final_eval_loss"] is None or not math.isfinite(summary["final_eval_loss"])
  except FloatingPointError as e:  # the loss became NaN/inf: a diverged setting, not a crash
    print(f"    diverged: {e}", flush=True)
    summary = dict(optimizer=config.optimizer, lr=run.lr, seed=run.seed, final_eval_loss=None)
    summary["final_eval_ppl"] = None
    diverged = True
  wall_s = time.perf_counter() - start
  records = train.read_metrics(workdir / "metrics.jsonl")
  result = dict(
    summary,
    name=run.name,
    kind=run.kind,
    rank=run.rank,
    embed_lr=run.embed_lr,
    model=run.model,
    diverged=diverged,
    wall_s=wall_s,
    curve=[(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r],
    train_curve=[(r["step"], r["loss_avg"]) for r in records if "loss_avg" in r],
  )
  if run.diagnose and not diverged:
    result["subspace"] = subspace_diagnostics(config, workdir)
    result["diagnostic_s"] = time.perf_counter() - start - wall_s
  shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
  with results_path.open("a") as f:
    f.write(json.dumps(result) + "\n")
  return result


# ---------------------------------------------------------------------------------------
# The report


def group(results: dict, kind: str, lr: float, embed_lr: float, rank=0, model=None) -> list[dict]:
  """The runs (all seeds) of one setting."""
  return [
    r
    for r in results.values()
    if r["kind"] == kind
    and r["lr"] == lr
    and r["embed_lr"] == embed_lr
    and r["rank"] == rank
    and r.get("model") == model
  ]


def mean_std(losses: list[float]) -> str:
  if not losses:
    return ""
  if any(not math.isfinite(x) for x in losses):
    return f"diverged ({sum(not math.isfinite(x) for x in losses)} of {len(losses)})"
  if len(losses) == 1:
    return f"{losses[0]:.3f} (n=1)"
  return f"{np.mean(losses):.3f} ± {np.std(losses, ddof=1):.3f} (n={len(losses)})"


def state_mib(runs: list[dict]) -> float:
  sizes = [r["optimizer_state_bytes"] for r in runs if r.get("optimizer_state_bytes")]
  return sizes[0] / 2**20 if sizes else math.nan


def step_ms(args, runs: list[dict]) -> float:
  """Median milliseconds per training step over ``runs`` (the same scale)."""
  times = []
  for r in runs:
    if r.get("tokens_per_s"):
      _, _, batch_size, _ = run_shape(args, Run(r["kind"], 0, 0, model=r.get("model")))
      times.append(batch_size * args.seq_len / r["tokens_per_s"] * 1e3)
  return float(np.median(times)) if times else math.nan


def points(args, results: dict, plan: Plan, model=None) -> list[dict]:
  """One point per optimizer (and rank) at its best setting: loss over seeds, memory."""
  out = []
  for kind in args.kinds:
    best = plan.best(kind, results)
    if best is None:
      continue
    ranks = [0] + (plan.ranks if kind in args.rank_sweep_kinds and model is None else [])
    for rank in ranks:
      runs = group(results, kind, best.lr, best.embed_lr, rank, model)
      losses = [loss_of(r) for r in runs]
      if not runs:
        continue
      hidden = train.model_lib.make_config(model or args.model).hidden
      out.append(
        dict(
          kind=kind,
          rank=rank or hidden // 4,
          default_rank=not rank,
          runs=runs,
          losses=losses,
          mib=state_mib(runs),
        )
      )
  return out


def pareto(pts: list[dict]) -> list[dict]:
  """The points no other point beats on both memory and mean loss."""
  finite = [p for p in pts if all(map(math.isfinite, p["losses"])) and math.isfinite(p["mib"])]
  front, best = [], math.inf
  for p in sorted(finite, key=lambda p: (p["mib"], np.mean(p["losses"]))):
    if np.mean(p["losses"]) < best:
      front.append(p)
      best = np.mean(p["losses"])
  return front


def diag_cell(runs: list[dict], key: str) -> str:
  values = [r["subspace"][key] for r in runs if r.get("subspace")]
  if not values:
    return ""
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def search_table(kind: str, results: dict, plan: Plan) -> list[str]:
  if not plan.searched(kind):
    best = plan.best(kind, results)
    return [
      f"**{KINDS[kind].label}**: lr {best.lr:g}, embeddings/head/norms lr {best.embed_lr:g},"
      f" from --settings {plan.args.settings_path}, not searched here",
      "",
    ]
  tried = plan.tried(kind, results)
  if not tried:
    return []
  rows = sorted({i for i, _ in tried})
  cols = sorted({j for _, j in tried})
  best = plan.best(kind, results)
  lines = [
    f"**{KINDS[kind].label}**"
    + ("" if plan.sweep_done(kind, results) else " (search not finished)")
    + (
      ""
      if best is None
      else f": best lr {best.lr:g}, embeddings/head/norms lr {best.embed_lr:g}"
      + edge_note(tried, rung(best.lr), rung(best.embed_lr))
    ),
    "",
    "| matrix lr \\ embed lr | " + " | ".join(f"{LADDER[j]:g}" for j in cols) + " |",
    "|---|" + "---|" * len(cols),
  ]
  for i in rows:
    cells = []
    for j in cols:
      loss = tried.get((i, j))
      text = "" if loss is None else ("diverged" if not math.isfinite(loss) else f"{loss:.3f}")
      if best is not None and (i, j) == (rung(best.lr), rung(best.embed_lr)):
        text = f"**{text}**"
      cells.append(text)
    lines.append(f"| {LADDER[i]:g} | " + " | ".join(cells) + " |")
  return [*lines, ""]


def model_sizes(results: dict, model: str | None) -> tuple[int | None, int | None]:
  """(parameters, AdamW's state bytes) of the model at a scale (None: the sweep's), read from a
  run without LoRA adapters."""
  for r in results.values():
    if r.get("model") == model and r["kind"] != "lora" and r.get("parameters"):
      return r["parameters"], r["adamw_state_bytes"]
  return None, None


def untried_neighbours(tried: dict, i: int, j: int) -> list[str]:
  return [name for name, p in neighbours(i, j).items() if p not in tried]


def edge_note(tried: dict, i: int, j: int) -> str:
  missing = untried_neighbours(tried, i, j)
  return f" (not tried: {', '.join(missing)})" if missing else " (a neighbour tried on every side)"


def capped_searches(results: dict, plan: Plan) -> dict[str, list[str]]:
  """Finished searches whose best has an untried neighbour: --max-sweep-runs cut them short."""
  out = {}
  for kind in plan.args.kinds:
    best = plan.best(kind, results)
    if best is None or not plan.searched(kind) or not plan.sweep_done(kind, results):
      continue
    missing = untried_neighbours(plan.tried(kind, results), rung(best.lr), rung(best.embed_lr))
    if missing:
      out[kind] = missing
  return out


def report(args, results: dict, plan: Plan, pending: int) -> str:
  """Markdown tables from the recorded results."""
  hidden = train.model_lib.make_config(args.model).hidden
  tokens = args.steps * args.batch_size * args.seq_len
  n_params, adamw_bytes = model_sizes(results, None)
  lines = [
    f"Model `{args.model}`"
    + (f" ({n_params / 1e6:.2f}M parameters)" if n_params else "")
    + f", {args.steps} steps × {args.batch_size} × {args.seq_len} tokens"
    f" ({tokens / 1e6:.2f}M tokens), cosine schedule with 10% warm-up to 10% of the peak,"
    f" α = 0.25, gap {args.update_proj_gap}, rank hidden/4 = {hidden // 4} unless noted."
    " Loss is the validation cross-entropy per byte-level token (nats) on held-out text;"
    " the protocol is in `examples/compare.py`'s docstring.",
    "",
  ]
  if pending:
    lines += [f"**Incomplete: {pending} runs of the current phase still to run.**", ""]
  lines += ["### Learning-rate search (seed 0): validation loss", ""]
  for kind in args.kinds:
    lines += search_table(kind, results, plan)

  pts = points(args, results, plan)
  lines += [
    "### Each optimizer at its best setting, over seeds",
    "",
    "| optimizer | lr (matrices) | lr (embeddings/head/norms) | validation loss |"
    " perplexity | at lr 0.01 for all (seed 0) | optimizer state | vs AdamW | step time |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for p in pts:
    if not p["default_rank"]:
      continue
    best = plan.best(p["kind"], results)
    paper = results.get(Run(p["kind"], PAPER_LR, PAPER_LR).name)
    finite = [x for x in p["losses"] if math.isfinite(x)]
    kind_runs = [
      r for r in results.values() if r["kind"] == p["kind"] and not r["rank"] and not r.get("model")
    ]
    ratio = p["mib"] * 2**20 / adamw_bytes if adamw_bytes else math.nan
    lines.append(
      f"| {KINDS[p['kind']].label} | {best.lr:g} | {best.embed_lr:g} | {mean_std(p['losses'])} | "
      f"{math.exp(np.mean(finite)) if finite else math.nan:.2f} | "
      f"{'' if paper is None else f'{loss_of(paper):.3f}'} | {p['mib']:.2f} MiB | "
      f"{ratio:.2f}× | {step_ms(args, kind_runs):.0f} ms |"
    )
  lines += [
    "",
    "Step time: the median over the optimizer's runs at this scale. Optimizer state: the"
    " bytes of `nnx.state(optimizer)`; AdamW's is 2 floats per model parameter.",
  ]

  lines += [
    "",
    "### Rank sweep at the best setting",
    "",
    "Validation loss (mean ± std over seeds), optimizer state, and at the final weights the"
    " share of the update's norm from Fira's scaled residual ‖S‖/‖u‖ and the gradient's share"
    " in the subspace ‖PᵀG‖/‖G‖ (the diagnostic in `compare.py`'s docstring).",
    "",
    "| optimizer | rank | validation loss | optimizer state | ‖S‖/‖u‖ | ‖PᵀG‖/‖G‖ |",
    "|---|---|---|---|---|---|",
  ]
  swept = sorted(
    (p for p in pts if p["kind"] in args.rank_sweep_kinds), key=lambda p: (p["kind"], p["rank"])
  )
  others = [p for p in pts if p["kind"] in DIAGNOSED and p["kind"] not in args.rank_sweep_kinds]
  for p in swept + others:
    lines.append(
      f"| {KINDS[p['kind']].label} | {p['rank']} | {mean_std(p['losses'])} |"
      f" {p['mib']:.2f} MiB | {diag_cell(p['runs'], 'residual_share')} |"
      f" {diag_cell(p['runs'], 'gradient_in_subspace')} |"
    )
  front = pareto(pts)
  if front:
    lines += [
      "",
      "Pareto front (no other point has both less optimizer state and a lower mean loss): "
      + ", ".join(point_label(p) for p in front)
      + ".",
    ]

  if args.confirm_model:
    confirm = points(args, results, plan, model=args.confirm_model)
    c = train.model_lib.make_config(args.confirm_model)
    ctokens = args.confirm_steps * args.confirm_batch_size * args.seq_len
    cparams, cadam = model_sizes(results, args.confirm_model)
    lines += [
      "",
      f"### The larger model: `{args.confirm_model}`"
      + (f" ({cparams / 1e6:.2f}M parameters)" if cparams else "")
      + f", {args.confirm_steps} steps × {args.confirm_batch_size} × {args.seq_len} tokens"
      f" ({ctokens / 1e6:.2f}M tokens), rank {c.hidden // 4}, each optimizer at"
      f" {setting_source(plan)}",
      "",
      "| optimizer | lr (matrices) | lr (embeddings/head/norms) | validation loss |"
      " optimizer state | vs AdamW | step time | ‖S‖/‖u‖ |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for p in confirm:
      best = plan.best(p["kind"], results)
      ratio = p["mib"] * 2**20 / cadam if cadam else math.nan
      lines.append(
        f"| {KINDS[p['kind']].label} | {best.lr:g} | {best.embed_lr:g} | {mean_std(p['losses'])}"
        f" | {p['mib']:.2f} MiB | {ratio:.2f}× | {step_ms(args, p['runs']):.0f} ms |"
        f" {diag_cell(p['runs'], 'residual_share')} |"
      )
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# The figures


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def point_label(p: dict) -> str:
  if p["kind"] in DIAGNOSED or p["kind"] == "lora":
    return f"{p['kind']} r{p['rank']}"
  return p["kind"]


def plot_memory(pts: list[dict], path: pathlib.Path, title: str) -> None:
  """Validation loss against optimizer-state MiB, error bars over seeds, the Pareto front."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(11, 5.5))
  for p in pts:
    finite = [x for x in p["losses"] if math.isfinite(x)]
    if not finite or not math.isfinite(p["mib"]):
      continue
    err = np.std(finite, ddof=1) if len(finite) > 1 else 0.0
    ax.errorbar(
      p["mib"],
      np.mean(finite),
      yerr=err,
      fmt="o" if p["default_rank"] else "s",
      color=COLORS[p["kind"]],
      capsize=3,
      label=KINDS[p["kind"]].label if p["default_rank"] else None,
    )
    ax.annotate(
      point_label(p),
      (p["mib"], np.mean(finite)),
      fontsize=7,
      xytext=(4, 3),
      textcoords="offset points",
    )
  front = pareto(pts)
  if len(front) > 1:
    xs = [p["mib"] for p in front]
    ys = [np.mean(p["losses"]) for p in front]
    ax.step(xs, ys, where="post", color="k", alpha=0.4, lw=1, label="Pareto front")
  ax.set_xscale("log")
  ax.set_xlabel("optimizer state (MiB, log scale)")
  ax.set_ylabel("validation loss (nats per token)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_curves(pts: list[dict], path: pathlib.Path, title: str) -> None:
  """Training loss (mean over each 10 steps) and validation loss, seed 0 of each best setting."""
  plt = _pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  for p in pts:
    if not p["default_rank"]:
      continue
    run = min(p["runs"], key=lambda r: r["seed"])
    if run.get("train_curve"):
      left.plot(*zip(*run["train_curve"], strict=True), lw=1, color=COLORS[p["kind"]])
    if run.get("curve"):
      right.plot(
        *zip(*run["curve"], strict=True),
        "o-",
        ms=3,
        color=COLORS[p["kind"]],
        label=KINDS[p["kind"]].label,
      )
  for ax, what in ((left, "training loss (mean of 10 steps)"), (right, "validation loss")):
    ax.set_xlabel("step")
    ax.set_ylabel(what)
    ax.grid(alpha=0.3)
  right.legend(fontsize=7)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_step_times(args, results: dict, path: pathlib.Path) -> None:
  plt = _pyplot()
  models = [None] + ([args.confirm_model] if args.confirm_model else [])
  fig, ax = plt.subplots(figsize=(8, 0.45 * len(args.kinds) + 1.5))
  height = 0.8 / len(models)
  for m, model in enumerate(models):
    times = [
      step_ms(
        args,
        [
          r
          for r in results.values()
          if r["kind"] == kind and not r["rank"] and r.get("model") == model
        ],
      )
      for kind in args.kinds
    ]
    ys = np.arange(len(args.kinds)) + m * height
    ax.barh(
      ys,
      [0 if math.isnan(t) else t for t in times],
      height,
      label=f"confirm: {model}" if model else f"sweep: {args.model}",
    )
    for y, t in zip(ys, times, strict=True):
      if math.isfinite(t):
        ax.text(t, y, f" {t:.0f}", va="center", fontsize=7)
  ax.set_yticks(
    np.arange(len(args.kinds)) + 0.4 - height / 2, [KINDS[k].label for k in args.kinds], fontsize=7
  )
  ax.invert_yaxis()
  ax.set_xlabel("milliseconds per training step (median over runs)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def best_settings(args, results: dict, plan: Plan) -> dict:
  """Each optimizer's setting whose search is done (or given), in ``--settings``' format."""
  out = {}
  for kind in args.kinds:
    best = plan.best(kind, results)
    if best is not None and plan.sweep_done(kind, results):
      out[kind] = {"lr": best.lr, "embed_lr": best.embed_lr}
  return out


def read_settings(path: str) -> dict[str, tuple[float, float]]:
  """``--settings``: {kind: {"lr": …, "embed_lr": …}} as written to best_settings.json."""
  try:
    raw = json.loads(pathlib.Path(path).read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise argparse.ArgumentTypeError(f"cannot read {path}: {e}") from e
  if not isinstance(raw, dict):
    raise argparse.ArgumentTypeError(f"{path}: expected an object of optimizers")
  settings = {}
  for kind, setting in raw.items():
    if kind not in KINDS:
      raise argparse.ArgumentTypeError(f"{path}: unknown optimizer {kind!r}")
    lrs = tuple(
      setting.get(key) if isinstance(setting, dict) else None for key in ("lr", "embed_lr")
    )
    if not all(isinstance(x, (int, float)) and x > 0 for x in lrs):
      raise argparse.ArgumentTypeError(f"{path}: {kind} needs positive 'lr' and 'embed_lr'")
    settings[kind] = lrs
  return settings


def setting_source(plan: Plan, short: bool = False) -> str:
  """Where step 4's settings come from, for its table (and, short, its figure's title)."""
  args = plan.args
  if short:
    return pathlib.Path(args.settings_path).name if args.settings_path else f"`{args.model}`"
  searched = sum(plan.searched(kind) for kind in args.kinds)
  if searched == len(args.kinds):
    return f"its best setting from `{args.model}`"
  if not searched:
    return f"its setting from --settings {args.settings_path}"
  return f"its best setting from `{args.model}` or from --settings {args.settings_path}"


def write_outputs(args, results: dict, plan: Plan, pending: int) -> str:
  text = report(args, results, plan, pending)
  (args.out / "compare.md").write_text(text)
  settings = json.dumps(best_settings(args, results, plan), indent=2) + "\n"
  (args.out / "best_settings.json").write_text(settings)
  tag = f"`{args.model}`, {args.steps * args.batch_size * args.seq_len / 1e6:.2f}M tokens"
  pts = points(args, results, plan)
  if pts:  # none with --confirm-only: no empty figures
    plot_memory(pts, args.out / "memory.png", f"Validation loss against optimizer memory ({tag})")
    plot_curves(pts, args.out / "curves.png", f"Each optimizer at its best setting ({tag})")
  plot_step_times(args, results, args.out / "step_time.png")
  if args.confirm_model:
    cpts = points(args, results, plan, model=args.confirm_model)
    ctokens = args.confirm_steps * args.confirm_batch_size * args.seq_len
    ctag = f"`{args.confirm_model}`, {ctokens / 1e6:.2f}M tokens"
    plot_memory(
      cpts,
      args.out / f"memory_{args.confirm_model}.png",
      f"Validation loss against optimizer memory ({ctag})",
    )
    plot_curves(
      cpts,
      args.out / f"curves_{args.confirm_model}.png",
      f"Settings from {setting_source(plan, short=True)} ({ctag})",
    )
  return text


def parse_kinds(text: str) -> list[str]:
  kinds = [k for k in text.split(",") if k]
  unknown = [k for k in kinds if k not in KINDS]
  if unknown:
    raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(KINDS)}")
  return kinds


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/compare"))
  parser.add_argument("--model", default="tiny", choices=sorted(train.model_lib.CONFIGS))
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--update-proj-gap", type=int, default=200)
  parser.add_argument("--eval-every", type=int, default=100)
  parser.add_argument("--eval-batches", type=int, default=16)
  parser.add_argument(
    "--kinds",
    type=parse_kinds,
    default=list(KINDS),
    help=f"optimizers to compare (default: {','.join(KINDS)})",
  )
  parser.add_argument(
    "--max-sweep-runs",
    type=int,
    default=16,
    help="lr-search runs per optimizer, at most (a cap on runaway searches; a search it"
    " stops with the best at an edge is warned about and marked in compare.md)",
  )
  parser.add_argument("--seeds", type=int, default=3, help="seeds at each best setting (>= 1)")
  parser.add_argument(
    "--rank-sweep-seeds", type=int, default=2, help="seeds per rank in the rank sweep"
  )
  parser.add_argument(
    "--rank-sweep-kinds",
    type=parse_kinds,
    default=["fira", "galore"],
    help="optimizers of the rank sweep",
  )
  parser.add_argument(
    "--confirm-model",
    default=None,
    choices=sorted(train.model_lib.CONFIGS),
    help="rerun each best setting on this (larger) model",
  )
  parser.add_argument("--confirm-steps", type=int, default=1000)
  parser.add_argument("--confirm-batch-size", type=int, default=16)
  parser.add_argument(
    "--confirm-seeds", type=int, default=2, help="seeds per optimizer on --confirm-model"
  )
  parser.add_argument(
    "--settings",
    dest="settings_path",
    default=None,
    help="a best_settings.json of an earlier study: its optimizers keep those learning rates"
    " instead of being searched (step 1), e.g. examples/compare_settings.json",
  )
  parser.add_argument(
    "--confirm-only",
    action="store_true",
    help="run only step 4, from finished searches or --settings (needs --confirm-model)",
  )
  parser.add_argument("--data", default=None, help="your own text instead of the stdlib sources")
  parser.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
  parser.add_argument(
    "--smoke", action="store_true", help="one lr per optimizer, no search (for tests)"
  )
  args = parser.parse_args(argv)
  try:
    args.settings = read_settings(args.settings_path) if args.settings_path else None
  except argparse.ArgumentTypeError as e:
    parser.error(f"--settings: {e}")
  # The trainer's own checks, on a draft of the runs' config, before anything is trained.
  problems = train.check_config(train_config(args, Run(kind="fira", lr=1e-3, embed_lr=1e-2)))
  if problems:
    parser.error("; ".join(problems))
  for flag in (
    "seeds",
    "rank_sweep_seeds",
    "confirm_seeds",
    "confirm_steps",
    "confirm_batch_size",
    "max_sweep_runs",
  ):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
  results_path = args.out / "results.jsonl"
  results = load_results(results_path)
  plan = Plan(args)
  if args.confirm_only:
    unsettled = [k for k in args.kinds if plan.searched(k) and not plan.sweep_done(k, results)]
    if not args.confirm_model:
      parser.error("--confirm-only needs --confirm-model")
    if unsettled:
      parser.error(
        f"--confirm-only: no finished search in {args.out} and no --settings entry for"
        f" {', '.join(unsettled)}"
      )
  args.out.mkdir(parents=True, exist_ok=True)
  new_runs = 0
  for phase, runs in plan.phases(results):
    pending = [run for run in runs if run.name not in results]
    for i, run in enumerate(pending):
      if args.max_runs is not None and new_runs >= args.max_runs:
        write_outputs(args, results, plan, len(pending) - i)
        print(f"stopped after {new_runs} runs (--max-runs); run again to continue")
        return ""
      print(f"[{len(results) + 1}] {phase}: {run.name} ({i + 1}/{len(pending)})", flush=True)
      result = execute(args, run, results_path)
      results[run.name] = result
      new_runs += 1
      note = f", diagnostic {result['subspace']}" if result.get("subspace") else ""
      print(
        f"    validation loss {loss_of(result):.4f} in {result['wall_s']:.0f} s{note}", flush=True
      )
  text = write_outputs(args, results, plan, 0)
  print(text)
  for kind, missing in capped_searches(results, plan).items():
    print(
      f"warning: {kind}'s search stopped at --max-sweep-runs {args.max_sweep_runs} with its"
      f" best at an edge (not tried: {', '.join(missing)}); raise --max-sweep-runs and run"
      " again to settle it",
      file=sys.stderr,
    )
  print(f"wrote {args.out / 'compare.md'}, best_settings.json and the figures (*.png) there")
  return text


if __name__ == "__main__":
  main()
