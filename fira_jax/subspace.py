"""The rank-r subspace of each matrix: which side is compressed, and the two products.

One side of each ``(reduction, output)`` matrix ``X`` is compressed to ``r``
dimensions by a projector ``P`` (orthonormal columns for the SVD bases,
``E[PᵀP] = I`` for the random one):

* compressed reduction side: ``R = Pᵀ X``, ``back(N) = P N``;
* compressed output side:    ``R = X P``,  ``back(N) = N Pᵀ``.

The reference (``fira`` 1.0.2, on torch ``(out, in)`` weights) compresses the
smaller side and, for square matrices, the input (reduction) side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from fira_jax import layout as layout_lib
from fira_jax import platform

CompressedSide = Literal["smaller", "larger", "reduction", "output"]
COMPRESSED_SIDES = ("smaller", "larger", "reduction", "output")
Side = Literal["reduction", "output"]


@dataclasses.dataclass(frozen=True)
class SubspaceLayout:
  """A leaf's matrices and the subspace they are compressed to (static fields).

  What :meth:`Subspace.layouts` returns for each projected leaf: its
  :class:`MatrixLayout` (``matrix``), the ``compressed`` side (``"reduction"`` or
  ``"output"``) and the effective ``rank``; the properties give the shapes of the
  state that the leaf costs.
  """

  matrix: layout_lib.MatrixLayout
  compressed: Side  # the side that P compresses
  rank: int  # effective rank, min(rank, reduction, output)

  @property
  def batch_shape(self) -> tuple[int, ...]:
    """The leaf's batch axes' sizes (one matrix per entry)."""
    return self.matrix.batch_shape

  @property
  def compressed_size(self) -> int:
    """The size of the compressed side of each matrix."""
    return self.matrix.reduction if self.compressed == "reduction" else self.matrix.output

  @property
  def projector_shape(self) -> tuple[int, ...]:
    """The stored basis ``P``: ``batch_shape + (compressed_size, rank)``."""
    return self.batch_shape + (self.compressed_size, self.rank)

  @property
  def low_rank_shape(self) -> tuple[int, ...]:
    """``R`` and the base optimizer's moments: the compressed side replaced by the rank."""
    if self.compressed == "reduction":
      return self.batch_shape + (self.rank, self.matrix.output)
    return self.batch_shape + (self.matrix.reduction, self.rank)

  @property
  def rank_axis(self) -> int:
    """The axis of a ``(B, ·, ·)`` low-rank matrix that holds the rank."""
    return 1 if self.compressed == "reduction" else 2


def compressed_of(reduction: int, output: int, compressed_side: CompressedSide) -> Side:
  """Which side of a ``(reduction, output)`` matrix ``compressed_side`` names."""
  if compressed_side == "smaller":  # the reference: ties compress the input side
    return "reduction" if reduction <= output else "output"
  if compressed_side == "larger":  # optax.contrib.galore's choice
    return "reduction" if reduction >= output else "output"
  if compressed_side in ("reduction", "output"):
    return compressed_side
  raise ValueError(f"compressed_side must be one of {COMPRESSED_SIDES}, got {compressed_side!r}.")


@dataclasses.dataclass(frozen=True)
class Subspace:
  """Which leaves are projected, on which axes and side, to which rank (all static).

  The one configuration that every piece of Fira which holds per-matrix state
  (:func:`fira_jax.subspace_projection`, :func:`fira_jax.in_subspace`,
  :func:`fira_jax.limit_residual_growth`) is built from.

  Args:
    rank: the subspace rank ``r``, clipped to each matrix's smaller dimension.
    weight_dimension_numbers: which leaves are projected and which axes form
      their matrices: None (every 2-D leaf as an ``(in, out)`` kernel, except
      Flax's ``bias``, ``scale`` and ``embedding`` leaves; a float leaf of three
      or more dimensions gets a warning naming it and what to pass), one
      :class:`FiraDimensionNumbers` (every leaf with ≥ 2 dimensions), a
      prefix tree of them and None, or a callable of the updates returning
      one of those.
    compressed_side: ``"smaller"`` (the reference: the smaller side, the
      input side of square matrices), ``"larger"`` (``optax.contrib.galore``),
      ``"reduction"`` or ``"output"``.

  Example:
    >>> import jax.numpy as jnp, fira_jax
    >>> space = fira_jax.Subspace(rank=2)
    >>> b, w = space.layouts({'w': jnp.zeros((8, 4)), 'b': jnp.zeros(4)})  # leaf order
    >>> b is None, w.compressed, w.projector_shape, w.low_rank_shape
    (True, 'output', (4, 2), (8, 2))
  """

  rank: int = 128
  weight_dimension_numbers: layout_lib.DimensionNumbersOrFn = None
  compressed_side: CompressedSide = "smaller"

  def layouts(self, tree: Any) -> list[SubspaceLayout | None]:
    """The layout of every leaf of ``tree`` (None for leaves not projected).

    Non-float leaves are never projected; complex ones that the dimension numbers
    select raise, naming the leaf.
    """
    specs = layout_lib.resolve_dimension_numbers(self.weight_dimension_numbers, tree)
    names = layout_lib.leaf_names(tree)
    layouts = []
    for leaf, spec, name in zip(jax.tree.leaves(tree), specs, names, strict=True):
      if spec is None or not layout_lib.is_trainable(leaf):
        layouts.append(None)
        continue
      if jnp.iscomplexobj(leaf):
        raise ValueError(
          f"{name} is complex ({jnp.result_type(leaf)}); Fira projects real matrices"
          " only: give it None in weight_dimension_numbers."
        )
      matrix = layout_lib.matrix_layout(jnp.shape(leaf), spec, name)
      rank = min(self.rank, matrix.reduction, matrix.output)
      # A zero-size matrix has no subspace; leave it to the base optimizer.
      compressed = compressed_of(matrix.reduction, matrix.output, self.compressed_side)
      layouts.append(SubspaceLayout(matrix, compressed, rank) if rank > 0 else None)
    for records in getattr(_recording, "stack", []):
      records.append((tree, layouts))
    return layouts


