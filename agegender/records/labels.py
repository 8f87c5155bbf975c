"""Labels (age, gender, race) from a UTKFace name, a name pattern or a table.

UTKFace names (the default): ``{age}_{gender}_{race}_{datetime}.jpg`` (or
``.jpg.chip.jpg`` for the aligned crops). The labels are the first three
fields; the datetime is no label, so only its leading digits are checked (at
least 8, which tells it apart from a race) and whatever follows them is
ignored: real names such as ``24_0_1_20170116220224657 .jpg.chip.jpg`` (a
space) and ``55_0_0_20170116232725357jpg.chip.jpg`` (no dot) keep their labels.
Three real files lack the race field (``39_1_20170116174525125.jpg.chip.jpg``):
their race is -1 (unknown), which the histograms count under "-1".

A name pattern (`parse_pattern_name`): a regular expression with the named
groups ``age`` and optionally ``gender`` and ``race``, matched against the
whole base name (re.fullmatch; folders left out).

A table (`read_table`): a CSV file with a header row and the columns ``path``
and ``age``, optionally ``gender`` and ``race`` (other columns are ignored);
``path`` is relative to the source's root (the folder, or the archive's top).

Values, in patterns and tables alike: age an integer 0..MAX_AGE; gender 0/1,
m/f or male/female (any case; 0 is male, as in UTKFace) or empty for unknown
(UNKNOWN_GENDER: trains the age head only); race 0..4 or empty for unknown.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import re
from typing import Iterable

from agegender import contract
from agegender import files

GENDERS = ('male', 'female')
RACES = ('White', 'Black', 'Asian', 'Indian', 'Others')
UNKNOWN_RACE = -1
UNKNOWN_GENDER = -1  # A face whose gender the source does not give: trains the age head only.
MAX_AGE = 120
GENDER_CODES = {'0': 0, '1': 1, 'm': 0, 'f': 1, 'male': 0, 'female': 1}
MAX_TABLE_BYTES = 512 * 2**20  # Read whole into the main process: a sane bound.
TABLE_COLUMNS = ('path', 'age', 'gender', 'race')

# Why a file has no labels from the table (its rejection kind).
NO_ROW = 'no label row'
BAD_ROW = 'bad label row'
# Why a table row is not used.
MISSING_FILE = 'missing file'
DUPLICATE_ROW = 'duplicate row'
NO_PATH = 'no path'

_SUFFIX = '.jpg'
_DATETIME = re.compile(r'\d{8}')  # The start of the field; the rest is ignored.
_INTEGER = re.compile(r'-?\d+')


@dataclasses.dataclass(frozen=True)
class Labels:
  age: int
  gender: int
  race: int


class LabelError(ValueError):
  """A name or value that does not carry valid labels; str() is the reason, `field` the label
  at fault (age, gender, race) or None."""

  def __init__(self, message: str, field: str | None = None):
    super().__init__(message)
    self.field = field


def _basename(name: str) -> str:
  # Names come from archives and folders alike; only the last part carries labels.
  return name.replace('\\', '/').rsplit('/', 1)[-1]


def _integer(text: str, field: str) -> int:
  if not _INTEGER.fullmatch(text):
    raise LabelError(f'{field} is not an integer: {text!r}', field)
  return int(text)


def _checked(age: int, gender: int, race: int) -> Labels:
  if not 0 <= age <= MAX_AGE:
    raise LabelError(f'age out of range 0..{MAX_AGE}: {age}', 'age')
  if gender not in (0, 1, UNKNOWN_GENDER):
    raise LabelError(f'gender not 0 or 1: {gender}', 'gender')
  if not UNKNOWN_RACE <= race < len(RACES):
    raise LabelError(f'race out of range -1..{len(RACES) - 1}: {race}', 'race')
  return Labels(age=age, gender=gender, race=race)


def parse_utkface_name(name: str) -> Labels:
  """Returns the labels in a UTKFace file name, or raises LabelError with the reason."""
  base = _basename(name)
  if not base.lower().endswith(_SUFFIX):
    raise LabelError(f'not a .jpg file name: {base!r}')
  fields = base[:-len(_SUFFIX)].split('_')
  if len(fields) == 4:
    age_text, gender_text, race_text, datetime_text = fields
  elif len(fields) == 3:
    age_text, gender_text, datetime_text = fields
    race_text = None
  else:
    raise LabelError(
        f'expected age_gender_race_datetime, got {len(fields)} fields: {base!r}')
  if not _DATETIME.match(datetime_text):
    raise LabelError(f'datetime does not start with 8 digits: {datetime_text!r}')
  gender = _integer(gender_text, 'gender')
  if gender == UNKNOWN_GENDER:  # UTKFace's names always give the gender.
    raise LabelError(f'gender not 0 or 1: {gender}', 'gender')
  return _checked(_integer(age_text, 'age'), gender,
                  UNKNOWN_RACE if race_text is None else _integer(race_text, 'race'))


def utkface_name(labels: Labels, datetime: str) -> str:
  """The UTKFace file name for these labels (the inverse of parse_utkface_name)."""
  if labels.race == UNKNOWN_RACE:
    return f'{labels.age}_{labels.gender}_{datetime}.jpg.chip.jpg'
  return f'{labels.age}_{labels.gender}_{labels.race}_{datetime}.jpg.chip.jpg'


def parse_values(age: str, gender: str | None, race: str | None) -> Labels:
  """Labels from the texts of a table row or a pattern's groups (None or '': unknown)."""
  gender_text = (gender or '').strip().lower()
  if gender_text and gender_text not in GENDER_CODES:
    raise LabelError(f'gender is not 0/1, m/f or male/female: {gender!r}', 'gender')
  race_text = (race or '').strip()
  return _checked(_integer((age or '').strip(), 'age'),
                  GENDER_CODES.get(gender_text, UNKNOWN_GENDER),
                  _integer(race_text, 'race') if race_text else UNKNOWN_RACE)


