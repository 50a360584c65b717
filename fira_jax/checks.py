"""Checks of concrete hyperparameters, with errors that name the argument and the problem."""

from __future__ import annotations

import numbers

import jax

from fira_jax import subspace


def check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(
      f"{name} must be a Python int (it fixes shapes or the schedule and is"
      f" static), got {value!r} of type {type(value).__name__}. With"
      " optax.inject_hyperparams, pass static_args=('rank', 'update_proj_gap')."
    )
  if value <= 0:
    raise ValueError(f"{name} must be positive, got {value}.")


def check_number(name: str, value, low: float, low_inclusive: bool, meaning: str) -> None:
  """Checks a concrete hyperparameter (NaN fails); traced or scheduled values pass through."""
  if isinstance(value, numbers.Real) and not isinstance(value, bool):
    if not (value > low or (low_inclusive and value == low)):
      raise ValueError(f"{name} must be {meaning}, got {value}.")


def check_decay(name: str, value) -> None:
  """A concrete moment decay must lie in [0, 1); traced or scheduled values pass through."""
  if isinstance(value, numbers.Real) and not isinstance(value, bool) and not 0 <= value < 1:
    raise ValueError(f"{name} must be in [0, 1), got {value}.")


def check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def check_seed(name: str, value) -> None:
  if isinstance(value, (bool, float)):
    raise TypeError(f"{name} must be an int, got {value!r}.")


def checked_subspace(rank, weight_dimension_numbers, compressed_side):
  """A :class:`fira_jax.Subspace` after checking its arguments."""
  check_positive_int("rank", rank)
  check_choice("compressed_side", compressed_side, subspace.COMPRESSED_SIDES)
  return subspace.Subspace(rank, weight_dimension_numbers, compressed_side)


def checked_fira_hyperparams(scale, norm_growth_limit, projection_seed) -> dict:
  """Fira's numeric (injectable) hyperparameters, checked, as a dict."""
  check_number("scale", scale, 0.0, False, "positive")
  if norm_growth_limit is not None:
    check_number("norm_growth_limit", norm_growth_limit, 1.0, True, ">= 1 (or None)")
  check_seed("projection_seed", projection_seed)
  return dict(scale=scale, norm_growth_limit=norm_growth_limit, projection_seed=projection_seed)


def check_unused_with_base_optimizer(**options) -> None:
  """The default Adam's options cannot be combined with another base optimizer."""
  given = [name for name, value in options.items() if value is not None]
  if given:
    raise ValueError(
      f"{', '.join(given)} configure the default Adam and cannot be combined"
      " with base_optimizer; configure the base optimizer instead."
    )


def check_same_shapes(state, expected) -> None:
  """Raises a ValueError naming the first base-optimizer state leaf of the wrong shape."""
  got, got_def = jax.tree_util.tree_flatten_with_path(state)
  want, want_def = jax.tree_util.tree_flatten_with_path(expected)
  if got_def != want_def:
    raise ValueError(
      "the base optimizer's state does not have the structure that the"
      " updates call for; call init on the parameters you update."
    )
  for (path, x), (_, y) in zip(got, want, strict=True):
    if jax.numpy.shape(x) != jax.numpy.shape(y):
      raise ValueError(
        f"optimizer state leaf base_optimizer_state{jax.tree_util.keystr(path)} has shape"
        f" {jax.numpy.shape(x)}, but the updates call for {jax.numpy.shape(y)}: the state was"
        " initialized for parameters of another shape, or with other"
        " weight_dimension_numbers, rank or compressed_side."
      )
