"""Fira on a device mesh: state shardings, sharded and pmap steps, partitioned refreshes.

The pytest process has already started JAX with one CPU device, so the mesh checks run in
one child process (``python tests/test_sharding.py``) with 8 CPU devices, which prints its
measurements as JSON; the tests below assert on them.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import fira_jax
from fira_jax import FiraDimensionNumbers

# A tiny network with every kind of projected leaf: a kernel whose compressed (input) side is
# FSDP-sharded, a stacked (layers, in, out) kernel, one compressed on its unsharded output
# side (so its low-rank moments are sharded), and a bias.
SHAPES = {"w1": (16, 32), "ws": (2, 32, 32), "w2": (32, 8), "b": (32,)}
SPECS = {"w1": P("fsdp", None), "ws": P(None, "fsdp", None), "w2": P("fsdp", None), "b": P()}
DIMS = {
  "w1": FiraDimensionNumbers(),
  "ws": FiraDimensionNumbers(1, 2),
  "w2": FiraDimensionNumbers(),
  "b": None,
}
RANK = 4
GAP = 2  # refreshes on steps 0 and 2 of the 3 steps
BATCH = 16


def make_tx(
  projection: str, injected: bool = False, staggered: bool = False
) -> optax.GradientTransformation:
  """fira_adamw; ``injected``: its hyperparameters as arrays in the state."""
  factory = fira_jax.fira_adamw
  if injected:
    factory = optax.inject_hyperparams(factory, static_args=("rank", "update_proj_gap"))
  return factory(
    learning_rate=1e-2,
    rank=RANK,
    update_proj_gap=GAP,
    scale=0.25,
    weight_decay=0.1,
    weight_dimension_numbers=DIMS,
    projection=projection,
    staggered_refresh=staggered,
  )


def init_params():
  keys = jax.random.split(jax.random.key(0), len(SHAPES))
  return {
    name: 0.3 * jax.random.normal(k, shape)
    for k, (name, shape) in zip(keys, SHAPES.items(), strict=True)
  }


def batches(steps: int):
  keys = jax.random.split(jax.random.key(1), steps)
  return [
    (jax.random.normal(k, (BATCH, 16)), jax.random.normal(jax.random.fold_in(k, 1), (BATCH, 8)))
    for k in keys
  ]


def loss_fn(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b"])
  for layer in range(SHAPES["ws"][0]):
    h = jnp.tanh(h @ params["ws"][layer])
  return jnp.mean(jnp.square(h @ params["w2"] - y))


def train_step(tx, params, state, batch):
  grads = jax.grad(loss_fn)(params, batch)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


# ---------------------------------------------------------------- tests in the pytest process


def test_projector_and_moments_follow_the_sharded_dimension():
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}
  specs = fira_jax.state_shardings(
    make_tx("svd"), params, SPECS, weight_dimension_numbers=DIMS, rank=RANK
  )
  fira_state = specs[0]
  adam = fira_state.base_optimizer_state
  # w1 (16, 32): input side compressed, sharded like w1's rows; moments (r, 32): w1 does not
  # shard its output side, so they take the fsdp axis there (spread_moments).
  assert fira_state.projector["w1"] == P("fsdp", None)
  assert adam.mu["w1"] == P(None, "fsdp")
  # ws (2, 32, 32): per-layer projectors, sharded like each layer's rows.
  assert fira_state.projector["ws"] == P(None, "fsdp", None)
  assert fira_state.residual_norm["ws"] == P(None)
  # w2 (32, 8): output side compressed (unsharded); the moments (32, r) keep the sharded rows.
  assert fira_state.projector["w2"] == P(None, None)
  assert adam.mu["w2"] == P("fsdp", None) and adam.nu["w2"] == P("fsdp", None)
  # Unprojected leaves are sharded like their parameter; counts are replicated.
  assert adam.mu["b"] == P() and fira_state.count == P()
  assert fira_state.projector["b"] == optax.MaskedNode()


def wrapped_optimizers():
  injected = optax.inject_hyperparams(fira_jax.fira_adamw, static_args=("rank", "update_proj_gap"))
  return {
    "svd": make_tx("svd"),
    "random": make_tx("random"),
    "multi_steps": optax.MultiSteps(make_tx("svd"), every_k_schedule=2).gradient_transformation(),
    "inject_hyperparams": injected(1e-2, rank=RANK, weight_dimension_numbers=DIMS),
    "chain_with_clipping": optax.chain(optax.clip_by_global_norm(1.0), make_tx("svd")),
  }


@pytest.mark.parametrize("name", sorted(wrapped_optimizers()))
def test_state_shardings_tree_matches_the_state_tree(name):
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}
  tx = wrapped_optimizers()[name]
  state = jax.eval_shape(tx.init, params)
  specs = fira_jax.state_shardings(tx, params, SPECS, weight_dimension_numbers=DIMS, rank=RANK)
  is_spec = lambda x: isinstance(x, P)
  assert jax.tree.structure(state) == jax.tree.structure(specs, is_leaf=is_spec)
  for x, spec in zip(jax.tree.leaves(state), jax.tree.leaves(specs, is_leaf=is_spec), strict=True):
    assert len(spec) <= x.ndim
  is_fira = lambda x: isinstance(x, fira_jax.FiraState)
  projectors = [x.projector["w1"] for x in jax.tree.leaves(specs, is_leaf=is_fira) if is_fira(x)]
  assert projectors == [optax.MaskedNode() if name == "random" else P("fsdp", None)]


def test_moments_keep_the_parameters_kept_side_without_spreading():
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}
  strict = fira_jax.state_shardings(
    make_tx("svd"), params, SPECS, weight_dimension_numbers=DIMS, rank=RANK, spread_moments=False
  )
  adam = strict[0].base_optimizer_state
  assert adam.mu["w1"] == P(None, None) and adam.mu["ws"] == P(None, None, None)
  assert adam.mu["w2"] == P("fsdp", None)  # the kept side is the sharded one


def test_flattened_side_is_sharded_like_its_major_axis_only():
  # An attention kernel (embed, heads, head_dim) with output_axis=(1, 2).
  params = {"attn": jax.ShapeDtypeStruct((8, 4, 6), jnp.float32)}
  dims = FiraDimensionNumbers(0, (1, 2))
  tx = fira_jax.scale_by_fira(rank=2, compressed_side="output", weight_dimension_numbers=dims)
  by_heads = fira_jax.state_shardings(
    tx,
    params,
    {"attn": P(None, "tp", None)},
    weight_dimension_numbers=dims,
    rank=2,
    compressed_side="output",
  )
  assert by_heads.projector["attn"] == P("tp", None)
  by_head_dim = fira_jax.state_shardings(
    tx,
    params,
    {"attn": P(None, None, "tp")},
    weight_dimension_numbers=dims,
    rank=2,
    compressed_side="output",
  )
  assert by_head_dim.projector["attn"] == P(None, None)  # not a contiguous tiling: replicated


def test_adamw_state_gets_the_parameter_shardings():
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}
  specs = fira_jax.state_shardings(optax.adamw(1e-3), params, SPECS)
  assert specs[0].mu == SPECS and specs[0].nu == SPECS and specs[0].count == P()


def test_mismatched_rank_is_reported():
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}
  with pytest.raises(ValueError, match="rank=8"):
    fira_jax.state_shardings(make_tx("svd"), params, SPECS, weight_dimension_numbers=DIMS, rank=8)


# ------------------------------------------------------- tests on the child's 8-device mesh


@pytest.fixture(scope="module")
def mesh_results():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, __file__], capture_output=True, text=True, timeout=600, env=env
  )
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
  assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(lines[-1].removeprefix("RESULTS "))


@pytest.mark.parametrize("projection", ["svd", "randomized_svd"])
def test_data_parallel_fsdp_step_matches_the_single_device_step(mesh_results, projection):
  assert mesh_results["devices"] == 8
  # 3 steps with refreshes on steps 0 and 2, stacked and plain kernels, weight decay.
  assert mesh_results[f"{projection}/params_error"] < 1e-5
  assert mesh_results[f"{projection}/state_error"] < 1e-4


def test_pmap_step_matches_the_single_device_step(mesh_results):
  assert mesh_results["pmap/replicas_agree"]
  assert mesh_results["pmap/params_error"] < 1e-5


def test_projectors_are_split_along_the_fsdp_sharded_side(mesh_results):
  # Global projectors: w1 (16, 4), ws (2, 32, 4), w2 (8, 4); fsdp = 4.
  shards = mesh_results["svd/projector_shards"]
  assert shards == {"w1": [4, 4], "ws": [2, 8, 4], "w2": [8, 4]}


def test_one_device_holds_about_a_quarter_of_the_state(mesh_results):
  # fsdp = 4: a fully split state gives 0.25 per device, a replicated one 1.0; the small
  # replicated pieces (w2's projector, the bias's moments, counts) add a little.
  for projection in ("svd", "randomized_svd"):
    assert mesh_results[f"{projection}/state_fraction_on_device_0"] < 0.35


def test_randomized_refresh_never_gathers_a_full_gradient(mesh_results):
  # The (64, 96) gradient is sharded (16, 96) per device; the range finder may gather
  # tall-skinny (64, rank + oversampling) blocks (for Householder QRs), nothing larger. The
  # parser is checked by the exact SVD's gather below.
  gathers = mesh_results["gathers/randomized_svd"]
  assert all(np.prod(shape) < 64 * 96 // 2 for shape in gathers), gathers


def test_layer_sharded_refresh_gathers_the_whole_stack_for_the_exact_svd_only(mesh_results):
  # What the README says: the per-layer SVD loop is not partitioned over a sharded layer
  # axis, so every device gets every layer; the randomized basis gathers small Grams only.
  assert [4, 64, 96] in mesh_results["gathers/layer_sharded/svd"]
  gathers = mesh_results["gathers/layer_sharded/randomized_svd"]
  assert all(np.prod(shape) < 64 * 96 for shape in gathers), gathers


def test_exact_svd_refresh_gathers_the_full_gradient(mesh_results):
  # What the README says: LAPACK's SVD needs the whole matrix on each device (here its
  # transpose: the SVD runs on the tall orientation).
  gathers = mesh_results["gathers/svd"]
  assert [64, 96] in gathers or [96, 64] in gathers, gathers


def recorded(mesh_results, prefix: str) -> dict:
  """The values the child process recorded under ``prefix/`` (see ``record``), by name."""
  return {
    k.removeprefix(f"{prefix}/"): v for k, v in mesh_results.items() if k.startswith(f"{prefix}/")
  }


@pytest.mark.parametrize("projection", ["svd", "randomized_svd"])
@pytest.mark.parametrize("staggered", [False, True])
def test_stacked_leaf_sharded_on_its_layer_axis_matches_the_single_device_step(
  mesh_results, projection, staggered
):
  # (4, 32, 32) with the layer axis over fsdp = 4: each device holds one layer's projector.
  results = recorded(mesh_results, f"layer_sharded/{projection},{staggered}")
  assert "error" not in results, results["error"]
  assert results["params_error"] < 1e-5
  assert results["projector_shard"] == [1, 32, RANK]


EXPLICIT_CASES = (
  "svd,plain",
  "randomized_svd,plain",
  "random,plain",
  "svd,injected",
  "svd,staggered",
  "randomized_svd,shard_map",
)


@pytest.mark.parametrize("case", EXPLICIT_CASES)
def test_explicit_axes_mesh_step_matches_the_single_device_step(mesh_results, case):
  # jax.make_mesh's default axis type: the exact SVD and products contracting a sharded axis
  # would raise ShardingTypeErrors without auto_axes; outputs keep their input's shardings.
  # "injected": hyperparameters are arrays typed on the explicit mesh.
  results = recorded(mesh_results, f"explicit/{case}")
  assert "error" not in results, results["error"]
  assert results["params_error"] < 1e-5
  assert results["params_keep_their_specs"]
  assert results["state_keeps_its_specs"]


PRETRAIN = pathlib.Path(__file__).resolve().parents[1] / "examples" / "pretrain.py"


PRETRAIN_FLAGS = (
  *("--steps", "4", "--log-every", "1", "--eval-every", "4", "--checkpoint-every", "2"),
  *("--batch-size", "8", "--seq-len", "16", "--eval-batches", "1", "--update-proj-gap", "2"),
  *("--no-progress", "--no-plot"),
)


def pretrain(workdir, corpus, *flags):
  args = [sys.executable, str(PRETRAIN), "--workdir", str(workdir), "--data", str(corpus)]
  args += [*PRETRAIN_FLAGS, *flags]
  proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_mesh_flag_is_checked_before_training():
  sys.path.insert(0, str(PRETRAIN.parent))
  import mesh as mesh_lib
  import train

  assert mesh_lib.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
  for bad in ("data=2,tp=4", "data=0", "fsdp", "data=2,data=2"):
    (problem,) = train.check_config(train.Config(mesh=bad))
    assert "--mesh" in problem
  (problem,) = train.check_config(train.Config(mesh="data=3", batch_size=16))
  assert "--batch-size 16" in problem


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  """A small text corpus: the first 30 standard-library modules."""
  root = tmp_path_factory.mktemp("corpus")
  for i, source in enumerate(sorted(pathlib.Path(os.__file__).parent.glob("*.py"))[:30]):
    (root / f"doc{i:02d}.txt").write_text(source.read_text()[:20000])
  return root


@pytest.mark.slow  # three trainer processes: about 40 s on 2 cores
def test_pretrain_on_a_mesh_resumes_sharded_and_matches_one_device(tmp_path, corpus_dir):
  # Stacked (scanned) layers, refreshes on steps 0 and 2, a checkpoint at step 2.
  single = pretrain(tmp_path / "single", corpus_dir, "--scan-layers")
  mesh = ("--mesh", "data=2,fsdp=4", "--scan-layers")
  pretrain(tmp_path / "mesh", corpus_dir, *mesh, "--stop-after", "2")  # saves step 2
  resumed = pretrain(tmp_path / "mesh", corpus_dir, *mesh, "--resume")  # restores sharded
  assert sorted(resumed) == [1, 2, 3, 4]
  # Float32 sums in another order over 8 devices: the losses drift apart by ~1e-4.
  drift = {s: abs(resumed[s] - single[s]) / single[s] for s in resumed}
  assert max(drift.values()) < 1e-3, drift
  assert resumed[4] != resumed[1]  # it trained


# ------------------------------------------------------------ the 8-device child process

MESH_SHAPE = {"data": 2, "fsdp": 4}
BATCH_SPEC = P(("data", "fsdp"))  # data parallel over the whole mesh, FSDP over "fsdp"


def single_device_run(projection: str, steps: int):
  tx = make_tx(projection)
  params = init_params()
  state = tx.init(params)
  step = jax.jit(functools.partial(train_step, tx))
  for batch in batches(steps):
    params, state = step(params, state, batch)
  return params, state


def run_on_mesh(tx, params, param_sh, dims, step, inputs, input_sh):
  """``step(params, state, x)`` for each ``x``, with the state sharded by ``state_shardings``.

  Returns the final parameters, the final state and the state's shardings.
  """
  state_sh = fira_jax.state_shardings(
    tx, params, param_sh, weight_dimension_numbers=dims, rank=RANK
  )
  params = jax.device_put(params, param_sh)
  state = jax.jit(tx.init, out_shardings=state_sh)(params)
  step = jax.jit(
    step,
    in_shardings=(param_sh, state_sh, input_sh),
    out_shardings=(param_sh, state_sh),
  )
  for x in inputs:
    params, state = step(params, state, jax.device_put(x, input_sh))
  return params, state, state_sh


def sharded_run(mesh, projection: str, steps: int):
  from jax.sharding import NamedSharding

  tx = make_tx(projection)
  shard = lambda spec: NamedSharding(mesh, spec)
  param_sh = jax.tree.map(shard, SPECS)
  batch_sh = (shard(BATCH_SPEC), shard(BATCH_SPEC))
  step = functools.partial(train_step, tx)
  return run_on_mesh(tx, init_params(), param_sh, DIMS, step, batches(steps), batch_sh)


def optimizer_step(tx):
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  return step


def updated_on_one_device(tx, params, grads):
  """The parameters after ``tx``'s updates with ``grads``, one after the other, unsharded."""
  step, state = jax.jit(optimizer_step(tx)), tx.init(params)
  for g in grads:
    params, state = step(params, state, g)
  return params


