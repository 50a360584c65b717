"""One function builds the optimizer (and what it trains) from the config."""

from __future__ import annotations

import re

import jax
import optax
from flax import nnx
from model import MATRIX_PATTERN
from model import LlamaConfig

import fira_jax

OPTIMIZERS = (
  "fira",
  "fira-adafactor",
  "galore",
  "galore-optax",
  "adamw",
  "adafactor",
  "muon",
  "lora",
)

# Adafactor's factored second moment inside Fira's subspace factors every matrix with two
# sides of at least this size: the rank-r matrices R are (m, r) with r as small as 8, which
# optax's default (128, meant for full-size weights) would leave unfactored.
SUBSPACE_MIN_DIM_TO_FACTOR = 2


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


def not_matrices(tree):
  """True at the leaves that are not attention/MLP matrices: embeddings, head and norms."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: not _is_matrix(jax.tree_util.keystr(path)), tree
  )


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


def subspace_base_optimizer(config) -> optax.GradientTransformation:
  """What Fira/GaLore run in the subspace (and on embeddings, head and norms) before the
  learning rate: the reference's Adam (moments without bias correction; the step size is
  applied to the whole update), or for ``fira-adafactor`` Adafactor's factored second
  moment alone (no momentum, no update clipping, no parameter scaling)."""
  if config.optimizer == "fira-adafactor":
    return optax.scale_by_factored_rms(min_dim_size_to_factor=SUBSPACE_MIN_DIM_TO_FACTOR)
  return fira_jax.scale_by_uncorrected_adam(config.b1, config.b2, config.eps)


def build_optimizer(config, model_config: LlamaConfig) -> optax.GradientTransformation:
  """The optax transformation named by ``config.optimizer`` with the config's settings.

  With ``config.embed_lr``, embeddings, head and norms (every leaf that is not an
  attention/MLP matrix) take that peak learning rate and the matrices ``config.lr``: the
  optimizer is built with ``config.lr`` and those leaves' updates are multiplied by
  ``embed_lr / lr``. The schedule is linear in its peak (warm-up from 0, cosine to
  ``min_lr_ratio`` of the peak), so this is the same as giving them their own schedule
  (exactly, without weight decay; with it, their decay is scaled by the same factor, as
  an lr-coupled decay would be). Muon takes it as its own ``adam_learning_rate``.
  """
  tx = _build(config, model_config)
  if config.embed_lr is None or config.optimizer == "muon":
    return tx
  return optax.chain(tx, optax.masked(optax.scale(config.embed_lr / config.lr), not_matrices))


def _build(config, model_config: LlamaConfig) -> optax.GradientTransformation:
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
  if name == "fira-adafactor":
    # Fira's pieces (fira_jax.fira_chain) with Adafactor's factored second moment as the
    # base optimizer: state = projector + one row and one column factor per matrix.
    weight_decay = (
      [fira_jax.add_decayed_weights_after_step(schedule, config.weight_decay)]
      if config.weight_decay
      else []
    )
    return optax.chain(
      fira_jax.fira_chain(
        rank,
        config.update_proj_gap,
        config.scale,
        subspace_base_optimizer(config),
        norm_growth_limit=config.norm_growth_limit,
        weight_dimension_numbers=matrices,
        compressed_side=config.compressed_side,
        scaling=config.scaling,
        formulation=config.formulation,
        projection=config.projection,
        projection_seed=config.projection_seed,
        staggered_refresh=config.staggered_refresh,
      ),
      optax.scale_by_learning_rate(schedule),
      *weight_decay,
    )
  if name == "adafactor":
    # optax.adafactor as users call it: its defaults (factored second moment for matrices
    # with two sides >= 128, update clipping at RMS 1, steps relative to each parameter's
    # RMS, no momentum), with this config's schedule.
    return optax.adafactor(schedule, weight_decay_rate=config.weight_decay or None)
  if name == "muon":
    # Muon on the attention/MLP matrices, AdamW on embeddings, head and norms.
    embed_schedule = (
      None
      if config.embed_lr is None
      else learning_rate_schedule(config.embed_lr, config.steps, config.warmup, config.min_lr_ratio)
    )

    def muon_dims(tree):
      to_muon = lambda spec: (
        None
        if spec is None
        else optax.contrib.MuonDimensionNumbers(spec.reduction_axis, spec.output_axis)
      )
      return jax.tree.map(
        to_muon,
        matrices(tree),
        is_leaf=lambda x: x is None or isinstance(x, fira_jax.FiraDimensionNumbers),
      )

    return optax.contrib.muon(
      schedule,
      weight_decay=config.weight_decay,
      mu_dtype=config.mu_dtype,
      adam_b1=config.b1,
      adam_b2=config.b2,
      adam_weight_decay=config.weight_decay,
      adam_learning_rate=embed_schedule,
      muon_weight_dimension_numbers=muon_dims,
    )
  return optax.adamw(schedule, **adam)  # adamw, and lora on its trainable parameters
