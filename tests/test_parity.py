"""fira_adamw reproduces the reference FiraAdamW (PyPI fira==1.0.2) step for step."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference_fira  # tests/reference_fira.py

import fira_jax

GOLDEN = pathlib.Path(__file__).with_name("golden") / "reference_fira.npz"
TOLERANCE = 1e-3  # relative Frobenius error of W_t - W_0; a faithful port reaches ~1e-5
TORCH_LAYOUT = fira_jax.FiraDimensionNumbers(reduction_axis=1, output_axis=0)


def load_cases():
  data = np.load(GOLDEN)
  cases = {}
  for key in data.files:
    if key.endswith("/config"):
      name = key.split("/")[0]
      config = json.loads(str(data[key]))
      fields = {
        part: {k.split("/")[-1]: data[k] for k in data.files if k.startswith(f"{name}/{part}/")}
        for part in ("w0", "grads", "delta")
      }
      cases[name] = (config, fields)
  return cases


def chained_fira_adamw(learning_rate, weight_decay, **kwargs):
  """fira_adamw with Algorithm 1's chain of pieces in place of the fused step."""
  return optax.chain(
    fira_jax.fira_chain(**kwargs),
    optax.scale_by_learning_rate(learning_rate),
    fira_jax.add_decayed_weights_after_step(learning_rate, weight_decay),
  )


IMPLEMENTATIONS = {"fused": fira_jax.fira_adamw, "chain": chained_fira_adamw}


def run_fira_jax(
  w0,
  grads,
  *,
  projected,
  rank,
  update_proj_gap,
  alpha,
  lr,
  layout,
  weight_decay=0.0,
  implementation="fused",
):
  """fira_adamw on the same problem; returns W_t - W_0 per step in torch (out, in) layout."""
  flax_layout = layout == "in_out"
  to_jax = lambda k, x: jnp.asarray(x.T if flax_layout and x.ndim == 2 else x)
  from_jax = lambda x: np.asarray(x.T if flax_layout and x.ndim == 2 else x)
  spec = fira_jax.FiraDimensionNumbers() if flax_layout else TORCH_LAYOUT
  tx = IMPLEMENTATIONS[implementation](
    lr,
    rank=rank,
    update_proj_gap=update_proj_gap,
    scale=alpha,
    weight_decay=weight_decay,
    weight_dimension_numbers={k: spec if k in projected else None for k in w0},
  )
  params = {k: to_jax(k, v) for k, v in w0.items()}
  state = tx.init(params)
  update = jax.jit(tx.update)
  deltas = {k: [] for k in w0}
  for step_grads in grads:
    g = {k: to_jax(k, v) for k, v in step_grads.items()}
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    for k in w0:
      deltas[k].append(from_jax(params[k]) - w0[k])
  return {k: np.stack(v) for k, v in deltas.items()}


def assert_trajectories_match(ours, reference):
  for name, ref in reference.items():
    for step, (a, b) in enumerate(zip(ours[name], ref, strict=True)):
      error = np.linalg.norm(a - b) / np.linalg.norm(b)
      assert error < TOLERANCE, f"{name} step {step}: relative error {error:.2e}"


CASES = load_cases()


def test_golden_file_covers_the_required_cases():
  shapes_seen = set()
  for config, fields in CASES.values():
    for k in config["projected"]:
      out, inp = fields["w0"][k].shape
      shapes_seen.add("tall" if out > inp else "wide" if out < inp else "square")
      if config["rank"] >= min(out, inp):
        shapes_seen.add("rank>=min")
    assert config["steps"] > 2 * config["update_proj_gap"], "need two refreshes after the first"
    assert any(v.ndim == 1 for v in fields["w0"].values()), "mixed trees need 1-D leaves"
  assert {"tall", "wide", "square", "rank>=min"} <= shapes_seen
  assert {c["alpha"] for c, _ in CASES.values()} >= {0.25, 1.0}


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fira_adamw_matches_reference_golden_trajectory(case, layout, implementation):
  config, fields = CASES[case]
  grads = [{k: v[t] for k, v in fields["grads"].items()} for t in range(config["steps"])]
  ours = run_fira_jax(
    fields["w0"],
    grads,
    projected=config["projected"],
    rank=config["rank"],
    update_proj_gap=config["update_proj_gap"],
    alpha=config["alpha"],
    lr=config["lr"],
    weight_decay=config.get("weight_decay", 0.0),
    layout=layout,
    implementation=implementation,
  )
  assert_trajectories_match(ours, fields["delta"])


def test_golden_trajectory_differs_from_a_plain_adamw_run():
  # Guards the parity test itself: a wrong optimizer must fail the tolerance.
  config, fields = CASES["mixed_alpha0.25"]
  grads = [{k: v[t] for k, v in fields["grads"].items()} for t in range(config["steps"])]
  ours = run_fira_jax(
    fields["w0"],
    grads,
    projected=[],
    rank=config["rank"],
    update_proj_gap=config["update_proj_gap"],
    alpha=config["alpha"],
    lr=config["lr"],
    layout="in_out",
  )
  with pytest.raises(AssertionError, match="relative error"):
    assert_trajectories_match(ours, fields["delta"])


LIVE_CASES = {
  # shapes and settings that the golden file does not hold
  "odd_shapes_gap2": (
    {"a": (33, 17), "b": (9, 31), "c": (16, 16), "d": (3, 40), "e": (7,)},
    dict(rank=5, update_proj_gap=2, alpha=0.5, lr=5e-3),
    7,
  ),
  "rank1_alpha0.0625": (
    {"a": (10, 4), "b": (4, 10), "e": (4,)},
    dict(rank=1, update_proj_gap=3, alpha=0.0625, lr=1e-2, weight_decay=0.05),
    8,
  ),
}


@pytest.mark.parity
@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("case", sorted(LIVE_CASES))
def test_fira_adamw_matches_live_reference(case, implementation):
  pytest.importorskip("torch")
  pytest.importorskip("fira")
  shapes, hparams, steps = LIVE_CASES[case]
  w0, grads = reference_fira.random_problem(7, shapes, steps)
  projected = [k for k, s in shapes.items() if len(s) == 2]
  reference = reference_fira.run_reference(w0, grads, projected=projected, **hparams)
  for layout in ("in_out", "out_in"):
    ours = run_fira_jax(
      w0, grads, projected=projected, layout=layout, implementation=implementation, **hparams
    )
    assert_trajectories_match(ours, reference)


@pytest.mark.parity
@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_limiter_norm_of_a_vanishing_residual_matches_live_reference(implementation):
  # α = 1 and a step-0 gradient inside the rank-1 subspace: ‖S₀‖ is pure rounding, and the
  # limiter then governs hundreds of steps by it, so it must be computed as the reference does.
  pytest.importorskip("torch")
  pytest.importorskip("fira")
  shapes = {"w": (8, 6)}
  w0, grads = reference_fira.random_problem(3, shapes, 300)
  grads[0] = {"w": np.ones((8, 6), np.float32)}
  hparams = dict(rank=1, update_proj_gap=200, alpha=1.0, lr=1e-3)
  reference = reference_fira.run_reference(w0, grads, projected=["w"], **hparams)
  for layout in ("in_out", "out_in"):
    ours = run_fira_jax(
      w0, grads, projected=["w"], layout=layout, implementation=implementation, **hparams
    )
    assert_trajectories_match(ours, reference)
