"""Face sources into sharded TFRecords: the conversion's one public entry, `build`.

The conversion, in the order it runs:

  build               checks the arguments, reads a labels table (--labels),
                      locks the records folder, and stops early when the
                      output is up to date (publish.py)
  sources             the source as a stream of (name, bytes), huge files unread
  a runner            local.run_local (this machine's processes) or
                      beam.run_beam (Apache Beam); both run
                      convert.convert_image per file and shards.py's copy
                      resolution and shard writing, into a staging folder
  publish.publish      tfds metadata, shards moved in, manifest.json last

Split, shard and order follow from each image's content hash, so reruns and
both runners write the same bytes.

Labels come from UTKFace's names by default, from another naming scheme
(`name_pattern`), or from a CSV table (`labels`: read once here, looked up per
file by the runner; see agegender.records.labels). With `find_faces` each
image is a photo, and the record holds its face's crop aligned by the eyes.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Iterable

from agegender import contract
from agegender import faces
from agegender import options
from agegender.records import convert
from agegender.records import labels as labels_lib
from agegender.records import publish
from agegender.records import shards
from agegender.records import sources
from agegender.records.runners import beam
from agegender.records.runners import local

DEFAULT_SPLIT = convert.DEFAULT_SPLIT
DEFAULT_SHARD_SIZE_MB = 64
DEFAULT_JPEG_QUALITY = convert.DEFAULT_JPEG_QUALITY
DEFAULT_SYNTHETIC_COUNT = 3000
DEFAULT_MAX_FILE_MB = sources.DEFAULT_MAX_FILE_BYTES / 2**20
DEFAULT_MAX_IMAGE_PIXELS = convert.DEFAULT_MAX_PIXELS
RUNNERS = ('local', 'beam')


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
  """One conversion's settings; `python -m agegender.make_records` derives its flags from them."""
  source: str = options.option(
      'kaggle', "Where the images come from: 'kaggle' (downloads jangedoo/utkface-new with "
      "kagglehub), 'synthetic' (generated faces), or a path to a folder, .tar, .tar.gz/.tgz or "
      '.zip archive.')
  records_dir: str = options.option(
      'records', 'Records root; the data set goes to <records_dir>/utkface/<version>/.')
  split: tuple[float, ...] = options.option(
      DEFAULT_SPLIT, 'Train, validation and test fractions (sum 1), assigned by content hash.')
  image_format: str = options.option(
      contract.JPEG, 'Stored image: JPEG bytes, or raw uint8 pixels (needs --image_size).',
      contract.STORAGE_FORMATS)
  image_size: int | None = options.option(
      None, "Resize to this square size before storing; unset keeps the source's JPEG bytes "
      'unchanged (with --find_faces: 200x200 crops). Required for --image_format=raw.',
      lower=1)
  jpeg_quality: int = options.option(
      DEFAULT_JPEG_QUALITY, 'Quality of re-encoded JPEGs (resized images, face crops, and '
      'sources that are not RGB JPEGs).', lower=1, upper=100)
  shard_size_mb: float = options.option(
      DEFAULT_SHARD_SIZE_MB, 'Target shard size in MiB (ignored when --num_shards is set).',
      above=0)
  num_shards: int | None = options.option(
      None, 'Shards per split (at most one per example); unset: from --shard_size_mb.', lower=1)
  label_conflicts: str = options.option(
      shards.DROP, "Byte-identical copies whose labels disagree: 'drop' every copy (listed in "
      "the manifest), or 'keep_first', the copy with the smallest name.", shards.LABEL_CONFLICTS)
  max_file_mb: float = options.option(
      DEFAULT_MAX_FILE_MB, 'Files and archive members larger than this (MiB, from their size on '
      'disk or in the archive header) are rejected without being read.', above=0)
  max_image_pixels: int = options.option(
      DEFAULT_MAX_IMAGE_PIXELS, 'Images with more pixels are downscaled to fit, or rejected '
      '(--large_images).', lower=1)
  large_images: str = options.option(
      convert.DOWNSCALE, 'Images over --max_image_pixels: downscale and re-encode them (JPEGs; '
      'others are rejected), or reject them.', convert.LARGE_IMAGES)
  labels: str | None = options.option(
      None, 'A CSV table of labels for a folder or archive source: a header row, then columns '
      'path (relative to the folder or the archive\'s top) and age, optionally gender (0/1, '
      'm/f or male/female, any case; empty: unknown) and race (0-4; empty: unknown). Files '
      'without a row, and rows that are bad, duplicated or name no file, are listed in the '
      'manifest. Unset: labels from the file names.')
  name_pattern: str | None = options.option(
      None, 'Labels from file names of another scheme: a Python regular expression with the '
      'named groups age and optionally gender and race (values as in --labels), matched against '
      'the whole base name (re.fullmatch), e.g. "(?P<age>\\d+)_(?P<gender>[mf])_.*\\.jpg". '
      "Unset: UTKFace's age_gender_race_datetime.jpg.")
  find_faces: bool = options.option(
      False, "Each image is a photo: find its face (agegender.faces; needs pip install -e "
      "'.[faces]') and store the crop aligned by the eyes as UTKFace's (200x200, or "
      '--image_size), re-encoded at --jpeg_quality. Photos with no face, or two faces of '
      'similar size, are rejected.')
  workers: int | None = options.option(
      None, 'Processes converting images (1: in this process); unset: the number of cores.',
      lower=1)
  synthetic_count: int = options.option(
      DEFAULT_SYNTHETIC_COUNT, 'Images generated by --source=synthetic.', lower=1)
  seed: int = options.option(0, 'Seed of --source=synthetic.')
  overwrite: bool = options.option(False, 'Replace existing complete records.')
  skip_if_done: bool = options.option(
      False, 'Exit 0 when complete records from the same source and flags exist; fail when their '
      'flags differ.')
  progress: bool = options.option(True, 'Show a progress line on stderr (local runner).')
  runner: str = options.option(
      'local', "Where the conversion runs: 'local' (this machine's cores) or 'beam' (an Apache "
      "Beam pipeline; needs pip install -e '.[beam]').", RUNNERS)
  beam_pipeline_options: str = options.option(
      beam.DEFAULT_PIPELINE_OPTIONS, 'With --runner=beam: options handed to Beam unchanged, e.g. '
      '"--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp".')


