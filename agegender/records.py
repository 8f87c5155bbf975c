"""UTKFace sources into sharded TFRecords, in the layout agegender.contract defines.

The work per image is one pure function, `convert_image(name, data, options)`:
parse the labels from the name, decode the image once to validate it, hash the
bytes, pick the split from the hash and serialize the record. Everything that
decides where a record lands follows from its content hash alone:

- split: the first 64 bits of sha256(bytes), read as a number in [0, 2**64),
  fall into the train / validation / test ranges of --split;
- shard: the split's hash range cut into `num_shards` equal parts;
- order within a shard: by hash (ties, which are duplicates, by name).

So a split never changes when files are renamed, reordered or added,
duplicates (same bytes, any name) land together and are kept once (the
smallest name), and any engine that runs `convert_image` (this module's process
pool, or a cluster engine) writes the same bytes.

A runner turns a source into written shards; everything after the per-image
function is shared between runners: deduplication (`unique_by_content`), the
per-split totals (`SplitTotals`), shard counts (`choose_num_shards`), shard
writing (`write_shard`), then the tfds metadata, manifest and summary, which
`convert` writes for every runner. `convert` takes the runner as an argument:
`run_local` (the default) or agegender.beam_records' Apache Beam pipeline.

`run_local` works in two passes with bounded memory:

1. stream the source through a pool of worker processes (which never load
   TensorFlow) and spill each converted record into a local bucket file keyed
   by (split, first hash byte);
2. with the totals known, choose each split's shard count (--shard_size_mb or
   --num_shards), then read the buckets in hash order, drop duplicates and
   write every shard under a temporary name, renamed when complete. The tfds
   metadata and manifest.json come last, so an output without a manifest is
   unfinished, and a rerun replaces it.

Images that are not RGB JPEGs (a PNG named .jpg, grayscale or CMYK JPEGs) are
re-encoded as RGB JPEG at --jpeg_quality rather than rejected: what lands
always decodes with tf.io.decode_jpeg(channels=3) or decode_raw.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import posixpath
import signal
import struct
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator

from PIL import Image

from agegender import cli
from agegender import contract
from agegender import labels as labels_lib
from agegender import sources

DEFAULT_SPLIT = (0.8, 0.1, 0.1)
DEFAULT_SHARD_SIZE_MB = 64
DEFAULT_JPEG_QUALITY = 95
DEFAULT_SYNTHETIC_COUNT = 3000
TEMP_PREFIX = '.incomplete-'
TFDS_FILES = ('dataset_info.json', 'features.json')
_POSITIONS = 2**64  # Hash positions: the first 8 bytes of sha256, big-endian.

# Reject kinds, counted in the summary; each reject also carries its detail.
BAD_NAME = 'bad name'
EMPTY = 'empty file'
NOT_AN_IMAGE = 'not an image'
TRUNCATED = 'truncated image'
CORRUPT = 'corrupt image'


# The per-image function.

@dataclasses.dataclass(frozen=True)
class ConvertOptions:
  split: tuple[float, float, float] = DEFAULT_SPLIT
  storage: contract.ImageStorage = contract.ImageStorage()
  jpeg_quality: int = DEFAULT_JPEG_QUALITY  # For every re-encoded image.


@dataclasses.dataclass(frozen=True)
class Rejected:
  name: str
  kind: str
  reason: str


@dataclasses.dataclass(frozen=True)
class Converted:
  content_hash: bytes  # sha256 of the source bytes.
  split: str
  example: bytes       # The serialized tf.train.Example.
  name: str
  labels: labels_lib.Labels

  @property
  def position(self) -> int:
    return hash_position(self.content_hash)


class _ImageRejected(Exception):
  def __init__(self, kind: str, reason: str):
    super().__init__(reason)
    self.kind = kind


def hash_position(content_hash: bytes) -> int:
  return int.from_bytes(content_hash[:8], 'big')


def split_ranges(split: tuple[float, ...]) -> dict[str, tuple[int, int]]:
  """Each split's [start, end) range of hash positions."""
  ranges, start, total = {}, 0, 0.0
  for name, fraction in zip(contract.SPLITS, split):
    total += fraction
    end = _POSITIONS if name == contract.SPLITS[-1] else round(total * _POSITIONS)
    ranges[name] = (start, end)
    start = end
  return ranges


