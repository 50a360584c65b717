"""See before you train: what an optimizer projects, and its state's size against AdamW's."""

from __future__ import annotations

import dataclasses
import math

import jax
import optax

from fira_jax import boxes
from fira_jax import state_tree


@dataclasses.dataclass(frozen=True)
class LeafDescription:
  """One parameter: how Fira reads it and the optimizer state it costs.

  One row of :func:`describe`'s table: the parameter's key ``path`` and ``shape``; where it
  is projected, its ``matrices`` (batch, reduction, output), ``compressed`` side and
  ``rank`` (None otherwise); and ``state_bytes``, the state kept for it.
  """

  path: str  # the key path, as jax.tree_util.keystr writes it
  shape: tuple[int, ...]
  matrices: tuple[int, int, int] | None  # (batch, reduction, output); None: not projected
  compressed: str | None  # "reduction" or "output"
  rank: int | None
  state_bytes: int  # every state leaf that belongs to this parameter


@dataclasses.dataclass(frozen=True)
class Description:
  """What :func:`describe` finds; ``str()`` gives the table.

  ``leaves``: one :class:`LeafDescription` per parameter, in flattening order;
  ``state_bytes``: the whole optimizer state's size; ``adamw_state_bytes``:
  ``optax.adamw``'s for the same parameters, inside ``optax.MultiSteps`` when the
  optimizer's state holds one (its accumulated gradients count on both sides).
  """

  leaves: tuple[LeafDescription, ...]
  state_bytes: int  # the whole state, counts and hyperparameters included
  adamw_state_bytes: int  # optax.adamw's state for the same parameters

  def __str__(self) -> str:
    header = ("parameter", "shape", "matrices (B×m×n)", "compressed", "rank", "state")
    rows = [
      (
        leaf.path,
        "×".join(map(str, leaf.shape)) or "scalar",
        "—" if leaf.matrices is None else "{}×{}×{}".format(*leaf.matrices),
        leaf.compressed or "—",
        "—" if leaf.rank is None else str(leaf.rank),
        _bytes(leaf.state_bytes),
      )
      for leaf in self.leaves
    ]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    line = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
    ratio = self.state_bytes / self.adamw_state_bytes if self.adamw_state_bytes else math.nan
    projected = sum(leaf.matrices is not None for leaf in self.leaves)
    return "\n".join(
      [
        line(header),
        *map(line, rows),
        f"{projected} of {len(self.leaves)} parameters projected; optimizer state"
        f" {_bytes(self.state_bytes)}, {ratio:.3f}× optax.adamw's {_bytes(self.adamw_state_bytes)}",
      ]
    )


def _bytes(n: int) -> str:
  if n < 1024:
    return f"{n} B"
  for unit in ("KiB", "MiB", "GiB"):
    n /= 1024
    if n < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}"


def _nbytes(x) -> int:
  return math.prod(x.shape) * x.dtype.itemsize


def describe(tx, params: optax.Params) -> Description:
  """Per parameter: how ``tx`` reads it as matrices, and the state it costs.

  Runs ``tx.init`` abstractly (nothing is allocated) and reads the layouts that Fira's
  pieces compute there, through any optax wrapper.

  Args:
    tx: the optimizer (anything with ``init``).
    params: the parameters, as arrays or ``jax.ShapeDtypeStruct``, Flax-boxed or not.

  Returns:
    A :class:`Description`; ``print`` it for a table.

  Example:
    >>> import jax.numpy as jnp, fira_jax
    >>> params = {'kernel': jnp.zeros((64, 32)), 'bias': jnp.zeros(32)}
    >>> report = fira_jax.describe(fira_jax.fira_adamw(1e-3, rank=8), params)
    >>> report.leaves[1].matrices, report.leaves[1].compressed, report.leaves[1].rank
    ((1, 64, 32), 'output', 8)
    >>> round(report.state_bytes / report.adamw_state_bytes, 3)
    0.323
  """
  state, seen = state_tree.layouts_seen_by_init(tx, params)
  state, params = boxes.unbox(state), boxes.unbox(params)  # Flax's boxes: read their arrays
  treedef = jax.tree.structure(params)
  per_leaf = [0] * treedef.num_leaves
  other = [0]

  def count(i, x):
    per_leaf[i] += _nbytes(x)

  def count_other(x):
    other[0] += _nbytes(x)

  state_tree.map_by_parameter(state, treedef, count, count_other)
  leaves = []
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for path, x, lays, nbytes in zip(paths, jax.tree.leaves(params), seen, per_leaf, strict=True):
    lay = lays[0] if lays else None
    matrices = None
    if lay is not None:
      matrices = (lay.matrix.num_matrices, lay.matrix.reduction, lay.matrix.output)
    leaves.append(
      LeafDescription(
        path=path or "<root>",
        shape=tuple(jax.numpy.shape(x)),
        matrices=matrices,
        compressed=None if lay is None else lay.compressed,
        rank=None if lay is None else lay.rank,
        state_bytes=nbytes,
      )
    )
  baseline = optax.adamw(1e-3)
  # A MultiSteps (or its gradient_transformation()): a gradient accumulator on both sides.
  if any(
    isinstance(s, optax.MultiStepsState)
    for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.MultiStepsState))
  ):
    baseline = optax.MultiSteps(baseline, every_k_schedule=2)
  adamw = jax.eval_shape(baseline.init, params)
  return Description(
    leaves=tuple(leaves),
    state_bytes=sum(per_leaf) + other[0],
    adamw_state_bytes=sum(_nbytes(x) for x in jax.tree.leaves(adamw)),
  )
