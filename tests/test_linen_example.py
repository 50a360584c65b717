"""examples/linen_decoder.py: the Linen TrainState trainer, at a test size."""

from __future__ import annotations

import re

import linen_decoder  # examples/ (on sys.path through conftest.py)
import numpy as np

SMALL = linen_decoder.DecoderConfig(D=32, H=2, F=64, N=2, L=32)


def run(tmp_path, corpus_dir, *flags):
  argv = [
    "--workdir", str(tmp_path / "run"), "--data", str(corpus_dir), "--batch-size", "2",
    "--eval-batches", "1", "--checkpoint-every", "2", "--no-progress", *flags,
  ]  # fmt: skip
  return linen_decoder.main(argv, cfg=SMALL)


def test_linen_trainer_projects_attention_and_mlp_and_resumes_from_its_checkpoint(
  tmp_path, corpus_dir, capsys
):
  first = run(tmp_path, corpus_dir, "--steps", "4")
  table = capsys.readouterr().out
  # The default weight_dimension_numbers, read from the shapes: 6 kernels, whole, per layer.
  assert "6 of 11 parameters projected" in table
  assert re.search(r"\['blocks'\]\['query'\]\['kernel'\]\s+2×32×2×16\s+2×32×32\s", table)
  assert first["step"] == 4 and np.isfinite(first["val_loss"])
  resumed = run(tmp_path, corpus_dir, "--steps", "6", "--resume")
  assert resumed["step"] == 6 and np.isfinite(resumed["val_loss"])
  checkpoints = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir())
  assert checkpoints == [4, 6]  # the boxed TrainState restored, trained on, saved again
