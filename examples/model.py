"""LLaMA in Flax NNX: RMSNorm, rotary embeddings, SwiGLU MLP, no biases, untied embeddings.

Tensor names carry their shapes: B batch, T time, D hidden, F ffn, N heads, H head dim,
V vocabulary, L layers. Kernels are Flax (in, out). With ``scan_layers`` the blocks are
created with ``nnx.vmap`` and applied with ``nnx.scan``, so every block kernel is one stacked
(L, in, out) parameter (Fira then projects each layer's slice on its own).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  hidden: int  # D, the residual stream width
  ffn: int  # F, the SwiGLU inner width
  heads: int  # N; head dim H = D / N
  layers: int  # L
  vocab_size: int = 256  # V; set from the tokenizer at run time
  max_seq_len: int = 256  # longest sequence the rotary table covers
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  init_std: float = 0.02  # as the GaLore/Fira LLaMA configs (initializer_range)
  scan_layers: bool = False  # one stacked (L, ...) parameter per kernel, applied with nnx.scan
  lora_rank: int = 0  # > 0: nnx.LoRA adapters on every attention/MLP kernel

  @property
  def head_dim(self) -> int:
    return self.hidden // self.heads


# The paper's shapes (REFERENCE.md) and a tiny default that trains on 2 CPU cores.
CONFIGS = {
  "tiny": LlamaConfig(hidden=128, ffn=352, heads=4, layers=4),
  "3m": LlamaConfig(hidden=256, ffn=688, heads=4, layers=4),  # the comparison's larger scale
  "60m": LlamaConfig(hidden=512, ffn=1376, heads=8, layers=8),
  "130m": LlamaConfig(hidden=768, ffn=2048, heads=12, layers=12),
  "350m": LlamaConfig(hidden=1024, ffn=2736, heads=16, layers=24),
  "1b": LlamaConfig(hidden=2048, ffn=5461, heads=32, layers=24),
}

# Attention and MLP matrices: what Fira, GaLore and LoRA act on (as in the paper).
MATRIX_PATTERN = r"\b(attn|mlp)\b"


def make_config(name: str, **overrides) -> LlamaConfig:
  if name not in CONFIGS:
    raise ValueError(f"--model must be one of {sorted(CONFIGS)}, got {name!r}.")
  config = dataclasses.replace(CONFIGS[name], **overrides)
  if config.hidden % config.heads:
    raise ValueError(f"hidden {config.hidden} must be divisible by heads {config.heads}.")
  return config


def _linear(d_in: int, d_out: int, config: LlamaConfig, rngs: nnx.Rngs) -> nnx.Module:
  init = nnx.initializers.normal(config.init_std)
  if config.lora_rank > 0:
    return nnx.LoRALinear(
      d_in, d_out, lora_rank=config.lora_rank, use_bias=False, kernel_init=init, rngs=rngs
    )
  return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=init, rngs=rngs)


def rotary(x_BxTxNxH: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (rotate-half form, as LLaMA)."""
  _, t, _, h = x_BxTxNxH.shape
  inv_freq_H2 = 1.0 / theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)
  angles_TxH2 = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq_H2[None, :]
  cos_1xTx1xH = jnp.cos(jnp.concatenate([angles_TxH2, angles_TxH2], -1))[None, :, None, :]
  sin_1xTx1xH = jnp.sin(jnp.concatenate([angles_TxH2, angles_TxH2], -1))[None, :, None, :]
  x1, x2 = jnp.split(x_BxTxNxH, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x_BxTxNxH * cos_1xTx1xH + rotated * sin_1xTx1xH).astype(x_BxTxNxH.dtype)


class Attention(nnx.Module):
  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    self.config = config
    d = config.hidden
    self.q = _linear(d, d, config, rngs)
    self.k = _linear(d, d, config, rngs)
    self.v = _linear(d, d, config, rngs)
    self.o = _linear(d, d, config, rngs)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    b, t, d = x_BxTxD.shape
    n, h = self.config.heads, self.config.head_dim
    split = lambda y: y.reshape(b, t, n, h)
    q_BxTxNxH = rotary(split(self.q(x_BxTxD)), self.config.rope_theta)
    k_BxTxNxH = rotary(split(self.k(x_BxTxD)), self.config.rope_theta)
    v_BxTxNxH = split(self.v(x_BxTxD))
    out_BxTxNxH = jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, is_causal=True)
    return self.o(out_BxTxNxH.reshape(b, t, d))


class Mlp(nnx.Module):
  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    self.gate = _linear(config.hidden, config.ffn, config, rngs)
    self.up = _linear(config.hidden, config.ffn, config, rngs)
    self.down = _linear(config.ffn, config.hidden, config, rngs)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    return self.down(nnx.silu(self.gate(x_BxTxD)) * self.up(x_BxTxD))


class Block(nnx.Module):
  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    self.attn_norm = nnx.RMSNorm(config.hidden, epsilon=config.norm_eps, rngs=rngs)
    self.attn = Attention(config, rngs)
    self.mlp_norm = nnx.RMSNorm(config.hidden, epsilon=config.norm_eps, rngs=rngs)
    self.mlp = Mlp(config, rngs)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    x_BxTxD = x_BxTxD + self.attn(self.attn_norm(x_BxTxD))
    return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))


class Llama(nnx.Module):
  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Embed(
      config.vocab_size,
      config.hidden,
      embedding_init=nnx.initializers.normal(config.init_std),
      rngs=rngs,
    )
    if config.scan_layers:

      @nnx.split_rngs(splits=config.layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make_blocks(rngs: nnx.Rngs) -> Block:
        return Block(config, rngs)

      self.layers = make_blocks(rngs)
    else:
      self.layers = nnx.List([Block(config, rngs) for _ in range(config.layers)])
    self.final_norm = nnx.RMSNorm(config.hidden, epsilon=config.norm_eps, rngs=rngs)
    self.lm_head = nnx.Linear(
      config.hidden,
      config.vocab_size,
      use_bias=False,
      kernel_init=nnx.initializers.normal(config.init_std),
      rngs=rngs,
    )

  def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
    x_BxTxD = self.embed(tokens_BxT)
    if self.config.scan_layers:

      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def apply_blocks(x_BxTxD, block):
        return block(x_BxTxD)

      x_BxTxD = apply_blocks(x_BxTxD, self.layers)
    else:
      for block in self.layers:
        x_BxTxD = block(x_BxTxD)
    return self.lm_head(self.final_norm(x_BxTxD))


def next_token_loss(model: Llama, tokens_BxT1: jax.Array) -> jax.Array:
  """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1]."""
  logits_BxTxV = model(tokens_BxT1[:, :-1]).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, tokens_BxT1[:, 1:]).mean()