def split_of(position: int, split: tuple[float, ...]) -> str:
  for name, (start, end) in split_ranges(split).items():
    if start <= position < end:
      return name
  raise AssertionError(f'position {position} outside every split')


def shard_of(position: int, split_range: tuple[int, int], num_shards: int) -> int:
  start, end = split_range
  return (position - start) * num_shards // (end - start)


def decode_image(data: bytes) -> Image.Image:
  """Decodes every pixel once; raises _ImageRejected with the reason."""
  if not data:
    raise _ImageRejected(EMPTY, 'the file has no bytes')
  try:
    image = Image.open(io.BytesIO(data))
  except Image.UnidentifiedImageError:
    # PIL's message names the buffer's address, which would differ between runs.
    raise _ImageRejected(NOT_AN_IMAGE, 'cannot identify image file') from None
  except Image.DecompressionBombError as e:
    raise _ImageRejected(NOT_AN_IMAGE, str(e)) from None
  try:
    image.load()
  except OSError as e:
    kind = TRUNCATED if 'truncated' in str(e) else CORRUPT
    raise _ImageRejected(kind, str(e)) from None
  except Exception as e:  # pylint: disable=broad-except
    # Decoders raise what they like on bad data (SyntaxError, ValueError...).
    raise _ImageRejected(CORRUPT, f'{type(e).__name__}: {e}') from None
  if image.width < 1 or image.height < 1:
    raise _ImageRejected(CORRUPT, f'image of size {image.size}')
  return image


def _encode_jpeg(image: Image.Image, quality: int) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


def stored_image(image: Image.Image, data: bytes, options: ConvertOptions) -> bytes:
  """The bytes of the `image` feature under the chosen storage."""
  storage = options.storage
  if storage.is_source_bytes and image.format == 'JPEG' and image.mode == 'RGB':
    return data  # The common case: the source's bytes, unchanged.
  rgb = image.convert('RGB')
  if storage.size is not None and rgb.size != (storage.size, storage.size):
    rgb = rgb.resize((storage.size, storage.size), Image.Resampling.BILINEAR)
  if storage.format == contract.RAW:
    return rgb.tobytes()  # size x size x 3, row-major.
  return _encode_jpeg(rgb, options.jpeg_quality)


def convert_image(name: str, data: bytes, options: ConvertOptions) -> Converted | Rejected:
  """One source file to a record, or to the reason it cannot be one."""
  try:
    labels = labels_lib.parse_utkface_name(name)
  except labels_lib.LabelError as e:
    return Rejected(name, BAD_NAME, str(e))
  try:
    image = stored_image(decode_image(data), data, options)
  except _ImageRejected as e:
    return Rejected(name, e.kind, str(e))
  content_hash = hashlib.sha256(data).digest()
  example = contract.serialize_example(image, labels.age, labels.gender, labels.race, name)
  return Converted(content_hash=content_hash,
                   split=split_of(hash_position(content_hash), options.split),
                   example=example, name=name, labels=labels)


def _convert_chunk(chunk: list[tuple[str, bytes]],
                   options: ConvertOptions) -> list[Converted | Rejected]:
  return [convert_image(name, data, options) for name, data in chunk]


def _ignore_interrupts() -> None:
  # Ctrl-C reaches the whole process group; the parent alone handles it.
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def process_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
  """Worker processes that start clean even when TensorFlow is loaded here.

  Forking a process that runs TensorFlow's threads is unsafe, so workers come
  from a fork server (or are spawned where there is none). The fork server
  preloads this module and not the parent's __main__, so workers never import
  TensorFlow: agegender.contract serializes records without it.
  """
  if 'forkserver' in multiprocessing.get_all_start_methods():
    context = multiprocessing.get_context('forkserver')
    context.set_forkserver_preload([__name__])
  else:
    context = multiprocessing.get_context('spawn')
  return concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                initializer=_ignore_interrupts)


