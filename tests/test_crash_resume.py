"""Faults lose nothing: SIGKILL the pre-training script at random moments, then ``--resume``.

Each kill lands either while orbax is writing a checkpoint (its ``*.orbax-checkpoint-tmp``
folder exists) or at a random moment a little after a checkpoint was committed. After every
kill the workdir's latest checkpoint must be a complete one, and the run resumed to the end
must hold exactly the parameters and optimizer state of a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from checkpoints import flat_arrays
from checkpoints import restored_state

PRETRAIN = pathlib.Path(__file__).resolve().parents[1] / "examples" / "pretrain.py"
STEPS = 16
SEED = int(os.environ.get("FIRA_CRASH_SEED", "20261128"))  # the kill schedule's seed


def launch(workdir: pathlib.Path, corpus: pathlib.Path, resume: bool) -> subprocess.Popen:
  flags = [
    *("--workdir", str(workdir), "--data", str(corpus), "--steps", str(STEPS)),
    *("--checkpoint-every", "1", "--eval-every", "8", "--update-proj-gap", "3"),
    *("--batch-size", "2", "--seq-len", "32", "--eval-batches", "1"),
    *("--no-progress", "--no-plot"),
  ]
  return subprocess.Popen(
    [sys.executable, str(PRETRAIN), *flags, *(["--resume"] if resume else [])],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def committed_steps(workdir: pathlib.Path) -> list[int]:
  folder = workdir / "checkpoints"
  return (
    sorted(int(p.name) for p in folder.glob("*") if p.name.isdigit()) if folder.exists() else []
  )


def partial_checkpoints(workdir: pathlib.Path) -> set[str]:
  return {p.name for p in (workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*")}


def saving_step(workdir: pathlib.Path, stale: frozenset[str] = frozenset()) -> int | None:
  """The step orbax is writing right now, if any (``stale``: left by an earlier kill)."""
  for name in partial_checkpoints(workdir) - stale:
    return int(name.split(".")[0])
  return None


def kill_when(proc: subprocess.Popen, should_kill, timeout: float = 120.0) -> bool:
  """SIGKILLs ``proc`` as soon as ``should_kill()``; False if it finished first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      return False
    if should_kill():
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return True
    time.sleep(0.002)
  proc.kill()
  raise TimeoutError(
    f"the training process neither finished nor reached its kill point:\n{out(proc)}"
  )


def out(proc: subprocess.Popen) -> str:
  return proc.stdout.read() if proc.stdout else ""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus_dir) -> pathlib.Path:
  """The workdir of a run that was never interrupted (read, never written, by the tests)."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  reference = launch(workdir, corpus_dir, resume=False)
  assert reference.wait() == 0, out(reference)
  return workdir


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(
  tmp_path, corpus_dir, uninterrupted
):
  rng = random.Random(SEED)
  full, cut = uninterrupted, tmp_path / "cut"

  kills = []
  proc = launch(cut, corpus_dir, resume=False)
  # Kill 1: during the save of an early step. Kill 2: at a random moment after a later commit.
  # Kill 3: during another save. Then let the last relaunch finish.
  stale = frozenset()
  for kind in ("during save", "random", "during save"):
    before = max(committed_steps(cut), default=0)
    # Leave steps to spare so that the run cannot finish before its kill point; a save missed
    # between two polls moves the kill to the next one rather than failing the test.
    target = min(STEPS - 4, before + rng.randint(1, 4))
    if kind == "during save":
      condition = lambda target=target, stale=stale: (saving_step(cut, stale) or 0) >= target
    else:
      delay = rng.uniform(0.0, 0.5)
      reached = {}

      def condition(target=target, delay=delay, reached=reached):
        if max(committed_steps(cut), default=0) >= target:
          reached.setdefault("at", time.monotonic())
        return "at" in reached and time.monotonic() - reached["at"] >= delay

    if not kill_when(proc, condition):
      pytest.fail(f"the run ended before the {kind} kill at step {target}:\n{out(proc)}")
    kills.append((kind, target, max(committed_steps(cut), default=0), saving_step(cut, stale)))
    stale = frozenset(partial_checkpoints(cut))
    # Whatever was half-written, orbax's latest step is a complete, readable checkpoint, and the
    # relaunch removes the half-written folder (so the next kill cannot see a stale one).
    with ocp.CheckpointManager(cut.resolve() / "checkpoints") as manager:
      latest = manager.latest_step()
    assert latest == max(committed_steps(cut), default=None), kills
    if latest is not None:
      assert flat_arrays(restored_state(cut)), f"checkpoint {latest} is empty"
    proc = launch(cut, corpus_dir, resume=True)
  assert proc.wait() == 0, f"the final resume failed after kills {kills}:\n{out(proc)}"
  assert any(k[0] == "during save" and k[3] is not None for k in kills), (
    f"no kill left a half-written checkpoint behind: {kills}"
  )
  assert not partial_checkpoints(cut), "the resumed run did not remove half-written checkpoints"

  expected, resumed = flat_arrays(restored_state(full)), flat_arrays(restored_state(cut))
  assert len(expected) > 50 and expected.keys() == resumed.keys()
  for key, value in expected.items():
    np.testing.assert_array_equal(value, resumed[key], err_msg=f"{key} after kills {kills}")
  records = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
  logged = [r["step"] for r in records if "loss" in r]
  assert logged == sorted(set(logged)), f"metrics repeat or lose order after kills {kills}"
  assert logged[-1] == STEPS


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
  import train  # examples/train.py

  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
  log = train.MetricsLog(path, resume_step=2)
  log.write({"step": 3, "loss": 1.2})
  assert [r["step"] for r in log.read()] == [1, 2, 3]


def test_checkpoints_hold_only_arrays_and_json_and_load_without_unpickling(
  uninterrupted, monkeypatch
):
  import pickle

  import train

  step_dir = uninterrupted / "checkpoints" / str(STEPS)
  for path in (p for p in step_dir.rglob("*") if p.is_file()):
    relative = path.relative_to(step_dir).parts
    if "d" in relative or path.name.endswith(".ocdbt"):
      continue  # tensorstore's OCDBT array chunks and manifests: raw array bytes
    if path.name == "commit_success.txt":
      continue
    json.loads(path.read_text())  # every other file is plain JSON metadata

  def refuse(*args, **kwargs):
    raise AssertionError("a checkpoint load tried to unpickle")

  for name in ("load", "loads", "Unpickler"):
    monkeypatch.setattr(pickle, name, refuse)
  state = flat_arrays(restored_state(uninterrupted))
  meta = train.read_checkpoint_meta(uninterrupted)
  assert meta["config"]["steps"] == STEPS
  assert any("projector" in k for k in state) and all(v.size for v in state.values())


def test_a_diverged_run_never_overwrites_its_last_finite_checkpoint(tmp_path, corpus_dir):
  import pretrain

  common = [
    *("--workdir", str(tmp_path), "--data", str(corpus_dir), "--steps", "8"),
    *("--optimizer", "adamw", "--warmup", "0", "--checkpoint-every", "1", "--log-every", "100"),
    *("--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--no-progress", "--no-plot"),
  ]
  with pytest.raises(SystemExit, match=r"is intact: --resume with a lower --lr") as diverged:
    pretrain.main([*common, "--lr", "1e12"])
  state = flat_arrays(restored_state(tmp_path))
  assert all(np.isfinite(v).all() for v in state.values()), "a non-finite state was saved"
  with ocp.CheckpointManager(tmp_path.resolve() / "checkpoints") as manager:
    latest = manager.latest_step()
  assert latest < 8 and f"(step {latest}) is intact" in str(diverged.value)
