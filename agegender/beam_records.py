"""make_records as an Apache Beam pipeline, for sources that outgrow one machine.

  python -m agegender.make_records --runner=beam --source=gs://bucket/faces \\
      --records_dir=gs://bucket/records \\
      --beam_pipeline_options="--runner=DataflowRunner --project=P --region=R ..."

The pipeline runs the local runner's functions, never copies of them:

  (name, bytes) -> records.convert_image -> rejected | converted
  converted -> group copies by content hash -> SplitTotals per split
            -> shard counts (records.choose_num_shards), a side input
  converted -> group by (split, shard) -> records.unique_by_content
            -> records.write_shard (hash order, temporary name, renamed)

and writes one small report (totals, rejects, shard lengths, files read)
beside the output. The launcher reads it, writes any empty shards, and then
records.convert writes the tfds metadata and the manifest as it does for the
local runner. Split, shard and order follow from the content hash, so the
output is byte for byte the local runner's, whatever order workers finish in.

Reading the source: a folder (local, or gs:// through tf.io.gfile) is listed
on one worker and its files are read in parallel by all of them. Archives and
the synthetic set are streams: the launcher reads them once into staging
files beside the output, which the workers then read.
"""

from __future__ import annotations

import dataclasses
import functools
import pickle
import posixpath
import shlex
import struct
from typing import Any, Iterable, Iterator

from agegender import cli
from agegender import contract
from agegender import records
from agegender import sources

DEFAULT_PIPELINE_OPTIONS = (
    '--runner=DirectRunner --direct_num_workers=0 --direct_running_mode=multi_processing')
INSTALL_HINT = "pip install -e '.[beam]'"
REPORT_NAME = records.TEMP_PREFIX + 'beam-report.pickle'
STAGING_PREFIX = records.TEMP_PREFIX + 'beam-source-'
STAGING_FILE_BYTES = 32 * 2**20
_NAME_LENGTH = struct.Struct('>I')


def import_beam():
  """apache_beam, or a usage error that says how to install it."""
  try:
    import apache_beam  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise cli.UsageError(
        f'--runner=beam needs Apache Beam, which is not installed: {INSTALL_HINT}') from None
  return apache_beam


def convert(source: str, records_dir: str, *,
            pipeline_options: str = DEFAULT_PIPELINE_OPTIONS, **kwargs) -> dict[str, Any]:
  """records.convert on Beam: the same arguments and output, and the options
  string handed to Beam unchanged (`--runner=DataflowRunner --project=...`)."""
  import_beam()
  runner = functools.partial(run_beam, pipeline_options=pipeline_options)
  return records.convert(source, records_dir, runner=runner, **kwargs)


# Reading the source.

def _folder_of(source: sources.Source) -> str | None:
  """The folder of a folder source (a kaggle download is one), else None."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if source.location and tf.io.gfile.isdir(source.location):
    return source.location
  return None


def read_file(name: str, path: str) -> tuple[str, bytes]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with tf.io.gfile.GFile(path, 'rb') as f:
    return name, f.read()


def stage(entries: Iterable[tuple[str, bytes]], directory: str) -> list[str]:
  """Writes a stream of (name, bytes) into TFRecord files in `directory`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  paths, writer, size = [], None, 0
  for name, data in entries:
    if writer is None or size >= STAGING_FILE_BYTES:
      if writer is not None:
        writer.close()
      paths.append(posixpath.join(directory, f'{STAGING_PREFIX}{len(paths):05d}'))
      writer, size = tf.io.TFRecordWriter(paths[-1]), 0
    encoded = name.encode('utf-8')
    writer.write(_NAME_LENGTH.pack(len(encoded)) + encoded + data)
    size += len(encoded) + len(data)
  if writer is not None:
    writer.close()
  return paths


def read_staged(path: str) -> Iterator[tuple[str, bytes]]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
    (length,) = _NAME_LENGTH.unpack_from(record)
    start = _NAME_LENGTH.size
    yield record[start:start + length].decode('utf-8'), record[start + length:]


# The pipeline's steps, each a call into agegender.records.

def _convert(entry: tuple[str, bytes], options: records.ConvertOptions):
  return records.convert_image(*entry, options)


def _count_copies(content_hash: bytes, copies: Iterable[tuple[str, records.Entry]]):
  copies = list(copies)
  del content_hash  # Every copy has it; the split follows from it.
  return copies[0][0], records.SplitTotals().add_entries(entry for _, entry in copies)


def _shard_key(record: records.Converted, split: tuple[float, ...],
               num_shards: dict[str, int]):
  split_range = records.split_ranges(split)[record.split]
  index = records.shard_of(record.position, split_range, num_shards[record.split])
  return (record.split, index), record


def _write_shard(shard: tuple[tuple[str, int], Iterable[records.Converted]], directory: str,
                 num_shards: dict[str, int]):
  key, group = shard
  split, index = key
  examples = [record.example for record, kept in records.unique_by_content(group)
              if kept is None]
  return key, records.write_shard(directory, split, index, num_shards[split], examples)


def _write_report(items: list[tuple[str, Any]], path: str) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with tf.io.gfile.GFile(path, 'wb') as f:
    f.write(pickle.dumps(items))


