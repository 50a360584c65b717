"""Fira in a Flax Linen trainer written the way nanodo writes one: copy it into your code.

    pip install -e ".[examples]" && python examples/linen_decoder.py

A decoder with ``DenseGeneral`` attention kernels ``(D, H, Dh)`` / ``(H, Dh, D)``, a tied
embedding, blocks stacked by ``nn.scan`` and FSDP names from ``nn.with_partitioning``; a
``TrainState`` whose ``tx`` is ``fira_jax.fira_adamw`` with the default
``weight_dimension_numbers`` (the attention and MLP matrices, read from the shapes). The
state is sharded over every device by Flax's own metadata,
``nn.get_sharding(jax.eval_shape(init), mesh)``, and checkpointed with orbax every
``--checkpoint-every`` steps; ``--resume`` continues a run. Trains on the embedded corpus
(Python's stdlib sources, byte-level) unless ``--data`` names a text file.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import cli
import data as data_lib

import fira_jax


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  V: int = 256  # vocabulary (bytes)
  D: int = 128  # model width
  H: int = 4  # attention heads
  F: int = 384  # MLP width
  N: int = 4  # blocks
  L: int = 128  # context length

  @property
  def Dh(self) -> int:
    return self.D // self.H


def causal_attention(q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh):
  att_BxHxLxL = jnp.einsum("blhd,bmhd->bhlm", q_BxLxHxDh, k_BxLxHxDh)
  att_BxHxLxL /= q_BxLxHxDh.shape[-1] ** 0.5
  L = att_BxHxLxL.shape[-1]
  att_BxHxLxL = jnp.where(jnp.tril(jnp.ones((L, L), bool)), att_BxHxLxL, -1e9)
  return jnp.einsum("bhlm,bmhd->blhd", jax.nn.softmax(att_BxHxLxL, axis=-1), v_BxLxHxDh)


def fsdp(init, names):
  """Shards the named axis over the mesh's "data" axis (nanodo's ``fsdp.init``)."""
  return nn.with_partitioning(init, names)


class Block(nn.Module):
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x_BxLxD, _):
    cfg, kernel = self.cfg, nn.initializers.xavier_uniform()
    qkv = functools.partial(
      nn.DenseGeneral,
      features=(cfg.H, cfg.Dh),
      use_bias=False,
      kernel_init=fsdp(kernel, ("data", None, None)),
    )
    y_BxLxD = nn.LayerNorm(use_bias=False)(x_BxLxD)
    o_BxLxHxDh = causal_attention(
      qkv(name="query")(y_BxLxD), qkv(name="key")(y_BxLxD), qkv(name="value")(y_BxLxD)
    )
    x_BxLxD += nn.DenseGeneral(
      cfg.D,
      axis=(-2, -1),
      use_bias=False,
      kernel_init=fsdp(kernel, (None, None, "data")),
      name="attn_out_proj",
    )(o_BxLxHxDh)
    y_BxLxD = nn.LayerNorm(use_bias=False)(x_BxLxD)
    mlp = functools.partial(nn.Dense, use_bias=False, kernel_init=fsdp(kernel, ("data", None)))
    x_BxLxD += mlp(cfg.D, name="mlp_out")(jax.nn.gelu(mlp(cfg.F, name="mlp_in")(y_BxLxD)))
    return x_BxLxD, None


class Decoder(nn.Module):
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, y_BxL):
    cfg, init = self.cfg, nn.initializers.normal(0.02)
    embed = nn.Embed(cfg.V, cfg.D, embedding_init=fsdp(init, (None, "data")), name="embed")
    positions = nn.Embed(cfg.L, cfg.D, embedding_init=fsdp(init, (None, "data")), name="pos_embed")
    x_BxLxD = embed(y_BxL) + positions(jnp.arange(y_BxL.shape[1]))[None]
    blocks = nn.scan(
      Block,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=cfg.N,
      metadata_params={nn.PARTITION_NAME: None},  # the layer axis is not sharded
    )
    x_BxLxD, _ = blocks(cfg, name="blocks")(x_BxLxD, None)
    return embed.attend(nn.LayerNorm(use_bias=False, name="out_ln")(x_BxLxD))


def next_token_loss(logits_BxLxV, y_BxL):
  log_p = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32))
  return -jnp.mean(jnp.take_along_axis(log_p, y_BxL[..., None], -1))


@dataclasses.dataclass(frozen=True)
class Config:
  steps: int = 300  # optimizer steps
  batch_size: int = 16  # sequences per step (divisible by the device count)
  lr: float = 3e-3  # peak learning rate (linear warm-up over 10%, cosine to 10%)
  rank: int | None = None  # Fira's rank r; None: D / 4
  update_proj_gap: int = 200  # steps between projector refreshes
  scale: float = 0.25  # Fira's alpha, the paper's value
  eval_batches: int = 8  # validation batches at the end
  checkpoint_every: int = 100  # steps between orbax checkpoints
  seed: int = 0  # parameters and batches
  data: str | None = None  # a text file instead of the embedded stdlib sources
  workdir: str = "runs/linen"  # checkpoints go to WORKDIR/checkpoints
  resume: bool = False  # continue the run in --workdir
  overwrite: bool = False  # delete an earlier run in --workdir
  progress: bool = True  # show a progress bar


def make_optimizer(config: Config, cfg: DecoderConfig) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, config.lr, max(1, config.steps // 10), config.steps, 0.1 * config.lr
  )
  return fira_jax.fira_adamw(
    schedule,
    rank=config.rank or cfg.D // 4,
    update_proj_gap=config.update_proj_gap,
    scale=config.scale,
  )


def main(argv=None, cfg: DecoderConfig | None = None) -> dict:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  cli.add_config_flags(parser, Config)
  config = cli.config_from_args(Config, parser.parse_args(argv))
  cfg = cfg or DecoderConfig()
  workdir = pathlib.Path(config.workdir)
  cli.prepare_workdir(workdir, config.resume, config.overwrite)
  corpus = data_lib.load_corpus(config.data)
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  model, tx = Decoder(cfg), make_optimizer(config, cfg)

  def init():
    params = model.init(jax.random.key(config.seed), jnp.zeros((1, cfg.L), jnp.int32))["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  abstract = jax.eval_shape(init)
  shardings = nn.get_sharding(abstract, mesh)  # Fira's state carries names for its shapes
  print(fira_jax.describe(tx, abstract.params))
  manager = ocp.CheckpointManager(
    workdir.resolve() / "checkpoints", options=ocp.CheckpointManagerOptions(max_to_keep=2)
  )
  if config.resume and manager.latest_step() is not None:
    # One sharding per array (a box's array included): the restored arrays land sharded.
    arrays = zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True)
    target = jax.tree.structure(abstract).unflatten(
      [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in arrays]
    )
    state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(target))
  else:
    state = jax.jit(init, out_shardings=shardings)()
  batch_sharding = NamedSharding(mesh, P("data"))

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state, tokens_BxL1):
    loss_fn = lambda p: next_token_loss(
      state.apply_fn({"params": p}, tokens_BxL1[:, :-1]), tokens_BxL1[:, 1:]
    )
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  start = int(state.step)
  bar = tqdm(total=config.steps, initial=start, disable=not config.progress, unit="step")
  for step in range(start, config.steps):
    batch = data_lib.batch_at(corpus.train_tokens, step, config.seed, config.batch_size, cfg.L)
    state, loss = train_step(state, jax.device_put(batch, batch_sharding))
    bar.update()
    if (step + 1) % 10 == 0:
      bar.set_postfix(loss=f"{float(loss):.3f}")
    if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
      manager.save(step + 1, args=ocp.args.StandardSave(state))
  bar.close()
  manager.wait_until_finished()
  manager.close()

  eval_loss = jax.jit(
    lambda params, t: next_token_loss(model.apply({"params": params}, t[:, :-1]), t[:, 1:])
  )
  batches = data_lib.eval_batches(corpus.val_tokens, config.batch_size, cfg.L, config.eval_batches)
  val_loss = float(np.mean([eval_loss(state.params, jnp.asarray(b)) for b in batches]))
  print(
    f"step {int(state.step)}: validation loss {val_loss:.4f}, perplexity {np.exp(val_loss):.3f}"
  )
  return {"step": int(state.step), "val_loss": val_loss}


if __name__ == "__main__":
  main()
