"""The training loop: ``train_and_evaluate(config, workdir)``.

Writes to ``workdir``: ``checkpoints/`` (orbax; model, optimizer state, step and the run's
config), ``metrics.jsonl`` (one JSON object per evaluation and per logged step: ``loss`` of
that step, ``loss_avg`` the mean since the previous record), ``loss.png`` and
``summary.json``. ``resume=True`` continues from the last complete checkpoint and ends with
the same parameters as an uninterrupted run; with a larger ``steps`` than the run was started
with, it extends the run (on the new ``steps``' learning-rate schedule).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import signal
import time

import data as data_lib
import jax
import jax.numpy as jnp
import mesh as mesh_lib
import model as model_lib
import numpy as np
import optim
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

import fira_jax


@dataclasses.dataclass
class Config:
  # model
  model: str = "tiny"  # one of model.CONFIGS
  scan_layers: bool = False  # stack the blocks (nnx.scan): (L, in, out) kernels
  # optimizer
  optimizer: str = "fira"  # fira | fira-adafactor | galore | galore-optax | adamw | adafactor
  #   | muon | lora
  lr: float = 0.01  # peak learning rate (the paper's 0.01)
  embed_lr: float | None = None  # own peak lr for embeddings, head and norms (default: --lr)
  warmup: float = 0.1  # fraction of steps with linear warm-up
  min_lr_ratio: float = 0.1  # cosine decay ends at this fraction of the peak
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-6
  weight_decay: float = 0.0
  mu_dtype: str | None = None  # Adam's first-moment dtype, e.g. bfloat16 (default: the params')
  nu_dtype: str | None = None  # fira/galore: second-moment dtype, e.g. float32 for bf16 params
  rank: int | None = None  # Fira/GaLore rank, positive; None (the default) means hidden / 4
  update_proj_gap: int = 200  # steps between projector refreshes
  scale: float = 0.25  # Fira/GaLore alpha
  norm_growth_limit: float | None = 1.01  # Fira's limiter gamma; None disables
  scaling: str = "column"  # Fira's norm-based scaling: column | matrix
  formulation: str = "reference"  # reference | paper
  compressed_side: str = "smaller"  # smaller (reference) | larger (optax) | reduction | output
  projection: str = "svd"  # projector basis: svd (reference) | randomized_svd | random
  projection_seed: int = 0  # seed of randomized/random bases
  staggered_refresh: bool = False  # spread projector refreshes over the gap (no refresh stall)
  lora_rank: int | None = None  # lora: adapter rank, positive; None means --rank (or hidden / 4)
  # data
  data: str | None = None  # a .txt/.jsonl file or folder; default: the stdlib sources
  domain: str = "pretrain"  # which part of the stdlib corpus (pretrain | finetune)
  hf_dataset: str | None = None  # a Hugging Face dataset name or save_to_disk folder
  hf_config: str | None = None
  tokenizer: str = "bytes"  # bytes | bpe:PATH | bpe-train:VOCAB
  batch_size: int = 16
  seq_len: int = 128
  # schedule of the run
  steps: int = 1200  # total steps of the run; --resume with a larger --steps extends a run:
  #   the lr schedule (warm-up, cosine decay) is then the new --steps', taken up at the
  #   checkpoint's step (after a finished run the lr climbs back from its floor to that value)
  seed: int = 0  # model init and batch order
  log_every: int = 10
  eval_every: int = 200
  eval_batches: int = 8
  checkpoint_every: int = 200
  checkpoints: bool = True  # write orbax checkpoints (compare.py turns them off)
  resume: bool = False  # continue from workdir's last checkpoint (to a new --steps: see --steps)
  init_from: str | None = None  # start from the model weights of another run's workdir
  stop_after: int | None = None  # stop (as if interrupted) after this many steps
  mesh: str | None = None  # shard over a device mesh, e.g. data=2,fsdp=4 (see examples/mesh.py)
  progress: bool = True  # show a progress bar
  plot: bool = True  # write loss.png


FLAG_CHOICES = {
  "model": sorted(model_lib.CONFIGS),
  "optimizer": optim.OPTIMIZERS,
  "scaling": fira_jax.SCALINGS,
  "formulation": fira_jax.FORMULATIONS,
  "compressed_side": fira_jax.COMPRESSED_SIDES,
  "domain": ("pretrain", "finetune"),
  "projection": fira_jax.PROJECTIONS,
  "mu_dtype": (None, "float32", "bfloat16", "float16"),
  "nu_dtype": (None, "float32", "bfloat16", "float16"),
}

# Flags that take a positive integer or are left out (None): what leaving them out means.
OPTIONAL_POSITIVE = {"rank": "hidden / 4", "lora_rank": "--rank (or hidden / 4)"}


def positive_message(name: str, value) -> str:
  """Why ``value`` is not a valid ``--name`` (one of OPTIONAL_POSITIVE), without the flag."""
  return f"must be a positive integer, got {value}; leave it out for {OPTIONAL_POSITIVE[name]}"


# What is wrong with a flag's value, checked as the command line is parsed (cli.py).
FLAG_PROBLEMS = {
  name: (lambda value, name=name: positive_message(name, value) if value <= 0 else None)
  for name in OPTIONAL_POSITIVE
}


def check_config(config: Config) -> list[str]:
  """What is wrong with a config's numbers, one message per flag."""
  problems = []
  positive = (
    "lr",
    "batch_size",
    "seq_len",
    "steps",
    "log_every",
    "eval_every",
    "eval_batches",
    "checkpoint_every",
    "update_proj_gap",
    "scale",
  )
  for name in positive:
    if getattr(config, name) <= 0:
      problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
  for name in OPTIONAL_POSITIVE:
    value = getattr(config, name)
    if value is not None and value < 0:  # 0 is a Python caller's "default" (compare.py's Run)
      problems.append(f"--{name.replace('_', '-')} {positive_message(name, value)}")
  if not 0 <= config.warmup < 1:
    problems.append(f"--warmup must be in [0, 1), got {config.warmup}")
  if not 0 <= config.min_lr_ratio <= 1:
    problems.append(f"--min-lr-ratio must be in [0, 1], got {config.min_lr_ratio}")
  if config.norm_growth_limit is not None and config.norm_growth_limit < 1:
    problems.append(f"--norm-growth-limit must be >= 1 (or none), got {config.norm_growth_limit}")
  if config.embed_lr is not None and config.embed_lr <= 0:
    problems.append(f"--embed-lr must be positive, got {config.embed_lr}")
  if config.mesh is not None:
    try:
      shape = mesh_lib.parse_mesh(config.mesh)
      if config.batch_size % math.prod(shape.values()):
        problems.append(f"--batch-size {config.batch_size} must divide over the --mesh devices")
    except ValueError as e:
      problems.append(str(e))
  if config.stop_after is not None and config.stop_after <= 0:
    problems.append(f"--stop-after must be positive, got {config.stop_after}")
  return problems


