"""Two small decoders written the way public JAX LLM code writes them, for the tests.

* ``LinenDecoder`` (``examples/linen_decoder.py``), after google-deepmind/nanodo:
  ``DenseGeneral`` attention kernels ``(D, H, Dh)`` / ``(H, Dh, D)``, ``Dense`` MLP, a tied
  embedding (``Embed.attend``),
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

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from linen_decoder import Decoder as LinenDecoder
from linen_decoder import DecoderConfig
from linen_decoder import causal_attention
from linen_decoder import next_token_loss  # noqa: F401 (the tests' loss)

# The Linen decoder is the one examples/linen_decoder.py trains, at a test size.
Config = functools.partial(DecoderConfig, V=48, D=32, H=4, F=64, N=2, L=16)


# --- Flax NNX, gemma-like ----------------------------------------------------------------


class NnxBlock(nnx.Module):
  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
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
    o_BxLxNxH = causal_attention(self.q_einsum(y_BxLxD), k_BxLxNxH, v_BxLxNxH)
    x_BxLxD = x_BxLxD + self.attn_vec_einsum(o_BxLxNxH)
    y_BxLxD = self.pre_ffw_norm(x_BxLxD)
    return x_BxLxD + self.mlp_out(jax.nn.gelu(self.mlp_in(y_BxLxD)))


class NnxDecoder(nnx.Module):
  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
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


def linen_params(cfg: DecoderConfig | None = None, seed: int = 0):
  """The Linen decoder's boxed parameters (``nn.Partitioned`` leaves)."""
  cfg = cfg or Config()
  tokens = jnp.zeros((1, cfg.L), jnp.int32)
  return LinenDecoder(cfg).init(jax.random.key(seed), tokens)["params"]


def tokens(cfg: DecoderConfig | None = None, batch: int = 8, seed: int = 0):
  cfg = cfg or Config()
  return jax.random.randint(jax.random.key(seed), (batch, cfg.L + 1), 0, cfg.V)


def arrays(tree):
  """``tree`` with Linen's boxes and NNX's Variables replaced by their arrays."""
  return jax.tree.map(
    lambda x: (
      x.get_value()
      if isinstance(x, nnx.Variable)
      else x.value
      if isinstance(x, nn.Partitioned)
      else x
    ),
    tree,
    is_leaf=lambda x: isinstance(x, (nnx.Variable, nn.Partitioned)),
  )
