"""Shared pieces of the benchmarks: LLaMA shapes, timing, markdown tables."""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp

import fira_jax

# hidden, ffn, layers, rank, gap, alpha: the paper's settings (vocabulary 32000, untied).
LLAMA = {
  "60M": (512, 1376, 8, 128, 200, 0.25),
  "130M": (768, 2048, 12, 256, 200, 0.25),
  "350M": (1024, 2736, 24, 256, 200, 0.25),
  "1B": (2048, 5461, 24, 512, 200, 0.0625),
  "7B": (4096, 11008, 32, 64, 500, 0.0625),
}
VOCAB = 32000
ATTN_MLP = r"\['(attn|mlp)'\]"


def llama_shapes(hidden, ffn, layers, vocab=VOCAB, stacked=False):
  """Parameter shapes of a LLaMA in Flax (in, out) layout, as a tree of tuples."""
  layer = {
    "attn": {name: (hidden, hidden) for name in ("q", "k", "v", "o")},
    "mlp": {"gate": (hidden, ffn), "up": (hidden, ffn), "down": (ffn, hidden)},
    "attn_norm": (hidden,),
    "mlp_norm": (hidden,),
  }
  is_shape = lambda x: isinstance(x, tuple)
  return {
    "embed": (vocab, hidden),
    "layers": jax.tree.map(lambda s: (layers, *s), layer, is_leaf=is_shape)
    if stacked
    else [layer] * layers,
    "final_norm": (hidden,),
    "lm_head": (hidden, vocab),
  }


def is_shape(x):
  return isinstance(x, tuple)


def abstract(shapes, dtype=jnp.float32):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes, is_leaf=is_shape)


def concrete(shapes, seed=0, scale=0.02):
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=is_shape)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten(
    [scale * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves, strict=True)]
  )


def galore_dimension_numbers():
  """optax.contrib.galore's specs for the same attention/MLP kernels."""
  return fira_jax.galore_dimension_numbers(fira_dimension_numbers())


def fira_dimension_numbers(stacked=False):
  spec = fira_jax.FiraDimensionNumbers(1, 2) if stacked else fira_jax.FiraDimensionNumbers()
  return fira_jax.dimension_numbers_for_paths(ATTN_MLP, spec)


def median_time(fn, repeats, warmup=1):
  """Median wall time of ``fn()`` (which must block) over ``repeats`` calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def markdown_table(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def parser(description):
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--output", type=pathlib.Path, help="also write the markdown table here")
  return p


def emit(text, output):
  print(text)
  if output is not None:
    output.write_text(text + "\n")