def _validated_split(split: Iterable[float]) -> tuple[float, float, float]:
  split = tuple(float(v) for v in split)
  if len(split) != len(contract.SPLITS) or min(split) < 0 or abs(sum(split) - 1) > 1e-6:
    raise contract.ArgumentError(
        'split', f'the split needs {len(contract.SPLITS)} non-negative fractions '
        f'(train, validation, test) that sum to 1, got {split}')
  if split[0] <= 0:
    raise contract.ArgumentError('split', 'the split needs a positive train fraction')
  return split


def _storage(image_format: str, image_size: int | None, jpeg_quality: int,
             find_faces: bool) -> contract.ImageStorage:
  if not 1 <= jpeg_quality <= 100:
    raise contract.ArgumentError('jpeg_quality',
                                 f'JPEG quality must be in 1..100, got {jpeg_quality}')
  _check_choice('image_format', image_format, contract.STORAGE_FORMATS)
  if image_format == contract.RAW and not image_size:
    raise contract.ArgumentError('image_size', 'raw storage needs an image size')
  if image_size is not None and image_size <= 0:
    raise contract.ArgumentError('image_size', f'image size must be positive, got {image_size}')
  if find_faces and image_size is None:
    image_size = faces.CROP_SIZE  # Every face crop is re-encoded at this size.
  return contract.ImageStorage(
      format=image_format, size=image_size,
      jpeg_quality=jpeg_quality if image_format == contract.JPEG and image_size else None)


