"""Runs the reference torch implementation (PyPI ``fira==1.0.2``) on given gradients.

Shared by ``tests/golden/make_golden.py`` (which writes the golden trajectories) and the
live parity test. Weights and gradients here are in torch's ``(out, in)`` layout.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np

REFERENCE_VERSION = "1.0.2"


@contextlib.contextmanager
def canonical_sign_svd():
  """Applies fira_jax's sign convention to the reference's SVD bases.

  Each basis vector (a row of ``Vh[:r]`` for a right projection, a column of
  ``U[:, :r]`` for a left one) is flipped so that its largest-magnitude entry is
  positive (the first on ties), as ``fira_jax.canonical_signs`` does.
  """
  import torch
  from fira.gradient_projection import GradientProjector

  original = GradientProjector.get_orthogonal_matrix

  def fixed(self, weights, rank, type):
    basis = original(self, weights, rank, type)
    axis = 1 if type == "right" else 0  # the axis along each basis vector
    index = basis.abs().argmax(dim=axis, keepdim=True)
    pivot = torch.gather(basis, axis, index)
    return basis * torch.where(pivot < 0, -1.0, 1.0).to(basis.dtype)

  GradientProjector.get_orthogonal_matrix = fixed
  try:
    yield
  finally:
    GradientProjector.get_orthogonal_matrix = original


def run_reference(
  w0: dict[str, np.ndarray],
  grads: list[dict[str, np.ndarray]],
  *,
  projected: list[str],
  rank: int,
  update_proj_gap: int,
  alpha: float,
  lr: float,
  weight_decay: float = 0.0,
) -> dict[str, np.ndarray]:
  """Returns ``{name: (steps, *shape)}``, the accumulated update ``W_t - W_0`` after each step."""
  import torch
  from fira import FiraAdamW

  params = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float32)) for k, v in w0.items()}
  groups = [
    {"params": [p for k, p in params.items() if k not in projected]},
    {
      "params": [params[k] for k in projected],
      "rank": rank,
      "update_proj_gap": update_proj_gap,
      "alpha": alpha,
      "proj_type": "std",
    },
  ]
  groups = [g for g in groups if g["params"]]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    optimizer = FiraAdamW(groups, lr=lr, weight_decay=weight_decay, no_deprecation_warning=True)
  deltas = {k: [] for k in w0}
  with canonical_sign_svd():
    for step_grads in grads:
      for k, p in params.items():
        p.grad = torch.tensor(step_grads[k], dtype=torch.float32)
      optimizer.step()
      for k, p in params.items():
        deltas[k].append(p.detach().numpy() - w0[k])
  return {k: np.stack(v) for k, v in deltas.items()}


def random_problem(seed: int, shapes: dict[str, tuple[int, ...]], steps: int):
  """Random weights and gradients whose scale jumps now and then (to exercise the limiter)."""
  rng = np.random.default_rng(seed)
  w0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  scales = np.exp(rng.uniform(-1.0, 1.0, size=steps)).astype(np.float32)
  grads = [
    {k: (scales[t] * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    for t in range(steps)
  ]
  return w0, grads
