"""The one contract between make_records, the pipeline, tfds and the tests.

Everything that both writes and reads the records is defined here once: the
feature keys, the image storage kinds, the output layout and the manifest.

Layout under a records root (``records/`` by default)::

  <root>/utkface/<VERSION>/utkface-<split>.tfrecord-00000-of-000NN
  <root>/utkface/<VERSION>/dataset_info.json, features.json   (tfds metadata)
  <root>/utkface/<VERSION>/manifest.json                       (written last)

manifest.json, the part every reader relies on (make_records adds more)::

  {"manifest_format": 1, "dataset": "utkface", "version": "1.0.0",
   "image_storage": {"format": "jpeg" | "raw", "size": null | 128, "jpeg_quality": null | 95},
   "splits": {"train": {"num_examples": 800,
                        "shards": [{"file": "utkface-train.tfrecord-00000-of-00002",
                                    "num_examples": 400}, ...]},
              "validation": {...}, "test": {...}}}

Readers list shards from the manifest, never by globbing, so a half-written
shard (under a temporary name) is never read. make_records also writes each
split's label statistics (`label_statistics` below reads them), so training
never rereads a split for its mean age or majority gender.
"""

from __future__ import annotations

import dataclasses
import json
import math
import posixpath
import re
from typing import Any

from agegender import files

DATASET_NAME = 'utkface'
VERSION = '1.0.0'
SPLITS = ('train', 'validation', 'test')
MANIFEST_NAME = 'manifest.json'
MANIFEST_FORMAT = 1
DEFAULT_IMAGE_SIZE = 128

# Record keys. Flat, so tfds reads the same records with a FeaturesDict.
IMAGE = 'image'
AGE = 'age'
GENDER = 'gender'
RACE = 'race'
FILE_NAME = 'file_name'
INT_KEYS = (AGE, GENDER, RACE)

# The model's output names: the pipeline's targets and the model's heads.
GENDER_OUTPUT = 'gender_output'
AGE_OUTPUT = 'age_output'

# A training run's folder: what training writes and serving reads.
MODEL_FILE = 'model.keras'
HISTORY_FILE = 'history.csv'
CURVES_FILE = 'learning_curves.png'
CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
LOGS_DIR = 'logs'
EXPORT_DIR = 'export'

# Image storage kinds.
JPEG = 'jpeg'  # JPEG bytes: the source's unchanged (size None) or re-encoded at `size`.
RAW = 'raw'    # uint8 pixels, size x size x 3, row-major.
STORAGE_FORMATS = (JPEG, RAW)


class ArgumentError(ValueError):
  """A library call's argument that the caller can fix: the one error type of the stages.

  `field` names the keyword argument (or settings field) at fault, so each
  entry point maps it to its own flag in one table; str() says what is wrong,
  in the library's words; `hint`, when given, says how to fix it, naming other
  fields as `{name}` so that an entry point can write them as its flags.
  """

  def __init__(self, field: str, message: str, hint: str | None = None):
    super().__init__(message)
    self.field = field
    self.hint = hint

  def fix(self, spell=lambda field: field) -> str | None:
    """The hint with each `{field}` in it written by `spell` (an entry point: its flag)."""
    if self.hint is None:
      return None
    return _FIELD_REFERENCE.sub(lambda match: spell(match.group(1)), self.hint)


_FIELD_REFERENCE = re.compile(r'\{(\w+)\}')


class RecordsError(ArgumentError):
  """Records that are missing, incomplete or not in this contract's format."""

  def __init__(self, message: str, hint: str | None = None, field: str = 'records_dir'):
    super().__init__(field, message, hint)


LABEL_STATISTICS_KEYS = ('num_examples', 'mean_age', 'age_std', 'majority_gender',
                         'majority_share')


@dataclasses.dataclass(frozen=True)
class ImageStorage:
  """How the `image` feature holds its pixels."""
  format: str = JPEG
  size: int | None = None          # None: the source's bytes, unchanged.
  jpeg_quality: int | None = None  # Only for JPEG re-encoded at `size`.

  def __post_init__(self):
    if self.format not in STORAGE_FORMATS:
      raise ValueError(f'unknown image storage {self.format!r}; '
                       f'expected one of {", ".join(STORAGE_FORMATS)}')
    if self.format == RAW and not self.size:
      raise ValueError('raw storage needs an image size')
    if self.size is not None and self.size <= 0:
      raise ValueError(f'image size must be positive, got {self.size}')

  @property
  def is_source_bytes(self) -> bool:
    return self.format == JPEG and self.size is None

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, value: dict[str, Any]) -> 'ImageStorage':
    return cls(format=value['format'], size=value.get('size'),
               jpeg_quality=value.get('jpeg_quality'))


# Records are encoded here, in tf.train.Example's protobuf wire format, rather
# than through tf.train.Example: make_records converts on worker processes, and
# a worker that never imports TensorFlow starts in a fraction of a second
# instead of seconds. The bytes are those of
# tf.train.Example(...).SerializeToString(deterministic=True) (map entries in
# key order); tests/test_contract.py checks that against TensorFlow.
#
#   Example  { Features features = 1; }
#   Features { map<string, Feature> feature = 1; }   entry: key = 1, value = 2
#   Feature  { oneof { BytesList bytes_list = 1; Int64List int64_list = 3; } }
#   BytesList { repeated bytes value = 1; }  Int64List { repeated int64 value = 1 [packed]; }

_ONE_BYTE_VARINTS = [bytes((value,)) for value in range(0x80)]


