"""Fira against GaLore, LoRA and full-rank Adam, done fairly: the paper's Table 3 in miniature.

    pip install -e ".[examples]" && python examples/compare.py

Every optimizer trains the same model on the same data with the same seeds and token budget.
The protocol:

1. a learning-rate sweep (3 values) for each optimizer, seed 0; the grids cover the paper's
   single setting (lr 0.01 for everything), which is reported too;
2. full-rank AdamW also with its own learning rate for embeddings, head and norms (swept,
   with the matrices at AdamW's best lr);
3. GaLore twice: ``fira_jax.galore_adamw`` (the reference's projection side) and
   ``optax.contrib.galore`` (the larger side compressed);
4. each optimizer at its best lr on more seeds, reported as mean and spread;
5. a rank sweep (hidden/16, hidden/8, hidden/4) for Fira and GaLore at their best lr
   (seed 0; ``--rank-sweep-seeds`` for more).

Runs are recorded one per line in ``results.jsonl`` as they finish; an interrupted comparison
continues where it stopped (``--max-runs`` runs a few at a time). Writes ``compare.md`` (the
tables) and ``curves.png`` (validation curves) to ``--out``.
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
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import train

# Learning-rate grids. Fira's residual is not multiplied by alpha in the reference, so at
# alpha = 0.25 it wants a lower lr than GaLore (about 3x in a calibration run).
LR_GRIDS = {
  "fira": (0.001, 0.003, 0.01),
  "galore": (0.003, 0.01, 0.03),
  "galore-optax": (0.003, 0.01, 0.03),
  "adamw": (0.001, 0.003, 0.01),
  "lora": (0.003, 0.01, 0.03),
}
EMBED_LR_GRID = (0.003, 0.01, 0.03)
PAPER_LR = 0.01
LABELS = {
  "fira": "Fira (fira_adamw)",
  "galore": "GaLore (fira_jax.galore_adamw)",
  "galore-optax": "GaLore (optax.contrib.galore)",
  "adamw": "AdamW, full rank",
  "adamw-grouped": "AdamW, full rank, own lr for embeddings/head/norms",
  "lora": "LoRA (nnx.LoRA adapters)",
}


@dataclasses.dataclass(frozen=True)
class Run:
  kind: str  # a LABELS key
  lr: float
  seed: int = 0
  rank: int = 0  # 0: hidden / 4
  embed_lr: float | None = None

  @property
  def name(self) -> str:
    parts = [self.kind, f"lr{self.lr:g}", f"seed{self.seed}"]
    if self.rank:
      parts.append(f"rank{self.rank}")
    if self.embed_lr is not None:
      parts.append(f"elr{self.embed_lr:g}")
    return "_".join(parts)


def load_results(path: pathlib.Path) -> dict[str, dict]:
  if not path.exists():
    return {}
  return {r["name"]: r for r in map(json.loads, path.read_text().splitlines()) if r}


def best_lr(results: dict, kind: str, runs: list[Run]) -> Run | None:
  done = [r for r in runs if r.name in results and results[r.name]["final_eval_loss"] is not None]
  finite = [r for r in done if math.isfinite(results[r.name]["final_eval_loss"])]
  return min(finite, key=lambda r: results[r.name]["final_eval_loss"]) if finite else None


class Plan:
  """The runs of the protocol; later phases depend on the best lr of earlier ones."""

  def __init__(self, args):
    self.args = args
    hidden = train.model_lib.make_config(args.model).hidden
    self.ranks = [hidden // 16, hidden // 8]  # hidden // 4 is the default rank
    self.seeds = list(range(args.seeds))

  def sweep(self, kind: str) -> list[Run]:
    grid = LR_GRIDS[kind]
    return [Run(kind, lr) for lr in (grid[1:2] if self.args.smoke else grid)]

  def phases(self, results: dict):
    kinds = list(LR_GRIDS)
    yield [run for kind in kinds for run in self.sweep(kind)]
    best = {kind: best_lr(results, kind, self.sweep(kind)) for kind in kinds}
    later = []
    if best["adamw"] is not None:
      grid = EMBED_LR_GRID[1:2] if self.args.smoke else EMBED_LR_GRID
      grouped = [Run("adamw-grouped", best["adamw"].lr, embed_lr=e) for e in grid]
      later += grouped
    yield later
    best["adamw-grouped"] = best_lr(results, "adamw-grouped", later)
    final = []
    for run in best.values():
      if run is not None:
        final += [dataclasses.replace(run, seed=s) for s in self.seeds[1:]]
    for kind in ("fira", "galore"):
      if best[kind] is not None:
        final += [
          dataclasses.replace(best[kind], rank=r, seed=s)
          for r in self.ranks
          for s in self.seeds[: self.args.rank_sweep_seeds]
        ]
    yield final


def train_config(args, run: Run) -> train.Config:
  optimizer = "adamw" if run.kind == "adamw-grouped" else run.kind
  return train.Config(
    model=args.model,
    optimizer=optimizer,
    lr=run.lr,
    embed_lr=run.embed_lr,
    rank=run.rank or None,  # None: hidden / 4
    seed=run.seed,
    steps=args.steps,
    batch_size=args.batch_size,
    seq_len=args.seq_len,
    eval_every=args.eval_every,
    eval_batches=args.eval_batches,
    checkpoints=False,
    update_proj_gap=args.update_proj_gap,
    log_every=10,
    progress=False,
    plot=False,
    data=args.data,
  )


def execute(args, run: Run, results_path: pathlib.Path) -> dict:
  workdir = args.out / "runs" / run.name
  if workdir.exists():
    import shutil

    shutil.rmtree(workdir)  # a run that did not finish last time starts again
  start = time.perf_counter()
  summary = train.train_and_evaluate(train_config(args, run), workdir)
  records = train.read_metrics(workdir / "metrics.jsonl")
  result = dict(
    summary,
    name=run.name,
    kind=run.kind,
    rank=run.rank,
    embed_lr=run.embed_lr,
    wall_s=time.perf_counter() - start,
    curve=[(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r],
  )
  with results_path.open("a") as f:
    f.write(json.dumps(result) + "\n")
  return result


def fmt_ppl(losses: list[float]) -> str:
  ppl = [math.exp(x) for x in losses]
  if len(ppl) == 1:
    return f"{ppl[0]:.2f}"
  return f"{np.mean(ppl):.2f} ± {np.std(ppl):.2f} (n={len(ppl)})"


def report(args, results: dict, plan: Plan) -> str:
  """Markdown tables from the recorded results."""
  lines = [
    f"Model `{args.model}`, {args.steps} steps × {args.batch_size} × {args.seq_len} tokens"
    f" ({args.steps * args.batch_size * args.seq_len / 1e6:.2f}M tokens), cosine schedule"
    f" with 10% warm-up, α = 0.25, gap {args.update_proj_gap}, rank hidden/4 unless noted."
    " Perplexity is per byte-level token on held-out stdlib files.",
    "",
    "### Learning-rate sweep (seed 0): validation perplexity",
    "",
    "| optimizer | "
    + " | ".join(f"lr {lr:g}" for lr in sorted({lr for g in LR_GRIDS.values() for lr in g}))
    + " |",
    "|---|" + "---|" * len({lr for g in LR_GRIDS.values() for lr in g}),
  ]
  all_lrs = sorted({lr for g in LR_GRIDS.values() for lr in g})
  for kind in LR_GRIDS:
    cells = []
    for lr in all_lrs:
      r = results.get(Run(kind, lr).name)
      cells.append("" if r is None else f"{r['final_eval_ppl']:.2f}")
    lines.append(f"| {LABELS[kind]} | " + " | ".join(cells) + " |")
  grouped = [r for r in results.values() if r["kind"] == "adamw-grouped" and r["seed"] == 0]
  if grouped:
    lines += [
      "",
      "AdamW with its own lr for embeddings, head and norms (matrices at AdamW's best lr):",
      "",
    ]
    lines += ["| matrix lr | embedding/head/norm lr | perplexity |", "|---|---|---|"]
    for r in sorted(grouped, key=lambda r: r["embed_lr"]):
      lines.append(f"| {r['lr']:g} | {r['embed_lr']:g} | {r['final_eval_ppl']:.2f} |")

  lines += [
    "",
    "### Each optimizer at its best learning rate, over seeds",
    "",
    "| optimizer | best lr | validation perplexity | at the paper's lr 0.01 (seed 0) |"
    " optimizer state | vs AdamW | step time |",
    "|---|---|---|---|---|---|---|",
  ]
  for kind in LABELS:
    runs = [r for r in results.values() if r["kind"] == kind and not r["rank"]]
    if not runs:
      continue
    seed0 = [r for r in runs if r["seed"] == 0]
    best = min(seed0, key=lambda r: r["final_eval_loss"])
    same = [r for r in runs if r["lr"] == best["lr"] and r.get("embed_lr") == best.get("embed_lr")]
    paper = results.get(Run(kind, PAPER_LR).name)
    step_ms = (
      args.batch_size * args.seq_len / best["tokens_per_s"] * 1e3
      if best["tokens_per_s"]
      else float("nan")
    )
    lr_text = f"{best['lr']:g}" + (f" (embed {best['embed_lr']:g})" if best.get("embed_lr") else "")
    paper_ppl = "" if paper is None else f"{paper['final_eval_ppl']:.2f}"
    lines.append(
      f"| {LABELS[kind]} | {lr_text} | {fmt_ppl([r['final_eval_loss'] for r in same])} | "
      f"{paper_ppl} | "
      f"{best['optimizer_state_bytes'] / 2**20:.2f} MiB | "
      f"{best['optimizer_state_bytes'] / best['adamw_state_bytes']:.2f}× | {step_ms:.0f} ms |"
    )

  lines += ["", "### Rank sweep at the best learning rate: validation perplexity", ""]
  hidden = train.model_lib.make_config(args.model).hidden
  ranks = [*plan.ranks, hidden // 4]
  lines += [
    "| optimizer | " + " | ".join(f"rank {r}" for r in ranks) + " |",
    "|---|" + "---|" * len(ranks),
  ]
  for kind in ("fira", "galore"):
    seed0 = [r for r in results.values() if r["kind"] == kind and not r["rank"] and r["seed"] == 0]
    if not seed0:
      continue
    best_lr_value = min(seed0, key=lambda r: r["final_eval_loss"])["lr"]
    cells = []
    for rank in ranks:
      runs = [
        r
        for r in results.values()
        if r["kind"] == kind
        and r["lr"] == best_lr_value
        and (r["rank"] == rank or (rank == hidden // 4 and not r["rank"]))
      ]
      cells.append(fmt_ppl([r["final_eval_loss"] for r in runs]) if runs else "")
    lines.append(f"| {LABELS[kind]} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot_curves(results: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for kind in LABELS:
    seed0 = [r for r in results.values() if r["kind"] == kind and not r["rank"] and r["seed"] == 0]
    if not seed0:
      continue
    best = min(seed0, key=lambda r: r["final_eval_loss"])
    steps, losses = zip(*best["curve"], strict=True)
    ax.plot(
      steps, [math.exp(x) for x in losses], "o-", ms=3, label=f"{LABELS[kind]}, lr {best['lr']:g}"
    )
  ax.set_xlabel("step")
  ax.set_ylabel("validation perplexity")
  ax.set_yscale("log")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  ax.set_title("Validation perplexity at each optimizer's best learning rate (seed 0)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


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
  parser.add_argument("--seeds", type=int, default=2, help="seeds at each best lr (>= 1)")
  parser.add_argument(
    "--rank-sweep-seeds", type=int, default=1, help="seeds per rank in the rank sweep"
  )
  parser.add_argument("--data", default=None, help="your own text instead of the stdlib sources")
  parser.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
  parser.add_argument("--smoke", action="store_true", help="one lr per optimizer (for tests)")
  args = parser.parse_args(argv)
  # The trainer's own checks, on a draft of the runs' config, before anything is trained.
  problems = train.check_config(train_config(args, Run(kind="fira", lr=1e-3)))
  if problems:
    parser.error("; ".join(problems))
  for flag in ("seeds", "rank_sweep_seeds"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
  args.out.mkdir(parents=True, exist_ok=True)
  results_path = args.out / "results.jsonl"
  results = load_results(results_path)
  plan = Plan(args)
  new_runs = 0
  for phase in plan.phases(results):
    pending = [run for run in phase if run.name not in results]
    for i, run in enumerate(pending):
      if args.max_runs is not None and new_runs >= args.max_runs:
        print(f"stopped after {new_runs} runs (--max-runs); run again to continue")
        return ""
      print(f"[{len(results) + 1}] {run.name} ({i + 1}/{len(pending)} in this phase)", flush=True)
      result = execute(args, run, results_path)
      results[run.name] = result
      new_runs += 1
      print(
        f"    validation perplexity {result['final_eval_ppl']:.3f} in {result['wall_s']:.0f} s",
        flush=True,
      )
  text = report(args, results, plan)
  (args.out / "compare.md").write_text(text)
  plot_curves(results, args.out / "curves.png")
  print(text)
  print(f"wrote {args.out / 'compare.md'} and {args.out / 'curves.png'}")
  return text


if __name__ == "__main__":
  main()