def layer_sharded_run(mesh, projection: str, staggered: bool, steps: int):
  """A stacked ``(layers, in, out)`` leaf FSDP-sharded on its layer axis, on an Auto mesh."""
  from jax.sharding import NamedSharding

  dims = {"ws": FiraDimensionNumbers(1, 2)}
  tx = fira_jax.fira_adamw(
    1e-2,
    rank=RANK,
    update_proj_gap=GAP,
    weight_dimension_numbers=dims,
    projection=projection,
    staggered_refresh=staggered,
  )
  shape = (MESH_SHAPE["fsdp"], 32, 32)
  params = {"ws": 0.3 * jax.random.normal(jax.random.key(0), shape)}
  grads = [{"ws": jax.random.normal(jax.random.key(i + 1), shape)} for i in range(steps)]
  reference = updated_on_one_device(tx, params, grads)
  param_sh = {"ws": NamedSharding(mesh, P("fsdp", None, None))}
  params, state, _ = run_on_mesh(tx, params, param_sh, dims, optimizer_step(tx), grads, param_sh)
  return {
    "params_error": relative_error(params, reference),
    "projector_shard": list(state[0].projector["ws"].addressable_shards[0].data.shape),
  }


def explicit_mesh_run(projection: str, steps: int, variant: str):
  """The optimizer alone on an Explicit-axes mesh, against the same updates on one device.

  The gradients are fixed trees sharded like the parameters: the model's own products
  would need explicit output shardings of their own, which is not Fira's business.
  ``variant``: "plain"; "injected" (hyperparameters are arrays in the state, from
  ``optax.inject_hyperparams``); "staggered"; or "shard_map" (the step inside a
  ``shard_map`` that makes the data axis Manual, the fsdp axis staying Explicit).
  """
  from jax.sharding import NamedSharding

  tx = make_tx(projection, injected=variant == "injected", staggered=variant == "staggered")
  grads = [jax.grad(loss_fn)(init_params(), batch) for batch in batches(steps)]
  step = optimizer_step(tx)
  if variant == "shard_map":
    step = jax.shard_map(step, in_specs=(P(), P(), P()), out_specs=(P(), P()), axis_names={"data"})
  step = jax.jit(step)
  reference = updated_on_one_device(tx, init_params(), grads)
  explicit = (jax.sharding.AxisType.Explicit,) * len(MESH_SHAPE)
  mesh = jax.make_mesh(tuple(MESH_SHAPE.values()), tuple(MESH_SHAPE), axis_types=explicit)
  with jax.set_mesh(mesh):
    param_sh = jax.tree.map(lambda spec: NamedSharding(mesh, spec), SPECS)
    params = jax.device_put(init_params(), param_sh)
    state_sh = fira_jax.state_shardings(
      tx, params, param_sh, weight_dimension_numbers=DIMS, rank=RANK
    )
    state = jax.jit(tx.init, out_shardings=state_sh)(params)
    for g in grads:
      params, state = step(params, state, jax.device_put(g, param_sh))

  def same_specs(arrays, shardings):
    padded = lambda spec, ndim: tuple(spec) + (None,) * (ndim - len(spec))
    return all(
      padded(jax.typeof(x).sharding.spec, x.ndim) == padded(s.spec, x.ndim)
      for x, s in zip(jax.tree.leaves(arrays), jax.tree.leaves(shardings), strict=True)
    )

  return {
    "params_error": relative_error(params, reference),
    "params_keep_their_specs": same_specs(params, param_sh),
    "state_keeps_its_specs": same_specs(state, state_sh),
  }