def convert_stream(entries: Iterable[tuple[str, bytes]], options: ConvertOptions,
                   workers: int, chunk_size: int = 32) -> Iterator[Converted | Rejected]:
  """convert_image over a stream on `workers` processes, in source order.

  Processes, not threads: much of the per-image work (parsing headers,
  building records) holds Python's global lock. Images go in chunks, and
  only a few chunks are in flight: memory stays bounded. One worker converts
  in this process, without starting any.
  """
  entries = iter(entries)
  if workers <= 1:
    for name, data in entries:
      yield convert_image(name, data, options)
    return
  pool = process_pool(workers)
  try:
    pending = collections.deque()
    while chunk := list(itertools.islice(entries, chunk_size)):
      pending.append(pool.submit(_convert_chunk, chunk, options))
      if len(pending) >= 2 * workers:
        yield from pending.popleft().result()
    while pending:
      yield from pending.popleft().result()
  finally:
    # Also when the consumer stops early or fails: drop the work still queued.
    pool.shutdown(wait=True, cancel_futures=True)


# What every runner does after the per-image function: deduplicate, count,
# choose shard counts and write shards.

@dataclasses.dataclass(frozen=True)
class Entry:
  """What deduplication and the totals need of a record: no image bytes."""
  content_hash: bytes
  name: str
  labels: labels_lib.Labels
  length: int  # Of the serialized example.


def entry_of(record: Converted) -> Entry:
  return Entry(record.content_hash, record.name, record.labels, len(record.example))


def unique_by_content(records: Iterable[Any]) -> Iterator[tuple[Any, Any | None]]:
  """Records (anything with content_hash and name) in (hash, name) order, each
  paired with None when kept, or with the record it duplicates (the smallest name)."""
  kept = None
  for record in sorted(records, key=lambda r: (r.content_hash, r.name)):
    if kept is not None and record.content_hash == kept.content_hash:
      yield record, kept
    else:
      kept = record
      yield record, None


def _decade(age: int) -> str:
  start = age // 10 * 10
  return f'{start}-{start + 9}'


def _empty_histograms() -> dict[str, dict[str, int]]:
  return {'age': {_decade(age): 0 for age in range(0, labels_lib.MAX_AGE + 1, 10)},
          'gender': {str(g): 0 for g in range(len(labels_lib.GENDERS))},
          'race': {str(r): 0 for r in range(labels_lib.UNKNOWN_RACE, len(labels_lib.RACES))}}


@dataclasses.dataclass
class SplitTotals:
  """A split's kept examples, bytes, label histograms and dropped duplicates."""
  num_examples: int = 0
  num_bytes: int = 0
  histograms: dict[str, dict[str, int]] = dataclasses.field(default_factory=_empty_histograms)
  duplicates: list[dict[str, str]] = dataclasses.field(default_factory=list)

  def add_entries(self, entries: Iterable[Entry]) -> 'SplitTotals':
    """Counts entries that hold every copy of their content; copies count once."""
    for entry, kept in unique_by_content(entries):
      if kept is not None:
        self.duplicates.append({'file': entry.name, 'same_as': kept.name})
        continue
      self.num_examples += 1
      self.num_bytes += entry.length
      self.histograms['age'][_decade(entry.labels.age)] += 1
      self.histograms['gender'][str(entry.labels.gender)] += 1
      self.histograms['race'][str(entry.labels.race)] += 1
    return self

  def merge(self, other: 'SplitTotals') -> 'SplitTotals':
    self.num_examples += other.num_examples
    self.num_bytes += other.num_bytes
    for kind, histogram in other.histograms.items():
      for key, count in histogram.items():
        self.histograms[kind][key] += count
    self.duplicates.extend(other.duplicates)
    return self


def merge_totals(totals: Iterable[SplitTotals]) -> SplitTotals:
  merged = SplitTotals()
  for total in totals:
    merged.merge(total)
  return merged


