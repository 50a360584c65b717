"""Reading what a run of the examples' trainer saved (test_examples, test_crash_resume)."""

from __future__ import annotations

import pathlib
import re

import jax
import numpy as np
import orbax.checkpoint as ocp


def restored_state(workdir: pathlib.Path) -> dict:
  """The latest checkpoint's {"model": ..., "optimizer": ...}, as saved (no target needed)."""
  with ocp.CheckpointManager(workdir.resolve() / "checkpoints") as manager:
    args = ocp.args.Composite(state=ocp.args.StandardRestore())
    return manager.restore(manager.latest_step(), args=args)["state"]


def flat_arrays(tree) -> dict[str, np.ndarray]:
  """{key path: array}, with nnx's `.value` and list indices written alike in both forms."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = jax.tree_util.keystr(path).replace("['value']", "").replace(".value", "")
    flat[re.sub(r"\[(\d+)\]", r"['\1']", key)] = np.asarray(leaf)
  return flat