def _read_report(path: str) -> dict[str, Any]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with tf.io.gfile.GFile(path, 'rb') as f:
    items = pickle.loads(f.read())
  report = {'totals': {}, 'rejected': [], 'shards': {}, 'files_read': 0}
  for kind, value in items:
    if kind == 'rejected':
      report['rejected'].append(value)
    elif kind == 'files_read':
      report['files_read'] = value
    else:
      key, item = value
      report[kind][key] = item
  return report


def build_pipeline(beam, entries, conversion: records.Conversion, report_path: str) -> None:
  """From a PCollection of (name, bytes) to written shards and the report."""
  as_dict = beam.pvalue.AsDict
  results = entries | 'Convert' >> beam.Map(_convert, conversion.options)
  converted = results | 'Converted' >> beam.Filter(
      lambda r: isinstance(r, records.Converted))
  rejected = results | 'Rejected' >> beam.Filter(lambda r: isinstance(r, records.Rejected))

  totals = (converted
            | 'KeyByContent' >> beam.Map(
                lambda r: (r.content_hash, (r.split, records.entry_of(r))))
            | 'GroupCopies' >> beam.GroupByKey()
            | 'CountCopies' >> beam.MapTuple(_count_copies)
            | 'SplitTotals' >> beam.CombinePerKey(records.merge_totals))
  num_shards = totals | 'NumShards' >> beam.MapTuple(
      lambda split, total: (split, conversion.num_shards_of(total)))
  lengths = (converted
             | 'KeyByShard' >> beam.Map(_shard_key, conversion.options.split,
                                        as_dict(num_shards))
             | 'GroupShards' >> beam.GroupByKey()
             | 'WriteShards' >> beam.Map(_write_shard, conversion.directory,
                                              as_dict(num_shards)))
  files_read = entries | 'CountFiles' >> beam.combiners.Count.Globally()

  tagged = (
      totals | 'TagTotals' >> beam.Map(lambda kv: ('totals', kv)),
      lengths | 'TagShards' >> beam.Map(lambda kv: ('shards', kv)),
      rejected | 'TagRejected' >> beam.Map(lambda r: ('rejected', r)),
      files_read | 'TagFilesRead' >> beam.Map(lambda n: ('files_read', n)))
  _ = (tagged | 'Report' >> beam.Flatten()
       | 'OneReport' >> beam.combiners.ToList()
       | 'WriteReport' >> beam.Map(_write_report, report_path))


def _read_entries(beam, pipeline, folder: str | None, staged: list[str]):
  if folder is not None:
    return (pipeline | 'Folder' >> beam.Create([folder])
            | 'List' >> beam.FlatMap(sources.folder_files)
            | 'SpreadFiles' >> beam.Reshuffle()
            | 'Read' >> beam.MapTuple(read_file))
  return (pipeline | 'Staged' >> beam.Create(staged)
          | 'SpreadStaged' >> beam.Reshuffle()
          | 'ReadStaged' >> beam.FlatMap(read_staged)
          | 'SpreadImages' >> beam.Reshuffle())


# The runner.

def run_beam(conversion: records.Conversion, source: sources.Source, *,
             pipeline_options: str = DEFAULT_PIPELINE_OPTIONS) -> records.Outcome:
  """records.convert's runner: the conversion as one Beam pipeline.

  The pipeline writes into a staging folder beside the output; only once it
  has found something valid does the old output (if any) make way for the new
  files, so a run that finds nothing leaves existing records as they were.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  beam = import_beam()
  from apache_beam.options import pipeline_options as beam_options  # pylint: disable=g-import-not-at-top
  options = beam_options.PipelineOptions(shlex.split(pipeline_options or ''))
  directory = conversion.directory
  staging = posixpath.join(posixpath.dirname(directory.rstrip('/')),
                           records.TEMP_PREFIX + posixpath.basename(directory.rstrip('/')))
  folder = _folder_of(source)
  with records.writing_to(staging):
    if tf.io.gfile.exists(staging):
      tf.io.gfile.rmtree(staging)  # What a killed run left.
    tf.io.gfile.makedirs(staging)
    staged = [] if folder is not None else stage(source, staging)
  report_path = posixpath.join(staging, REPORT_NAME)
  with beam.Pipeline(options=options) as pipeline:
    build_pipeline(beam, _read_entries(beam, pipeline, folder, staged),
                   dataclasses.replace(conversion, directory=staging), report_path)
  report = _read_report(report_path)
  for path in staged + [report_path]:
    tf.io.gfile.remove(path)

  try:
    records.check_something_valid(source.spec, report['files_read'], report['rejected'])
  except cli.UsageError:
    tf.io.gfile.rmtree(staging)
    raise
  totals = {name: report['totals'].get(name, records.SplitTotals())
            for name in contract.SPLITS}
  with records.writing_to(directory):
    records.prepare_output(directory)
    for name in tf.io.gfile.listdir(staging):
      tf.io.gfile.rename(posixpath.join(staging, name), posixpath.join(directory, name),
                         overwrite=True)
    tf.io.gfile.rmtree(staging)
    lengths = {name: _all_shards(directory, name, conversion.num_shards_of(total),
                                 report['shards'])
               for name, total in totals.items()}
  return records.Outcome(totals, lengths, report['rejected'], report['files_read'])


def _all_shards(directory: str, split: str, num_shards: int,
                written: dict[tuple[str, int], int]) -> list[int]:
  """Shard lengths of a split; shards no record fell into are written empty here."""
  return [written[(split, index)] if (split, index) in written
          else records.write_shard(directory, split, index, num_shards, ())
          for index in range(num_shards)]