def relative_error(a, b) -> float:
  errors = [
    float(np.linalg.norm(np.asarray(x) - np.asarray(y)) / (np.linalg.norm(np.asarray(y)) + 1e-12))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  ]
  return max(errors)


def per_device_fraction(tree) -> float:
  """Bytes of ``tree`` on device 0 over its total bytes."""
  leaves = [x for x in jax.tree.leaves(tree) if x.size]
  local = sum(x.addressable_shards[0].data.nbytes for x in leaves)
  return local / sum(x.nbytes for x in leaves)


def pmap_run(projection: str, steps: int):
  tx = make_tx(projection)
  n = jax.local_device_count()

  def step(params, state, batch):
    grads = jax.lax.pmean(jax.grad(loss_fn)(params, batch), "batch")
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.pmap(step, axis_name="batch")
  params = init_params()
  replicate = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree)
  params, state = replicate(params), replicate(tx.init(params))
  for x, y in batches(steps):
    split = lambda a: a.reshape((n, -1) + a.shape[1:])
    params, state = step(params, state, (split(x), split(y)))
  replicas_agree = all(bool(jnp.all(x == x[:1])) for x in jax.tree.leaves(params))
  return jax.tree.map(lambda x: x[0], params), replicas_agree


def all_gathers(hlo: str) -> list[tuple[int, ...]]:
  """Result shapes of the all-gathers in a compiled (partitioned) HLO module."""
  shapes = []
  for line in hlo.splitlines():
    match = re.search(r"= \w+\[([\d,]*)\][^=]*? all-gather(?:-start)?\(", line)
    if match:
      shapes.append(tuple(int(d) for d in match.group(1).split(",") if d))
  return shapes


