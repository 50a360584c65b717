"""fira_jax: Fira (full-rank training under a low-rank constraint) for JAX and Optax."""

from fira_jax.adam import ScaleByAdamStepSizeState
from fira_jax.adam import ScaleByUncorrectedAdamState
from fira_jax.adam import adam_step_size
from fira_jax.adam import scale_by_adam_step_size
from fira_jax.adam import scale_by_uncorrected_adam
from fira_jax.alias import DecayUpdatedWeightsState
from fira_jax.alias import add_decayed_weights_after_step
from fira_jax.alias import fira_adamw
from fira_jax.alias import galore_adamw
from fira_jax.fira import FiraState
from fira_jax.fira import scale_by_fira
from fira_jax.limiter import ClipByNormGrowthState
from fira_jax.limiter import clip_by_norm_growth
from fira_jax.limiter import limit_norm_growth
from fira_jax.limiter import norm_growth_divisor
from fira_jax.projection import FiraDimensionNumbers
from fira_jax.projection import MatrixLayout
from fira_jax.projection import canonical_signs
from fira_jax.projection import dimension_numbers_for_paths
from fira_jax.projection import matrix_layout
from fira_jax.projection import project
from fira_jax.projection import project_back
from fira_jax.projection import random_projector
from fira_jax.projection import randomized_svd_projector
from fira_jax.projection import svd_projector
from fira_jax.scaling import norm_based_scaling_factor
from fira_jax.sharding import state_shardings

__version__ = "0.1.0"

__all__ = (
  "ClipByNormGrowthState",
  "DecayUpdatedWeightsState",
  "FiraDimensionNumbers",
  "FiraState",
  "MatrixLayout",
  "ScaleByAdamStepSizeState",
  "ScaleByUncorrectedAdamState",
  "adam_step_size",
  "add_decayed_weights_after_step",
  "canonical_signs",
  "clip_by_norm_growth",
  "dimension_numbers_for_paths",
  "fira_adamw",
  "galore_adamw",
  "limit_norm_growth",
  "matrix_layout",
  "norm_based_scaling_factor",
  "norm_growth_divisor",
  "project",
  "project_back",
  "random_projector",
  "randomized_svd_projector",
  "scale_by_adam_step_size",
  "scale_by_fira",
  "scale_by_uncorrected_adam",
  "state_shardings",
  "svd_projector",
)
