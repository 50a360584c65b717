"""The training workflow in examples/: a few steps on a tiny config each (seconds, not minutes)."""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re

import compare  # examples/ (on sys.path through conftest.py)
import data as data_lib
import finetune
import model as model_lib
import numpy as np
import optax
import orbax.checkpoint as ocp
import pretrain
import pytest
import train
from checkpoints import flat_arrays
from checkpoints import restored_state
from flax import nnx

import fira_jax

EXAMPLES = pathlib.Path(compare.__file__).parent
SMALL = ["--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--no-progress"]


def test_pretrain_writes_checkpoint_metrics_and_plot(tmp_path, corpus_dir):
  workdir = tmp_path / "run"
  summary = pretrain.main(
    [
      "--workdir",
      str(workdir),
      "--data",
      str(corpus_dir),
      "--steps",
      "6",
      "--eval-every",
      "3",
      "--checkpoint-every",
      "3",
      *SMALL,
    ]
  )
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
  assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
  assert (workdir / "loss.png").stat().st_size > 1000
  assert summary["optimizer_state_bytes"] < 0.5 * summary["adamw_state_bytes"]
  with ocp.CheckpointManager(workdir.resolve() / "checkpoints") as manager:
    assert manager.latest_step() == 6


@pytest.mark.parametrize("scan_layers", [False, True])
def test_resumed_run_ends_with_the_same_parameters_as_an_uninterrupted_one(
  tmp_path, corpus_dir, scan_layers
):
  common = [
    "--data",
    str(corpus_dir),
    "--steps",
    "8",
    "--checkpoint-every",
    "3",
    "--eval-every",
    "4",
    "--update-proj-gap",
    "3",
    *SMALL,
  ]
  if scan_layers:
    common.append("--scan-layers")
  pretrain.main(["--workdir", str(tmp_path / "full"), *common])
  pretrain.main(["--workdir", str(tmp_path / "cut"), "--stop-after", "5", *common])
  pretrain.main(["--workdir", str(tmp_path / "cut"), "--resume", *common])
  full, resumed = (
    flat_arrays(restored_state(tmp_path / "full")),
    flat_arrays(restored_state(tmp_path / "cut")),
  )
  assert len(full) > 50 and full.keys() == resumed.keys()  # model and optimizer state
  assert any("projector" in k for k in full)
  for key, value in full.items():
    np.testing.assert_array_equal(value, resumed[key], err_msg=key)
  metrics = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
  steps = [json.loads(line)["step"] for line in metrics if "loss" in json.loads(line)]
  assert steps == sorted(set(steps)), "resumed metrics must not repeat steps"


def test_resume_refuses_a_checkpoint_from_another_optimizer(tmp_path, corpus_dir):
  common = ["--workdir", str(tmp_path), "--data", str(corpus_dir), "--steps", "2", *SMALL]
  pretrain.main(common)
  with pytest.raises(SystemExit, match="optimizer: checkpoint 'fira', now 'adamw'"):
    pretrain.main([*common, "--resume", "--optimizer", "adamw"])


def test_a_second_run_in_the_same_workdir_needs_resume_or_overwrite(tmp_path, corpus_dir):
  common = ["--workdir", str(tmp_path), "--data", str(corpus_dir), "--steps", "2", *SMALL]
  pretrain.main(common)
  with pytest.raises(SystemExit, match="--resume to continue"):
    pretrain.main(common)


def test_missing_corpus_gets_a_clear_error(tmp_path):
  with pytest.raises(SystemExit, match="no such file or folder"):
    pretrain.main(["--workdir", str(tmp_path), "--data", str(tmp_path / "nope"), *SMALL])