def refresh_gathers(mesh, projection: str, shape=(64, 96), spec=None, dims=None):
  """All-gathers in a compiled refresh step of one FSDP-sharded gradient (default (in, out))."""
  from jax.sharding import NamedSharding

  spec = P("fsdp", None) if spec is None else spec
  dims = None if dims is None else {"w": dims}
  tx = fira_jax.scale_by_fira(
    rank=8, update_proj_gap=1, projection=projection, weight_dimension_numbers=dims
  )
  param_sh = {"w": NamedSharding(mesh, spec)}
  params = {"w": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=param_sh["w"])}
  state_sh = fira_jax.state_shardings(tx, params, param_sh, weight_dimension_numbers=dims, rank=8)
  state = jax.eval_shape(tx.init, params)
  update = jax.jit(lambda g, s: tx.update(g, s), in_shardings=(param_sh, state_sh))
  hlo = update.lower(params, state).compile().as_text()
  return all_gathers(hlo)


def child_main():
  jax.config.update("jax_num_cpu_devices", 8)
  assert jax.device_count() == 8, jax.devices()
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_SHAPE)
  mesh = jax.make_mesh(tuple(MESH_SHAPE.values()), tuple(MESH_SHAPE), axis_types=auto)
  steps = 3
  results = {"devices": jax.device_count()}
  for projection in ("svd", "randomized_svd"):
    reference, reference_state = single_device_run(projection, steps)
    params, state, _ = sharded_run(mesh, projection, steps)
    results[f"{projection}/params_error"] = relative_error(params, reference)
    results[f"{projection}/state_error"] = relative_error(
      state[0].base_optimizer_state, reference_state[0].base_optimizer_state
    )
    results[f"{projection}/state_fraction_on_device_0"] = per_device_fraction(state)
    results[f"{projection}/projector_shards"] = {
      k: list(v.addressable_shards[0].data.shape)
      for k, v in state[0].projector.items()
      if not isinstance(v, optax.MaskedNode)
    }
    if projection == "svd":
      pmapped, agree = pmap_run(projection, steps)
      results["pmap/params_error"] = relative_error(pmapped, reference)
      results["pmap/replicas_agree"] = agree
  for projection in ("svd", "randomized_svd"):
    results[f"gathers/{projection}"] = refresh_gathers(mesh, projection)
    results[f"gathers/layer_sharded/{projection}"] = refresh_gathers(
      mesh,
      projection,
      (MESH_SHAPE["fsdp"], 64, 96),
      P("fsdp", None, None),
      FiraDimensionNumbers(1, 2),
    )

  def record(prefix, run, *args):
    try:  # a failure here fails only the tests that read this prefix
      values = run(*args)
    except Exception as e:
      values = {"error": f"{type(e).__name__}: {e}"[:1000]}
    for key, value in values.items():
      results[f"{prefix}/{key}"] = value

  for projection in ("svd", "randomized_svd"):
    for staggered in (False, True):
      prefix = f"layer_sharded/{projection},{staggered}"
      record(prefix, layer_sharded_run, mesh, projection, staggered, steps)
  for case in EXPLICIT_CASES:
    projection, variant = case.split(",")
    record(f"explicit/{case}", explicit_mesh_run, projection, steps, variant)
  print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
  child_main()