def model_config_for(config: Config, vocab_size: int) -> model_lib.LlamaConfig:
  lora_rank = 0
  if config.optimizer == "lora":
    base = model_lib.make_config(config.model)
    lora_rank = config.lora_rank or config.rank or max(1, base.hidden // 4)
  return model_lib.make_config(
    config.model,
    vocab_size=vocab_size,
    max_seq_len=config.seq_len,
    scan_layers=config.scan_layers,
    lora_rank=lora_rank,
  )


def step_memory_estimate(model_config: model_lib.LlamaConfig, batch_size: int, seq_len: int) -> int:
  """Bytes a training step holds at its peak, in float32: the sum of

  - the state: parameters, gradients and Adam's two moments, 4 x 4 bytes a parameter (an upper
    bound: Fira's and GaLore's moments are smaller);
  - per layer, what the backward pass keeps: the attention scores, their softmax and its
    gradient, 3 x B*heads*L*L floats (the term that grows with the square of --seq-len), and
    B*L*(8*hidden + 6*ffn) floats of the other activations;
  - the head: logits, their softmax and its gradient, 3 x B*L*vocab floats.

  Within 15% of XLA's own memory analysis of the compiled step on CPU (the tiny and 60m models,
  sequences of 128 to 4096).
  """
  c, b, t = model_config, batch_size, seq_len
  params = 2 * c.vocab_size * c.hidden + c.layers * (4 * c.hidden**2 + 3 * c.hidden * c.ffn)
  per_layer = 3 * b * c.heads * t * t + b * t * (8 * c.hidden + 6 * c.ffn)
  floats = 4 * params + c.layers * per_layer + 3 * b * t * c.vocab_size
  return 4 * floats


def available_memory() -> int | None:
  """Bytes a run may still use: on CPU the host's available memory (``MemAvailable``, else the
  free pages), within a cgroup's limit; ``None`` on accelerators (not checked: the runtime
  refuses a step too large for the device with RESOURCE_EXHAUSTED and the sizes)."""
  if jax.default_backend() != "cpu":
    return None
  available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
  try:
    meminfo = pathlib.Path("/proc/meminfo").read_text()
    available = int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024
  except (OSError, AttributeError):
    pass
  try:
    cgroup = pathlib.Path("/sys/fs/cgroup")
    limit = (cgroup / "memory.max").read_text().strip()
    if limit != "max":
      used = int((cgroup / "memory.current").read_text())
      available = min(available, int(limit) - used)
  except (OSError, ValueError):
    pass
  return available


def check_memory(config: Config, model_config: model_lib.LlamaConfig) -> None:
  """Refuses a --seq-len/--batch-size whose step cannot fit in memory (on CPU).

  Never over-cautious: the process peaks above the estimate (by ~0.7 GiB of its own, and by
  up to ~20% more at long sequences), so a run close to the limit can still run out."""
  available = available_memory()
  need = lambda batch, seq: step_memory_estimate(model_config, batch, seq)
  if available is None or need(config.batch_size, config.seq_len) <= available:
    return
  gib = lambda n: f"{n / 2**30:.1f} GiB"
  seq_len, batch_size = config.seq_len, config.batch_size
  while seq_len > 1 and need(config.batch_size, seq_len) > available:
    seq_len //= 2
  while batch_size > 1 and need(batch_size, config.seq_len) > available:
    batch_size //= 2
  fits = []
  if need(config.batch_size, seq_len) <= available:
    fits.append(f"--seq-len {seq_len} fits at --batch-size {config.batch_size}")
  if need(batch_size, config.seq_len) <= available:
    fits.append(f"--batch-size {batch_size} fits at --seq-len {config.seq_len}")
  raise ValueError(
    f"--seq-len {config.seq_len} with --batch-size {config.batch_size}: a training step of"
    f" --model {config.model} needs about {gib(need(config.batch_size, config.seq_len))}"
    f" (train.step_memory_estimate; attention alone keeps 3 x {config.batch_size} x"
    f" {model_config.heads} heads x {config.seq_len}^2 floats per layer), but only"
    f" {gib(available)} of memory is available. Use a smaller --seq-len or --batch-size"
    + (f" ({', '.join(fits)})." if fits else ".")
  )


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def describe_bytes(n: int) -> str:
  return f"{n / 2**20:.2f} MiB"


def read_metrics(path: pathlib.Path) -> list[dict]:
  """The records of a ``metrics.jsonl``; a truncated last line (a kill mid-write) is dropped."""
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue  # blank, or cut short by a kill
  return records


class MetricsLog:
  """``metrics.jsonl``: appends records; on resume drops those past the restored step.

  A process killed mid-write leaves a truncated last line: it is dropped, not fatal.
  """

  def __init__(self, path: pathlib.Path, resume_step: int | None):
    self.path = path
    if resume_step is None:
      path.write_text("")
    elif path.exists():
      kept = [r for r in self.read() if r["step"] <= resume_step]
      partial = path.with_suffix(".jsonl.tmp")  # a kill while rewriting loses nothing
      partial.write_text("".join(json.dumps(r) + "\n" for r in kept))
      partial.replace(path)

  def write(self, record: dict) -> None:
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")

  def read(self) -> list[dict]:
    return read_metrics(self.path)


class NullLog:
  """What processes other than the first write: nothing."""

  def write(self, record: dict) -> None:
    pass

  def read(self) -> list[dict]:
    return []


def plot_losses(records: list[dict], path: pathlib.Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  train = [(r["step"], r["loss"]) for r in records if "loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  fig, ax = plt.subplots(figsize=(7, 4))
  if train:
    ax.plot(*zip(*train, strict=True), label="train loss", alpha=0.6)
  if evals:
    ax.plot(*zip(*evals, strict=True), "o-", label="validation loss")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def all_finite(tree) -> bool:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  # One jitted reduction: with several processes, each program is a collective, and many
  # small ones in flight deadlocked the CPU (gloo) run.
  return bool(
    jax.jit(lambda xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])))(leaves)
  )


