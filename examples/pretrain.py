"""Pre-train a small LLaMA with Fira on the Python standard library's sources (no download).

    pip install -e ".[examples]" && python examples/pretrain.py

Every library option is a flag (``--help``). ``--optimizer galore|galore-optax|adamw|lora``
trains the baselines; ``--resume`` continues an interrupted run from its last checkpoint;
``--mesh data=2,fsdp=4`` shards the run over 8 devices (on CPU: 8 host devices).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import cli
import mesh
import train


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "--workdir",
    type=pathlib.Path,
    default=pathlib.Path("runs/pretrain"),
    help="where checkpoints, metrics.jsonl and loss.png go (default: runs/pretrain)",
  )
  parser.add_argument("--overwrite", action="store_true", help="delete an earlier run in --workdir")
  cli.add_config_flags(parser, train.Config, choices=train.FLAG_CHOICES)
  args = parser.parse_args(argv)
  config = cli.config_from_args(train.Config, args)
  problems = train.check_config(config)
  if problems:
    parser.error("; ".join(problems))
  if config.mesh:
    mesh.request_cpu_devices(mesh.parse_mesh(config.mesh))
  cli.prepare_workdir(args.workdir, config.resume, args.overwrite)
  try:
    summary = train.train_and_evaluate(config, args.workdir)
  except KeyboardInterrupt:
    print(
      f"stopped; continue with: python examples/pretrain.py --resume --workdir {args.workdir} ..."
    )
    raise SystemExit(130) from None
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    raise SystemExit(f"error: {e}") from None
  ppl = summary["final_eval_ppl"]
  print(
    f"done: {summary['steps_done']} steps; validation perplexity"
    f" {'n/a' if ppl is None else f'{ppl:.2f}'}\n"
    f"  checkpoint: {args.workdir / 'checkpoints'}\n"
    f"  metrics:    {args.workdir / 'metrics.jsonl'}\n"
    f"  loss curve: {args.workdir / 'loss.png'}"
  )
  return summary


if __name__ == "__main__":
  main()
