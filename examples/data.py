"""Text corpora, tokenizers and deterministic, resumable batches.

The default corpus is the Python standard library's own source files, read from the running
interpreter's installation: about 30 MB of real text on every machine, no download. Files are
split into train and validation by a hash of their relative path, so the split is the same on
every run and no validation file is ever seen in training (a corpus of one document, such as
a single ``input.txt``, is split by position instead: its last 10% validates). A few GUI
packages are held out of pre-training altogether as the default fine-tuning domain.

Batch ``t`` of seed ``s`` is drawn from ``np.random.default_rng([s, t])``: the data position is
the step, so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import sysconfig
from collections.abc import Iterator
from collections.abc import Sequence

import numpy as np

FINETUNE_PACKAGES = ("idlelib", "tkinter", "turtledemo")  # held out of pre-training
DOC_SEPARATOR = "\0"  # never in source text; byte 0 marks document boundaries
VALIDATION_PERCENT = 5
SINGLE_DOCUMENT_VALIDATION_FRACTION = 0.1  # a lone document: its last tenth validates


@dataclasses.dataclass(frozen=True)
class Document:
  name: str  # a stable identifier (relative path, or dataset index)
  text: str


def is_validation(name: str, percent: int = VALIDATION_PERCENT) -> bool:
  """Deterministic split by name: the same on every machine and run."""
  digest = hashlib.sha256(name.encode()).digest()
  return int.from_bytes(digest[:4], "little") % 100 < percent


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents(domain: str = "pretrain") -> list[Document]:
  """The standard library's ``.py`` files: ``pretrain`` (all but the held-out packages) or
  ``finetune`` (only the held-out packages)."""
  if domain not in ("pretrain", "finetune"):
    raise ValueError(f"domain must be 'pretrain' or 'finetune', got {domain!r}.")
  root = stdlib_root()
  docs = []
  for path in sorted(root.rglob("*.py")):
    rel = path.relative_to(root)
    if rel.parts[0] in ("site-packages", "dist-packages"):
      continue
    held_out = rel.parts[0] in FINETUNE_PACKAGES
    if held_out != (domain == "finetune"):
      continue
    docs.append(Document(str(rel), path.read_text(encoding="utf-8", errors="replace")))
  if not docs:
    raise FileNotFoundError(
      f"no .py files for the {domain!r} domain under {root}; pass --data with your own text."
    )
  return docs


def file_documents(path: str | pathlib.Path) -> list[Document]:
  """A ``.txt``/``.jsonl`` file or a folder of them (``.jsonl`` lines need a ``text`` field)."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"--data {path}: no such file or folder.")
  files = (
    sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
    if path.is_dir()
    else [path]
  )
  docs = []
  for file in files:
    rel = str(file.relative_to(path)) if path.is_dir() else file.name
    if file.suffix == ".jsonl":
      for i, line in enumerate(file.read_text(encoding="utf-8").splitlines()):
        if line.strip():
          record = json.loads(line)
          if "text" not in record:
            raise ValueError(f"{file}:{i + 1}: a .jsonl line needs a 'text' field.")
          docs.append(Document(f"{rel}:{i}", record["text"]))
    else:
      docs.append(Document(rel, file.read_text(encoding="utf-8", errors="replace")))
  docs = [d for d in docs if d.text.strip()]
  if not docs:
    raise ValueError(f"--data {path}: no non-empty .txt or .jsonl text found.")
  return docs


def hf_documents(name: str, config: str | None, split: str, max_docs: int) -> list[Document]:
  """A Hugging Face dataset with a ``text`` column: a folder written by ``save_to_disk``,
  or a hub name streamed when online (the paper used ``allenai/c4``, ``en``)."""
  import datasets

  if pathlib.Path(name).is_dir():
    dataset = datasets.load_from_disk(name)
    if isinstance(dataset, datasets.DatasetDict):
      dataset = dataset[split]
    rows = dataset.select(range(min(max_docs, len(dataset))))
  else:
    rows = datasets.load_dataset(name, config, split=split, streaming=True).take(max_docs)
  docs = [Document(f"{split}:{i}", row["text"]) for i, row in enumerate(rows)]
  if not docs:
    raise ValueError(f"--hf-dataset {name}: split {split!r} is empty.")
  return docs


def split_document(doc: Document) -> tuple[list[Document], list[Document]]:
  """A corpus of one document (one ``input.txt``): split by position, the last
  ``SINGLE_DOCUMENT_VALIDATION_FRACTION`` of its characters for validation."""
  cut = len(doc.text) - int(len(doc.text) * SINGLE_DOCUMENT_VALIDATION_FRACTION)
  print(
    f"one document ({doc.name}, {len(doc.text):,} characters): training on its first"
    f" {cut:,} characters, validating on the last {len(doc.text) - cut:,}"
    f" ({SINGLE_DOCUMENT_VALIDATION_FRACTION:.0%})"
  )
  return [Document(f"{doc.name}[:{cut}]", doc.text[:cut])], [
    Document(f"{doc.name}[{cut}:]", doc.text[cut:])
  ]


def split_documents(docs: Sequence[Document]) -> tuple[list[Document], list[Document]]:
  if len(docs) == 1:
    return split_document(docs[0])
  train = [d for d in docs if not is_validation(d.name)]
  val = [d for d in docs if is_validation(d.name)]
  if not train or not val:  # tiny corpora: hold out the last document
    train, val = list(docs[:-1]), list(docs[-1:])
  return train, val


