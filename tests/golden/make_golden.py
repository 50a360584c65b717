"""Writes the golden trajectories of the reference FiraAdamW that test_parity.py replays.

    pip install -e '.[test,parity]'
    python tests/golden/make_golden.py

Each case: random weights and gradients (torch (out, in) layout), the reference's
hyperparameters, and the accumulated update W_t - W_0 after every step, computed by
``fira==1.0.2`` with fira_jax's sign convention applied to its SVD bases.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import reference_fira

# name -> (shapes, projected names, hyperparameters, steps, seed)
CASES = {
  # tall, wide and square matrices plus 1-D leaves; gap 3 over 8 steps: refreshes at 0, 3, 6.
  "mixed_alpha0.25": (
    {"tall": (24, 10), "wide": (8, 20), "square": (12, 12), "bias": (12,), "norm": (10,)},
    ["tall", "wide", "square"],
    dict(rank=4, update_proj_gap=3, alpha=0.25, lr=1e-2),
    8,
    0,
  ),
  # rank at or above the smaller dimension; alpha 1.0.
  "full_rank_alpha1": (
    {"tall": (16, 6), "wide": (5, 12), "square": (6, 6), "bias": (6,)},
    ["tall", "wide", "square"],
    dict(rank=8, update_proj_gap=4, alpha=1.0, lr=3e-3),
    9,
    1,
  ),
  # decoupled weight decay applied after the update, as the reference does.
  "weight_decay": (
    {"tall": (20, 7), "wide": (6, 15), "bias": (7,)},
    ["tall", "wide"],
    dict(rank=3, update_proj_gap=3, alpha=0.25, lr=2e-2, weight_decay=0.1),
    7,
    2,
  ),
}


def main() -> None:
  out = {}
  for case, (shapes, projected, hparams, steps, seed) in CASES.items():
    w0, grads = reference_fira.random_problem(seed, shapes, steps)
    deltas = reference_fira.run_reference(w0, grads, projected=projected, **hparams)
    config = dict(hparams, projected=projected, steps=steps, seed=seed)
    out[f"{case}/config"] = np.array(json.dumps(config))
    for k in shapes:
      out[f"{case}/w0/{k}"] = w0[k]
      out[f"{case}/grads/{k}"] = np.stack([g[k] for g in grads])
      out[f"{case}/delta/{k}"] = deltas[k]
  out["reference_version"] = np.array(reference_fira.REFERENCE_VERSION)
  path = pathlib.Path(__file__).with_name("reference_fira.npz")
  np.savez_compressed(path, **out)
  print(f"wrote {path} ({path.stat().st_size} bytes, {len(CASES)} cases)")


if __name__ == "__main__":
  main()
