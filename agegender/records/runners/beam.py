"""make_records as an Apache Beam pipeline, for sources that outgrow one machine.

  python -m agegender.make_records --runner=beam --source=gs://bucket/faces \\
      --records_dir=gs://bucket/records \\
      --beam_pipeline_options="--runner=DataflowRunner --project=P --region=R ..."

records.build picks this runner; it runs the same functions as the local
runner, never copies of them:

  (name, bytes) [-> labels from the table: a step with the table as its argument,
                    so a table rides in the pipeline's graph]
                -> convert.convert_image -> rejected | converted
  converted -> group copies by content hash -> shards.by_content
            -> shards.SplitTotals per split -> shard counts, a side input
  converted -> group by (split, shard) -> shards.by_content
            -> shards.write_shard (hash order, temporary name, renamed)

and writes one small report (totals, rejects, downscaled images, shard
lengths, files read, the names a table row labelled) into the staging folder.
The launcher reads it and writes any empty shards; records.build then
publishes the output as it does for the local runner. Split, shard and order
follow from the content hash, so the output is byte for byte the local
runner's, whatever order workers finish in.

Reading the source: a folder (local, or gs:// through tf.io.gfile) is listed
on one worker and its files are read in parallel by all of them. Archives and
the synthetic set are streams: the launcher reads them once into staging
files beside the output, which the workers then read.
"""

from __future__ import annotations

import pickle
import posixpath
import shlex
from typing import Any, Iterable, Iterator

from agegender import files
from agegender import contract
from agegender.records import convert
from agegender.records import labels as labels_lib
from agegender.records import shards
from agegender.records import sources

DEFAULT_PIPELINE_OPTIONS = (
    '--runner=DirectRunner --direct_num_workers=0 --direct_running_mode=multi_processing')
INSTALL_HINT = "pip install -e '.[beam]'"
REPORT_NAME = files.TEMP_PREFIX + 'beam-report.pickle'
STAGING_PREFIX = files.TEMP_PREFIX + 'beam-source-'
STAGING_FILE_BYTES = 32 * 2**20


def import_beam():
  """apache_beam (with apache_beam.options.pipeline_options loaded), or an ArgumentError about
  the runner that says how to install it."""
  try:
    # Lazy: Apache Beam is an optional extra, and seconds to import.
    import apache_beam.options.pipeline_options  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise contract.ArgumentError(
        'runner', f'the Beam runner needs Apache Beam, which is not installed: '
        f'{INSTALL_HINT}', hint='needed by {runner}=beam') from None
  return apache_beam


# Reading the source.

def _folder_of(source: sources.Source) -> str | None:
  """The folder of a folder source (a kaggle download is one), else None."""
  if source.location and files.isdir(source.location):
    return source.location
  return None


def stage(entries: Iterable[tuple[str, bytes | sources.TooLarge]], directory: str) -> list[str]:
  """Writes a stream of (name, bytes or TooLarge) into TFRecord files in `directory`."""
  tf = files.tensorflow()
  paths, writer, size = [], None, 0
  for entry in entries:
    if writer is None or size >= STAGING_FILE_BYTES:
      if writer is not None:
        writer.close()
      paths.append(posixpath.join(directory, f'{STAGING_PREFIX}{len(paths):05d}'))
      writer, size = tf.io.TFRecordWriter(paths[-1]), 0
    record = pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(record)
    size += len(record)
  if writer is not None:
    writer.close()
  return paths


def read_staged(path: str) -> Iterator[tuple[str, bytes | sources.TooLarge]]:
  for record in files.tensorflow().data.TFRecordDataset(path).as_numpy_iterator():
    yield pickle.loads(record)


# The pipeline's steps, each a call into the shared conversion modules.

def _label(entry: tuple[str, Any], table: labels_lib.LabelTable):
  return entry[0], entry[1], table.lookup(entry[0])


def _count_copies(content_hash: bytes, copies: Iterable[tuple[str, shards.Entry]],
                  label_conflicts: str = shards.DROP):  # Beam's MapTuple needs the default.
  del content_hash  # Every copy has it; the split follows from it.
  copies = list(copies)
  totals = shards.SplitTotals()
  for group in shards.by_content((entry for _, entry in copies), label_conflicts):
    totals.add(group)
  return copies[0][0], totals


def _shard_key(record: convert.Converted, split: tuple[float, ...],
               num_shards: dict[str, int]):
  split_range = convert.split_ranges(split)[record.split]
  index = convert.shard_of(record.position, split_range, num_shards[record.split])
  return (record.split, index), record


def _write_shard(shard, directory: str, num_shards: dict[str, int], label_conflicts: str):
  (split, index), group = shard
  examples = [copies.kept.example for copies in shards.by_content(group, label_conflicts)
              if copies.kept is not None]
  return (split, index), shards.write_shard(directory, split, index, num_shards[split],
                                            examples)


def _write_report(items: list[tuple[str, Any]], path: str) -> None:
  files.write_bytes(path, pickle.dumps(items))


def _read_report(path: str) -> dict[str, Any]:
  items = pickle.loads(files.read_bytes(path))
  report = {'totals': {}, 'rejected': [], 'downscaled': [], 'shards': {}, 'files_read': 0,
            'matched': []}
  for kind, value in items:
    if kind in ('rejected', 'downscaled', 'matched'):
      report[kind].append(value)
    elif kind == 'files_read':
      report['files_read'] = value
    else:
      key, item = value
      report[kind][key] = item
  return report


