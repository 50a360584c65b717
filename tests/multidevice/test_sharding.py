"""Fira on a device mesh: state shardings, sharded and pmap steps, partitioned refreshes.

This module runs in a pytest process of its own with 8 CPU devices (see ``conftest.py``
here): ``python -m pytest -q tests/multidevice``. The tiny network and its single-device
run are in ``tests/mesh_cases.py``, shared with ``tests/test_multiprocess.py``.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import mesh_cases
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from mesh_cases import BATCH_SPEC
from mesh_cases import DIMS
from mesh_cases import GAP
from mesh_cases import MESH_SHAPE
from mesh_cases import RANK
from mesh_cases import SHAPES
from mesh_cases import SPECS
from mesh_cases import make_tx
from mesh_cases import pretrain

import fira_jax
from fira_jax import FiraDimensionNumbers
from fira_jax import state_shardings

STEPS = 3  # refreshes on steps 0 and 2 (GAP = 2)


def abstract_params():
  return {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}


# ------------------------------------------------ state shardings (no devices involved)


def test_projector_and_moments_follow_the_sharded_dimension():
  specs = state_shardings(make_tx("svd"), abstract_params(), SPECS)
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
  params = abstract_params()
  tx = wrapped_optimizers()[name]
  state = jax.eval_shape(tx.init, params)
  specs = state_shardings(tx, params, SPECS)
  is_spec = lambda x: isinstance(x, P)
  assert jax.tree.structure(state) == jax.tree.structure(specs, is_leaf=is_spec)
  for x, spec in zip(jax.tree.leaves(state), jax.tree.leaves(specs, is_leaf=is_spec), strict=True):
    assert len(spec) <= x.ndim
  is_fira = lambda x: isinstance(x, fira_jax.FiraState)
  projectors = [x.projector["w1"] for x in jax.tree.leaves(specs, is_leaf=is_fira) if is_fira(x)]
  assert projectors == [optax.MaskedNode() if name == "random" else P("fsdp", None)]


def test_moments_keep_the_parameters_kept_side_without_spreading():
  strict = state_shardings(make_tx("svd"), abstract_params(), SPECS, spread_moments=False)
  adam = strict[0].base_optimizer_state
  assert adam.mu["w1"] == P(None, None) and adam.mu["ws"] == P(None, None, None)
  assert adam.mu["w2"] == P("fsdp", None)  # the kept side is the sharded one


def test_flattened_side_is_sharded_like_its_major_axis_only():
  # An attention kernel (embed, heads, head_dim) with output_axis=(1, 2).
  params = {"attn": jax.ShapeDtypeStruct((8, 4, 6), jnp.float32)}
  dims = FiraDimensionNumbers(0, (1, 2))
  tx = fira_jax.scale_by_fira(rank=2, compressed_side="output", weight_dimension_numbers=dims)
  by_heads = state_shardings(tx, params, {"attn": P(None, "tp", None)})
  assert by_heads.projector["attn"] == P("tp", None)
  by_head_dim = state_shardings(tx, params, {"attn": P(None, None, "tp")})
  assert by_head_dim.projector["attn"] == P(None, None)  # not a contiguous tiling: replicated


def test_adamw_state_gets_the_parameter_shardings():
  specs = state_shardings(optax.adamw(1e-3), abstract_params(), SPECS)
  assert specs[0].mu == SPECS and specs[0].nu == SPECS and specs[0].count == P()


def test_fira_state_without_its_optimizer_is_refused_rather_than_replicated():
  state = jax.eval_shape(make_tx("svd").init, abstract_params())
  with pytest.raises(ValueError, match="pass state_shardings the optimizer"):
    state_shardings(state, abstract_params(), SPECS)


def test_multi_steps_and_the_chain_of_pieces_get_fira_shardings_from_their_init():
  multi = state_shardings(optax.MultiSteps(make_tx("svd"), 2), abstract_params(), SPECS)
  assert multi.inner_opt_state[0].projector["w1"] == P("fsdp", None)
  assert multi.acc_grads == SPECS  # accumulated gradients: the parameters' own shardings
  chain = fira_jax.fira_chain(rank=RANK, weight_dimension_numbers=DIMS)
  specs = state_shardings(chain, abstract_params(), SPECS)
  assert specs[0].projector["w1"] == P("fsdp", None)  # subspace_projection
  assert specs[1].mu["w1"] == P(None, "fsdp")  # in_subspace: low-rank moments, spread
  assert specs[3].residual_norm["ws"] == P(None)  # limit_residual_growth: per layer


def test_inject_hyperparams_and_partition_get_fira_shardings_from_their_init():
  static = ("rank", "update_proj_gap")
  injected = optax.inject_hyperparams(fira_jax.fira_adamw, static_args=static)(
    learning_rate=1e-3, rank=RANK, weight_dimension_numbers=DIMS
  )
  specs = state_shardings(injected, abstract_params(), SPECS)
  assert specs.inner_state[0].projector["w1"] == P("fsdp", None)
  assert specs.hyperparams["learning_rate"] == P()
  labels = {"w1": "fira", "ws": "fira", "w2": "adam", "b": "adam"}
  routed = optax.partition(
    {"fira": fira_jax.fira_adamw(1e-3, rank=RANK, weight_dimension_numbers=DIMS),
     "adam": optax.adamw(1e-3)},
    labels,
  )  # fmt: skip
  specs = state_shardings(routed, abstract_params(), SPECS)
  fira = specs.inner_states["fira"].inner_state[0]
  assert fira.projector["w1"] == P("fsdp", None) and fira.projector["ws"] == P(None, "fsdp", None)
  assert fira.base_optimizer_state.mu["w1"] == P(None, "fsdp")  # low rank, spread
  assert specs.inner_states["adam"].inner_state[0].mu["w2"] == P("fsdp", None)


# ------------------------------------------------------------- runs on the 8-device mesh


@pytest.fixture(scope="module")
def mesh():
  """``data=2 x fsdp=4`` over the 8 CPU devices, with Auto axes."""
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_SHAPE)
  return jax.make_mesh(tuple(MESH_SHAPE.values()), tuple(MESH_SHAPE), axis_types=auto)


def run_on_mesh(tx, params, param_sh, dims, step, inputs, input_sh):
  """``step(params, state, x)`` for each ``x``, with the state sharded by ``state_shardings``.

  Returns the final parameters, the final state and the state's shardings.
  """
  state_sh = state_shardings(tx, params, param_sh)
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


@functools.cache
def single_device_run(projection: str):
  """``mesh_cases.single_device_run`` for STEPS steps, run once per projection."""
  return mesh_cases.single_device_run(projection, STEPS)


@pytest.fixture(scope="module")
def sharded_run(mesh):
  """``sharded_run(projection)``: the tiny network's parameters and state after STEPS steps,
  data parallel over the whole mesh and FSDP over "fsdp"; run once per projection."""

  @functools.cache
  def run(projection: str):
    tx = make_tx(projection)
    shard = lambda spec: NamedSharding(mesh, spec)
    param_sh = jax.tree.map(shard, SPECS)
    batch_sh = (shard(BATCH_SPEC), shard(BATCH_SPEC))
    step = functools.partial(mesh_cases.train_step, tx)
    inputs = mesh_cases.batches(STEPS)
    params, state, _ = run_on_mesh(
      tx, mesh_cases.init_params(), param_sh, DIMS, step, inputs, batch_sh
    )
    return params, state

  return run


def relative_error(a, b) -> float:
  errors = [
    float(np.linalg.norm(np.asarray(x) - np.asarray(y)) / (np.linalg.norm(np.asarray(y)) + 1e-12))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  ]
  return max(errors)


@pytest.mark.parametrize("projection", ["svd", "randomized_svd"])
def test_data_parallel_fsdp_step_matches_the_single_device_step(sharded_run, projection):
  assert jax.device_count() == 8
  # 3 steps with refreshes on steps 0 and 2, stacked and plain kernels, weight decay.
  reference, reference_state = single_device_run(projection)
  params, state = sharded_run(projection)
  assert relative_error(params, reference) < 1e-5
  base_state = state[0].base_optimizer_state
  assert relative_error(base_state, reference_state[0].base_optimizer_state) < 1e-4


def pmap_run(projection: str, steps: int):
  tx = make_tx(projection)
  n = jax.local_device_count()

  def step(params, state, batch):
    grads = jax.lax.pmean(jax.grad(mesh_cases.loss_fn)(params, batch), "batch")
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.pmap(step, axis_name="batch")
  params = mesh_cases.init_params()
  replicate = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree)
  params, state = replicate(params), replicate(tx.init(params))
  for x, y in mesh_cases.batches(steps):
    split = lambda a: a.reshape((n, -1) + a.shape[1:])
    params, state = step(params, state, (split(x), split(y)))
  replicas_agree = all(bool(jnp.all(x == x[:1])) for x in jax.tree.leaves(params))
  return jax.tree.map(lambda x: x[0], params), replicas_agree


def test_pmap_step_matches_the_single_device_step():
  pmapped, replicas_agree = pmap_run("svd", STEPS)
  assert replicas_agree
  assert relative_error(pmapped, single_device_run("svd")[0]) < 1e-5


def test_projectors_are_split_along_the_fsdp_sharded_side(sharded_run):
  # Global projectors: w1 (16, 4), ws (2, 32, 4), w2 (8, 4); fsdp = 4.
  _, state = sharded_run("svd")
  shards = {
    k: v.addressable_shards[0].data.shape
    for k, v in state[0].projector.items()
    if not isinstance(v, optax.MaskedNode)
  }
  assert shards == {"w1": (4, 4), "ws": (2, 8, 4), "w2": (8, 4)}


def per_device_fraction(tree) -> float:
  """Bytes of ``tree`` on device 0 over its total bytes."""
  leaves = [x for x in jax.tree.leaves(tree) if x.size]
  local = sum(x.addressable_shards[0].data.nbytes for x in leaves)
  return local / sum(x.nbytes for x in leaves)


def test_one_device_holds_about_a_quarter_of_the_state(sharded_run):
  # fsdp = 4: a fully split state gives 0.25 per device, a replicated one 1.0; the small
  # replicated pieces (w2's projector, the bias's moments, counts) add a little.
  for projection in ("svd", "randomized_svd"):
    _, state = sharded_run(projection)
    assert per_device_fraction(state) < 0.35


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
  spec = P("fsdp", None) if spec is None else spec
  dims = None if dims is None else {"w": dims}
  tx = fira_jax.scale_by_fira(
    rank=8, update_proj_gap=1, projection=projection, weight_dimension_numbers=dims
  )
  param_sh = {"w": NamedSharding(mesh, spec)}
  params = {"w": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=param_sh["w"])}
  state_sh = state_shardings(tx, params, param_sh)
  state = jax.eval_shape(tx.init, params)
  update = jax.jit(lambda g, s: tx.update(g, s), in_shardings=(param_sh, state_sh))
  hlo = update.lower(params, state).compile().as_text()
  return all_gathers(hlo)


def layer_sharded_gathers(mesh, projection: str):
  """``refresh_gathers`` of a stacked (layers, in, out) gradient sharded on its layer axis."""
  shape = (MESH_SHAPE["fsdp"], 64, 96)
  return refresh_gathers(mesh, projection, shape, P("fsdp", None, None), FiraDimensionNumbers(1, 2))


def test_randomized_refresh_never_gathers_a_full_gradient(mesh):
  # The (64, 96) gradient is sharded (16, 96) per device; the range finder may gather
  # tall-skinny (64, rank + oversampling) blocks (for Householder QRs), nothing larger. The
  # parser is checked by the exact SVD's gather below.
  gathers = refresh_gathers(mesh, "randomized_svd")
  assert all(np.prod(shape) < 64 * 96 // 2 for shape in gathers), gathers


def test_layer_sharded_refresh_gathers_the_whole_stack_for_the_exact_svd_only(mesh):
  # What the README says: the per-layer SVD loop is not partitioned over a sharded layer
  # axis, so every device gets every layer; the randomized basis gathers small Grams only.
  assert (4, 64, 96) in layer_sharded_gathers(mesh, "svd")
  gathers = layer_sharded_gathers(mesh, "randomized_svd")
  assert all(np.prod(shape) < 64 * 96 for shape in gathers), gathers


def test_exact_svd_refresh_gathers_the_full_gradient(mesh):
  # What the README says: LAPACK's SVD needs the whole matrix on each device (here its
  # transpose: the SVD runs on the tall orientation).
  gathers = refresh_gathers(mesh, "svd")
  assert (64, 96) in gathers or (96, 64) in gathers, gathers


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


@pytest.mark.parametrize("projection", ["svd", "randomized_svd"])
@pytest.mark.parametrize("staggered", [False, True])
def test_stacked_leaf_sharded_on_its_layer_axis_matches_the_single_device_step(
  mesh, projection, staggered
):
  # (4, 32, 32) with the layer axis over fsdp = 4: each device holds one layer's projector.
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
  grads = [{"ws": jax.random.normal(jax.random.key(i + 1), shape)} for i in range(STEPS)]
  reference = updated_on_one_device(tx, params, grads)
  param_sh = {"ws": NamedSharding(mesh, P("fsdp", None, None))}
  params, state, _ = run_on_mesh(tx, params, param_sh, dims, optimizer_step(tx), grads, param_sh)
  assert relative_error(params, reference) < 1e-5
  assert state[0].projector["ws"].addressable_shards[0].data.shape == (1, 32, RANK)


EXPLICIT_CASES = (
  "svd,plain",
  "randomized_svd,plain",
  "random,plain",
  "svd,injected",
  "svd,staggered",
  "randomized_svd,shard_map",
)


def same_specs(arrays, shardings) -> bool:
  """Whether each array's sharding type has the spec of its sharding (None-padded alike)."""
  padded = lambda spec, ndim: tuple(spec) + (None,) * (ndim - len(spec))
  return all(
    padded(jax.typeof(x).sharding.spec, x.ndim) == padded(s.spec, x.ndim)
    for x, s in zip(jax.tree.leaves(arrays), jax.tree.leaves(shardings), strict=True)
  )


