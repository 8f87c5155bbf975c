"""The flag tables in docs/*.md, generated from the entry points' own flags.

  .venv/bin/python docs/flag_tables.py           # rewrite every table in place
  .venv/bin/python docs/flag_tables.py --check   # exit status 1 when a table is out of date

A table sits between two marker comments naming its entry point,

  <!-- flags:train -->

  | flag | default | meaning |
  ...

  <!-- /flags:train -->

and everything between them is replaced. The flags are read in this process,
from each entry module as `python -m agegender.X` defines them: the module's
`define_flags(flag_values)` where it has one (train, data_service), the flags
it defines into absl's FLAGS at import (make_records), or the flags its
`console_main` derives from settings dataclasses through `agegender.cli.define_flags`
(evaluate, export, predict), caught into a fresh FlagValues. So a field added
to a settings dataclass appears in its table at the next run of this script,
and tests/test_docs.py fails until then.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Iterable
from unittest import mock

from absl import flags

DOCS_DIR = os.path.dirname(os.path.abspath(__file__))
ENTRY_POINTS = ('make_records', 'train', 'evaluate', 'export', 'predict', 'data_service')
MARKERS = re.compile(r'(<!-- flags:(\w+) -->\n)(.*?)(<!-- /flags:\2 -->)', re.DOTALL)
_ENUM_PREFIX = re.compile(r'^<[^>]*>: ')


def entry_flags(entry: str) -> list[flags.Flag]:
  """The flags `python -m agegender.<entry>` defines (not absl's own), in definition order."""
  if entry not in ENTRY_POINTS:
    raise ValueError(f'unknown entry point {entry!r}; expected one of {", ".join(ENTRY_POINTS)}')
  name = f'agegender.{entry}'
  module = importlib.import_module(name)
  if hasattr(module, 'define_flags'):
    flag_values = flags.FlagValues()
    module.define_flags(flag_values)
    return _unique(flag_values[key] for key in flag_values)
  defined_at_import = flags.FLAGS.flags_by_module_dict().get(name)
  if defined_at_import:
    return _unique(defined_at_import)
  flag_values = flags.FlagValues()
  cli = importlib.import_module('agegender.cli')
  define = cli.define_flags

  def define_here(*settings, flag_values=None, **options):  # pylint: disable=unused-argument
    define(*settings, flag_values=caught, **options)

  caught = flag_values
  with mock.patch.object(cli, 'define_flags', define_here), \
       mock.patch.object(cli, 'run', lambda *args, **kwargs: None):
    module.console_main()
  return _unique(flag_values[key] for key in flag_values)


def _unique(found: Iterable[flags.Flag]) -> list[flags.Flag]:
  seen, result = set(), []
  for flag in found:
    if flag.name not in seen:
      seen.add(flag.name)
      result.append(flag)
  return result


def _text(value: str) -> str:
  """Plain text made safe inside a Markdown table cell."""
  value = ' '.join(str(value).split())
  for raw, safe in (('|', '\\|'), ('<', '&lt;'), ('>', '&gt;')):
    value = value.replace(raw, safe)
  return value


def format_default(flag: flags.Flag) -> str:
  value = flag.default
  if isinstance(value, bool):
    return 'on' if value else 'off'
  if value is None:
    return 'unset'
  if isinstance(value, (list, tuple)):
    value = ','.join(str(item) for item in value)
  if isinstance(value, float):
    value = format(value, 'g')
  if value == '':
    return 'empty'
  return f'`{_text(value)}`'


def format_help(flag: flags.Flag) -> str:
  text = _ENUM_PREFIX.sub('', flag.help or '')
  choices = getattr(flag.parser, 'enum_values', None)
  if choices:
    text = f'{text.rstrip()} One of: {", ".join(choices)}.'
  return _text(text)


def table(entry: str) -> str:
  """The Markdown table of an entry point's flags: name, default, help."""
  rows = ['| flag | default | meaning |', '|---|---|---|']
  for flag in entry_flags(entry):
    rows.append(f'| `--{flag.name}` | {format_default(flag)} | {format_help(flag)} |')
  return '\n'.join(rows) + '\n'


def render(text: str) -> str:
  """`text` with every marked table regenerated."""
  # Blank lines around the table: Markdown then reads it apart from the comments.
  return MARKERS.sub(lambda m: m.group(1) + '\n' + table(m.group(2)) + '\n' + m.group(4), text)


def doc_files(docs_dir: str = DOCS_DIR) -> list[str]:
  return sorted(os.path.join(docs_dir, name) for name in os.listdir(docs_dir)
                if name.endswith('.md'))


def main(argv: list[str]) -> int:
  check = '--check' in argv[1:]
  stale = []
  for path in doc_files():
    with open(path, encoding='utf-8') as f:
      text = f.read()
    new = render(text)
    if new != text:
      stale.append(os.path.relpath(path))
      if not check:
        with open(path, 'w', encoding='utf-8') as f:
          f.write(new)
  verb = 'out of date' if check else 'rewritten'
  for path in stale:
    print(f'{path}: flag tables {verb}')
  return 1 if check and stale else 0


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(DOCS_DIR))  # The repository's agegender, run from anywhere.
  sys.exit(main(sys.argv))
