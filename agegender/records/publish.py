"""The output folder of a conversion: one writer at a time, staged, published whole.

- `records_lock`: an exclusive lock file in the records folder holding the
  writer's host and pid. The lock is an advisory file lock (flock) that the
  operating system drops when its process dies, so a lock file left by a
  killed run is stale by construction and is taken over; a live holder stops
  the second writer with an error that names it.
- `existing_manifest`: what skip_if_done compares: the same source and settings
  (a labels table by its path and its sha256, so an edited table is noticed).
- `staging_dir`: runners write shards into a sibling staging folder, so a
  failed or killed run never touches complete records; `publish` then writes
  the tfds metadata, moves the shards in, and writes manifest.json last, so an
  output without a manifest is unfinished and a rerun replaces it.
- the manifest and the summary, the same whichever runner wrote the shards:
  rejected files, copies, conflicts, downscaled images, and with a labels
  table the rows that labelled no file (`label_rows_rejected`).

Local paths go through the os module, gs:// ones through files.gfile(); only
the tfds metadata needs TensorFlow (through tensorflow_datasets).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import fcntl
import json
import os
import posixpath
import socket
from typing import Any, Iterator

import numpy as np

from agegender import contract
from agegender import files
from agegender.records import convert
from agegender.records import labels as labels_lib
from agegender.records import shards

LOCK_NAME = '.make_records.lock'
TFDS_FILES = ('dataset_info.json', 'features.json')
# Settings newer than some manifests: a manifest without one was made with its default.
LATER_SETTINGS = {'labels': None, 'labels_sha256': None, 'name_pattern': None,
                  'find_faces': False}


# One writer at a time.

def _holder() -> dict[str, Any]:
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'since': datetime.datetime.now().astimezone().isoformat(timespec='seconds')}


def _busy(path: str, holder: dict[str, Any] | None) -> contract.ArgumentError:
  who = ('another run' if holder is None else
         f'pid {holder.get("pid")} on host {holder.get("host")} since {holder.get("since")}')
  return contract.ArgumentError(
      'records_dir', f'{posixpath.dirname(path)} is being written by {who} (lock file '
      f'{path}); wait for it to finish, or delete the lock file if that run is gone')


def _read_holder(path: str) -> dict[str, Any] | None:
  unreadable = (ValueError, OSError)
  if files.is_url(path):
    unreadable += (files.tensorflow().errors.OpError,)
  try:
    return json.loads(files.read_bytes(path))
  except unreadable:
    return None


@contextlib.contextmanager
def _local_lock(path: str) -> Iterator[None]:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise _busy(path, _read_holder(path)) from None
    # The file may have been removed (by a holder finishing) between open and flock.
    try:
      if os.stat(path).st_ino == os.fstat(fd).st_ino:
        break
    except FileNotFoundError:
      pass
    os.close(fd)
  try:
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(_holder()) + '\n').encode('utf-8'))
    yield
  finally:
    os.remove(path)  # While still locked: the next writer finds no file or a new one.
    os.close(fd)


@contextlib.contextmanager
def _remote_lock(path: str) -> Iterator[None]:
  # Object stores have no file locks: the check and the write are not one step.
  if files.exists(path):
    raise _busy(path, _read_holder(path))
  files.write_text(path, json.dumps(_holder()) + '\n')
  try:
    yield
  finally:
    files.remove(path)


def records_lock(records_root: str):
  """Holds the records folder's lock for a block; raises ArgumentError naming a live holder."""
  path = posixpath.join(str(records_root), LOCK_NAME)
  return _remote_lock(path) if '://' in path else _local_lock(path)


# Existing output.

def existing_manifest(directory: str) -> dict[str, Any] | None:
  if not files.exists(posixpath.join(directory, contract.MANIFEST_NAME)):
    return None
  try:
    return contract.read_manifest(directory)
  except contract.RecordsError:
    return None  # Unreadable: treat as unfinished and replace it.


def check_existing(directory: str, spec: str, settings: dict[str, Any], overwrite: bool,
                   skip_if_done: bool) -> dict[str, Any] | None:
  """The existing manifest when the output is up to date; raises when it must not be replaced."""
  manifest = None if overwrite else existing_manifest(directory)
  if manifest is None:
    return None
  if not skip_if_done:
    raise contract.ArgumentError('overwrite', f'records already exist at {directory}',
                                 hint='set {overwrite} to replace them, or {skip_if_done} to '
                                 'keep them')
  if manifest.get('source', {}).get('spec') != spec:
    raise contract.ArgumentError(
        'source', f'records at {directory} were made from source '
        f'{manifest.get("source", {}).get("spec")!r}, not {spec!r}',
        hint='set {overwrite} to replace them')
  old = {**LATER_SETTINGS, **manifest.get('flags', {})}
  changed = [f'{k}={old.get(k)} (now {v})' for k, v in settings.items() if old.get(k) != v]
  if changed:
    raise contract.ArgumentError(
        'skip_if_done', f'records at {directory} were made with {", ".join(changed)}',
        hint='set {overwrite} to replace them')
  return manifest