@pytest.mark.parametrize("case", EXPLICIT_CASES)
def test_explicit_axes_mesh_step_matches_the_single_device_step(case):
  # jax.make_mesh's default axis type: the exact SVD and products contracting a sharded axis
  # would raise ShardingTypeErrors without auto_axes; outputs keep their input's shardings.
  # "injected": hyperparameters are arrays typed on the explicit mesh.
  # The optimizer alone, against the same updates on one device: the gradients are fixed
  # trees sharded like the parameters (the model's own products would need explicit output
  # shardings of their own, which is not Fira's business). "shard_map": the step inside a
  # shard_map that makes the data axis Manual, the fsdp axis staying Explicit.
  projection, variant = case.split(",")
  tx = make_tx(projection, injected=variant == "injected", staggered=variant == "staggered")
  grads = [
    jax.grad(mesh_cases.loss_fn)(mesh_cases.init_params(), batch)
    for batch in mesh_cases.batches(STEPS)
  ]
  step = optimizer_step(tx)
  if variant == "shard_map":
    step = jax.shard_map(step, in_specs=(P(), P(), P()), out_specs=(P(), P()), axis_names={"data"})
  step = jax.jit(step)
  reference = updated_on_one_device(tx, mesh_cases.init_params(), grads)
  explicit = (jax.sharding.AxisType.Explicit,) * len(MESH_SHAPE)
  mesh = jax.make_mesh(tuple(MESH_SHAPE.values()), tuple(MESH_SHAPE), axis_types=explicit)
  with jax.set_mesh(mesh):
    param_sh = jax.tree.map(lambda spec: NamedSharding(mesh, spec), SPECS)
    params = jax.device_put(mesh_cases.init_params(), param_sh)
    state_sh = state_shardings(tx, params, param_sh)
    state = jax.jit(tx.init, out_shardings=state_sh)(params)
    for g in grads:
      params, state = step(params, state, jax.device_put(g, param_sh))
  assert relative_error(params, reference) < 1e-5
  assert same_specs(params, param_sh)
  assert same_specs(state, state_sh)


# ----------------------------------------------------------- examples/ on a mesh


def test_mesh_flag_is_checked_before_training():
  import mesh as mesh_lib  # examples/mesh.py
  import train

  assert mesh_lib.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
  for bad in ("data=2,tp=4", "data=0", "fsdp", "data=2,data=2"):
    (problem,) = train.check_config(train.Config(mesh=bad))
    assert "--mesh" in problem
  (problem,) = train.check_config(train.Config(mesh="data=3", batch_size=16))
  assert "--batch-size 16" in problem


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