# tqdm's default rate flips between "3.84step/s" and "3.49s/step" around one step a second;
# this one is always steps per second.
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"


def progress_bar(config: Config, initial: int) -> tqdm:
  """The run's progress bar from step ``initial`` on. Its rate is the mean since the bar
  started (``smoothing=0``): steady under asynchronous dispatch, with evaluations and
  checkpoints counted, so that the time left is honest."""
  return tqdm(
    total=config.steps,
    initial=initial,
    disable=not config.progress,
    unit="step",
    bar_format=BAR_FORMAT,
    smoothing=0,
    dynamic_ncols=True,
    desc=config.optimizer,
  )


def evaluate(eval_step, model, batches) -> float:
  losses = [float(eval_step(model, jnp.asarray(b))) for b in batches]
  return float(np.mean(losses))


def checkpoint_manager(workdir: pathlib.Path) -> ocp.CheckpointManager:
  # A kill during a save leaves a *.orbax-checkpoint-tmp folder: never read, removed here.
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(workdir.resolve() / "checkpoints", options=options)


def run_metadata(config: Config, model_config: model_lib.LlamaConfig, tokenizer) -> dict:
  return {
    "config": dataclasses.asdict(config),
    "model_config": dataclasses.asdict(model_config),
    "tokenizer": tokenizer.name,
  }


