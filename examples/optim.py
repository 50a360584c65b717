"""One function builds the optimizer (and what it trains) from the config."""

from __future__ import annotations

import re

import jax
import optax
from flax import nnx
from model import MATRIX_PATTERN
from model import LlamaConfig

import fira_jax

OPTIMIZERS = ("fira", "galore", "galore-optax", "adamw", "lora")


def learning_rate_schedule(peak: float, steps: int, warmup_fraction: float, min_ratio: float):
  """Linear warm-up from 0, then cosine decay to ``min_ratio * peak`` (the paper's schedule)."""
  warmup = max(1, int(warmup_fraction * steps))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak,
    warmup_steps=warmup,
    decay_steps=max(steps, warmup + 1),
    end_value=min_ratio * peak,
  )


def _is_matrix(path: str) -> bool:
  return re.search(MATRIX_PATTERN, path) is not None


def trainable_filter(optimizer: str):
  """LoRA trains the adapters and every parameter it does not adapt (embeddings, norms,
  head), with the adapted attention/MLP kernels frozen, as the paper's LoRA baseline.
  Every other optimizer trains all parameters."""
  if optimizer != "lora":
    return nnx.Param
  not_adapted = lambda path, _: not _is_matrix("/".join(str(p) for p in path))
  return nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, not_adapted))


def low_rank_layout(config, model_config: LlamaConfig):
  """Fira/GaLore's rank and weight_dimension_numbers for this model."""
  rank = config.rank or max(1, model_config.hidden // 4)
  stacked = fira_jax.FiraDimensionNumbers(1, 2) if model_config.scan_layers else None
  return rank, fira_jax.dimension_numbers_for_paths(MATRIX_PATTERN, stacked)


def build_optimizer(config, model_config: LlamaConfig) -> optax.GradientTransformation:
  """The optax transformation named by ``config.optimizer`` with the config's settings."""
  name = config.optimizer
  if name not in OPTIMIZERS:
    raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {name!r}.")
  schedule = learning_rate_schedule(config.lr, config.steps, config.warmup, config.min_lr_ratio)
  adam = dict(
    b1=config.b1,
    b2=config.b2,
    eps=config.eps,
    weight_decay=config.weight_decay,
    mu_dtype=config.mu_dtype,
  )
  rank, matrices = low_rank_layout(config, model_config)
  low_rank = dict(
    rank=rank,
    update_proj_gap=config.update_proj_gap,
    scale=config.scale,
    weight_dimension_numbers=matrices,
    compressed_side=config.compressed_side,
    projection=config.projection,
    projection_seed=config.projection_seed,
    staggered_refresh=config.staggered_refresh,
    nu_dtype=config.nu_dtype,
    **adam,
  )
  if name == "fira":
    return fira_jax.fira_adamw(
      schedule,
      norm_growth_limit=config.norm_growth_limit,
      scaling=config.scaling,
      formulation=config.formulation,
      **low_rank,
    )
  if name == "galore":
    return fira_jax.galore_adamw(schedule, **low_rank)
  if name == "galore-optax":
    if model_config.scan_layers:
      raise ValueError(
        "optax.contrib.galore cannot give stacked (scanned) layers per-layer projectors;"
        " drop --scan-layers or use --optimizer galore."
      )
    return optax.contrib.galore(
      schedule,
      rank=rank,
      update_proj_gap=config.update_proj_gap,
      scale=config.scale,
      weight_decay=config.weight_decay,
      weight_dimension_numbers=fira_jax.galore_dimension_numbers(matrices),
      base_optimizer=optax.scale_by_adam(config.b1, config.b2, config.eps),
    )
  if name == "adamw" and config.embed_lr:
    # Full-rank Adam with its own learning rate for embeddings, head and norms.
    embed_schedule = learning_rate_schedule(
      config.embed_lr, config.steps, config.warmup, config.min_lr_ratio
    )

    def labels(tree):
      return jax.tree_util.tree_map_with_path(
        lambda path, _: "matrix" if _is_matrix(jax.tree_util.keystr(path)) else "other", tree
      )

    return optax.partition(
      {"matrix": optax.adamw(schedule, **adam), "other": optax.adamw(embed_schedule, **adam)},
      labels,
    )
  return optax.adamw(schedule, **adam)  # adamw, and lora on its trainable parameters