def _labelling(config: ConvertConfig, spec: str) -> labels_lib.LabelTable | None:
  """Checks the label source; returns the labels table read once, when there is one."""
  if config.labels is not None and config.name_pattern is not None:
    raise contract.ArgumentError('name_pattern', 'labels come from a table or from a name '
                                 'pattern, not both', hint='unset {labels} or {name_pattern}')
  for field in ('labels', 'name_pattern'):
    if getattr(config, field) is not None and spec == sources.SYNTHETIC:
      raise contract.ArgumentError(field, f'{field} is for a folder or an archive source; the '
                                   'synthetic source names its files as UTKFace does')
  if config.name_pattern is not None:
    labels_lib.compile_name_pattern(config.name_pattern)
  return None if config.labels is None else labels_lib.read_table(
      sources.normalize_spec(config.labels))


def _check_choice(argument: str, value: Any, choices: tuple[Any, ...]) -> None:
  if value not in choices:
    raise contract.ArgumentError(argument, f'{argument} must be one of '
                                           f'{", ".join(map(str, choices))}, got {value!r}')


def _check_positive(**values: float | None) -> None:
  for argument, value in values.items():
    if value is not None and value <= 0:
      raise contract.ArgumentError(argument, f'{argument} must be positive, got {value}')


def build(source: str, records_dir: str, **settings: Any) -> dict[str, Any]:
  """Converts `source` into records under `records_dir`; returns the summary.

  `runner` is 'local' (`workers` processes, default the core count, and a
  progress line) or 'beam' (`pipeline_options` handed to Beam unchanged).
  Local workers import the calling script again, as multiprocessing does: a
  script needs the `if __name__ == '__main__':` guard, and its workers start
  in a fraction of a second unless it imports TensorFlow at the top.

  `settings` are ConvertConfig's other fields. Bad arguments and unusable
  sources raise contract.ArgumentError, whose `field` names the one at fault.
  """
  try:
    config = ConvertConfig(source=source, records_dir=records_dir, **settings)
  except TypeError as e:
    raise TypeError(f'build(): {e}') from None
  return _build(config)