def check_compatible(saved: dict, current: dict, workdir: pathlib.Path) -> None:
  """A checkpoint from another model or optimizer cannot be resumed: say what differs."""
  problems = []
  if saved["model_config"] != current["model_config"]:
    problems.append(f"model {saved['model_config']} != {current['model_config']}")
  for key in ("optimizer", "rank", "update_proj_gap", "batch_size", "seq_len", "seed"):
    before, now = saved["config"].get(key), current["config"].get(key)
    if key == "rank":  # checkpoints written before rank=None meant hidden / 4 stored 0
      before, now = before or None, now or None
    if before != now:
      problems.append(f"{key}: checkpoint {before!r}, now {now!r}")
  if saved["tokenizer"] != current["tokenizer"]:
    problems.append(f"tokenizer: checkpoint {saved['tokenizer']}, now {current['tokenizer']}")
  if problems:
    raise ValueError(
      f"cannot resume from {workdir}: the checkpoint was written by a different run ("
      + "; ".join(problems)
      + "). Resume with the same flags, or use a new --workdir."
    )


def read_checkpoint_meta(workdir: str | pathlib.Path) -> dict:
  """The config stored with the latest checkpoint of a run's ``workdir``."""
  manager = ocp.CheckpointManager(pathlib.Path(workdir).resolve() / "checkpoints")
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint found under {workdir}/checkpoints.")
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  manager.close()
  return meta


def load_model_weights(model: nnx.Module, source_workdir: str) -> None:
  """Loads the model parameters of another run's latest checkpoint into ``model``.

  Parameters the source does not have (LoRA adapters) keep their initial values.
  """
  meta = read_checkpoint_meta(source_workdir)
  base_config = model_lib.LlamaConfig(**{**meta["model_config"], "lora_rank": 0})
  if base_config.vocab_size != model.config.vocab_size:
    raise ValueError(
      f"--init-from {source_workdir}: its vocabulary has {base_config.vocab_size} tokens, this"
      f" run's tokenizer {model.config.vocab_size}; use the same --tokenizer."
    )
  shape_fields = ("hidden", "ffn", "heads", "layers", "scan_layers")
  differ = [
    f"{f} {getattr(base_config, f)} (now {getattr(model.config, f)})"
    for f in shape_fields
    if getattr(base_config, f) != getattr(model.config, f)
  ]
  if differ:
    raise ValueError(
      f"--init-from {source_workdir}: that run's model has {', '.join(differ)}; use its"
      f" --model {meta['config']['model']}"
      f"{' --scan-layers' if base_config.scan_layers else ''}."
    )
  abstract = {"model": nnx.state(nnx.eval_shape(lambda: model_lib.Llama(base_config, nnx.Rngs(0))))}
  manager = ocp.CheckpointManager(pathlib.Path(source_workdir).resolve() / "checkpoints")
  restored = manager.restore(
    manager.latest_step(),
    args=ocp.args.Composite(state=ocp.args.PyTreeRestore(abstract, partial_restore=True)),
  )["state"]
  manager.close()
  nnx.update(model, restored["model"])


def build_run(config: Config, workdir: pathlib.Path):
  """Corpus, model (with ``init_from`` weights) and model config of a run."""
  corpus = data_lib.load_corpus(
    data=config.data,
    hf_dataset=config.hf_dataset,
    hf_config=config.hf_config,
    domain=config.domain,
    tokenizer=config.tokenizer,
    tokenizer_out=workdir / "tokenizer.json",
  )
  model_config = model_config_for(config, corpus.tokenizer.vocab_size)
  check_memory(config, model_config)
  model = model_lib.Llama(model_config, nnx.Rngs(config.seed))
  if config.init_from:
    load_model_weights(model, config.init_from)
  return corpus, model, model_config