def build_pipeline(beam, entries, conversion: shards.Conversion, report_path: str) -> None:
  """From a PCollection of (name, bytes) to written shards and the report."""
  as_dict = beam.pvalue.AsDict
  matched = ()
  if conversion.table is not None:
    entries = entries | 'Label' >> beam.Map(_label, conversion.table)
    matched = (entries
               | 'InTable' >> beam.Filter(lambda entry: labels_lib.in_table(entry[2]))
               | 'TagMatched' >> beam.Map(lambda entry: ('matched', entry[0])),)
  results = entries | 'Convert' >> beam.Map(convert.convert_in_worker, conversion.options)
  converted = results | 'Converted' >> beam.Filter(
      lambda r: isinstance(r, convert.Converted))
  rejected = results | 'Rejected' >> beam.Filter(lambda r: isinstance(r, convert.Rejected))
  downscaled = (converted
                | 'Downscaled' >> beam.Filter(lambda r: r.downscaled_from is not None)
                | 'DownscaledEntry' >> beam.Map(shards.downscaled_entry))

  totals = (converted
            | 'KeyByContent' >> beam.Map(
                lambda r: (r.content_hash, (r.split, shards.entry_of(r))))
            | 'GroupCopies' >> beam.GroupByKey()
            | 'CountCopies' >> beam.MapTuple(_count_copies, conversion.label_conflicts)
            | 'SplitTotals' >> beam.CombinePerKey(shards.merge_totals))
  num_shards = totals | 'NumShards' >> beam.MapTuple(
      lambda split, total: (split, conversion.num_shards_of(total)))
  lengths = (converted
             | 'KeyByShard' >> beam.Map(_shard_key, conversion.options.split,
                                        as_dict(num_shards))
             | 'GroupShards' >> beam.GroupByKey()
             | 'WriteShards' >> beam.Map(_write_shard, conversion.directory,
                                         as_dict(num_shards), conversion.label_conflicts))
  files_read = entries | 'CountFiles' >> beam.combiners.Count.Globally()

  tagged = (
      totals | 'TagTotals' >> beam.Map(lambda kv: ('totals', kv)),
      lengths | 'TagShards' >> beam.Map(lambda kv: ('shards', kv)),
      rejected | 'TagRejected' >> beam.Map(lambda r: ('rejected', r)),
      downscaled | 'TagDownscaled' >> beam.Map(lambda d: ('downscaled', d)),
      files_read | 'TagFilesRead' >> beam.Map(lambda n: ('files_read', n))) + matched
  _ = (tagged | 'Report' >> beam.Flatten()
       | 'OneReport' >> beam.combiners.ToList()
       | 'WriteReport' >> beam.Map(_write_report, report_path))


def _read_entries(beam, pipeline, folder: str | None, staged: list[str],
                  max_file_bytes: int):
  if folder is not None:
    return (pipeline | 'Folder' >> beam.Create([folder])
            | 'List' >> beam.FlatMap(files.walk)
            | 'SpreadFiles' >> beam.Reshuffle()
            | 'Read' >> beam.MapTuple(sources.read_file, max_file_bytes=max_file_bytes))
  return (pipeline | 'Staged' >> beam.Create(staged)
          | 'SpreadStaged' >> beam.Reshuffle()
          | 'ReadStaged' >> beam.FlatMap(read_staged)
          | 'SpreadImages' >> beam.Reshuffle())


# The runner.

def run_beam(conversion: shards.Conversion, source: sources.Source,
             pipeline_options: str = DEFAULT_PIPELINE_OPTIONS) -> shards.Outcome:
  """The conversion as one Beam pipeline, writing shards into conversion.directory."""
  beam = import_beam()
  options = beam.options.pipeline_options.PipelineOptions(shlex.split(pipeline_options or ''))
  directory = conversion.directory
  folder = _folder_of(source)
  staged = [] if folder is not None else stage(source, directory)
  report_path = posixpath.join(directory, REPORT_NAME)
  with beam.Pipeline(options=options) as pipeline:
    build_pipeline(beam, _read_entries(beam, pipeline, folder, staged,
                                       conversion.max_file_bytes),
                   conversion, report_path)
  report = _read_report(report_path)
  for path in staged + [report_path]:
    files.remove(path)
  table = conversion.table
  label_rows = table.rejected_rows(report['matched']) if table is not None else []

  if report['files_read'] == len(report['rejected']):  # Nothing to write.
    return shards.Outcome({}, {}, report['rejected'], report['downscaled'],
                          report['files_read'], label_rows)
  totals = {name: report['totals'].get(name, shards.SplitTotals())
            for name in contract.SPLITS}
  lengths = {name: _all_shards(directory, name, conversion.num_shards_of(total),
                               report['shards'])
             for name, total in totals.items()}
  return shards.Outcome(totals, lengths, report['rejected'], report['downscaled'],
                        report['files_read'], label_rows)


def _all_shards(directory: str, split: str, num_shards: int,
                written: dict[tuple[str, int], int]) -> list[int]:
  """Shard lengths of a split; shards no record fell into are written empty here."""
  return [written[(split, index)] if (split, index) in written
          else shards.write_shard(directory, split, index, num_shards, ())
          for index in range(num_shards)]
