"""Fira across processes: 2 JAX processes on localhost (CPU collectives) vs one process.

Each worker (``python tests/test_multiprocess.py worker PORT ID OUT``) joins a
``jax.distributed`` cluster of 2 processes with 4 CPU devices each, builds the global
``data=2 x fsdp=4`` mesh over all 8 devices, and trains, from the same
initialization and batches, for 3 steps (two projector refreshes): the tiny network of
``tests/mesh_cases.py`` with ``jax.jit`` shardings, then a tiny stacked-layer LLaMA of the
examples through ``nnx.Optimizer`` and ``examples/mesh.py``. Process 0 writes the gathered
parameters.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import socket
import subprocess
import sys

import mesh_cases
import numpy as np
import pytest

PROCESSES = 2
STEPS = 3
EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def worker_env() -> dict[str, str]:
  """A worker runs this file as a script: its folder (tests/) is on its path; add examples/."""
  paths = [str(EXAMPLES), *filter(None, [os.environ.get("PYTHONPATH")])]
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(paths))


def test_two_processes_train_like_one(tmp_path):
  port = free_port()
  out = tmp_path / "params.npz"
  env = worker_env()
  workers = [
    subprocess.Popen(
      [sys.executable, __file__, "worker", str(port), str(i), str(out)],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=env,
    )
    for i in range(PROCESSES)
  ]
  logs = []
  try:
    for w in workers:
      logs.append(w.communicate(timeout=240)[0])
  finally:
    for w in workers:
      if w.poll() is None:
        w.kill()
  assert all(w.returncode == 0 for w in workers), "\n".join(log[-3000:] for log in logs)
  assert "processes 2, devices 8, local 4" in logs[0], logs[0][-2000:]
  gathered = dict(np.load(out))
  reference, _ = mesh_cases.single_device_run("svd", STEPS)
  for name, value in reference.items():
    np.testing.assert_allclose(gathered[f"mlp/{name}"], np.asarray(value), rtol=1e-5, atol=1e-6)
  # The run moved the parameters: the comparison is not between two initializations.
  assert not np.allclose(gathered["mlp/w1"], np.asarray(mesh_cases.init_params()["w1"]))
  # The examples' LLaMA (stacked layers) through the trainer's nnx path and examples/mesh.py.
  llama = {k.removeprefix("llama/"): v for k, v in gathered.items() if k.startswith("llama/")}
  expected = llama_run(None)
  assert sorted(llama) == sorted(expected) and len(llama) > 5
  errors = {k: np.linalg.norm(llama[k] - v) / np.linalg.norm(v) for k, v in expected.items()}
  assert max(errors.values()) < 1e-4, errors
  start = llama_run(None, steps=0)
  assert min(np.linalg.norm(llama[k] - v) for k, v in start.items() if v.ndim == 3) > 0


@pytest.mark.slow  # three trainer processes: about 90 s on 2 cores
def test_pretrain_across_two_processes_matches_one_process(tmp_path, corpus_dir):
  single = mesh_cases.pretrain(tmp_path / "single", corpus_dir, "--scan-layers")
  workdir = tmp_path / "two"
  flags = [*mesh_cases.PRETRAIN_FLAGS, "--workdir", str(workdir), "--data", str(corpus_dir)]
  flags += ["--scan-layers", "--mesh", "data=2,fsdp=4", "--num-processes", str(PROCESSES)]
  flags += ["--coordinator", f"localhost:{free_port()}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [
    subprocess.Popen(
      [sys.executable, str(mesh_cases.PRETRAIN), *flags, "--process-id", str(i)],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=env,
    )
    for i in range(PROCESSES)
  ]
  try:
    logs = [p.communicate(timeout=400)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  two = {r["step"]: r["loss"] for r in records if "loss" in r}
  assert sorted(two) == sorted(single) == [1, 2, 3, 4]
  drift = {s: abs(two[s] - single[s]) / single[s] for s in two}
  assert max(drift.values()) < 1e-3, drift
  assert (workdir / "checkpoints" / "4").is_dir()  # both processes wrote the final checkpoint


def llama_run(mesh, steps: int = STEPS) -> dict[str, np.ndarray]:
  """A tiny stacked-layer LLaMA trained with Fira as examples/train.py does (nnx.Optimizer,
  nnx.jit, examples/mesh.py placement when ``mesh`` is given); returns its gathered params."""
  import jax
  import mesh as mesh_lib  # examples/
  import model as model_lib
  import optim
  import train
  from flax import nnx
  from jax.experimental import multihost_utils

  config = train.Config(scan_layers=True, update_proj_gap=2, steps=STEPS, rank=8, lr=0.01)
  model_config = model_lib.make_config(
    "tiny", vocab_size=64, max_seq_len=16, layers=2, hidden=32, ffn=64, scan_layers=True
  )
  model = model_lib.Llama(model_config, nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optim.build_optimizer(config, model_config), wrt=nnx.Param)
  placement = None
  if mesh is not None:
    placement = mesh_lib.Placement(mesh, model, optimizer, config, model_config)
    placement.place(model, optimizer)

  @nnx.jit
  def step(model, optimizer, batch):
    grads = nnx.grad(model_lib.next_token_loss)(model, batch)
    optimizer.update(model, grads)
    if placement is not None:
      placement.constrain(model, optimizer)

  tokens = np.random.default_rng(0).integers(0, 64, (steps, 8, 17), dtype=np.int32)
  for batch in tokens:
    if mesh is not None:
      sharding = mesh_lib.batch_sharding(mesh)
      batch = jax.make_array_from_callback(batch.shape, sharding, lambda i, b=batch: b[i])
    step(model, optimizer, batch)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  named = {jax.tree_util.keystr(path): value for path, value in flat}
  if mesh is not None:
    named = multihost_utils.process_allgather(named, tiled=True)
  return {k: np.asarray(v) for k, v in named.items()}


def worker(port: int, process_id: int, out: str) -> None:
  import jax
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding

  import fira_jax

  jax.config.update("jax_num_cpu_devices", 4)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", PROCESSES, process_id)
  print(
    f"processes {jax.process_count()}, devices {jax.device_count()},"
    f" local {jax.local_device_count()}",
    flush=True,
  )
  auto = (jax.sharding.AxisType.Auto,) * 2
  mesh_shape = mesh_cases.MESH_SHAPE
  mesh = jax.make_mesh(tuple(mesh_shape.values()), tuple(mesh_shape), axis_types=auto)
  shard = lambda spec: NamedSharding(mesh, spec)

  def global_array(x, sharding):
    # Every process holds the full value (same seed); each contributes its own shards,
    # as a data loader would contribute its part of the batch.
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  tx = mesh_cases.make_tx("svd")
  param_sh = jax.tree.map(shard, mesh_cases.SPECS)
  params = jax.tree.map(global_array, mesh_cases.init_params(), param_sh)
  state_sh = fira_jax.state_shardings(tx, params, param_sh)
  state = jax.jit(tx.init, out_shardings=state_sh)(params)
  batch_sh = (shard(mesh_cases.BATCH_SPEC),) * 2
  step = jax.jit(
    functools.partial(mesh_cases.train_step, tx),
    in_shardings=(param_sh, state_sh, batch_sh),
    out_shardings=(param_sh, state_sh),
  )
  for batch in mesh_cases.batches(STEPS):
    params, state = step(params, state, jax.tree.map(global_array, batch, batch_sh))
  gathered = multihost_utils.process_allgather(params, tiled=True)
  results = {f"mlp/{k}": np.asarray(v) for k, v in gathered.items()}
  results.update({f"llama/{k}": v for k, v in llama_run(mesh).items()})
  if jax.process_index() == 0:
    np.savez(out, **results)
  jax.distributed.shutdown()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
  worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