def evaluate_only(config: Config, workdir: str | pathlib.Path) -> float:
  """Validation loss of the starting weights (e.g. before fine-tuning)."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  corpus, model, _ = build_run(config, workdir)
  batches = data_lib.eval_batches(
    corpus.val_tokens, config.batch_size, config.seq_len, config.eval_batches
  )
  return evaluate(nnx.jit(model_lib.next_token_loss), model, batches)


def train_and_evaluate(config: Config, workdir: str | pathlib.Path) -> dict:
  """Trains ``config.model`` with ``config.optimizer``; returns the run's summary."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  corpus, model, model_config = build_run(config, workdir)
  wrt = optim.trainable_filter(config.optimizer)
  tx = optim.build_optimizer(config, model_config)
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  placement, batch_sharding = None, None
  if config.mesh:  # before any restore: orbax restores onto the shardings it is shown
    mesh = mesh_lib.make_mesh(mesh_lib.parse_mesh(config.mesh))
    placement = mesh_lib.Placement(mesh, model, optimizer, config, model_config)
    placement.place(model, optimizer)
    batch_sharding = mesh_lib.batch_sharding(mesh)
  schedule = optim.learning_rate_schedule(
    config.lr, config.steps, config.warmup, config.min_lr_ratio
  )

  if config.checkpoints and config.optimizer == "galore-optax":
    raise ValueError(
      "optax.contrib.galore keeps zero-size placeholder arrays in its state, which orbax"
      " refuses to save; pass --no-checkpoints (or use --optimizer galore)."
    )
  meta = run_metadata(config, model_config, corpus.tokenizer)
  manager = checkpoint_manager(workdir)
  start_step = 0
  if config.resume and manager.latest_step() is None:
    print(f"--resume: no checkpoint in {workdir} yet; starting from step 0")
  if config.resume and manager.latest_step() is not None:
    step = manager.latest_step()
    saved = read_checkpoint_meta(workdir)
    check_compatible(saved, meta, workdir)
    if step > config.steps:
      raise ValueError(
        f"cannot resume {workdir} with --steps {config.steps}: its checkpoint is already at"
        f" step {step}. Pass a --steps above {step} to train on (a run cannot be shortened)."
      )
    if saved["config"]["steps"] != config.steps:
      print(
        f"--resume: the run was planned for {saved['config']['steps']} steps, now"
        f" {config.steps}: from step {step} the learning rate follows the {config.steps}-step"
        f" schedule ({float(schedule(step)):.2e} at step {step + 1})"
      )
    elif step == config.steps:
      print(f"--resume: the run already did its {step} steps; pass a larger --steps to extend it")
    abstract = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)
    restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    )["state"]
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])
    start_step = step
  lead = jax.process_index() == 0  # with several processes, one writes the run's files
  log = (
    MetricsLog(workdir / "metrics.jsonl", start_step if config.resume else None)
    if lead
    else NullLog()
  )

  def save(step: int) -> None:
    if not config.checkpoints:
      return
    state = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    if not all_finite(state):  # never let a diverged state replace a good checkpoint
      raise FloatingPointError(
        f"the model or optimizer state is not finite at step {step}; not saving it. The last"
        f" checkpoint (step {manager.latest_step()}) is intact: --resume with a lower --lr."
      )
    manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=True,
    )
    manager.wait_until_finished()

  opt_bytes = tree_bytes(nnx.state(optimizer))
  # Full-rank AdamW's state on the model's own weights (LoRA adapters are not counted).
  adam_bytes = 2 * tree_bytes(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(
    f"model {config.model}: {n_params / 1e6:.2f}M parameters ({model_config}); corpus:"
    f" {corpus.description}: {len(corpus.train_tokens):,} train / {len(corpus.val_tokens):,}"
    f" validation tokens ({corpus.tokenizer.name})"
  )
  print(
    f"optimizer {config.optimizer}: state {describe_bytes(opt_bytes)} vs AdamW's"
    f" {describe_bytes(adam_bytes)} on the same parameters ({opt_bytes / adam_bytes:.3f}x)"
  )
  if config.optimizer in ("fira", "galore"):  # what is projected, before the first step
    print(fira_jax.describe(optimizer.tx, nnx.as_pure(nnx.state(model, wrt))))

  @nnx.jit
  def train_step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(model_lib.next_token_loss, argnums=nnx.DiffState(0, wrt))(
      model, batch
    )
    optimizer.update(model, grads)
    if placement is not None:
      placement.constrain(model, optimizer)
    return loss

  @nnx.jit
  def eval_step(model, batch):
    return model_lib.next_token_loss(model, batch)

  def put(batch):  # every process builds the same global batch and supplies its shards
    if batch_sharding is None:
      return jnp.asarray(batch)
    return jax.make_array_from_callback(batch.shape, batch_sharding, lambda index: batch[index])

  val_batches = data_lib.eval_batches(
    corpus.val_tokens, config.batch_size, config.seq_len, config.eval_batches
  )
  val_batches = [put(b) for b in val_batches]
  tokens_per_step = config.batch_size * config.seq_len
  end_step = (
    config.steps if config.stop_after is None else min(config.steps, start_step + config.stop_after)
  )
  batches = corpus.batches(start_step, config.seed, config.batch_size, config.seq_len)

  # SIGTERM (a scheduler's kill) is handled like Ctrl-C: save, then stop.
  previous_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)
  bar = None  # started once the first step (and its compilation) is done
  window = []  # the losses (device scalars) of the steps since the last log record
  step, window_start, eval_loss = start_step, time.perf_counter(), None
  try:
    for step in range(start_step + 1, end_step + 1):
      if bar is None and config.progress:
        print("compiling the training step…", flush=True)
        compile_start = time.perf_counter()
      loss = train_step(model, optimizer, put(next(batches)))
      window.append(loss)
      if bar is None:
        if config.progress:
          jax.block_until_ready(loss)
          took = time.perf_counter() - compile_start
          print(f"compiled the training step and ran step {step} in {took:.1f} s", flush=True)
        bar = progress_bar(config, initial=step)
      else:
        bar.update(1)
      if step % config.log_every == 0 or step == end_step:
        losses = [float(x) for x in window]  # host copies: no extra programs on a mesh
        loss, loss_avg = losses[-1], float(np.mean(losses))
        if not all(map(math.isfinite, losses)):
          raise FloatingPointError(
            f"the training loss is {next(x for x in losses if not math.isfinite(x))} by step"
            f" {step}. The last checkpoint (step {manager.latest_step()}) is intact: --resume"
            " with a lower --lr."
          )
        elapsed = time.perf_counter() - window_start
        tok_s = tokens_per_step * len(window) / max(elapsed, 1e-9)
        window, window_start = [], time.perf_counter()
        lr = float(schedule(step - 1))
        log.write(
          {"step": step, "loss": loss, "loss_avg": loss_avg, "lr": lr, "tokens_per_s": tok_s}
        )
        bar.set_postfix(loss_avg=f"{loss_avg:.3f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}")
      if step % config.eval_every == 0 or step == config.steps:
        eval_loss = evaluate(eval_step, model, val_batches)
        log.write({"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss)})
        bar.write(
          f"step {step}: validation loss {eval_loss:.4f}, perplexity {math.exp(eval_loss):.2f}"
        )
      if step % config.checkpoint_every == 0 or step == config.steps:
        save(step)
      if step % config.eval_every == 0 or step % config.checkpoint_every == 0:
        window_start = time.perf_counter()  # tokens/s counts training steps only
  except KeyboardInterrupt:
    say = print if bar is None else bar.write
    say(f"interrupted at step {step}: saving a checkpoint so that --resume continues here")
    save(step)
    raise
  finally:
    if bar is not None:
      bar.close()
    signal.signal(signal.SIGTERM, previous_handler)
  if step == end_step and end_step % config.checkpoint_every and end_step != config.steps:
    save(step)  # stopped early on purpose (stop_after): keep the position
  manager.close()

  records = log.read()
  if config.plot and lead:
    plot_losses(
      records, workdir / "loss.png", f"{config.model} / {config.optimizer} (lr {config.lr})"
    )
  evals = [r for r in records if "eval_loss" in r]
  rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # skip compilation
  summary = {
    "optimizer": config.optimizer,
    "lr": config.lr,
    "seed": config.seed,
    "steps_done": step,
    "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
    "final_eval_ppl": evals[-1]["eval_ppl"] if evals else None,
    "optimizer_state_bytes": opt_bytes,
    "adamw_state_bytes": adam_bytes,
    "tokens_per_s": float(np.median(rates)) if rates else None,
    "parameters": n_params,
  }
  if lead:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary
