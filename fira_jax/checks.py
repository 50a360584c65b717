"""Checks of concrete hyperparameters, with errors that name the argument and the problem."""

from __future__ import annotations

import numbers


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
