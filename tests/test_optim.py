"""examples/optim.py: the optimizers of the examples and their two learning rates."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import model as model_lib  # examples/ (on sys.path through conftest.py)
import optax
import optim
import pytest
import train

PARAMS = {
  "embed": {"embedding": jnp.ones((16, 8))},
  "layers": {
    "attn": {"q": {"kernel": jnp.ones((8, 8))}},
    "mlp": {"up": {"kernel": jnp.ones((8, 12))}},
  },
  "final_norm": {"scale": jnp.ones(8)},
}
MODEL = model_lib.make_config("tiny", hidden=8, ffn=12, heads=2, layers=1, vocab_size=16)


def trajectory(tx, steps=6, apply=True):
  """The updates of ``steps`` steps on fixed gradients (applied to the parameters if
  ``apply``)."""
  params, state = PARAMS, tx.init(PARAMS)
  out = []
  for step in range(steps):
    grads = jax.tree.map(
      lambda x, step=step: jnp.sin((step + 1) * jnp.arange(x.size).reshape(x.shape)), params
    )
    updates, state = tx.update(grads, state, params)
    if apply:
      params = optax.apply_updates(params, updates)
    out.append(updates)
  return out


def test_embed_lr_gives_embeddings_head_and_norms_their_own_schedule_exactly():
  config = train.Config(optimizer="adamw", lr=1e-3, embed_lr=2e-2, steps=10)
  schedule = lambda peak: optim.learning_rate_schedule(peak, 10, config.warmup, config.min_lr_ratio)
  labels = lambda tree: jax.tree.map(lambda m: "other" if m else "matrix", optim.not_matrices(tree))
  adam = dict(b1=config.b1, b2=config.b2, eps=config.eps)
  two_schedules = optax.partition(
    {
      "matrix": optax.adamw(schedule(1e-3), **adam, weight_decay=0.0),
      "other": optax.adamw(schedule(2e-2), **adam, weight_decay=0.0),
    },
    labels,
  )
  for a, b in zip(
    trajectory(optim.build_optimizer(config, MODEL)), trajectory(two_schedules), strict=True
  ):
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", ["fira", "fira-adafactor", "galore", "adafactor", "muon"])
def test_embed_lr_scales_only_the_updates_of_embeddings_head_and_norms(name):
  base = train.Config(optimizer=name, lr=1e-2, steps=10, rank=2)
  # At fixed parameters (Adafactor scales its steps by theirs).
  plain = trajectory(optim.build_optimizer(base, MODEL), apply=False)
  own = optim.build_optimizer(train.Config(**{**vars(base), "embed_lr": 3e-2}), MODEL)
  for a, b in zip(plain, trajectory(own, apply=False), strict=True):
    chex.assert_trees_all_close(a["layers"], b["layers"], rtol=1e-5, atol=1e-9)
    for key in ("embed", "final_norm"):
      chex.assert_trees_all_close(
        jax.tree.map(lambda x: 3 * x, a[key]), b[key], rtol=1e-4, atol=1e-9
      )


def test_muon_orthogonalizes_only_attention_and_mlp_matrices():
  tx = optim.build_optimizer(train.Config(optimizer="muon", lr=1e-2, steps=10), MODEL)
  muon_state = tx.init(PARAMS).inner_states["muon"].inner_state
  momentum = muon_state[0].mu
  assert momentum["layers"]["attn"]["q"]["kernel"].shape == (8, 8)
  assert isinstance(momentum["embed"]["embedding"], optax.MaskedNode)
  assert isinstance(momentum["final_norm"]["scale"], optax.MaskedNode)
