"""fira_jax: Fira (full-rank training under a low-rank constraint) for JAX and Optax."""

from fira_jax.adam import ScaleByAdamStepSizeState
from fira_jax.adam import ScaleByUncorrectedAdamState
from fira_jax.adam import adam_step_size
from fira_jax.adam import scale_by_adam_step_size
from fira_jax.adam import scale_by_uncorrected_adam
from fira_jax.algorithm import LimitResidualGrowthState
from fira_jax.algorithm import SubspaceProjectionState
from fira_jax.algorithm import SubspaceUpdate
from fira_jax.algorithm import back_projection
from fira_jax.algorithm import fira_chain
from fira_jax.algorithm import in_subspace
from fira_jax.algorithm import limit_residual_growth
from fira_jax.algorithm import norm_based_scaling
from fira_jax.algorithm import subspace_projection
from fira_jax.alias import DecayUpdatedWeightsState
from fira_jax.alias import add_decayed_weights_after_step
from fira_jax.alias import fira_adamw
from fira_jax.alias import galore_adamw
from fira_jax.bases import PROJECTIONS
from fira_jax.bases import canonical_signs
from fira_jax.bases import random_projector
from fira_jax.bases import randomized_svd_projector
from fira_jax.bases import svd_projector
from fira_jax.description import Description
from fira_jax.description import LeafDescription
from fira_jax.description import describe
from fira_jax.fira import FORMULATIONS
from fira_jax.fira import FiraState
from fira_jax.fira import scale_by_fira
from fira_jax.flax_metadata import keep_flax_metadata
from fira_jax.layout import FiraDimensionNumbers
from fira_jax.layout import MatrixLayout
from fira_jax.layout import default_dimension_numbers
from fira_jax.layout import dimension_numbers_for_paths
from fira_jax.layout import galore_dimension_numbers
from fira_jax.layout import matrix_layout
from fira_jax.limiter import ClipByNormGrowthState
from fira_jax.limiter import clip_by_norm_growth
from fira_jax.limiter import limit_norm_growth
from fira_jax.limiter import norm_growth_divisor
from fira_jax.scaling import SCALINGS
from fira_jax.scaling import norm_based_scaling_factor
from fira_jax.sharding import state_shardings
from fira_jax.subspace import COMPRESSED_SIDES
from fira_jax.subspace import Subspace
from fira_jax.subspace import SubspaceLayout
from fira_jax.subspace import project
from fira_jax.subspace import project_back

__version__ = "0.1.0"

__all__ = (
  "COMPRESSED_SIDES",
  "FORMULATIONS",
  "PROJECTIONS",
  "SCALINGS",
  "ClipByNormGrowthState",
  "DecayUpdatedWeightsState",
  "Description",
  "FiraDimensionNumbers",
  "FiraState",
  "LeafDescription",
  "LimitResidualGrowthState",
  "MatrixLayout",
  "ScaleByAdamStepSizeState",
  "ScaleByUncorrectedAdamState",
  "Subspace",
  "SubspaceLayout",
  "SubspaceProjectionState",
  "SubspaceUpdate",
  "adam_step_size",
  "add_decayed_weights_after_step",
  "back_projection",
  "canonical_signs",
  "clip_by_norm_growth",
  "default_dimension_numbers",
  "describe",
  "dimension_numbers_for_paths",
  "fira_adamw",
  "fira_chain",
  "galore_adamw",
  "galore_dimension_numbers",
  "in_subspace",
  "keep_flax_metadata",
  "limit_norm_growth",
  "limit_residual_growth",
  "matrix_layout",
  "norm_based_scaling",
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
  "subspace_projection",
  "svd_projector",
)