def choose_num_shards(num_bytes: int, num_examples: int, shard_size_mb: float,
                      num_shards: int | None) -> int:
  if num_shards is None:
    num_shards = -(-num_bytes // int(shard_size_mb * 2**20))
  return max(1, min(num_shards, num_examples))


class _ShardWriter:
  """Writes a split's shards, each under a temporary name until complete."""

  def __init__(self, directory: str, split: str, num_shards: int):
    self.directory, self.split, self.num_shards = directory, split, num_shards
    self._writer = self._index = None

  def _path(self, index: int, temporary: bool = False) -> str:
    name = contract.shard_name(self.split, index, self.num_shards)
    return posixpath.join(self.directory, TEMP_PREFIX + name if temporary else name)

  def write_shard(self, index: int, examples: Iterable[bytes]) -> int:
    """Writes shard `index` from serialized examples in order; returns their count."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self._index = index
    self._writer = tf.io.TFRecordWriter(self._path(index, temporary=True))
    length = 0
    for example in examples:
      self._writer.write(example)
      length += 1
    self._finish_current()
    return length

  def _finish_current(self) -> None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self._writer.close()
    tf.io.gfile.rename(self._path(self._index, temporary=True), self._path(self._index),
                       overwrite=True)
    self._writer = None


def write_shard(directory: str, split: str, index: int, num_shards: int,
                examples: Iterable[bytes]) -> int:
  """One complete shard (renamed into place when written); returns its length."""
  return _ShardWriter(directory, split, num_shards).write_shard(index, examples)


def write_split(directory: str, split: str, num_shards: int,
                indexed_examples: Iterable[tuple[int, bytes]]) -> list[int]:
  """Every shard of a split from (shard index, example) in shard order, the empty
  ones included; returns the shard lengths."""
  writer = _ShardWriter(directory, split, num_shards)
  lengths = []
  for index, group in itertools.groupby(indexed_examples, key=lambda pair: pair[0]):
    while len(lengths) < index:
      lengths.append(writer.write_shard(len(lengths), ()))
    lengths.append(writer.write_shard(index, (example for _, example in group)))
  while len(lengths) < num_shards:
    lengths.append(writer.write_shard(len(lengths), ()))
  return lengths


# The local runner's pass 1: spill converted records into local bucket files.

# hash, example length, age, gender, race, name length; then name, example.
_HEADER = struct.Struct('>32sIhbbH')


@dataclasses.dataclass(frozen=True)
class _Spilled(Entry):
  offset: int = 0  # Of the example in its bucket file.


class _Spill:
  """Records grouped by (split, first hash byte), in local files."""

  def __init__(self, directory: str):
    self.directory = directory
    self._files = {}

  def _path(self, split: str, bucket: int) -> str:
    return os.path.join(self.directory, f'{split}-{bucket:03d}')

  def add(self, record: Converted) -> None:
    key = (record.split, record.content_hash[0])
    if key not in self._files:
      self._files[key] = open(self._path(*key), 'wb')
    name = record.name.encode('utf-8')
    labels = record.labels
    self._files[key].write(_HEADER.pack(record.content_hash, len(record.example),
                                        labels.age, labels.gender, labels.race, len(name)))
    self._files[key].write(name)
    self._files[key].write(record.example)

  def close(self) -> None:
    for f in self._files.values():
      f.close()

  def buckets(self, split: str) -> list[str]:
    return [self._path(s, b) for s, b in sorted(self._files) if s == split]


def _bucket_entries(path: str) -> list[_Spilled]:
  """The bucket's records, examples left on disk."""
  entries = []
  with open(path, 'rb') as f:
    while header := f.read(_HEADER.size):
      content_hash, length, age, gender, race, name_length = _HEADER.unpack(header)
      name = f.read(name_length).decode('utf-8')
      entries.append(_Spilled(content_hash, name, labels_lib.Labels(age, gender, race),
                              length, f.tell()))
      f.seek(length, os.SEEK_CUR)
  return entries


# The local runner's pass 2: totals, shard counts, shards.

def _split_totals(spill: _Spill, split: str) -> SplitTotals:
  # Copies share a hash, so they share a bucket: buckets can be counted one by one.
  totals = SplitTotals()
  for path in spill.buckets(split):
    totals.add_entries(_bucket_entries(path))
  return totals


def _write_split(spill: _Spill, split: str, split_range: tuple[int, int], num_shards: int,
                 directory: str) -> list[int]:
  def indexed_examples():  # Buckets in hash order, so shards in order.
    for path in spill.buckets(split):
      with open(path, 'rb') as f:
        for entry, kept in unique_by_content(_bucket_entries(path)):
          if kept is None:
            f.seek(entry.offset)
            yield (shard_of(hash_position(entry.content_hash), split_range, num_shards),
                   f.read(entry.length))
  return write_split(directory, split, num_shards, indexed_examples())


# Output folder: checks, cleaning, metadata.

def _remove_leftovers(directory: str) -> None:
  """Deletes what an earlier (unfinished or replaced) run wrote, and nothing else."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  manifest = posixpath.join(directory, contract.MANIFEST_NAME)
  if tf.io.gfile.exists(manifest):
    tf.io.gfile.remove(manifest)  # First: the output stops counting as complete.
  for name in tf.io.gfile.listdir(directory):
    name = name.rstrip('/')
    ours = (name.startswith(TEMP_PREFIX) or name in TFDS_FILES or
            name.startswith(f'{contract.DATASET_NAME}-') and '.tfrecord-' in name)
    if ours:
      tf.io.gfile.remove(posixpath.join(directory, name))


def _existing_manifest(directory: str) -> dict[str, Any] | None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.exists(posixpath.join(directory, contract.MANIFEST_NAME)):
    return None
  try:
    return contract.read_manifest(directory)
  except contract.RecordsError:
    return None  # Unreadable: treat as unfinished and replace it.


def _check_existing(directory: str, source: dict[str, Any], flags: dict[str, Any],
                    overwrite: bool, skip_if_done: bool) -> dict[str, Any] | None:
  """The existing manifest when the output is up to date; raises when it must not be replaced."""
  manifest = None if overwrite else _existing_manifest(directory)
  if manifest is None:
    return None
  if not skip_if_done:
    raise cli.UsageError(f'records already exist at {directory}; pass --overwrite to '
                         'replace them (or --skip_if_done to keep them)')
  if manifest.get('source', {}).get('spec') != source['spec']:
    raise cli.UsageError(
        f'records at {directory} were made from source {manifest.get("source", {}).get("spec")!r}, '
        f'not {source["spec"]!r}; pass --overwrite to replace them')
  old_flags = manifest.get('flags', {})
  changed = [f'--{k}={old_flags.get(k)} (now {v})' for k, v in flags.items()
             if old_flags.get(k) != v]
  if changed:
    raise cli.UsageError(f'records at {directory} were made with {", ".join(changed)}; '
                         'pass --overwrite to replace them')
  return manifest


def tfds_features(storage: contract.ImageStorage):
  """The tfds FeaturesDict that reads our records."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if storage.format == contract.RAW:
    image = tfds.features.Tensor(shape=(storage.size, storage.size, 3), dtype=np.uint8,
                                 encoding=tfds.features.Encoding.BYTES)
  else:
    size = storage.size
    image = tfds.features.Image(shape=(size, size, 3), encoding_format='jpeg')
  return tfds.features.FeaturesDict({
      contract.IMAGE: image,
      contract.AGE: tfds.features.Scalar(dtype=np.int64),
      contract.GENDER: tfds.features.Scalar(dtype=np.int64),
      contract.RACE: tfds.features.Scalar(dtype=np.int64),
      contract.FILE_NAME: tfds.features.Text(),
  })


def _write_tfds_metadata(directory: str, storage: contract.ImageStorage,
                         splits: dict[str, dict[str, Any]]) -> None:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  split_infos = [tfds.core.SplitInfo(name=name, shard_lengths=split['shard_lengths'],
                                     num_bytes=split['num_bytes'])
                 for name, split in splits.items()]
  tfds.folder_dataset.write_metadata(
      data_dir=directory, features=tfds_features(storage), split_infos=split_infos,
      version=contract.VERSION, filename_template=contract.filename_template(),
      check_data=False,
      description='UTKFace face crops with age, gender and race labels, '
                  'converted by agegender.make_records.')


def _write_json(path: str, value: dict[str, Any]) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  temporary = posixpath.join(posixpath.dirname(path), TEMP_PREFIX + posixpath.basename(path))
  with tf.io.gfile.GFile(temporary, 'w') as f:
    f.write(json.dumps(value, indent=2) + '\n')
  tf.io.gfile.rename(temporary, path, overwrite=True)


# Progress and summary.

class _Progress:
  """One updating line on stderr: done/total and images per second."""

  def __init__(self, enabled: bool, total: int | None):
    self.enabled, self.total = enabled, total
    self.start = self._last = time.monotonic()
    self.done = 0
    self._tty = enabled and sys.stderr.isatty()

  def step(self) -> None:
    self.done += 1
    now = time.monotonic()
    if self.enabled and now - self._last >= (0.5 if self._tty else 10):
      self._last = now
      self._print(end='\r' if self._tty else '\n')

  def _print(self, end: str) -> None:
    total = f'/{self.total}' if self.total is not None else ''
    rate = self.done / max(time.monotonic() - self.start, 1e-9)
    print(f'make_records: {self.done}{total} images, {rate:.0f} images/s',
          end=end, file=sys.stderr, flush=True)

  def finish(self) -> None:
    if self.enabled:
      self._print(end='\n')


def format_summary(summary: dict[str, Any]) -> str:
  """The final summary, a few lines for people."""
  if summary.get('up_to_date'):
    return (f'make_records: records at {summary["records_dir"]} are up to date '
            '(same source and flags); nothing to do')
  accepted = ', '.join(f'{k} {v}' for k, v in summary['accepted'].items())
  rejected = ', '.join(f'{k} {v}' for k, v in summary['rejected'].items()) or 'none'
  return (f'make_records: wrote {summary["records_dir"]}\n'
          f'  accepted: {accepted} (total {summary["accepted_total"]})\n'
          f'  rejected: {rejected}\n'
          f'  duplicates dropped: {summary["duplicates"]}\n'
          f'  {summary["files_read"]} files in {summary["elapsed_s"]:.1f} s, '
          f'{summary["images_per_s"]:.0f} images/s')


# The conversion.

def _validated_split(split: Iterable[float]) -> tuple[float, float, float]:
  split = tuple(float(v) for v in split)
  if len(split) != len(contract.SPLITS) or min(split) < 0 or abs(sum(split) - 1) > 1e-6:
    raise cli.UsageError(f'--split needs {len(contract.SPLITS)} non-negative fractions '
                         f'(train, validation, test) that sum to 1, got {split}')
  if split[0] <= 0:
    raise cli.UsageError('--split needs a positive train fraction')
  return split


def _storage(image_format: str, image_size: int | None,
             jpeg_quality: int) -> contract.ImageStorage:
  if not 1 <= jpeg_quality <= 100:
    raise cli.UsageError(f'--jpeg_quality must be in 1..100, got {jpeg_quality}')
  try:
    return contract.ImageStorage(
        format=image_format, size=image_size,
        jpeg_quality=jpeg_quality if image_format == contract.JPEG and image_size else None)
  except ValueError as e:
    hint = ' (pass --image_size)' if image_format == contract.RAW and not image_size else ''
    raise cli.UsageError(f'{e}{hint}') from None


def _conversion_flags(source_spec: str, split, storage, jpeg_quality, shard_size_mb,
                      num_shards, synthetic_count, seed) -> dict[str, Any]:
  """The flags that decide the output: what --skip_if_done compares."""
  flags = {'split': list(split), 'image_format': storage.format,
           'image_size': storage.size, 'jpeg_quality': jpeg_quality,
           'shard_size_mb': shard_size_mb, 'num_shards': num_shards}
  if source_spec == sources.SYNTHETIC:
    flags.update(synthetic_count=synthetic_count, seed=seed)
  return flags


@dataclasses.dataclass(frozen=True)
class Conversion:
  """One conversion's checked settings: what a runner needs besides the source."""
  directory: str  # The data set folder: <records_dir>/utkface/<version>.
  options: ConvertOptions
  shard_size_mb: float
  num_shards: int | None

  def num_shards_of(self, totals: SplitTotals) -> int:
    return choose_num_shards(totals.num_bytes, totals.num_examples, self.shard_size_mb,
                             self.num_shards)


@dataclasses.dataclass
class Outcome:
  """What a runner did: shards written; the rest goes into the manifest and summary."""
  totals: dict[str, SplitTotals]
  shard_lengths: dict[str, list[int]]
  rejected: list[Rejected]
  files_read: int


def check_something_valid(spec: str, files_read: int, rejected: list[Rejected]) -> None:
  if files_read == len(rejected):
    raise cli.UsageError(_nothing_valid_message(spec, rejected))


@contextlib.contextmanager
def writing_to(directory: str) -> Iterator[None]:
  """Turns a failure to write the output into a one-line usage error."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    yield
  except (tf.errors.OpError, OSError) as e:
    raise cli.UsageError(f'could not write the records to {directory}: {e}') from None


def prepare_output(directory: str) -> None:
  """Creates the data set folder and clears what an earlier run left in it."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.io.gfile.makedirs(directory)
  _remove_leftovers(directory)


def run_local(conversion: Conversion, source: sources.Source, *, workers: int,
              progress: bool = True) -> Outcome:
  """Converts on this machine's cores, in two passes through local spill files."""
  directory = conversion.directory
  with tempfile.TemporaryDirectory(prefix='make_records-') as spill_dir:
    spill = _Spill(spill_dir)
    rejected = []
    meter = _Progress(progress, source.total)
    try:
      for result in convert_stream(source, conversion.options, workers):
        if isinstance(result, Rejected):
          rejected.append(result)
        else:
          spill.add(result)
        meter.step()
    finally:
      spill.close()
      meter.finish()
    check_something_valid(source.spec, meter.done, rejected)

    totals = {name: _split_totals(spill, name) for name in contract.SPLITS}
    ranges = split_ranges(conversion.options.split)
    with writing_to(directory):
      prepare_output(directory)
      lengths = {name: _write_split(spill, name, ranges[name], conversion.num_shards_of(total),
                                    directory)
                 for name, total in totals.items()}
  return Outcome(totals, lengths, rejected, meter.done)


def convert(source: str, records_dir: str, *, split=DEFAULT_SPLIT, image_format: str = 'jpeg',
            image_size: int | None = None, jpeg_quality: int = DEFAULT_JPEG_QUALITY,
            shard_size_mb: float = DEFAULT_SHARD_SIZE_MB, num_shards: int | None = None,
            workers: int | None = None, overwrite: bool = False, skip_if_done: bool = False,
            synthetic_count: int = DEFAULT_SYNTHETIC_COUNT, seed: int = 0,
            progress: bool = True,
            runner: Callable[[Conversion, sources.Source], Outcome] | None = None
            ) -> dict[str, Any]:
  """Converts `source` into records under `records_dir`; returns the summary.

  `runner(conversion, source)` writes the shards; unset, `run_local` with
  `workers` processes (default: the core count). `workers` and `progress` only
  concern `run_local`. Its workers import the calling script again, as
  multiprocessing does: a script needs the `if __name__ == '__main__':` guard,
  and its workers start in a fraction of a second unless it imports
  TensorFlow at the top (import it inside functions instead).
  """
  start = time.monotonic()
  split = _validated_split(split)
  storage = _storage(image_format, image_size, jpeg_quality)
  if shard_size_mb <= 0 or (num_shards is not None and num_shards <= 0):
    raise cli.UsageError('--shard_size_mb and --num_shards must be positive')
  directory = contract.dataset_dir(records_dir)
  source_info = {'spec': sources.normalize_spec(source)}
  flags = _conversion_flags(source_info['spec'], split, storage, jpeg_quality,
                            shard_size_mb, num_shards, synthetic_count, seed)
  existing = _check_existing(directory, source_info, flags, overwrite, skip_if_done)
  if existing is not None:
    return dict(existing['summary'], up_to_date=True, records_dir=directory)

  opened = sources.open_source(source, synthetic_count=synthetic_count, seed=seed)
  source_info = dict(opened.describe(), spec=source_info['spec'])
  conversion = Conversion(
      directory=directory,
      options=ConvertOptions(split=split, storage=storage, jpeg_quality=jpeg_quality),
      shard_size_mb=shard_size_mb, num_shards=num_shards)
  if runner is None:
    runner = functools.partial(run_local, workers=workers or os.cpu_count() or 1,
                               progress=progress)
  outcome = runner(conversion, opened)
  with writing_to(directory):
    splits = {name: {'shard_lengths': outcome.shard_lengths[name],
                     'num_bytes': outcome.totals[name].num_bytes}
              for name in contract.SPLITS}
    _write_tfds_metadata(directory, storage, splits)
    elapsed = time.monotonic() - start
    summary = _summary(directory, opened.spec, outcome.totals, outcome.rejected,
                       outcome.files_read, elapsed)
    _write_json(posixpath.join(directory, contract.MANIFEST_NAME),
                _manifest(storage, splits, source_info, flags, outcome.totals,
                          outcome.rejected, summary))
  return summary


def _nothing_valid_message(spec: str, rejected: list[Rejected]) -> str:
  if not rejected:
    return f'no files found in source {spec!r}'
  counts = collections.Counter(r.kind for r in rejected)
  reasons = ', '.join(f'{kind} {count}' for kind, count in sorted(counts.items()))
  return f'no valid images in source {spec!r}: all {len(rejected)} files rejected ({reasons})'


def _summary(directory: str, spec: str, totals: dict[str, SplitTotals],
             rejected: list[Rejected], files_read: int, elapsed: float) -> dict[str, Any]:
  accepted = {name: total.num_examples for name, total in totals.items()}
  return {
      'records_dir': directory,
      'source': spec,
      'accepted': accepted,
      'accepted_total': sum(accepted.values()),
      'rejected': dict(sorted(collections.Counter(r.kind for r in rejected).items())),
      'rejected_total': len(rejected),
      'duplicates': sum(len(total.duplicates) for total in totals.values()),
      'files_read': files_read,
      'elapsed_s': round(elapsed, 3),
      'images_per_s': round(files_read / max(elapsed, 1e-9), 1),
      'up_to_date': False,
  }


def _manifest(storage, splits, source_info, flags, totals, rejected, summary) -> dict[str, Any]:
  manifest_splits = {}
  for name, split in splits.items():
    count = len(split['shard_lengths'])
    manifest_splits[name] = {
        'num_examples': sum(split['shard_lengths']),
        'num_bytes': split['num_bytes'],
        'shards': [{'file': contract.shard_name(name, index, count), 'num_examples': length}
                   for index, length in enumerate(split['shard_lengths'])]}
  return {
      'manifest_format': contract.MANIFEST_FORMAT,
      'dataset': contract.DATASET_NAME,
      'version': contract.VERSION,
      'image_storage': storage.to_json(),
      'splits': manifest_splits,
      'source': source_info,
      'flags': flags,
      'histograms': {name: total.histograms for name, total in totals.items()},
      'rejected': [{'file': r.name, 'reason': f'{r.kind}: {r.reason}'}
                   for r in sorted(rejected, key=lambda r: (r.name, r.kind, r.reason))],
      'duplicates': sorted((d for total in totals.values() for d in total.duplicates),
                           key=lambda d: (d['file'], d['same_as'])),
      'summary': summary,
  }
