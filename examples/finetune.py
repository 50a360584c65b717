"""Fine-tune a pre-trained LLaMA on another text with Fira, LoRA and full AdamW, and compare.

    python examples/pretrain.py                     # writes runs/pretrain
    python examples/finetune.py                     # fine-tunes it, writes runs/finetune

The default fine-tuning text is a part of the standard library held out of pre-training
(the GUI packages idlelib, tkinter and turtledemo); ``--data`` takes your own. Each optimizer
starts from the same weights and sees the same batches; the table reports validation
perplexity on the fine-tuning text before and after.
"""

from __future__ import annotations

import os

# Before numpy/jaxlib load OpenBLAS: its LAPACK threads (the SVD refresh) would compete
# with XLA's inside a step (benchmarks/README.md, "Latest numbers").
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import dataclasses
import math
import pathlib
import shutil
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import cli
import train

DEFAULT_LR = {"fira": 1e-3, "lora": 3e-3, "adamw": 1e-3, "galore": 3e-3}


def finetune_config(name: str, args: argparse.Namespace, pre_config: dict, tokenizer: str):
  """The run of optimizer ``name`` on the pre-trained model (same model, seq_len, tokenizer)."""
  return train.Config(
    model=pre_config["model"],
    scan_layers=pre_config["scan_layers"],
    optimizer=name,
    lr=DEFAULT_LR[name] if args.lr is None else args.lr,
    rank=args.rank,
    steps=args.steps,
    batch_size=args.batch_size,
    seq_len=pre_config["seq_len"],
    tokenizer=tokenizer,
    data=args.data,
    domain="finetune",
    eval_every=max(1, args.steps // 3),
    eval_batches=args.eval_batches,
    checkpoint_every=max(1, args.steps),
    init_from=str(args.init_from),
    progress=args.progress,
    warmup=0.1,
  )


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "--init-from",
    type=pathlib.Path,
    default=pathlib.Path("runs/pretrain"),
    help="the pre-training run's workdir (default: runs/pretrain)",
  )
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/finetune"))
  parser.add_argument(
    "--optimizers",
    default="fira,lora,adamw",
    help="comma-separated, from fira, galore, lora, adamw",
  )
  parser.add_argument(
    "--lr", type=float, default=None, help=f"one lr for all (default per optimizer: {DEFAULT_LR})"
  )
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument(
    "--data", default=None, help="fine-tuning text (default: held-out stdlib packages)"
  )
  parser.add_argument(
    "--rank",
    type=cli.parser_for(int | None, train.FLAG_PROBLEMS["rank"]),
    default=None,
    help="Fira/GaLore/LoRA rank, positive (default: None, meaning hidden / 4)",
  )
  parser.add_argument("--eval-batches", type=int, default=8)
  parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
  args = parser.parse_args(argv)

  names = [o.strip() for o in args.optimizers.split(",") if o.strip()]
  unknown = [n for n in names if n not in DEFAULT_LR]
  if unknown or not names:
    parser.error(
      f"--optimizers: unknown {unknown or 'none given'}; choose from {sorted(DEFAULT_LR)}"
    )
  # Flags are checked before anything is read or trained (the model's own fields are the defaults).
  defaults = dataclasses.asdict(train.Config())
  drafts = [finetune_config(name, args, defaults, "bytes") for name in names]
  problems = sorted({p for c in drafts for p in train.check_config(c)})
  if problems:
    parser.error("; ".join(problems))
  try:
    pre_config = train.read_checkpoint_meta(args.init_from)["config"]
  except FileNotFoundError as e:
    raise SystemExit(f"error: {e} Run `python examples/pretrain.py` first.") from None
  tokenizer = pre_config["tokenizer"]
  if tokenizer.startswith("bpe-train:"):  # the tokenizer the pre-training run trained
    tokenizer = f"bpe:{args.init_from / 'tokenizer.json'}"
  configs = {name: finetune_config(name, args, pre_config, tokenizer) for name in names}
  rows = []
  for name, config in configs.items():
    workdir = args.out / name
    if workdir.exists():
      shutil.rmtree(workdir)  # every fine-tuning run starts from the pre-trained weights
    try:
      before = train.evaluate_only(config, workdir)
      summary = train.train_and_evaluate(config, workdir)
    except (ValueError, FileNotFoundError) as e:
      raise SystemExit(f"error: {e}") from None
    rows.append((name, config.lr, before, summary))
  lines = [
    f"Fine-tuning `{pre_config['model']}` from {args.init_from} for {args.steps} steps on"
    f" {'the held-out stdlib packages' if args.data is None else args.data}.",
    "",
    "| optimizer | lr | perplexity before | perplexity after | optimizer state | vs AdamW |",
    "|---|---|---|---|---|---|",
  ]
  for name, lr, before, s in rows:
    lines.append(
      f"| {name} | {lr:g} | {math.exp(before):.2f} | {s['final_eval_ppl']:.2f} |"
      f" {s['optimizer_state_bytes'] / 2**20:.2f} MiB |"
      f" {s['optimizer_state_bytes'] / s['adamw_state_bytes']:.2f}× |"
    )
  text = "\n".join(lines) + "\n"
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "finetune.md").write_text(text)
  print(text)
  return text


if __name__ == "__main__":
  main()