def _varint(value: int) -> bytes:
  """Protobuf's base-128 varint; a negative int64 as its 64-bit two's complement."""
  if 0 <= value < 0x80:
    return _ONE_BYTE_VARINTS[value]  # Most tags, lengths and labels.
  value &= 0xFFFFFFFFFFFFFFFF
  out = bytearray()
  while value > 0x7F:
    out.append(value & 0x7F | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _field(number: int, parts: list[bytes]) -> list[bytes]:
  """A length-delimited field (wire type 2), as parts: the image is copied
  once, by the final join."""
  return [_varint(number << 3 | 2), _varint(sum(map(len, parts))), *parts]


def _bytes_feature(value: bytes) -> list[bytes]:
  return _field(1, _field(1, [value]))


def _int64_feature(value: int) -> list[bytes]:
  if not -2**63 <= value < 2**63:
    raise ValueError(f'{value} does not fit in an int64')
  return _field(3, _field(1, [_varint(value)]))


def serialize_example(image: bytes, age: int, gender: int, race: int,
                      file_name: str) -> bytes:
  """One record, serialized deterministically (same inputs, same bytes)."""
  features = {
      IMAGE: _bytes_feature(bytes(image)),
      FILE_NAME: _bytes_feature(file_name.encode('utf-8')),
      AGE: _int64_feature(int(age)),
      GENDER: _int64_feature(int(gender)),
      RACE: _int64_feature(int(race)),
  }
  entries = []
  for key, feature in sorted(features.items()):
    entries += _field(1, _field(1, [key.encode('utf-8')]) + _field(2, feature))
  return b''.join(_field(1, entries))


def feature_spec() -> dict[str, Any]:
  """The tf.io parsing spec of one record."""
  tf = files.tensorflow()
  spec = {IMAGE: tf.io.FixedLenFeature([], tf.string),
          FILE_NAME: tf.io.FixedLenFeature([], tf.string)}
  spec.update({key: tf.io.FixedLenFeature([], tf.int64) for key in INT_KEYS})
  return spec


def dataset_dir(records_root: str) -> str:
  """The folder holding one converted data set under a records root."""
  return posixpath.join(str(records_root), DATASET_NAME, VERSION)


def filename_template() -> str:
  """tfds's file name template, so tfds.builder_from_directory finds the shards."""
  return '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'


def shard_name(split: str, index: int, num_shards: int) -> str:
  return f'{DATASET_NAME}-{split}.tfrecord-{index:05d}-of-{num_shards:05d}'


def resolve_dataset_dir(records_dir: str) -> str:
  """Accepts either a records root or the data set folder itself."""
  records_dir = str(records_dir)
  if files.exists(posixpath.join(records_dir, MANIFEST_NAME)):
    return records_dir
  return dataset_dir(records_dir)


def read_manifest(records_dir: str) -> dict[str, Any]:
  """Reads the manifest of the records under `records_dir` (root or data set folder)."""
  directory = resolve_dataset_dir(records_dir)
  path = posixpath.join(directory, MANIFEST_NAME)
  if not files.exists(path):
    raise RecordsError(
        f'no records at {records_dir}: {path} is missing. '
        'Run `python -m agegender.make_records` first (or point --records_dir '
        'at its output).')
  try:
    with files.open_file(path, 'rb') as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RecordsError(f'{path} is not valid JSON: {e}') from None
  if manifest.get('manifest_format') != MANIFEST_FORMAT:
    raise RecordsError(f'{path} has manifest_format '
                       f'{manifest.get("manifest_format")!r}, expected {MANIFEST_FORMAT}')
  manifest['directory'] = directory
  return manifest


def split_shards(manifest: dict[str, Any], split: str) -> list[str]:
  """Full paths of a split's shards, in order, as the manifest lists them."""
  if split not in manifest['splits']:
    raise RecordsError(f'unknown split {split!r}; the records have '
                       f'{", ".join(manifest["splits"])}')
  shards = manifest['splits'][split]['shards']
  return [posixpath.join(manifest['directory'], shard['file']) for shard in shards]


def image_storage(manifest: dict[str, Any]) -> ImageStorage:
  return ImageStorage.from_json(manifest['image_storage'])


def age_statistics(count: int, age_sum: int, age_square_sum: int) -> tuple[float, float]:
  """Mean age and population standard deviation from exact integer sums.

  Integer sums add up the same in any order, so every runner (and any way of
  merging partial totals) writes the same floats.
  """
  if count == 0:
    return 0.0, 0.0
  return age_sum / count, math.sqrt(count * age_square_sum - age_sum * age_sum) / count


def majority(gender_counts: dict[str, int]) -> tuple[int, float]:
  """The most frequent gender (the smaller code on a tie) and its share."""
  total = sum(gender_counts.values())
  if total == 0:
    return 0, 0.0
  gender = min(gender_counts, key=lambda key: (-gender_counts[key], int(key)))
  return int(gender), gender_counts[gender] / total


def label_statistics(manifest: dict[str, Any], split: str) -> dict[str, Any]:
  """A split's label statistics, as make_records wrote them.

  {'num_examples': int, 'mean_age': float, 'age_std': float (population),
   'majority_gender': int, 'majority_share': float}; a split without
  examples has zeros.
  """
  if split not in manifest.get('splits', {}):
    raise RecordsError(f'unknown split {split!r}; the records have '
                       f'{", ".join(manifest.get("splits", {}))}')
  statistics = manifest.get('label_statistics', {}).get(split)
  if statistics is None or set(statistics) != set(LABEL_STATISTICS_KEYS):
    where = manifest.get('directory', 'these records')
    raise RecordsError(f'the records at {where} were written by an older version of '
                       'make_records, without label statistics; convert them again')
  return {'num_examples': int(statistics['num_examples']),
          'mean_age': float(statistics['mean_age']),
          'age_std': float(statistics['age_std']),
          'majority_gender': int(statistics['majority_gender']),
          'majority_share': float(statistics['majority_share'])}