@pytest.mark.parametrize(
  "files, message",
  [
    ({}, "no non-empty .txt or .jsonl text found"),
    ({"a.txt": ""}, "no non-empty .txt or .jsonl text found"),
    ({"a.txt": "one document only"}, "use more text or a shorter --seq-len"),
    ({"a.jsonl": '{"body": "x"}'}, "a .jsonl line needs a 'text' field"),
    ({f"d{i}.txt": "short" for i in range(30)}, "use more text or a shorter --seq-len"),
  ],
  ids=["empty-folder", "empty-file", "one-short-document", "jsonl-without-text", "too-short"],
)
def test_unusable_corpus_gets_an_error_saying_what_to_do(tmp_path, files, message):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for name, text in files.items():
    (corpus / name).write_text(text)
  with pytest.raises(SystemExit, match=re.escape(message)):
    pretrain.main(["--workdir", str(tmp_path / "run"), "--data", str(corpus), *SMALL])


def test_lora_baseline_trains_only_adapters_and_unadapted_weights(tmp_path, corpus_dir):
  config = train.Config(
    optimizer="lora",
    data=str(corpus_dir),
    steps=4,
    batch_size=2,
    seq_len=32,
    eval_batches=1,
    progress=False,
    plot=False,
    lr=0.01,
  )
  corpus, model, _ = train.build_run(config, tmp_path)
  before = flat_arrays(nnx.state(model, nnx.Param))
  train.train_and_evaluate(config, tmp_path / "run")
  after = flat_arrays(restored_state(tmp_path / "run")["model"])
  assert before.keys() == after.keys()
  changed = {k: not np.array_equal(v, after[k]) for k, v in before.items()}
  frozen = [k for k in changed if ("'attn'" in k or "'mlp'" in k) and "lora" not in k]
  adapters = [k for k in changed if "lora_b" in k]
  assert frozen and adapters
  assert not any(changed[k] for k in frozen), "base attention/MLP kernels must stay frozen"
  assert all(changed[k] for k in adapters), "every adapter must train"
  assert changed[next(k for k in changed if "embedding" in k)]
  del corpus


