"""Pre-train a small LLaMA with Fira on the Python standard library's sources (no download).

    pip install -e ".[examples]" && python examples/pretrain.py

Every library option is a flag (``--help``). ``--optimizer galore|galore-optax|adamw|lora``
trains the baselines; ``--resume`` continues an interrupted run from its last checkpoint;
``--mesh data=2,fsdp=4`` shards the run over 8 devices (on CPU: 8 host devices).
"""

from __future__ import annotations

import os

# Before numpy/jaxlib load OpenBLAS: its LAPACK threads (the SVD refresh) would compete
# with XLA's inside a step (benchmarks/README.md, "Latest numbers").
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import cli
import jax
import mesh
import train


def valid_mesh(text: str) -> bool:
  try:
    mesh.parse_mesh(text)
  except ValueError:
    return False
  return True


def mesh_device_problem(text: str, processes: int, start_backend: bool) -> str | None:
  """Why ``--mesh text`` cannot have its devices, or None; asks for CPU host devices.

  On CPU the trainer creates the mesh's host devices (mesh.request_cpu_devices); they share
  the machine's cores, so it asks for at most max(8, cores) of them per process. Elsewhere the
  mesh needs that many real devices. ``start_backend=False`` (several processes, which start
  JAX only in jax.distributed.initialize) leaves the device count to mesh.make_mesh."""
  shape = mesh.parse_mesh(text)
  needed = math.prod(shape.values())
  cores = os.cpu_count() or 1
  cpu_limit = max(8, cores)
  if needed // processes <= cpu_limit:
    mesh.request_cpu_devices(shape, processes)
  if not start_backend:
    return None
  backend, count = jax.default_backend(), jax.device_count()
  if backend == "cpu" and needed // processes > cpu_limit:
    return (
      f"--mesh {text} needs {needed} devices: on CPU the trainer creates host devices, which"
      f" share this machine's {cores} cores, at most max(8, cores) = {cpu_limit} per process"
      " (e.g. --mesh data=2,fsdp=4)"
    )
  if needed > count:
    started = " (its CPU backend had already started: no more host devices)"
    started = started if backend == "cpu" else ""
    return f"--mesh {text} needs {needed} devices; JAX sees {count} {backend} device(s){started}"
  return None


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
  parser.add_argument(
    "--num-processes", type=int, help="several processes (hosts): start each with the same flags"
  )
  parser.add_argument("--process-id", type=int, default=0, help="this process, 0 .. N-1")
  parser.add_argument("--coordinator", help="HOST:PORT of process 0 (omit on TPU pods and Slurm)")
  cli.add_config_flags(
    parser, train.Config, choices=train.FLAG_CHOICES, problems=train.FLAG_PROBLEMS
  )
  args = parser.parse_args(argv)
  config = cli.config_from_args(train.Config, args)
  problems = train.check_config(config)
  processes = args.num_processes or 1
  device_problem = None
  if config.mesh and valid_mesh(config.mesh):  # else check_config said what is wrong with it
    device_problem = mesh_device_problem(config.mesh, processes, not args.num_processes)
  if device_problem:  # first: a --batch-size that does not divide over it may follow from it
    problems.insert(0, device_problem)
  if problems:
    parser.error("; ".join(problems))
  if args.process_id == 0:
    cli.prepare_workdir(args.workdir, config.resume, args.overwrite)
  if args.num_processes:  # returns once every process has joined (after process 0's clean-up)
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
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