# Staging and publishing.

def staging_dir(directory: str) -> str:
  directory = directory.rstrip('/')
  return posixpath.join(posixpath.dirname(directory),
                        files.TEMP_PREFIX + posixpath.basename(directory))


def start_staging(directory: str) -> str:
  """An empty staging folder for `directory` (what a killed run left there is removed)."""
  staging = staging_dir(directory)
  files.remove(staging)
  files.makedirs(staging)
  return staging


def remove_staging(directory: str) -> None:
  with contextlib.suppress(Exception):
    files.remove(staging_dir(directory))


def _ours(name: str) -> bool:
  return (name.startswith(files.TEMP_PREFIX) or name in TFDS_FILES or
          name.startswith(f'{contract.DATASET_NAME}-') and '.tfrecord-' in name)


def publish(directory: str, storage: contract.ImageStorage, outcome: shards.Outcome,
            manifest: dict[str, Any]) -> None:
  """Moves the staged shards in with their tfds metadata, and writes the manifest last."""
  staging = staging_dir(directory)
  _write_tfds_metadata(staging, storage, outcome)
  files.makedirs(directory)
  old_manifest = posixpath.join(directory, contract.MANIFEST_NAME)
  files.remove(old_manifest)  # First: the old output stops counting as complete.
  for name in files.listdir(directory):
    if _ours(name):
      files.remove(posixpath.join(directory, name))
  for name in files.listdir(staging):
    if _ours(name) and not name.startswith(files.TEMP_PREFIX):
      files.rename(posixpath.join(staging, name), posixpath.join(directory, name))
  files.write_text(old_manifest, json.dumps(manifest, indent=2) + '\n')
  files.remove(staging)


def _tfds():
  # Lazy: tensorflow_datasets imports TensorFlow, which conversion workers must never import.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def tfds_features(storage: contract.ImageStorage):
  """The tfds FeaturesDict that reads our records."""
  tfds = _tfds()
  if storage.format == contract.RAW:
    image = tfds.features.Tensor(shape=(storage.size, storage.size, 3), dtype=np.uint8,
                                 encoding=tfds.features.Encoding.BYTES)
  else:
    image = tfds.features.Image(shape=(storage.size, storage.size, 3), encoding_format='jpeg')
  return tfds.features.FeaturesDict({
      contract.IMAGE: image,
      contract.AGE: tfds.features.Scalar(dtype=np.int64),
      contract.GENDER: tfds.features.Scalar(dtype=np.int64),
      contract.RACE: tfds.features.Scalar(dtype=np.int64),
      contract.FILE_NAME: tfds.features.Text(),
  })


def _write_tfds_metadata(staging: str, storage: contract.ImageStorage,
                         outcome: shards.Outcome) -> None:
  tfds = _tfds()
  split_infos = [tfds.core.SplitInfo(name=name, shard_lengths=outcome.shard_lengths[name],
                                     num_bytes=outcome.totals[name].num_bytes)
                 for name in contract.SPLITS]
  tfds.folder_dataset.write_metadata(
      data_dir=staging, features=tfds_features(storage), split_infos=split_infos,
      version=contract.VERSION, filename_template=contract.filename_template(),
      check_data=False,
      description='UTKFace face crops with age, gender and race labels, '
                  'converted by agegender.make_records.')


# Manifest and summary.

def nothing_valid_message(spec: str, rejected: list[convert.Rejected]) -> str:
  if not rejected:
    return f'no files found in source {spec!r}'
  counts = collections.Counter(r.kind for r in rejected)
  reasons = ', '.join(f'{kind} {count}' for kind, count in sorted(counts.items()))
  return f'no valid images in source {spec!r}: all {len(rejected)} files rejected ({reasons})'