def test_scanned_model_gives_fira_one_projector_per_layer():
  config = model_lib.make_config("tiny", scan_layers=True)
  model = model_lib.Llama(config, nnx.Rngs(0))
  tx = fira_jax.fira_adamw(
    0.01,
    rank=8,
    weight_dimension_numbers=fira_jax.dimension_numbers_for_paths(
      model_lib.MATRIX_PATTERN, fira_jax.FiraDimensionNumbers(1, 2)
    ),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  projector = optimizer.opt_state[0].projector
  assert projector["layers"]["attn"]["q"]["kernel"][...].shape == (config.layers, config.hidden, 8)
  assert projector["embed"]["embedding"] == optax.MaskedNode()


def test_split_is_deterministic_and_validation_text_never_reaches_training(corpus_dir):
  a = data_lib.load_corpus(data=str(corpus_dir))
  b = data_lib.load_corpus(data=str(corpus_dir))
  assert a.val_names == b.val_names and a.train_names == b.train_names
  assert set(a.val_names).isdisjoint(a.train_names) and a.val_names
  train_text = data_lib.ByteTokenizer().decode(a.train_tokens)
  for name in a.val_names:
    marker = f"MARKER{int(name[3:5]):02d}MARKER"
    assert marker not in train_text
  for name in a.train_names:
    assert f"MARKER{int(name[3:5]):02d}MARKER" in train_text


def test_batches_are_a_pure_function_of_seed_and_step():
  tokens = np.arange(10_000, dtype=np.int32)
  first = data_lib.batch_at(tokens, 7, 0, 4, 16)
  np.testing.assert_array_equal(first, data_lib.batch_at(tokens, 7, 0, 4, 16))
  assert not np.array_equal(first, data_lib.batch_at(tokens, 8, 0, 4, 16))
  assert first.shape == (4, 17)
  np.testing.assert_array_equal(np.diff(first, axis=1), 1)  # contiguous windows


def test_stdlib_pretrain_and_finetune_domains_do_not_overlap():
  pre = {d.name for d in data_lib.stdlib_documents("pretrain")}
  fine = {d.name for d in data_lib.stdlib_documents("finetune")}
  assert pre and fine and pre.isdisjoint(fine)


def test_jsonl_and_hugging_face_dataset_saved_locally(tmp_path):
  import datasets

  texts = [f"document {i}: " + "some text " * 50 for i in range(40)]
  (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  from_jsonl = data_lib.load_corpus(data=str(tmp_path / "docs.jsonl"))
  assert len(from_jsonl.train_names) + len(from_jsonl.val_names) == 40
  datasets.DatasetDict(
    {
      "train": datasets.Dataset.from_dict({"text": texts[:30]}),
      "validation": datasets.Dataset.from_dict({"text": texts[30:]}),
    }
  ).save_to_disk(str(tmp_path / "hf"))
  from_hf = data_lib.load_corpus(hf_dataset=str(tmp_path / "hf"))
  assert len(from_hf.train_names) == 30 and len(from_hf.val_names) == 10


def test_bpe_tokenizer_trained_on_the_training_split_round_trips(tmp_path, corpus_dir):
  corpus = data_lib.load_corpus(
    data=str(corpus_dir), tokenizer="bpe-train:400", tokenizer_out=tmp_path / "t.json"
  )
  assert corpus.tokenizer.vocab_size <= 400
  text = "def f(x):\n    return x + 1\n"
  assert corpus.tokenizer.decode(corpus.tokenizer.encode(text)) == text
  reloaded = data_lib.load_corpus(data=str(corpus_dir), tokenizer=f"bpe:{tmp_path / 't.json'}")
  np.testing.assert_array_equal(reloaded.val_tokens, corpus.val_tokens)


def test_compare_runs_every_optimizer_and_writes_the_tables_and_figures(tmp_path, corpus_dir):
  common = ["--smoke", "--steps", "3", "--eval-every", "3", "--eval-batches", "1"]
  common += [
    "--batch-size",
    "2",
    "--seq-len",
    "32",
    "--out",
    str(tmp_path),
    "--data",
    str(corpus_dir),
  ]
  text = compare.main(
    [*common, "--seeds", "1", "--rank-sweep-kinds", "fira", "--rank-sweep-seeds", "1"]
  )
  results = compare.load_results(tmp_path / "results.jsonl")
  assert {r["kind"] for r in results.values()} == set(compare.KINDS)
  assert all(np.isfinite(r["final_eval_loss"]) for r in results.values())
  for kind in compare.KINDS.values():
    assert f"**{kind.label}**: best lr" in text  # its search table
    row = next(line for line in text.splitlines() if line.startswith(f"| {kind.label} | "))
    assert re.search(r"\| \d+\.\d{3} \(n=1\) \| .* MiB \| [\d.]+× \| \d+ ms \|$", row), row
  # The rank sweep: ranks 8 and 16 (and the default 32), with Fira's residual share measured.
  rank_sweep = text[text.index("### Rank sweep") :].splitlines()
  rank_rows = [line for line in rank_sweep if line.startswith("| Fira (fira_adamw, SVD basis) | ")]
  assert [row.split(" | ")[1] for row in rank_rows] == ["8", "16", "32"]
  for row in rank_rows[:2]:
    share = float(row.split(" | ")[4])
    assert 0 < share < 1, row
  assert "Pareto front" in text
  for figure in ("memory.png", "curves.png", "step_time.png"):
    assert (tmp_path / figure).stat().st_size > 20_000, figure
  assert (tmp_path / "compare.md").read_text() == text
  written = json.loads((tmp_path / "best_settings.json").read_text())
  assert set(written) == set(compare.KINDS)
  assert compare.read_settings(str(tmp_path / "best_settings.json")) == {
    k: (v["lr"], v["embed_lr"]) for k, v in written.items()
  }

  # The larger scale, in parts: one run, then the rest; the tuning is not run again.
  confirm = [*common, "--seeds", "1", "--rank-sweep-kinds", "fira", "--rank-sweep-seeds", "1"]
  confirm += ["--kinds", "adamw,fira-adafactor", "--confirm-model", "tiny"]
  confirm += ["--confirm-steps", "4", "--confirm-batch-size", "2", "--confirm-seeds", "1"]
  assert compare.main([*confirm, "--max-runs", "1"]) == ""
  assert len(compare.load_results(tmp_path / "results.jsonl")) == len(results) + 1
  assert "Incomplete: 1 runs" in (tmp_path / "compare.md").read_text()
  text = compare.main(confirm)
  assert len(compare.load_results(tmp_path / "results.jsonl")) == len(results) + 2
  larger = text[text.index("### The larger model") :]
  assert "4 steps × 2 × 32 tokens" in larger
  assert larger.splitlines()[0].endswith("each optimizer at its best setting from `tiny`")
  for kind in ("adamw", "fira-adafactor"):
    assert f"| {compare.KINDS[kind].label} | " in larger
  assert (tmp_path / "memory_tiny.png").stat().st_size > 20_000

  # --confirm-only from a settings file: the larger scale's figures, no empty sweep figures.
  only = tmp_path / "confirm_only"
  settings = ["--settings", str(tmp_path / "best_settings.json"), "--confirm-only"]
  compare.main([*confirm, "--out", str(only), "--kinds", "adamw", *settings])  # the last counts
  assert "at its setting from --settings" in (only / "compare.md").read_text()
  assert (only / "memory_tiny.png").stat().st_size > 20_000
  assert not (only / "memory.png").exists() and not (only / "curves.png").exists()


def fake_results(plan, loss, kind="adamw"):
  """Runs ``kind``'s learning-rate search on ``loss(matrix rung, embed rung)``, no training."""
  results = {}
  while runs := plan.next_sweep_runs(kind, results):
    for run in runs:
      value = loss(compare.rung(run.lr), compare.rung(run.embed_lr))
      results[run.name] = dict(
        kind=kind,
        lr=run.lr,
        embed_lr=run.embed_lr,
        seed=0,
        rank=0,
        final_eval_loss=None if math.isinf(value) else value,  # None: diverged, as recorded
      )
  return results


def search_plan(max_sweep_runs):
  return compare.Plan(
    argparse.Namespace(
      model="tiny", seeds=3, smoke=False, max_sweep_runs=max_sweep_runs, settings=None
    )
  )


def test_compare_search_extends_the_grid_past_an_edge_optimum_until_it_is_interior():
  # AdamW's grid is 3e-4, 1e-3, 3e-3 with the embeddings at 0.01; the optimum is 3e-5 / 0.03.
  optimum = (compare.rung(3e-5), compare.rung(0.03))
  loss = lambda i, j: (i - optimum[0]) ** 2 + 0.5 * (j - optimum[1]) ** 2
  plan = search_plan(max_sweep_runs=30)
  results = fake_results(plan, loss)
  best = plan.best("adamw", results)
  assert (best.lr, best.embed_lr) == (3e-5, 0.03)
  tried = plan.tried("adamw", results)
  i, j = optimum
  assert {(i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)} <= set(tried)  # both sides, both lrs
  assert len(tried) < 15  # the neighbourhood of the path, not the whole ladder


def test_compare_search_stops_at_max_sweep_runs_and_counts_a_diverged_run_as_worst():
  plan = search_plan(max_sweep_runs=5)
  results = fake_results(plan, lambda i, j: math.inf if i == compare.rung(3e-3) else -i)
  assert len(results) == 5
  best = plan.best("adamw", results)
  assert best.lr == 1e-3  # 3e-3 diverged
  assert plan.next_sweep_runs("adamw", results) == []


def test_compare_names_a_search_the_run_cap_cut_short_with_its_best_at_an_edge():
  optimum = (compare.rung(3e-5), compare.rung(0.1))  # far from AdamW's start
  loss = lambda i, j: abs(i - optimum[0]) + abs(j - optimum[1])
  capped, uncapped = search_plan(max_sweep_runs=8), search_plan(max_sweep_runs=30)
  for plan in (capped, uncapped):
    plan.args.kinds = ["adamw"]
  cut = compare.capped_searches(fake_results(capped, loss), capped)
  assert set(cut) == {"adamw"} and cut["adamw"]  # names the untried sides
  assert compare.capped_searches(fake_results(uncapped, loss), uncapped) == {}


def test_compare_settings_replace_the_search_for_their_optimizers_only():
  args = argparse.Namespace(
    model="tiny",
    seeds=3,
    smoke=False,
    max_sweep_runs=8,
    settings={"adamw": (1e-3, 0.01), "muon": (1e-2, 0.03)},
    kinds=["adamw", "fira", "muon"],
    rank_sweep_kinds=[],
    rank_sweep_seeds=1,
    confirm_model="3m",
    confirm_seeds=2,
    confirm_only=False,
  )
  plan = compare.Plan(args)
  assert plan.next_sweep_runs("adamw", {}) == [] == plan.next_sweep_runs("muon", {})
  assert plan.next_sweep_runs("fira", {})  # searched as usual
  optimum = (compare.rung(3e-3), compare.rung(0.03))
  results = fake_results(plan, lambda i, j: abs(i - optimum[0]) + abs(j - optimum[1]), "fira")
  phases = dict(plan.phases(results))
  assert "sweep" not in phases  # fira's search is done, the others have none
  seeds = {(run.kind, run.lr, run.embed_lr, run.seed) for run in phases["seeds"]}
  assert seeds == {
    *(("adamw", 1e-3, 0.01, s) for s in range(3)),  # no search: seed 0 runs here
    *(("fira", 3e-3, 0.03, s) for s in (1, 2)),  # seed 0 ran in the search
    *(("muon", 1e-2, 0.03, s) for s in range(3)),
  }
  assert {(run.kind, run.model, run.seed) for run in phases["confirm"]} == {
    (kind, "3m", s) for kind in args.kinds for s in range(2)
  }
  # --confirm-only: step 4 alone, every optimizer's first seed before any second one.
  args.confirm_only = True
  phases = list(plan.phases(results))
  assert [name for name, _ in phases] == ["confirm"]
  assert [run.seed for run in phases[0][1]] == [0, 0, 0, 1, 1, 1]


def test_compare_larger_model_heading_names_the_settings_file_its_settings_came_from():
  path = "examples/compare_settings.json"
  settings = {"adamw": (1e-3, 0.01)}
  args = argparse.Namespace(
    model="tiny", seeds=1, settings_path=path, settings=settings, kinds=["adamw"]
  )
  assert compare.setting_source(compare.Plan(args)) == f"its setting from --settings {path}"
  assert compare.setting_source(compare.Plan(args), short=True) == "compare_settings.json"
  args.kinds = ["adamw", "fira"]  # fira searched here
  mixed = f"its best setting from `tiny` or from --settings {path}"
  assert compare.setting_source(compare.Plan(args)) == mixed
  args.settings_path, args.settings = None, None
  assert compare.setting_source(compare.Plan(args)) == "its best setting from `tiny`"
  assert compare.setting_source(compare.Plan(args), short=True) == "`tiny`"


def test_compare_reads_the_shipped_settings_and_rejects_bad_ones(tmp_path, capsys):
  shipped = compare.read_settings(str(EXAMPLES / "compare_settings.json"))
  assert set(shipped) == set(compare.KINDS)
  for text, message in (
    ('{"adamx": {"lr": 0.1, "embed_lr": 0.1}}', "unknown optimizer 'adamx'"),
    ('{"fira": {"lr": 0, "embed_lr": 0.1}}', "fira needs positive 'lr' and 'embed_lr'"),
    ("{", "cannot read"),
    ("[1]", "expected an object of optimizers"),
    ('{"fira": 0.01}', "fira needs positive 'lr' and 'embed_lr'"),
  ):
    path = tmp_path / "settings.json"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
      compare.main(["--out", str(tmp_path / "run"), "--settings", str(path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_finetune_starts_every_optimizer_from_the_pretrained_weights(tmp_path, corpus_dir):
  pretrain.main(
    ["--workdir", str(tmp_path / "pre"), "--data", str(corpus_dir), "--steps", "3", *SMALL]
  )
  text = finetune.main(
    [
      "--init-from",
      str(tmp_path / "pre"),
      "--out",
      str(tmp_path / "ft"),
      "--steps",
      "2",
      "--batch-size",
      "2",
      "--eval-batches",
      "1",
      "--data",
      str(corpus_dir),
      "--no-progress",
    ]
  )
  rows = [
    line.split("|")
    for line in text.splitlines()
    if line.startswith("| fira") or line.startswith("| lora") or line.startswith("| adamw")
  ]
  assert len(rows) == 3
  assert len({row[3].strip() for row in rows}) == 1, "the same starting perplexity for all"


def test_init_from_a_run_of_another_model_shape_says_which_model_to_use(tmp_path, corpus_dir):
  common = ["--data", str(corpus_dir), "--steps", "1", *SMALL]
  pretrain.main(["--workdir", str(tmp_path / "pre"), *common])
  with pytest.raises(SystemExit, match=r"scan_layers False \(now True\); use its --model tiny\."):
    pretrain.main(
      ["--workdir", str(tmp_path / "ft"), "--init-from", str(tmp_path / "pre"), "--scan-layers"]
      + common
    )


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--steps", "-3"], "--steps must be positive, got -3"),
    (["--lr", "0"], "--lr must be positive, got 0.0"),
    (["--optimizers", "fira,sgd"], "--optimizers: unknown ['sgd']"),
  ],
)
def test_finetune_rejects_bad_flags_before_training(tmp_path, capsys, flags, message):
  pre = tmp_path / "pre"
  (pre / "checkpoints").mkdir(parents=True)
  with pytest.raises(SystemExit) as exit_info:
    finetune.main(["--init-from", str(pre), "--out", str(tmp_path / "ft"), *flags])
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize(
  "script, flags, message",
  [
    (pretrain, ["--steps", "0"], "--steps must be positive, got 0"),
    (pretrain, ["--batch-size", "-2"], "--batch-size must be positive, got -2"),
    (pretrain, ["--model", "huge"], "invalid choice: 'huge'"),
    (compare, ["--steps", "0"], "--steps must be positive, got 0"),
    (compare, ["--batch-size", "-1"], "--batch-size must be positive, got -1"),
    (compare, ["--rank-sweep-seeds", "0"], "--rank-sweep-seeds must be at least 1, got 0"),
    (compare, ["--model", "huge"], "invalid choice: 'huge'"),
    (compare, ["--confirm-only"], "--confirm-only needs --confirm-model"),
    (
      compare,
      ["--confirm-only", "--confirm-model", "3m", "--kinds", "adamw"],
      "no finished search in",
    ),
  ],
)
def test_pretrain_and_compare_reject_bad_flags_before_training(
  tmp_path, capsys, script, flags, message
):
  out_flag = "--workdir" if script is pretrain else "--out"
  with pytest.raises(SystemExit) as exit_info:
    script.main([out_flag, str(tmp_path / "run"), *flags])
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
  "script, flags",
  [
    (pretrain, ["--rank", "0"]),
    (pretrain, ["--rank", "-4"]),
    (pretrain, ["--lora-rank", "0"]),
    (finetune, ["--rank", "0"]),
  ],
)
def test_rank_flags_reject_zero_and_negative_naming_the_flag(tmp_path, capsys, script, flags):
  out_flag = "--workdir" if script is pretrain else "--out"
  with pytest.raises(SystemExit) as exit_info:
    script.main([out_flag, str(tmp_path / "run"), "--data", str(tmp_path / "nope"), *flags])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert f"argument {flags[0]}: must be a positive integer, got {flags[1]}; leave it out" in err
  assert not (tmp_path / "run").exists()


def test_rank_left_out_means_hidden_over_four_and_the_help_says_so(capsys):
  import optim

  config = train.Config(optimizer="lora")
  assert config.rank is None and config.lora_rank is None
  model_config = train.model_config_for(config, 256)
  assert optim.low_rank_layout(config, model_config)[0] == model_config.hidden // 4
  assert model_config.lora_rank == model_config.hidden // 4
  with pytest.raises(SystemExit):
    pretrain.main(["--help"])
  help_text = " ".join(capsys.readouterr().out.split())
  assert "None (the default) means hidden / 4" in help_text


def test_a_single_document_trains_on_its_first_90_percent_and_validates_on_the_rest(
  tmp_path, capsys
):
  text = "".join(f"line {i:05d} of the only document\n" for i in range(400))
  (tmp_path / "input.txt").write_text(text)
  corpus = data_lib.load_corpus(data=str(tmp_path / "input.txt"))
  cut = len(text) - len(text) // 10
  decode = corpus.tokenizer.decode
  assert decode(corpus.train_tokens) == text[:cut] + data_lib.DOC_SEPARATOR
  assert decode(corpus.val_tokens) == text[cut:] + data_lib.DOC_SEPARATOR
  said = capsys.readouterr().out.splitlines()
  assert len(said) == 1 and "validating on the last" in said[0] and "(10%)" in said[0]
  workdir = tmp_path / "run"
  pretrain.main(
    ["--workdir", str(workdir), "--data", str(tmp_path / "input.txt"), "--steps", "1"] + SMALL
  )
  assert (workdir / "summary.json").exists()


def test_resume_extends_a_finished_run_to_a_larger_steps_on_its_schedule_and_refuses_fewer(
  tmp_path, corpus_dir, capsys
):
  import optim

  common = ["--workdir", str(tmp_path), "--data", str(corpus_dir), "--log-every", "1", *SMALL]
  pretrain.main([*common, "--steps", "4"])
  summary = pretrain.main([*common, "--steps", "6", "--resume"])
  assert summary["steps_done"] == 6
  assert "from step 4 the learning rate follows the 6-step schedule" in capsys.readouterr().out
  with ocp.CheckpointManager((tmp_path / "checkpoints").resolve()) as manager:
    assert manager.latest_step() == 6
  records = train.read_metrics(tmp_path / "metrics.jsonl")
  lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
  assert sorted(lrs) == [1, 2, 3, 4, 5, 6]
  first, extended = (optim.learning_rate_schedule(0.01, n, 0.1, 0.1) for n in (4, 6))
  assert lrs[4] == pytest.approx(float(first(3)))  # the finished run's last step, kept
  assert [lrs[5], lrs[6]] == pytest.approx([float(extended(4)), float(extended(5))])
  assert [r["step"] for r in records if "eval_loss" in r] == [4, 6]
  with pytest.raises(SystemExit, match=r"already at step 6\. Pass a --steps above 6"):
    pretrain.main([*common, "--steps", "5", "--resume"])


def test_progress_bar_rate_is_in_steps_per_second_at_any_speed(capsys):
  from tqdm import tqdm

  bar = train.progress_bar(train.Config(steps=100), initial=3)
  bar.update(2)  # two steps since the bar started
  fast = tqdm.format_meter(**{**bar.format_dict, "elapsed": 0.5})
  slow = tqdm.format_meter(**{**bar.format_dict, "elapsed": 20.0})
  bar.close()
  assert "4.00step/s" in fast and "0.10step/s" in slow
  assert "s/step" not in fast + slow
  assert bar.smoothing == 0  # the mean rate since the bar started (after compilation)


def test_progress_announces_compilation_and_shows_the_mean_loss_since_the_last_log(
  tmp_path, corpus_dir, capsys
):
  common = ["--data", str(corpus_dir), "--steps", "4", *SMALL]
  pretrain.main(["--workdir", str(tmp_path / "a"), "--log-every", "2", *common, "--progress"])
  out, err = capsys.readouterr()
  assert re.search(
    r"compiling the training step…\ncompiled the training step and ran step 1 in", out
  )
  assert "loss_avg=" in err and "step/s" in err and "s/step" not in err
  pretrain.main(["--workdir", str(tmp_path / "b"), "--log-every", "1", *common])
  records = train.read_metrics(tmp_path / "b/metrics.jsonl")
  every_step = {r["step"]: r["loss"] for r in records if "loss" in r}
  logged = [r for r in train.read_metrics(tmp_path / "a/metrics.jsonl") if "loss" in r]
  assert [r["step"] for r in logged] == [2, 4]
  for r in logged:
    assert r["loss"] == pytest.approx(every_step[r["step"]], rel=1e-6)
    mean = (every_step[r["step"] - 1] + every_step[r["step"]]) / 2
    assert r["loss_avg"] == pytest.approx(mean, rel=1e-6)


def test_step_memory_estimate_is_within_15_percent_of_xla_memory_analysis():
  import jax
  import jax.numpy as jnp

  model_config = model_lib.make_config("tiny", vocab_size=256)
  batch_size, seq_len = 4, 256
  graph, params = nnx.split(nnx.eval_shape(lambda: model_lib.Llama(model_config, nnx.Rngs(0))))

  def loss_and_grads(params, tokens):
    return nnx.value_and_grad(model_lib.next_token_loss)(nnx.merge(graph, params), tokens)

  tokens = jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32)
  analysis = jax.jit(loss_and_grads).lower(params, tokens).compile().memory_analysis()
  moments = 2 * train.tree_bytes(params)  # Adam's, not part of the gradient's program
  xla = analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
  xla += analysis.output_size_in_bytes + moments
  estimate = train.step_memory_estimate(model_config, batch_size, seq_len)
  assert 0.85 < estimate / xla < 1.15
  default = train.Config()
  default_estimate = train.step_memory_estimate(
    model_lib.make_config(default.model), default.batch_size, default.seq_len
  )
  assert default_estimate < 2**30  # the default run fits on any machine


def test_a_step_too_large_for_memory_is_refused_naming_seq_len_and_batch_size(
  tmp_path, corpus_dir, monkeypatch
):
  monkeypatch.setattr(train, "available_memory", lambda: 2**30)
  flags = ["--data", str(corpus_dir), "--steps", "1", "--no-progress"]
  with pytest.raises(SystemExit) as exit_info:
    pretrain.main(["--workdir", str(tmp_path), *flags, "--seq-len", "1024", "--batch-size", "16"])
  message = str(exit_info.value.code)
  assert "--seq-len 1024 with --batch-size 16" in message
  assert "needs about 3.8 GiB" in message and "only 1.0 GiB of memory is available" in message
  assert "--seq-len 256 fits at --batch-size 16" in message
  assert not (tmp_path / "checkpoints").exists()


def test_a_mesh_of_more_devices_than_exist_is_reported_first_with_the_device_count(
  tmp_path, capsys
):
  with pytest.raises(SystemExit) as exit_info:
    pretrain.main(["--workdir", str(tmp_path / "run"), "--mesh", "data=1000", "--batch-size", "16"])
  assert exit_info.value.code == 2
  error = capsys.readouterr().err.split("error: ", 1)[1]
  assert error.startswith("--mesh data=1000 needs 1000 devices")
  assert "at most max(8, cores)" in error  # the CPU backend: what it can ask for
  assert not (tmp_path / "run").exists()
