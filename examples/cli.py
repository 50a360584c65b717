"""Command-line flags from a config dataclass: one ``--flag`` per field, with its comment."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import pathlib
import re
import shutil
import typing


def _field_comments(cls) -> dict[str, str]:
  """Each field's end-of-line comment, continued by the comment lines right below it that
  start with ``#   `` (three spaces: a plain ``# heading`` starts the next group of fields)."""
  comments, last = {}, None
  for line in inspect.getsource(cls).splitlines():
    match = re.match(r"\s+(\w+):.*?#\s*(.*)$", line)
    more = re.match(r"\s+#   \s*(.*)$", line)
    if match:
      last = match.group(1)
      comments[last] = match.group(2)
    elif more and last:
      comments[last] += " " + more.group(1)
    else:
      last = None
  return comments


def parser_for(kind, problem=None):
  """argparse ``type`` for an annotation such as ``int``, ``float | None`` or ``str``;
  ``problem(value)`` says what is wrong with a parsed value (``None``: nothing)."""
  args = [a for a in typing.get_args(kind) if a is not type(None)]
  base = args[0] if args else kind
  optional = type(None) in typing.get_args(kind)

  def parse(text: str):
    if optional and text.lower() == "none":
      return None
    value = base(text)
    message = problem(value) if problem else None
    if message:
      raise argparse.ArgumentTypeError(message)  # argparse prefixes "argument --flag: "
    return value

  parse.__name__ = getattr(base, "__name__", str(base))
  return parse


def add_config_flags(
  parser: argparse.ArgumentParser, cls, defaults=None, choices=None, problems=None
) -> None:
  """Adds ``--field-name`` for each dataclass field; ``choices`` maps field names to options,
  ``problems`` field names to a function saying what is wrong with a value (``None``: fine)."""
  choices = choices or {}
  problems = problems or {}
  comments = _field_comments(cls)
  hints = typing.get_type_hints(cls)
  defaults = defaults or cls()
  for field in dataclasses.fields(cls):
    flag = "--" + field.name.replace("_", "-")
    default = getattr(defaults, field.name)
    help_text = f"{comments.get(field.name, '')} (default: {default})"
    if hints[field.name] is bool:
      parser.add_argument(
        flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
      )
    else:
      parser.add_argument(
        flag,
        type=parser_for(hints[field.name], problems.get(field.name)),
        default=default,
        help=help_text,
        choices=choices.get(field.name),
      )


def config_from_args(cls, args: argparse.Namespace):
  return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def prepare_workdir(workdir: pathlib.Path, resume: bool, overwrite: bool) -> None:
  """Refuses to mix a new run with an old one's checkpoints unless told what to do."""
  checkpoints = workdir / "checkpoints"
  if checkpoints.exists() and any(checkpoints.iterdir()) and not resume:
    if not overwrite:
      raise SystemExit(
        f"{workdir} holds checkpoints of an earlier run. Pass --resume to continue it,"
        " --overwrite to start again, or choose another --workdir."
      )
    shutil.rmtree(workdir)