_recording = threading.local()


@contextlib.contextmanager
def recording_layouts():
  """Collects ``(tree, layouts)`` from every :meth:`Subspace.layouts` call in the block.

  :func:`fira_jax.state_shardings` reads an optimizer's layouts this way while it
  traces the optimizer's ``init``, so nobody has to pass them twice.
  """
  records = []
  _recording.stack = [*getattr(_recording, "stack", []), records]
  try:
    yield records
  finally:
    _recording.stack = _recording.stack[:-1]


def project(matrices: jax.Array, projector: jax.Array, compressed: Side) -> jax.Array:
  r"""``R = Pᵀ X`` (compressed reduction side) or ``R = X P`` (output side), batched.

  .. math::
    R_b = P_b^\top X_b \ (\text{reduction}), \qquad R_b = X_b P_b \ (\text{output})

  Args:
    matrices: ``X``, ``(B, reduction, output)``.
    projector: ``P``, ``(B, compressed, rank)``.
    compressed: ``"reduction"`` or ``"output"``, the side that ``P`` compresses.

  Returns:
    ``(B, rank, output)`` or ``(B, reduction, rank)``.

  Example:
    >>> import jax.numpy as jnp, fira_jax
    >>> x = jnp.arange(24.0).reshape(1, 6, 4)
    >>> p = fira_jax.svd_projector(x, 2, "output")
    >>> fira_jax.project(x, p, "output").shape
    (1, 6, 2)
    >>> fira_jax.project(x, fira_jax.svd_projector(x, 2, "reduction"), "reduction").shape
    (1, 2, 4)

  References:
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, 2024
  """
  if compressed == "reduction":
    return platform.on_cpu_or_else(_project_reduction_cpu, _project_reduction, matrices, projector)
  return jnp.einsum("bko,bor->bkr", matrices, projector)


def _project_reduction(matrices, projector):
  return jnp.einsum("bkr,bko->bro", projector, matrices)


def _project_reduction_cpu(matrices, projector):
  # XLA:CPU runs a dot that contracts its left operand's rows outside its fast batched
  # dots; a materialized Pᵀ (a copy of the small P) keeps stacked leaves on them.
  return jax.lax.optimization_barrier(jnp.swapaxes(projector, 1, 2)) @ matrices


def project_back(low_rank: jax.Array, projector: jax.Array, compressed: Side) -> jax.Array:
  r"""``P N`` (compressed reduction side) or ``N Pᵀ`` (output side), batched.

  .. math::
    P_b N_b \ (\text{reduction}), \qquad N_b P_b^\top \ (\text{output})

  The way back from :func:`project`: with orthonormal ``P``,
  ``project_back(project(X))`` is the orthogonal projection of ``X`` onto the subspace.

  Args:
    low_rank: ``N``, ``(B, rank, output)`` or ``(B, reduction, rank)``.
    projector: ``P``, ``(B, compressed, rank)``.
    compressed: ``"reduction"`` or ``"output"``, the side that ``P`` compresses.

  Returns:
    ``(B, reduction, output)``.

  Example:
    >>> import jax.numpy as jnp, fira_jax
    >>> x = jnp.arange(24.0).reshape(1, 6, 4)  # of rank 2
    >>> p = fira_jax.svd_projector(x, 2, "output")
    >>> back = fira_jax.project_back(fira_jax.project(x, p, "output"), p, "output")
    >>> back.shape, bool(jnp.allclose(back, x, atol=1e-4))
    ((1, 6, 4), True)

  References:
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, 2024
  """
  if compressed == "reduction":
    return jnp.einsum("bkr,bro->bko", projector, low_rank)
  return jnp.einsum("bkr,bor->bko", low_rank, projector)


def per_projected_leaf(tree: Any, layouts: list[SubspaceLayout | None], fn) -> Any:
  """A tree like ``tree``: ``fn(leaf, layout)`` at projected leaves, ``optax.MaskedNode()``
  elsewhere (and everywhere when ``fn`` is None)."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef.unflatten(
    [
      optax.MaskedNode() if lay is None or fn is None else fn(x, lay)
      for x, lay in zip(leaves, layouts, strict=True)
    ]
  )


def low_rank_inputs(
  tree: Any, layouts: list[SubspaceLayout | None], low_rank: dict | None = None
) -> Any:
  """What a base optimizer sees: each projected leaf's low-rank matrices
  (``batch_shape + low_rank_shape``; zeros when ``low_rank`` is None, as at init),
  ``MaskedNode`` for frozen (non-float) leaves, the rest as they are.

  ``low_rank`` maps a projected leaf's index to its ``(B, ·, ·)`` low-rank matrices.
  """
  leaves, treedef = jax.tree.flatten(tree)
  inputs = []
  for i, (x, lay) in enumerate(zip(leaves, layouts, strict=True)):
    if lay is None:
      inputs.append(x if layout_lib.is_trainable(x) else optax.MaskedNode())
    elif low_rank is None:
      inputs.append(jnp.zeros(lay.low_rank_shape, x.dtype))
    else:
      inputs.append(lay.matrix.from_batched(low_rank[i]))
  return treedef.unflatten(inputs)