class ByteTokenizer:
  """UTF-8 bytes; byte 0 separates documents. No training, no download."""

  name = "bytes"
  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class BpeTokenizer:
  """A Hugging Face ``tokenizers`` BPE tokenizer, from a file or trained on the train split."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.get_vocab_size()
    self.name = f"bpe{self.vocab_size}"

  @classmethod
  def from_file(cls, path: str) -> BpeTokenizer:
    from tokenizers import Tokenizer

    return cls(Tokenizer.from_file(path))

  @classmethod
  def train(cls, docs: Sequence[Document], vocab_size: int) -> BpeTokenizer:
    from tokenizers import Tokenizer
    from tokenizers import decoders
    from tokenizers import models
    from tokenizers import pre_tokenizers
    from tokenizers import trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=[DOC_SEPARATOR],
      show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator((d.text for d in docs), trainer=trainer)
    return cls(tokenizer)

  def save(self, path: str | pathlib.Path) -> None:
    self.tokenizer.save(str(path))

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tokenizer.encode(text).ids, dtype=np.int32)

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids])


def tokenize(docs: Sequence[Document], tokenizer) -> np.ndarray:
  """One token stream: documents joined by the separator."""
  separator = tokenizer.encode(DOC_SEPARATOR)
  parts = []
  for doc in docs:
    parts.append(tokenizer.encode(doc.text))
    parts.append(separator)
  return np.concatenate(parts).astype(np.int32)


def batch_at(tokens: np.ndarray, step: int, seed: int, batch_size: int, seq_len: int) -> np.ndarray:
  """Batch number ``step``: random windows of ``seq_len + 1`` tokens, a pure function of
  (seed, step), so resuming at a step reproduces the batches exactly."""
  if len(tokens) <= seq_len + 1:
    raise ValueError(
      f"the training text has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1};"
      " use more text or a shorter --seq-len."
    )
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
  return np.stack([tokens[s : s + seq_len + 1] for s in starts])


def eval_batches(
  tokens: np.ndarray, batch_size: int, seq_len: int, num_batches: int
) -> list[np.ndarray]:
  """A fixed validation set: evenly spaced windows (the same for every run and optimizer)."""
  window = seq_len + 1
  count = min(batch_size * num_batches, max(1, (len(tokens) - 1) // window))
  if len(tokens) < window:
    raise ValueError(
      f"the validation text (about {VALIDATION_PERCENT}% of the documents, or the last"
      f" {SINGLE_DOCUMENT_VALIDATION_FRACTION:.0%} of a single one) has {len(tokens)} tokens,"
      f" fewer than one sequence of {window}; use more text or a shorter --seq-len."
    )
  starts = np.linspace(0, len(tokens) - window, count).astype(np.int64)
  windows = np.stack([tokens[s : s + window] for s in starts])
  return [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]


@dataclasses.dataclass
class Corpus:
  train_tokens: np.ndarray
  val_tokens: np.ndarray
  tokenizer: object
  description: str
  train_names: list[str]
  val_names: list[str]

  def batches(
    self, start_step: int, seed: int, batch_size: int, seq_len: int
  ) -> Iterator[np.ndarray]:
    step = start_step
    while True:
      yield batch_at(self.train_tokens, step, seed, batch_size, seq_len)
      step += 1


def load_corpus(
  data: str | None = None,
  hf_dataset: str | None = None,
  hf_config: str | None = None,
  hf_max_docs: int = 20000,
  domain: str = "pretrain",
  tokenizer: str = "bytes",
  tokenizer_out: pathlib.Path | None = None,
) -> Corpus:
  """Reads, splits and tokenizes the chosen corpus.

  ``tokenizer``: ``bytes`` (default), ``bpe:PATH`` (a ``tokenizers`` JSON file), or
  ``bpe-train:VOCAB`` (trained on the training split only; saved to ``tokenizer_out``).
  """
  if data and hf_dataset:
    raise ValueError("give --data or --hf-dataset, not both.")
  if hf_dataset:
    train = hf_documents(hf_dataset, hf_config, "train", hf_max_docs)
    try:
      val = hf_documents(hf_dataset, hf_config, "validation", max(1, hf_max_docs // 20))
    except (KeyError, ValueError):
      train, val = split_documents(train)
    description = f"Hugging Face dataset {hf_dataset}"
  else:
    docs = file_documents(data) if data else stdlib_documents(domain)
    train, val = split_documents(docs)
    description = f"{data}" if data else f"Python {domain} stdlib sources ({stdlib_root()})"
  if tokenizer == "bytes":
    tok = ByteTokenizer()
  elif tokenizer.startswith("bpe:"):
    tok = BpeTokenizer.from_file(tokenizer[4:])
  elif tokenizer.startswith("bpe-train:"):
    tok = BpeTokenizer.train(train, int(tokenizer.split(":", 1)[1]))
    if tokenizer_out is not None:
      tok.save(tokenizer_out)
  else:
    raise ValueError(f"--tokenizer must be bytes, bpe:PATH or bpe-train:VOCAB, got {tokenizer!r}.")
  return Corpus(
    train_tokens=tokenize(train, tok),
    val_tokens=tokenize(val, tok),
    tokenizer=tok,
    description=description,
    train_names=[d.name for d in train],
    val_names=[d.name for d in val],
  )