def _build(config: ConvertConfig) -> dict[str, Any]:
  source, records_dir = config.source, config.records_dir
  split, image_format, image_size = config.split, config.image_format, config.image_size
  jpeg_quality, shard_size_mb = config.jpeg_quality, config.shard_size_mb
  num_shards = config.num_shards
  label_conflicts, max_file_mb = config.label_conflicts, config.max_file_mb
  max_image_pixels, large_images = config.max_image_pixels, config.large_images
  overwrite, skip_if_done = config.overwrite, config.skip_if_done
  synthetic_count, seed = config.synthetic_count, config.seed
  start = time.monotonic()
  split = _validated_split(split)
  storage = _storage(image_format, image_size, jpeg_quality, config.find_faces)
  _check_positive(shard_size_mb=shard_size_mb, num_shards=num_shards, max_file_mb=max_file_mb,
                  max_image_pixels=max_image_pixels)
  _check_choice('label_conflicts', label_conflicts, shards.LABEL_CONFLICTS)
  _check_choice('large_images', large_images, convert.LARGE_IMAGES)
  _check_choice('runner', config.runner, RUNNERS)
  run = _runner(config.runner, config.workers, config.progress, config.beam_pipeline_options)
  if config.find_faces:
    convert.check_faces()  # No OpenCV: one line now, not a rejection per image.

  directory = contract.dataset_dir(records_dir)
  spec = sources.normalize_spec(source)
  table = _labelling(config, spec)
  settings = {'split': list(split), 'image_format': storage.format,
              'image_size': storage.size, 'jpeg_quality': jpeg_quality,
              'shard_size_mb': shard_size_mb, 'num_shards': num_shards,
              'label_conflicts': label_conflicts, 'max_file_mb': max_file_mb,
              'max_image_pixels': max_image_pixels, 'large_images': large_images,
              'labels': table.path if table else None,
              'labels_sha256': table.sha256 if table else None,
              'name_pattern': config.name_pattern, 'find_faces': config.find_faces}
  if spec == sources.SYNTHETIC:
    settings.update(synthetic_count=synthetic_count, seed=seed)
  with _writing(records_dir), publish.records_lock(records_dir):
    existing = publish.check_existing(directory, spec, settings, overwrite, skip_if_done)
    if existing is not None:
      return dict(existing['summary'], up_to_date=True, records_dir=directory)

    max_file_bytes = int(max_file_mb * 2**20)
    opened = sources.open_source(source, synthetic_count=synthetic_count, seed=seed,
                                 max_file_bytes=max_file_bytes)
    conversion = shards.Conversion(
        directory=publish.start_staging(directory),
        options=convert.ConvertOptions(split=split, storage=storage,
                                       jpeg_quality=jpeg_quality,
                                       max_pixels=max_image_pixels,
                                       large_images=large_images,
                                       name_pattern=config.name_pattern,
                                       find_faces=config.find_faces),
        shard_size_mb=shard_size_mb, num_shards=num_shards,
        label_conflicts=label_conflicts, max_file_bytes=max_file_bytes, table=table)
    try:
      outcome = run(conversion, opened)
      if outcome.files_read == len(outcome.rejected):
        raise contract.ArgumentError(
            'source', publish.nothing_valid_message(opened.spec, outcome.rejected),
            hint=_nothing_valid_hint(outcome.rejected, table))
      summary = publish.summary(directory, opened.spec, outcome, label_conflicts,
                               time.monotonic() - start, table)
      manifest = publish.manifest(storage, dict(opened.describe(), spec=spec), settings,
                                 outcome, summary)
      publish.publish(directory, storage, outcome, manifest)
    except BaseException:
      publish.remove_staging(directory)  # What this run wrote, never complete records.
      raise
  return summary


def _nothing_valid_hint(rejected: list[convert.Rejected],
                       table: labels_lib.LabelTable | None) -> str | None:
  if table is None or not rejected or any(r.kind != convert.NO_LABEL_ROW for r in rejected):
    return None
  example = next(iter(table.lines), None)
  return (f'the paths in {{labels}} are relative to {{source}}: a file there is named '
          f'{rejected[0].name!r}' + (f', a row names {example!r}' if example else ''))


def _runner(runner: str, workers: int | None, progress: bool, pipeline_options: str | None):
  """The runner's function of (conversion, source); the entry point picks it, once."""
  if runner == 'beam':
    beam.import_beam()  # Fails here, before anything is written, if missing.
    beam_options = beam.DEFAULT_PIPELINE_OPTIONS if pipeline_options is None else pipeline_options
    return lambda conversion, source: beam.run_beam(conversion, source, beam_options)
  count = workers or os.cpu_count() or 1
  return lambda conversion, source: local.run_local(conversion, source, workers=count,
                                                    progress=progress)


class _writing:
  """Turns a failure to write the output (a full disk, no permission) into an
  ArgumentError about the records folder."""

  def __init__(self, records_dir: str):
    self.records_dir = records_dir

  def __enter__(self):
    return self

  def __exit__(self, kind, error, traceback):
    if isinstance(error, OSError) or (error is not None and _is_tf_error(error)):
      raise contract.ArgumentError(
          'records_dir', f'could not write the records to {self.records_dir}: '
          f'{_one_line(error)}') from None
    return False


def _is_tf_error(error: BaseException) -> bool:
  # Only gs:// writes raise TensorFlow's errors; a local run need not load it to check.
  tf = sys.modules.get('tensorflow')
  return tf is not None and isinstance(error, tf.errors.OpError)


def _one_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


format_summary = publish.format_summary
