"""Per-backend code paths: XLA:CPU workarounds that GPUs and TPUs must not pay for.

:func:`on_cpu_or_else` lowers ``cpu_fn`` for CPU devices and ``default_fn`` for every
other backend (``jax.lax.platform_dependent``: the choice is made when the computation is
lowered, so each backend compiles only its own path).
"""

from __future__ import annotations

import contextlib
import threading

import jax

_forced = threading.local()


def on_cpu_or_else(cpu_fn, default_fn, *args):
  """``cpu_fn(*args)`` on CPU, ``default_fn(*args)`` elsewhere."""
  if getattr(_forced, "default", False):
    return default_fn(*args)
  return jax.lax.platform_dependent(*args, cpu=cpu_fn, default=default_fn)


@contextlib.contextmanager
def default_paths():
  """Traces the non-CPU paths on every backend, CPU included (to test them on CPU).

  It acts when a function is traced: build and jit the optimizer inside the block.
  """
  previous = getattr(_forced, "default", False)
  _forced.default = True
  try:
    yield
  finally:
    _forced.default = previous
