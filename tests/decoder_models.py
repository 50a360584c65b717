"""Two small decoders written the way public JAX LLM code writes them, for the tests.

* :class:`LinenDecoder`, after google-deepmind/nanodo: ``DenseGeneral`` attention kernels
  ``(D, H, Dh)`` / ``(H, Dh, D)``, ``Dense`` MLP, a tied embedding (``Embed.attend``),
  learned positions, blocks stacked with ``nn.scan``, FSDP names from
  ``nn.with_partitioning``.
* :class:`NnxDecoder`, after flax's gemma example: ``nnx.Einsum`` attention kernels
  ``(N, D, H)`` / ``(N, H, D)``, ``nnx.Linear`` MLP, ``nnx.RMSNorm``, a tied embedding,
  blocks made by ``nnx.vmap`` and run by ``nnx.scan``, FSDP names from
  ``nnx.with_partitioning``.

``ATTENTION_AND_MLP`` says, per decoder, which leaves are the attention and MLP matrices and
how they read as matrices: what the default ``weight_dimension_numbers`` must give them.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Config:
  V: int = 48  # vocabulary
  D: int = 32  # model width
  H: int = 4  # heads
  F: int = 64  # MLP width
  N: int = 2  # layers
  L: int = 16  # context

  @property
  def Dh(self) -> int:
    return self.D // self.H


def _causal_attention(q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh):
  Dh = q_BxLxHxDh.shape[-1]
  att_BxHxLxL = jnp.einsum("blhd,bmhd->bhlm", q_BxLxHxDh, k_BxLxHxDh) / Dh**0.5
  L = att_BxHxLxL.shape[-1]
  att_BxHxLxL = jnp.where(jnp.tril(jnp.ones((L, L), bool)), att_BxHxLxL, -1e9)
  return jnp.einsum("bhlm,bmhd->blhd", jax.nn.softmax(att_BxHxLxL, axis=-1), v_BxLxHxDh)


# --- Flax Linen, nanodo-like -------------------------------------------------------------


def _fsdp(init, names):
  return nn.with_partitioning(init, names)


class LinenBlock(nn.Module):
  cfg: Config

  @nn.compact
  def __call__(self, x_BxLxD, _):
    cfg = self.cfg
    kernel = nn.initializers.xavier_uniform()
    qkv = functools.partial(
      nn.DenseGeneral,
      axis=-1,
      features=(cfg.H, cfg.Dh),
      use_bias=False,
      kernel_init=_fsdp(kernel, ("data", None, None)),
    )
    y_BxLxD = nn.LayerNorm(use_bias=False)(x_BxLxD)
    o_BxLxHxDh = _causal_attention(
      qkv(name="query")(y_BxLxD), qkv(name="key")(y_BxLxD), qkv(name="value")(y_BxLxD)
    )
    x_BxLxD += nn.DenseGeneral(
      features=cfg.D,
      axis=(-2, -1),
      use_bias=False,
      kernel_init=_fsdp(kernel, (None, None, "data")),
      name="attn_out_proj",
    )(o_BxLxHxDh)
    y_BxLxD = nn.LayerNorm(use_bias=False)(x_BxLxD)
    mlp = functools.partial(nn.Dense, use_bias=False, kernel_init=_fsdp(kernel, ("data", None)))
    x_BxLxD += mlp(cfg.D, name="mlp_out")(jax.nn.gelu(mlp(cfg.F, name="mlp_in")(y_BxLxD)))
    return x_BxLxD, None


class LinenDecoder(nn.Module):
  cfg: Config

  @nn.compact
  def __call__(self, y_BxL):
    cfg = self.cfg
    init = nn.initializers.normal(0.02)
    embed = nn.Embed(cfg.V, cfg.D, embedding_init=_fsdp(init, (None, "data")), name="embed")
    pos = nn.Embed(cfg.L, cfg.D, embedding_init=_fsdp(init, (None, "data")), name="pos_embed")
    x_BxLxD = embed(y_BxL) + pos(jnp.arange(y_BxL.shape[1]))[None]
    blocks = nn.scan(
      LinenBlock,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=cfg.N,
      metadata_params={nn.PARTITION_NAME: None},
    )
    x_BxLxD, _ = blocks(cfg, name="blocks")(x_BxLxD, None)
    return embed.attend(nn.LayerNorm(use_bias=False, name="out_ln")(x_BxLxD))


# --- Flax NNX, gemma-like ----------------------------------------------------------------


class NnxBlock(nnx.Module):
  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    kernel = nnx.initializers.xavier_uniform()
    fsdp = nnx.with_partitioning
    self.pre_attention_norm = nnx.RMSNorm(cfg.D, rngs=rngs)
    self.q_einsum = nnx.Einsum(
      "BLD,NDH->BLNH",
      (cfg.H, cfg.D, cfg.Dh),
      kernel_init=fsdp(kernel, (None, "data", None)),
      rngs=rngs,
    )
    self.kv_einsum = nnx.Einsum(
      "BLD,CNDH->CBLNH",
      (2, cfg.H, cfg.D, cfg.Dh),
      kernel_init=fsdp(kernel, (None, None, "data", None)),
      rngs=rngs,
    )
    self.attn_vec_einsum = nnx.Einsum(
      "BLNH,NHD->BLD",
      (cfg.H, cfg.Dh, cfg.D),
      kernel_init=fsdp(kernel, (None, None, "data")),
      rngs=rngs,
    )
    self.pre_ffw_norm = nnx.RMSNorm(cfg.D, rngs=rngs)
    self.mlp_in = nnx.Linear(
      cfg.D, cfg.F, use_bias=False, kernel_init=fsdp(kernel, ("data", None)), rngs=rngs
    )
    self.mlp_out = nnx.Linear(
      cfg.F, cfg.D, use_bias=False, kernel_init=fsdp(kernel, (None, "data")), rngs=rngs
    )

  def __call__(self, x_BxLxD):
    y_BxLxD = self.pre_attention_norm(x_BxLxD)
    k_BxLxNxH, v_BxLxNxH = self.kv_einsum(y_BxLxD)
    o_BxLxNxH = _causal_attention(self.q_einsum(y_BxLxD), k_BxLxNxH, v_BxLxNxH)
    x_BxLxD = x_BxLxD + self.attn_vec_einsum(o_BxLxNxH)
    y_BxLxD = self.pre_ffw_norm(x_BxLxD)
    return x_BxLxD + self.mlp_out(jax.nn.gelu(self.mlp_in(y_BxLxD)))


class NnxDecoder(nnx.Module):
  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(
      cfg.V,
      cfg.D,
      embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), (None, "data")),
      rngs=rngs,
    )

    @nnx.split_rngs(splits=cfg.N)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def make_blocks(rngs):
      return NnxBlock(cfg, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = nnx.RMSNorm(cfg.D, rngs=rngs)

  def __call__(self, y_BxL):
    @nnx.scan(
      in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: None}
    )
    def forward(x_BxLxD, block):
      return block(x_BxLxD)

    x_BxLxD = forward(self.embed(y_BxL), self.blocks)
    return self.embed.attend(self.final_norm(x_BxLxD))


# Per projected leaf (path -> (batch, reduction, output) axes): the attention and MLP
# matrices whole, one per layer; nothing else is projected.
ATTENTION_AND_MLP = {
  "linen": {
    "blocks/query/kernel": ((0,), (1,), (2, 3)),  # (N, D, H, Dh)
    "blocks/key/kernel": ((0,), (1,), (2, 3)),
    "blocks/value/kernel": ((0,), (1,), (2, 3)),
    "blocks/attn_out_proj/kernel": ((0,), (1, 2), (3,)),  # (N, H, Dh, D)
    "blocks/mlp_in/kernel": ((0,), (1,), (2,)),  # (N, D, F)
    "blocks/mlp_out/kernel": ((0,), (1,), (2,)),  # (N, F, D)
  },
  "nnx": {
    "blocks/q_einsum/kernel": ((0,), (2,), (1, 3)),  # (layers, N, D, H)
    "blocks/kv_einsum/kernel": ((0,), (3,), (1, 2, 4)),  # (layers, 2, N, D, H)
    "blocks/attn_vec_einsum/kernel": ((0,), (1, 2), (3,)),  # (layers, N, H, D)
    "blocks/mlp_in/kernel": ((0,), (1,), (2,)),
    "blocks/mlp_out/kernel": ((0,), (1,), (2,)),
  },
}


def linen_params(cfg: Config = Config(), seed: int = 0):
  """The Linen decoder's boxed parameters (``nn.Partitioned`` leaves)."""
  tokens = jnp.zeros((1, cfg.L), jnp.int32)
  return LinenDecoder(cfg).init(jax.random.key(seed), tokens)["params"]


def tokens(cfg: Config = Config(), batch: int = 8, seed: int = 0):
  return jax.random.randint(jax.random.key(seed), (batch, cfg.L + 1), 0, cfg.V)


def next_token_loss(logits_BxLxV, y_BxL):
  return jnp.mean(
    jax.nn.logsumexp(logits_BxLxV, -1)
    - jnp.take_along_axis(logits_BxLxV, y_BxL[..., None], -1)[..., 0]
  )
