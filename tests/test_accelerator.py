"""benchmarks/accelerator.py end to end on CPU, on the tiny preset (about a minute)."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "accelerator.py"
PLAIN = [
  "optax.adamw",
  "optax.contrib.galore",
  "fira_jax.galore_adamw (svd)",
  "fira_jax.fira_adamw (svd)",
  "fira_jax.fira_adamw (randomized_svd)",
  "fira_jax.fira_adamw (random)",
  "bound: projection products + AdamW on the unprojected leaves",
]
REFRESH = PLAIN[1:6]
STAGGER = [
  "fira_jax.fira_adamw (svd), all-at-once refresh",
  "fira_jax.fira_adamw (svd), staggered refresh",
]


def positive_finite(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out = tmp_path_factory.mktemp("accelerator")
  cmd = [sys.executable, str(SCRIPT), "--shapes", "tiny", "--repeats", "2"]
  cmd += ["--refresh-repeats", "1", "--output-dir", str(out)]
  proc = subprocess.run(
    cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"}
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  report = json.loads((out / "accelerator.json").read_text())
  return report, out, proc


def test_reports_device_jax_version_and_progress(run):
  report, _, proc = run
  assert report["device"] and report["jax"]
  assert "device:" in proc.stderr and "compiled" in proc.stderr
  assert not report["budget_exceeded"]


def test_every_plain_candidate_has_a_positive_finite_median(run):
  plain = run[0]["shapes"]["tiny"]["plain"]
  assert set(plain) == set(PLAIN)
  for entry in plain.values():
    assert positive_finite(entry["median_s"])
    assert len(entry["times_s"]) == 2


def test_every_refresh_candidate_has_a_positive_finite_median(run):
  refresh = run[0]["shapes"]["tiny"]["refresh"]
  assert set(refresh) == set(REFRESH)
  assert all(positive_finite(e["median_s"]) for e in refresh.values())


def test_paired_ratios_are_finite_and_positive(run):
  res = run[0]["shapes"]["tiny"]
  ratios = {**res["plain_ratios"], **res["refresh_ratios"]}
  assert "fira_jax.fira_adamw (svd) ÷ optax.adamw" in ratios
  assert (
    "fira_jax.fira_adamw (svd) ÷ bound: projection products + AdamW on the unprojected leaves"
    in ratios
  )
  assert all(positive_finite(r) for r in ratios.values())


def test_staggered_slowest_over_median_is_at_least_one(run):
  st = run[0]["shapes"]["tiny"]["staggered"]
  assert st["steps"] == 2 * st["gap"]
  for label in STAGGER:
    assert st[label]["slowest_over_median"] >= 1
    assert positive_finite(st[label]["median_s"])


def test_compile_times_are_positive(run):
  res = run[0]["shapes"]["tiny"]
  assert all(positive_finite(res["compile_s"][n]) for n in PLAIN)
  assert all(positive_finite(res["refresh"][n]["compile_s"]) for n in REFRESH)
  assert all(positive_finite(res["staggered"][n]["compile_s"]) for n in STAGGER)


def test_memory_is_reported_for_every_candidate_next_to_adamw(run):
  memory = run[0]["shapes"]["tiny"]["memory"]
  assert set(memory) == set(PLAIN)
  for entry in memory.values():
    assert entry["bytes"] is None or entry["bytes"] > 0


def test_markdown_file_names_every_candidate(run):
  _, out, proc = run
  text = (out / "accelerator.md").read_text()
  for name in PLAIN + STAGGER:
    assert name in text
  assert text.strip() in proc.stdout