def summary(directory: str, spec: str, outcome: shards.Outcome, label_conflicts: str,
            elapsed: float, table: labels_lib.LabelTable | None = None) -> dict[str, Any]:
  totals = outcome.totals.values()
  label_table = None
  if table is not None:
    rows = collections.Counter(row.kind for row in outcome.label_rows)
    label_table = {'file': table.path, 'rows': table.num_rows,
                   'rows_rejected': dict(sorted(rows.items())),
                   'rows_rejected_total': len(outcome.label_rows)}
  accepted = {name: total.num_examples for name, total in outcome.totals.items()}
  conflicts = [group for total in totals for group in total.label_conflicts]
  return {
      'records_dir': directory,
      'source': spec,
      'accepted': accepted,
      'accepted_total': sum(accepted.values()),
      'rejected': dict(sorted(collections.Counter(r.kind for r in outcome.rejected).items())),
      'rejected_total': len(outcome.rejected),
      'duplicates': sum(len(total.duplicates) for total in totals),
      'label_conflicts': len(conflicts),
      'label_conflict_files': sum(len(group['files']) for group in conflicts),
      'label_conflicts_kept': label_conflicts == shards.KEEP_FIRST,
      'downscaled': len(outcome.downscaled),
      'label_table': label_table,
      'files_read': outcome.files_read,
      'elapsed_s': round(elapsed, 3),
      'images_per_s': round(outcome.files_read / max(elapsed, 1e-9), 1),
      'up_to_date': False,
  }


def manifest(storage: contract.ImageStorage, source_info: dict[str, Any],
             settings: dict[str, Any], outcome: shards.Outcome,
             summary_: dict[str, Any]) -> dict[str, Any]:
  splits = {}
  for name, lengths in outcome.shard_lengths.items():
    splits[name] = {
        'num_examples': sum(lengths),
        'num_bytes': outcome.totals[name].num_bytes,
        'shards': [{'file': contract.shard_name(name, index, len(lengths)),
                    'num_examples': length} for index, length in enumerate(lengths)]}
  totals = outcome.totals.values()
  return {
      'manifest_format': contract.MANIFEST_FORMAT,
      'dataset': contract.DATASET_NAME,
      'version': contract.VERSION,
      'image_storage': storage.to_json(),
      'splits': splits,
      'source': source_info,
      'flags': settings,
      'histograms': {name: total.histograms for name, total in outcome.totals.items()},
      'label_statistics': {name: total.label_statistics()
                           for name, total in outcome.totals.items()},
      'rejected': [{'file': r.name, 'reason': f'{r.kind}: {r.reason}'}
                   for r in sorted(outcome.rejected, key=lambda r: (r.name, r.kind, r.reason))],
      'duplicates': sorted((d for total in totals for d in total.duplicates),
                           key=lambda d: (d['file'], d['same_as'])),
      'label_conflicts': sorted((c for total in totals for c in total.label_conflicts),
                                key=lambda c: c['files']),
      'downscaled': sorted(outcome.downscaled, key=lambda d: d['file']),
      'label_rows_rejected': [row.to_json() for row in outcome.label_rows],
      'summary': summary_,
  }


def format_summary(summary_: dict[str, Any]) -> str:
  """The final summary, a few lines for people."""
  if summary_.get('up_to_date'):
    return (f'make_records: records at {summary_["records_dir"]} are up to date '
            '(same source and settings); nothing to do')
  accepted = ', '.join(f'{k} {v}' for k, v in summary_['accepted'].items())
  rejected = ', '.join(f'{k} {v}' for k, v in summary_['rejected'].items()) or 'none'
  conflicts = 'none'
  if summary_['label_conflicts']:
    what = ('the smallest name of each kept' if summary_['label_conflicts_kept']
            else 'all copies dropped')
    conflicts = (f'{summary_["label_conflicts"]} images whose copies disagree '
                 f'({summary_["label_conflict_files"]} files), {what}')
  table = summary_.get('label_table')
  table_line = ''
  if table:
    unused = ', '.join(f'{k} {v}' for k, v in table['rows_rejected'].items()) or 'none'
    table_line = f'  label table: {table["rows"]} rows; rows not used: {unused}\n'
  return (f'make_records: wrote {summary_["records_dir"]}\n'
          f'  accepted: {accepted} (total {summary_["accepted_total"]})\n'
          f'  rejected: {rejected}\n'
          f'{table_line}'
          f'  duplicates dropped: {summary_["duplicates"]}\n'
          f'  label conflicts: {conflicts}\n'
          f'  downscaled: {summary_["downscaled"]}\n'
          f'  {summary_["files_read"]} files in {summary_["elapsed_s"]:.1f} s, '
          f'{summary_["images_per_s"]:.0f} images/s')