# Name patterns.

@functools.lru_cache(maxsize=8)
def compile_name_pattern(pattern: str) -> re.Pattern:
  """The compiled pattern, or contract.ArgumentError about `name_pattern` saying what is wrong."""
  try:
    compiled = re.compile(pattern)
  except re.error as e:
    raise contract.ArgumentError('name_pattern',
                                 f'name_pattern is not a regular expression: {e}') from None
  if 'age' not in compiled.groupindex:
    raise contract.ArgumentError(
        'name_pattern', f'name_pattern "{pattern}" has no group (?P<age>...); it needs one, '
        'and may have (?P<gender>...) and (?P<race>...)')
  return compiled


def parse_pattern_name(name: str, pattern: str) -> Labels:
  """The labels of a file name by a name pattern, or LabelError with the reason."""
  base = _basename(name)
  match = compile_name_pattern(pattern).fullmatch(base)
  if match is None:
    raise LabelError(f'the name does not match the name pattern: {base!r}')
  groups = match.groupdict()
  return parse_values(groups['age'], groups.get('gender'), groups.get('race'))


# Tables.

@dataclasses.dataclass(frozen=True)
class NoLabels:
  """Stands for a file's labels when the table gives none; the file is rejected as `kind`."""
  kind: str
  reason: str


@dataclasses.dataclass(frozen=True)
class RowProblem:
  """A table row that labels no file: its line in the CSV, its path, why."""
  line: int
  path: str
  kind: str
  reason: str

  def to_json(self) -> dict:
    return {'line': self.line, 'file': self.path, 'reason': f'{self.kind}: {self.reason}'}


def table_key(path: str) -> str:
  """A table path or a source name in one spelling: '/' between folders, no leading './'."""
  path = path.replace('\\', '/')
  while path.startswith('./'):
    path = path[2:]
  return path


