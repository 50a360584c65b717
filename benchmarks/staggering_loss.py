"""Staggered projector refreshes against the reference's all-at-once schedule, on loss.

Trains the pre-training example's default run (``examples/pretrain.py``: the tiny LLaMA on the
embedded standard-library corpus, Fira, 1,200 steps, gap 200) once per seed with
``staggered_refresh`` off and on, and prints the validation loss at every evaluation (mean over
seeds, and the spread), the final loss of each seed, and the difference.

  python benchmarks/staggering_loss.py [--seeds 0,1,2] [--projection svd] [--output FILE]
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import tempfile

import common  # benchmarks/ is on sys.path when a script here runs

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

import train  # examples/train.py

import fira_jax

SCHEDULES = {"all at once (reference)": False, "staggered": True}


def eval_losses(workdir: pathlib.Path) -> dict[int, float]:
  records = train.read_metrics(workdir / "metrics.jsonl")
  return {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}


def run(seed: int, staggered: bool, projection: str, steps: int, root: pathlib.Path):
  config = train.Config(
    seed=seed,
    steps=steps,
    projection=projection,
    staggered_refresh=staggered,
    checkpoints=False,
    progress=False,
    plot=False,
  )
  problems = train.check_config(config)
  if problems:
    raise SystemExit("; ".join(problems))
  workdir = root / f"{'staggered' if staggered else 'reference'}-seed{seed}"
  summary = train.train_and_evaluate(config, workdir)
  print(
    f"seed {seed}, staggered={staggered}: final eval loss {summary['final_eval_loss']:.4f}",
    file=sys.stderr,
    flush=True,
  )
  return eval_losses(workdir), summary["tokens_per_s"]


def main():
  p = common.parser(__doc__)
  p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
  p.add_argument("--projection", default="svd", choices=fira_jax.PROJECTIONS)
  p.add_argument("--steps", type=int, default=train.Config.steps)
  args = p.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  curves, speeds = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, staggered in SCHEDULES.items():
      runs = [run(s, staggered, args.projection, args.steps, pathlib.Path(tmp)) for s in seeds]
      curves[name] = [losses for losses, _ in runs]
      speeds[name] = statistics.median(speed for _, speed in runs)

  spread = lambda xs: (
    f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"
  )
  names = list(SCHEDULES)
  steps = sorted(curves[names[0]][0])
  rows = []
  for step in steps:
    per = {n: [c[step] for c in curves[n]] for n in names}
    diffs = [b - a for a, b in zip(per[names[0]], per[names[1]], strict=True)]
    rows.append([step, *(spread(per[n]) for n in names), f"{statistics.mean(diffs):+.4f}"])
  table = common.markdown_table(
    ["step", *(f"eval loss, {n}" for n in names), "staggered − reference (mean of paired)"], rows
  )
  last = steps[-1]
  finals = common.markdown_table(
    ["seed", *(f"final eval loss, {n}" for n in names), "difference"],
    [
      [
        s,
        *(f"{curves[n][i][last]:.4f}" for n in names),
        f"{curves[names[1]][i][last] - curves[names[0]][i][last]:+.4f}",
      ]
      for i, s in enumerate(seeds)
    ],
  )
  header = (
    f"examples/pretrain.py defaults (tiny LLaMA, Fira, projection={args.projection}, gap"
    f" {train.Config.update_proj_gap}), {args.steps} steps, seeds {args.seeds}; mean ± standard"
    " deviation over seeds. Median throughput: "
    + ", ".join(f"{n} {speeds[n]:,.0f} tokens/s" for n in names)
    + "."
  )
  common.emit("\n\n".join([header, table, finals]), args.output)


if __name__ == "__main__":
  main()
