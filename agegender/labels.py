"""Labels from UTKFace file names.

UTKFace names its images ``{age}_{gender}_{race}_{datetime}.jpg`` (or
``.jpg.chip.jpg`` for the aligned crops). A few real files lack the race field;
they keep age and gender and get race -1 (unknown).
"""

from __future__ import annotations

import dataclasses
import re

GENDERS = ('male', 'female')
RACES = ('White', 'Black', 'Asian', 'Indian', 'Others')
UNKNOWN_RACE = -1
MAX_AGE = 120

_SUFFIXES = ('.jpg.chip.jpg', '.jpg')
_DATETIME = re.compile(r'\d{8,20}')
_INTEGER = re.compile(r'-?\d+')


@dataclasses.dataclass(frozen=True)
class Labels:
  age: int
  gender: int
  race: int


class LabelError(ValueError):
  """A file name that does not carry valid UTKFace labels; str() is the reason."""


def _basename(name: str) -> str:
  # Names come from archives and folders alike; only the last part carries labels.
  return name.replace('\\', '/').rsplit('/', 1)[-1]


def _integer(text: str, field: str) -> int:
  if not _INTEGER.fullmatch(text):
    raise LabelError(f'{field} is not an integer: {text!r}')
  return int(text)


def parse_utkface_name(name: str) -> Labels:
  """Returns the labels in a UTKFace file name, or raises LabelError with the reason."""
  base = _basename(name)
  stem = None
  for suffix in _SUFFIXES:
    if base.lower().endswith(suffix):
      stem = base[:-len(suffix)]
      break
  if stem is None:
    raise LabelError(f'not a .jpg file name: {base!r}')
  fields = stem.split('_')
  if len(fields) == 4:
    age_text, gender_text, race_text, datetime_text = fields
  elif len(fields) == 3:
    age_text, gender_text, datetime_text = fields
    race_text = None
  else:
    raise LabelError(
        f'expected age_gender_race_datetime, got {len(fields)} fields: {base!r}')
  if not _DATETIME.fullmatch(datetime_text):
    raise LabelError(f'datetime is not a number: {datetime_text!r}')
  age = _integer(age_text, 'age')
  gender = _integer(gender_text, 'gender')
  race = UNKNOWN_RACE if race_text is None else _integer(race_text, 'race')
  if not 0 <= age <= MAX_AGE:
    raise LabelError(f'age out of range 0..{MAX_AGE}: {age}')
  if gender not in (0, 1):
    raise LabelError(f'gender not 0 or 1: {gender}')
  if not UNKNOWN_RACE <= race < len(RACES):
    raise LabelError(f'race out of range -1..{len(RACES) - 1}: {race}')
  return Labels(age=age, gender=gender, race=race)


def utkface_name(labels: Labels, datetime: str) -> str:
  """The UTKFace file name for these labels (the inverse of parse_utkface_name)."""
  if labels.race == UNKNOWN_RACE:
    return f'{labels.age}_{labels.gender}_{datetime}.jpg.chip.jpg'
  return f'{labels.age}_{labels.gender}_{labels.race}_{datetime}.jpg.chip.jpg'
