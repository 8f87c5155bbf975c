"""Labels from UTKFace file names.

UTKFace names its images ``{age}_{gender}_{race}_{datetime}.jpg`` (or
``.jpg.chip.jpg`` for the aligned crops). The labels are the first three
fields; the datetime is no label, so only its leading digits are checked (at
least 8, which tells it apart from a race) and whatever follows them is
ignored: real names such as ``24_0_1_20170116220224657 .jpg.chip.jpg`` (a
space) and ``55_0_0_20170116232725357jpg.chip.jpg`` (no dot) keep their labels.

Three real files lack the race field (``39_1_20170116174525125.jpg.chip.jpg``):
their age and gender are kept and their race is -1 (unknown), which the
histograms count under "-1" and no head is trained on.
"""

from __future__ import annotations

import dataclasses
import re

GENDERS = ('male', 'female')
RACES = ('White', 'Black', 'Asian', 'Indian', 'Others')
UNKNOWN_RACE = -1
MAX_AGE = 120

_SUFFIX = '.jpg'
_DATETIME = re.compile(r'\d{8}')  # The start of the field; the rest is ignored.
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
