"""The docs against the code: flag tables as the configuration defines them, commands whose flags
exist, a README a newcomer reads in minutes.

In-process and quick: the entry modules are imported, never run as subprocesses.
"""

import importlib.util
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, 'docs')
README = os.path.join(ROOT, 'README.md')
MAX_README_LINES = 220
# absl's own flags that any entry point accepts.
ABSL_FLAGS = {'help', 'helpfull', 'helpshort', 'helpxml', 'flagfile', 'undefok'}
CONSOLE_SCRIPTS = {'agegender-make-records': 'make_records', 'agegender-train': 'train',
                   'agegender-evaluate': 'evaluate', 'agegender-export': 'export',
                   'agegender-predict': 'predict', 'agegender-data-service': 'data_service'}
COMMAND = re.compile(r'(?:python3? -m agegender\.(\w+)|\b(agegender-[a-z-]+))(?=\s|$)')


def _load_flag_tables():
  spec = importlib.util.spec_from_file_location('flag_tables', os.path.join(DOCS, 'flag_tables.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


flag_tables = _load_flag_tables()


def _read(path):
  with open(path, encoding='utf-8') as f:
    return f.read()


def _documents():
  return [README] + flag_tables.doc_files(DOCS)


@pytest.fixture(scope='module')
def entry_flags():
  """Each entry point's flags: {name: is_boolean}."""
  return {entry: {flag.name: flag.boolean for flag in flag_tables.entry_flags(entry)}
          for entry in flag_tables.ENTRY_POINTS}


def code_blocks(text):
  """The text of each fenced code block, then each inline code span outside them."""
  blocks, current, prose = [], None, []
  for line in text.splitlines():
    if line.strip().startswith('```'):
      if current is None:
        current = []
      else:
        blocks.append('\n'.join(current))
        current = None
    elif current is not None:
      current.append(line)
    else:
      prose.append(line)
  spans = re.findall(r'`([^`]+)`', '\n'.join(prose))
  return blocks + [' '.join(span.split()) for span in spans]


def commands(text):
  """(entry point, [arguments]) of every agegender command in the text's code blocks."""
  found = []
  for block in code_blocks(text):
    block = re.sub(r'\\\n', ' ', block)  # Continued lines are one command.
    for line in block.splitlines():
      for command in COMMAND.finditer(line):
        entry = command.group(1) or CONSOLE_SCRIPTS.get(command.group(2), command.group(2))
        if entry.isupper():
          continue  # A placeholder: `python -m agegender.X`.
        lexer = shlex.shlex(line[command.end():], posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = '#'
        arguments = []
        for token in lexer:
          if token and set(token) <= set('();<>|&'):
            break  # The shell's: the command ends here.
          arguments.append(token.strip('[]'))
        found.append((entry, arguments))
  return found


def unknown_flags(arguments, known):
  """The --flags among the arguments that the entry point does not define."""
  unknown = []
  for argument in arguments:
    if not argument.startswith('--') or argument == '--':
      continue
    name = argument[2:].split('=', 1)[0]
    negated = name.startswith('no') and known.get(name[2:]) is True
    if name not in known and name not in ABSL_FLAGS and not negated:
      unknown.append(argument)
  return unknown


def test_every_flag_table_is_what_the_configuration_defines():
  stale = [os.path.relpath(path, ROOT) for path in flag_tables.doc_files(DOCS)
           if flag_tables.render(_read(path)) != _read(path)]
  assert not stale, (f'flag tables out of date in {", ".join(stale)}: run '
                     '.venv/bin/python docs/flag_tables.py')


def test_every_entry_point_has_a_flag_table():
  tables = {match.group(2) for path in flag_tables.doc_files(DOCS)
            for match in flag_tables.MARKERS.finditer(_read(path))}
  assert tables == set(flag_tables.ENTRY_POINTS)


def test_a_table_lists_each_flag_with_its_default():
  table = flag_tables.table('evaluate')
  assert '| `--split` | `test` |' in table
  assert '| `--model_dir` | empty |' in table


def test_every_documented_command_uses_flags_its_entry_point_defines(entry_flags):
  problems, seen = [], 0
  for path in _documents():
    for entry, arguments in commands(_read(path)):
      seen += 1
      where = os.path.relpath(path, ROOT)
      if entry not in entry_flags:
        problems.append(f'{where}: no entry point agegender.{entry}')
        continue
      for flag in unknown_flags(arguments, entry_flags[entry]):
        problems.append(f'{where}: agegender.{entry} has no flag {flag}')
  assert seen > 30  # The extraction found the commands.
  assert not problems, '\n'.join(problems)


def test_the_command_check_catches_a_misspelt_flag_and_accepts_negations():
  text = ('```\npython -m agegender.train --epoch=3 --noaugment \\\n  --model_dir=runs/x  # a comment'
          ' --nothing\npython -m agegender.predict --find_faces photo.jpg | head\n```\n')
  found = commands(text)
  assert found == [('train', ['--epoch=3', '--noaugment', '--model_dir=runs/x']),
                   ('predict', ['--find_faces', 'photo.jpg'])]
  known = {'epochs': False, 'augment': True, 'model_dir': False}
  assert unknown_flags(found[0][1], known) == ['--epoch=3']
  assert unknown_flags(['--nomodel_dir'], known) == ['--nomodel_dir']  # Not a boolean.


def test_the_readme_is_short():
  lines = _read(README).count('\n')
  assert lines <= MAX_README_LINES, f'README.md has {lines} lines; reference material goes in docs/'


def _anchors(path):
  """GitHub's anchors of a Markdown file's headings."""
  headings = re.findall(r'^#+ (.+)$', _read(path), re.MULTILINE)
  return {re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')
          for heading in headings}


def test_links_point_to_files_and_headings_that_exist():
  generated = ('docs/images/', 'agegender/models/')  # Written by the packaged model's tools.
  missing = []
  for path in _documents():
    for target, anchor in re.findall(r'\]\(([^)#\s]*)(?:#([^)\s]*))?\)', _read(path)):
      if re.match(r'[a-z]+://', target):
        continue
      resolved = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
      where = f'{os.path.relpath(path, ROOT)}: {target}' + (f'#{anchor}' if anchor else '')
      if not os.path.exists(resolved):
        if not os.path.relpath(resolved, ROOT).startswith(generated):
          missing.append(where)
      elif anchor and resolved.endswith('.md') and anchor not in _anchors(resolved):
        missing.append(where)
  assert not missing, '\n'.join(missing)
