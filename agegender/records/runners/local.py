"""The local runner: a conversion on this machine's cores, in two passes with bounded memory.

1. Stream the source (each file looked up in the labels table here, when
   there is one) through a pool of worker processes (which never load
   TensorFlow) running convert.convert_image, and spill each converted record
   into a local bucket file keyed by (split, first hash byte).
2. With the totals known, choose each split's shard count, then read the
   buckets in hash order, resolve copies (agegender.records.shards) and write the
   shards. Copies share a hash, so they share a bucket, and one bucket at a
   time is all that is ever held in memory (its names and labels, not images).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import multiprocessing
import os
import signal
import struct
import sys
import tempfile
import time
from typing import Iterable, Iterator

from agegender import contract
from agegender.records import convert
from agegender.records import labels as labels_lib
from agegender.records import shards
from agegender.records import sources


def _convert_chunk(chunk, options: convert.ConvertOptions):
  return [convert.convert_in_worker(entry, options) for entry in chunk]


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


def convert_stream(entries: Iterable[tuple], options: convert.ConvertOptions,
                   workers: int, chunk_size: int = 32
                   ) -> Iterator[convert.Converted | convert.Rejected]:
  """convert_image over a stream of (name, bytes[, labels]) on `workers` processes, in order.

  Processes, not threads: much of the per-image work (parsing headers,
  building records) holds Python's global lock. Images go in chunks, and
  only a few chunks are in flight: memory stays bounded. One worker converts
  in this process, without starting any.
  """
  entries = iter(entries)
  if workers <= 1:
    for entry in entries:
      yield convert.convert_entry(entry, options)
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


class Progress:
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


# Pass 1: spill converted records into local bucket files.

# hash, example length, age, gender, race, name length; then name, example.
_HEADER = struct.Struct('>32sIhbbH')


@dataclasses.dataclass(frozen=True)
class _Spilled(shards.Entry):
  offset: int = 0  # Of the example in its bucket file.


class _Spill:
  """Records grouped by (split, first hash byte), in local files."""

  def __init__(self, directory: str):
    self.directory = directory
    self._files = {}

  def _path(self, split: str, bucket: int) -> str:
    return os.path.join(self.directory, f'{split}-{bucket:03d}')

  def add(self, record: convert.Converted) -> None:
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


# Pass 2: totals, shard counts, shards.

def _split_totals(spill: _Spill, split: str, label_conflicts: str) -> shards.SplitTotals:
  totals = shards.SplitTotals()
  for path in spill.buckets(split):
    for copies in shards.by_content(_bucket_entries(path), label_conflicts):
      totals.add(copies)
  return totals


def _write_split(spill: _Spill, split: str, conversion: shards.Conversion,
                 num_shards: int) -> list[int]:
  split_range = convert.split_ranges(conversion.options.split)[split]

  def indexed_examples():  # Buckets in hash order, so shards in order.
    for path in spill.buckets(split):
      with open(path, 'rb') as f:
        for copies in shards.by_content(_bucket_entries(path), conversion.label_conflicts):
          if copies.kept is not None:
            f.seek(copies.kept.offset)
            position = convert.hash_position(copies.kept.content_hash)
            yield (convert.shard_of(position, split_range, num_shards),
                   f.read(copies.kept.length))
  return shards.write_split(conversion.directory, split, num_shards, indexed_examples())


def run_local(conversion: shards.Conversion, source: sources.Source, *, workers: int,
              progress: bool = True) -> shards.Outcome:
  """Converts on this machine's cores, in two passes through local spill files."""
  with tempfile.TemporaryDirectory(prefix='make_records-') as spill_dir:
    spill = _Spill(spill_dir)
    rejected, downscaled, matched = [], [], set()
    meter = Progress(progress, source.total)
    entries = shards.labelled(source, conversion.table, matched)  # Looked up here, once.
    try:
      for result in convert_stream(entries, conversion.options, workers):
        if isinstance(result, convert.Rejected):
          rejected.append(result)
        else:
          spill.add(result)
          if result.downscaled_from is not None:
            downscaled.append(shards.downscaled_entry(result))
        meter.step()
    finally:
      spill.close()
      meter.finish()
    label_rows = conversion.table.rejected_rows(matched) if conversion.table else []
    if meter.done == len(rejected):  # Nothing to write.
      return shards.Outcome({}, {}, rejected, downscaled, meter.done, label_rows)

    totals = {name: _split_totals(spill, name, conversion.label_conflicts)
              for name in contract.SPLITS}
    lengths = {name: _write_split(spill, name, conversion, conversion.num_shards_of(total))
               for name, total in totals.items()}
  return shards.Outcome(totals, lengths, rejected, downscaled, meter.done, label_rows)
