"""UTKFace sources into sharded TFRecords: the conversion's one public entry, `convert`.

The conversion, in the order it runs:

  records.convert     checks the arguments, locks the records folder, and
                      stops early when the output is up to date (output.py)
  sources             the source as a stream of (name, bytes), huge files unread
  a runner            local_runner.run_local (this machine's processes) or
                      beam_records.run_beam (Apache Beam); both run
                      convert.convert_image per file and shards.py's copy
                      resolution and shard writing, into a staging folder
  output.publish      tfds metadata, shards moved in, manifest.json last

Split, shard and order follow from each image's content hash, so reruns and
both runners write the same bytes.
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterable

from agegender import contract
from agegender import convert as convert_lib
from agegender import output
from agegender import shards
from agegender import sources

DEFAULT_SPLIT = convert_lib.DEFAULT_SPLIT
DEFAULT_SHARD_SIZE_MB = 64
DEFAULT_JPEG_QUALITY = convert_lib.DEFAULT_JPEG_QUALITY
DEFAULT_SYNTHETIC_COUNT = 3000
DEFAULT_MAX_FILE_MB = sources.DEFAULT_MAX_FILE_BYTES / 2**20
DEFAULT_MAX_IMAGE_PIXELS = convert_lib.DEFAULT_MAX_PIXELS
RUNNERS = ('local', 'beam')


def _validated_split(split: Iterable[float]) -> tuple[float, float, float]:
  split = tuple(float(v) for v in split)
  if len(split) != len(contract.SPLITS) or min(split) < 0 or abs(sum(split) - 1) > 1e-6:
    raise contract.ArgumentError(
        'split', f'the split needs {len(contract.SPLITS)} non-negative fractions '
        f'(train, validation, test) that sum to 1, got {split}')
  if split[0] <= 0:
    raise contract.ArgumentError('split', 'the split needs a positive train fraction')
  return split


def _storage(image_format: str, image_size: int | None,
             jpeg_quality: int) -> contract.ImageStorage:
  if not 1 <= jpeg_quality <= 100:
    raise contract.ArgumentError('jpeg_quality',
                                 f'JPEG quality must be in 1..100, got {jpeg_quality}')
  try:
    return contract.ImageStorage(
        format=image_format, size=image_size,
        jpeg_quality=jpeg_quality if image_format == contract.JPEG and image_size else None)
  except ValueError as e:
    raise contract.ArgumentError('image_size' if 'size' in str(e) else 'image_format',
                                 str(e)) from None


def _check_choice(argument: str, value: Any, choices: tuple[Any, ...]) -> None:
  if value not in choices:
    raise contract.ArgumentError(argument, f'{argument} must be one of '
                                           f'{", ".join(map(str, choices))}, got {value!r}')


def _check_positive(**values: float | None) -> None:
  for argument, value in values.items():
    if value is not None and value <= 0:
      raise contract.ArgumentError(argument, f'{argument} must be positive, got {value}')


def convert(source: str, records_dir: str, *, split=DEFAULT_SPLIT, image_format: str = 'jpeg',
            image_size: int | None = None, jpeg_quality: int = DEFAULT_JPEG_QUALITY,
            shard_size_mb: float = DEFAULT_SHARD_SIZE_MB, num_shards: int | None = None,
            label_conflicts: str = shards.DROP, max_file_mb: float = DEFAULT_MAX_FILE_MB,
            max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
            large_images: str = convert_lib.DOWNSCALE,
            workers: int | None = None, overwrite: bool = False, skip_if_done: bool = False,
            synthetic_count: int = DEFAULT_SYNTHETIC_COUNT, seed: int = 0,
            progress: bool = True, runner: str = 'local',
            pipeline_options: str | None = None) -> dict[str, Any]:
  """Converts `source` into records under `records_dir`; returns the summary.

  `runner` is 'local' (`workers` processes, default the core count, and a
  progress line) or 'beam' (`pipeline_options` handed to Beam unchanged).
  Local workers import the calling script again, as multiprocessing does: a
  script needs the `if __name__ == '__main__':` guard, and its workers start
  in a fraction of a second unless it imports TensorFlow at the top.

  Bad arguments and unusable sources raise contract.ArgumentError, whose
  `argument` names the keyword argument at fault.
  """
  start = time.monotonic()
  split = _validated_split(split)
  storage = _storage(image_format, image_size, jpeg_quality)
  _check_positive(shard_size_mb=shard_size_mb, num_shards=num_shards, max_file_mb=max_file_mb,
                  max_image_pixels=max_image_pixels)
  _check_choice('label_conflicts', label_conflicts, shards.LABEL_CONFLICTS)
  _check_choice('large_images', large_images, convert_lib.LARGE_IMAGES)
  _check_choice('runner', runner, RUNNERS)
  run = _runner(runner, workers, progress, pipeline_options)

  directory = contract.dataset_dir(records_dir)
  spec = sources.normalize_spec(source)
  settings = {'split': list(split), 'image_format': storage.format,
              'image_size': storage.size, 'jpeg_quality': jpeg_quality,
              'shard_size_mb': shard_size_mb, 'num_shards': num_shards,
              'label_conflicts': label_conflicts, 'max_file_mb': max_file_mb,
              'max_image_pixels': max_image_pixels, 'large_images': large_images}
  if spec == sources.SYNTHETIC:
    settings.update(synthetic_count=synthetic_count, seed=seed)
  with _writing(records_dir), output.records_lock(records_dir):
    existing = output.check_existing(directory, spec, settings, overwrite, skip_if_done)
    if existing is not None:
      return dict(existing['summary'], up_to_date=True, records_dir=directory)

    max_file_bytes = int(max_file_mb * 2**20)
    opened = sources.open_source(source, synthetic_count=synthetic_count, seed=seed,
                                 max_file_bytes=max_file_bytes)
    conversion = shards.Conversion(
        directory=output.start_staging(directory),
        options=convert_lib.ConvertOptions(split=split, storage=storage,
                                           jpeg_quality=jpeg_quality,
                                           max_pixels=max_image_pixels,
                                           large_images=large_images),
        shard_size_mb=shard_size_mb, num_shards=num_shards,
        label_conflicts=label_conflicts, max_file_bytes=max_file_bytes)
    try:
      outcome = run(conversion, opened)
      if outcome.files_read == len(outcome.rejected):
        raise contract.ArgumentError(
            'source', output.nothing_valid_message(opened.spec, outcome.rejected))
      summary = output.summary(directory, opened.spec, outcome, label_conflicts,
                               time.monotonic() - start)
      manifest = output.manifest(storage, dict(opened.describe(), spec=spec), settings,
                                 outcome, summary)
      output.publish(directory, storage, outcome, manifest)
    except BaseException:
      output.remove_staging(directory)  # What this run wrote, never complete records.
      raise
  return summary


def _runner(runner: str, workers: int | None, progress: bool, pipeline_options: str | None):
  """The runner's function of (conversion, source); the entry point picks it, once."""
  if runner == 'beam':
    from agegender import beam_records  # pylint: disable=g-import-not-at-top
    beam_records.import_beam()  # Fails here, before anything is written, if missing.
    options = beam_records.DEFAULT_PIPELINE_OPTIONS if pipeline_options is None else (
        pipeline_options)
    return lambda conversion, source: beam_records.run_beam(conversion, source, options)
  from agegender import local_runner  # pylint: disable=g-import-not-at-top
  count = workers or os.cpu_count() or 1
  return lambda conversion, source: local_runner.run_local(conversion, source, workers=count,
                                                           progress=progress)


class _writing:
  """Turns a failure to write the output (a full disk, no permission) into an
  ArgumentError about the records folder."""

  def __init__(self, records_dir: str):
    self.records_dir = records_dir

  def __enter__(self):
    return self

  def __exit__(self, kind, error, traceback):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if isinstance(error, (tf.errors.OpError, OSError)):
      raise contract.ArgumentError(
          'records_dir', f'could not write the records to {self.records_dir}: '
          f'{_one_line(error)}') from None
    return False


def _one_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


format_summary = output.format_summary