@dataclasses.dataclass(frozen=True)
class LabelTable:
  """A CSV table read once: each path's labels (or why it has none) and the rows not used."""
  path: str
  sha256: str
  num_rows: int
  rows: dict[str, Labels | NoLabels]
  problems: tuple[RowProblem, ...]  # Rows rejected when read.
  lines: dict[str, int]             # The line of each usable row.

  def lookup(self, name: str) -> Labels | NoLabels:
    found = self.rows.get(table_key(name))
    if found is None:
      return NoLabels(NO_ROW, 'no row of the labels table names this file')
    return found

  def rejected_rows(self, matched: Iterable[str]) -> list[RowProblem]:
    """The rows rejected when read, and the usable rows whose file no name in `matched` is."""
    matched = {table_key(name) for name in matched}
    missing = [RowProblem(self.lines[path], path, MISSING_FILE, 'no such file in the source')
               for path in self.lines if path not in matched]
    return sorted([*self.problems, *missing], key=lambda row: (row.line, row.path))


def in_table(found: Labels | NoLabels) -> bool:
  """Whether a lookup's result came from a row (usable or not)."""
  return not (isinstance(found, NoLabels) and found.kind == NO_ROW)


def _table_error(path: str, message: str) -> contract.ArgumentError:
  return contract.ArgumentError('labels', f'the labels table {path} {message}')


def _read_text(path: str) -> tuple[str, str]:
  if not files.exists(path) or files.isdir(path):
    raise _table_error(path, 'does not exist (expected a CSV file)')
  size = files.size(path)
  if size > MAX_TABLE_BYTES:
    raise _table_error(path, f'is {size} bytes, more than the bound of {MAX_TABLE_BYTES} '
                             f'({MAX_TABLE_BYTES // 2**20} MiB)')
  data = files.read_bytes(path, MAX_TABLE_BYTES + 1)
  if len(data) > MAX_TABLE_BYTES:
    raise _table_error(path, f'grew past the bound of {MAX_TABLE_BYTES} bytes while read')
  try:
    return data.decode('utf-8-sig'), hashlib.sha256(data).hexdigest()
  except UnicodeDecodeError as e:
    raise _table_error(path, f'is not UTF-8 text: {e}') from None


def read_table(path: str) -> LabelTable:
  """Reads a labels CSV (see the module's docstring); raises contract.ArgumentError about
  `labels` when it cannot be read. Rows with bad values or duplicate paths are kept as
  problems, and their files are rejected, never the whole table."""
  text, sha256 = _read_text(path)
  reader = csv.reader(io.StringIO(text, newline=''))
  try:
    header = [name.strip().lower() for name in next(reader, [])]
    missing = [name for name in TABLE_COLUMNS[:2] if name not in header]
    if missing:
      raise _table_error(path, f'has no {" or ".join(missing)} column in its header row '
                               f'{",".join(header)!r}; expected path,age[,gender][,race]')
    column = {name: header.index(name) for name in TABLE_COLUMNS if name in header}
    found: dict[str, list[tuple[int, Labels | LabelError]]] = {}
    problems, num_rows = [], 0
    for row in reader:
      if not any(value.strip() for value in row):
        continue  # Blank lines.
      num_rows += 1
      values = {name: row[index] if index < len(row) else '' for name, index in column.items()}
      key = table_key(values['path'].strip())
      if not key:
        problems.append(RowProblem(reader.line_num, '', NO_PATH, 'the row has no path'))
        continue
      try:
        labels = parse_values(values['age'], values.get('gender'), values.get('race'))
      except LabelError as e:
        labels = e
      found.setdefault(key, []).append((reader.line_num, labels))
  except csv.Error as e:
    raise _table_error(path, f'is not a CSV file (line {reader.line_num}: {e})') from None

  rows, lines = {}, {}
  for key, entries in found.items():
    if len(entries) > 1:
      numbers = [line for line, _ in entries]
      where = ', '.join(map(str, numbers))
      problems.extend(RowProblem(line, key, DUPLICATE_ROW, f'lines {where} name the same file')
                      for line in numbers)
      rows[key] = NoLabels(BAD_ROW, f'lines {where} of the labels table name this file')
      continue
    [(line, labels)] = entries
    if isinstance(labels, LabelError):
      problems.append(RowProblem(line, key, f'bad {labels.field or "value"}', str(labels)))
      rows[key] = NoLabels(BAD_ROW, f'line {line} of the labels table: {labels}')
    else:
      rows[key], lines[key] = labels, line
  return LabelTable(path=path, sha256=sha256, num_rows=num_rows, rows=rows,
                    problems=tuple(problems), lines=lines)
