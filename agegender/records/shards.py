"""What every runner does after the per-image function: copies, totals, shards.

Copies are records with the same content hash. Where their labels agree, the
smallest name is kept and the others are dropped as duplicates. Where they
disagree, the picture carries at least one wrong label and nobody can tell
which: by default (DROP) every copy is dropped and the group is listed as a
label conflict; with KEEP_FIRST the smallest name is kept, as for agreeing
copies, so the choice never depends on the order files were listed in.

With a labels table (`Conversion.table`) the runner looks each file up in
the main process or a Beam step (`labelled`), and reports the rows that
labelled no file (`Outcome.label_rows`).

Every shard is written through files.atomic_path, so no half-written shard
is ever left under its real name or left to fill the disk.
"""

from __future__ import annotations

import dataclasses
import itertools
import posixpath
from typing import Any, Iterable, Iterator

from agegender import contract
from agegender import files
from agegender.records import convert
from agegender.records import labels as labels_lib

DROP, KEEP_FIRST = 'drop', 'keep_first'
LABEL_CONFLICTS = (DROP, KEEP_FIRST)


# Copies.

@dataclasses.dataclass(frozen=True)
class Entry:
  """What deduplication and the totals need of a record: no image bytes."""
  content_hash: bytes
  name: str
  labels: labels_lib.Labels
  length: int  # Of the serialized example.


def entry_of(record: convert.Converted) -> Entry:
  return Entry(record.content_hash, record.name, record.labels, len(record.example))


@dataclasses.dataclass(frozen=True)
class Copies:
  """The records (anything with content_hash, name, labels) of one content, by name."""
  records: list[Any]
  kept: Any | None   # The record written, or None when a label conflict drops them all.
  conflict: bool     # The copies' labels disagree.


def by_content(records: Iterable[Any], label_conflicts: str) -> Iterator[Copies]:
  """Records grouped by content hash, in hash order, each group resolved."""
  ordered = sorted(records, key=lambda r: (r.content_hash, r.name))
  for _, group in itertools.groupby(ordered, key=lambda r: r.content_hash):
    group = list(group)
    conflict = any(r.labels != group[0].labels for r in group[1:])
    kept = None if conflict and label_conflicts == DROP else group[0]
    yield Copies(group, kept, conflict)


def _decade(age: int) -> str:
  start = age // 10 * 10
  return f'{start}-{start + 9}'


def _empty_histograms() -> dict[str, dict[str, int]]:
  return {'age': {_decade(age): 0 for age in range(0, labels_lib.MAX_AGE + 1, 10)},
          'gender': {str(g): 0 for g in range(labels_lib.UNKNOWN_GENDER,
                                              len(labels_lib.GENDERS))},
          'race': {str(r): 0 for r in range(labels_lib.UNKNOWN_RACE, len(labels_lib.RACES))}}


@dataclasses.dataclass
class SplitTotals:
  """A split's kept examples, bytes, label counts and sums, and what was dropped.

  Ages are summed as integers, so totals merged in any order (Beam's) give
  the same statistics as one pass (the local runner's). Unknown genders (-1)
  are counted in the histogram and left out of the majority gender and its share.
  """
  num_examples: int = 0
  num_bytes: int = 0
  age_sum: int = 0
  age_square_sum: int = 0
  histograms: dict[str, dict[str, int]] = dataclasses.field(default_factory=_empty_histograms)
  duplicates: list[dict[str, str]] = dataclasses.field(default_factory=list)
  label_conflicts: list[dict[str, Any]] = dataclasses.field(default_factory=list)

  def add(self, copies: Copies) -> 'SplitTotals':
    """Counts one content's copies (every copy of it must be in `copies`)."""
    names = [record.name for record in copies.records]
    if copies.conflict:
      kept = copies.kept.name if copies.kept is not None else None
      self.label_conflicts.append({'files': names, 'kept': kept})
    elif len(names) > 1:
      self.duplicates.extend({'file': name, 'same_as': names[0]} for name in names[1:])
    if copies.kept is not None:
      labels = copies.kept.labels
      self.num_examples += 1
      self.num_bytes += copies.kept.length
      self.age_sum += labels.age
      self.age_square_sum += labels.age * labels.age
      self.histograms['age'][_decade(labels.age)] += 1
      self.histograms['gender'][str(labels.gender)] += 1
      self.histograms['race'][str(labels.race)] += 1
    return self

  def merge(self, other: 'SplitTotals') -> 'SplitTotals':
    self.num_examples += other.num_examples
    self.num_bytes += other.num_bytes
    self.age_sum += other.age_sum
    self.age_square_sum += other.age_square_sum
    for kind, histogram in other.histograms.items():
      for key, count in histogram.items():
        self.histograms[kind][key] += count
    self.duplicates.extend(other.duplicates)
    self.label_conflicts.extend(other.label_conflicts)
    return self

  def label_statistics(self) -> dict[str, Any]:
    """What contract.label_statistics returns for this split."""
    mean_age, age_std = contract.age_statistics(self.num_examples, self.age_sum,
                                                self.age_square_sum)
    known = {code: count for code, count in self.histograms['gender'].items()
             if int(code) != labels_lib.UNKNOWN_GENDER}
    gender, share = contract.majority(known)
    return {'num_examples': self.num_examples, 'mean_age': mean_age, 'age_std': age_std,
            'majority_gender': gender, 'majority_share': share}


def merge_totals(totals: Iterable[SplitTotals]) -> SplitTotals:
  merged = SplitTotals()
  for total in totals:
    merged.merge(total)
  return merged


def labelled(entries: Iterable[tuple[str, Any]], table: labels_lib.LabelTable | None,
             matched: set[str]) -> Iterator[tuple]:
  """(name, bytes) entries as (name, bytes, labels from the table); adds to `matched` the
  names that have a row. Without a table the entries pass unchanged."""
  if table is None:
    yield from entries
    return
  for name, data in entries:
    found = table.lookup(name)
    if labels_lib.in_table(found):
      matched.add(name)
    yield name, data, found


# Shards.

@dataclasses.dataclass(frozen=True)
class Conversion:
  """One conversion's checked settings: what a runner needs besides the source."""
  directory: str  # Where the runner writes its shards (a staging folder).
  options: convert.ConvertOptions
  shard_size_mb: float
  num_shards: int | None
  label_conflicts: str = DROP
  max_file_bytes: int = 32 * 2**20
  table: labels_lib.LabelTable | None = None  # --labels: looked up per file by the runner.

  def num_shards_of(self, totals: SplitTotals) -> int:
    return choose_num_shards(totals.num_bytes, totals.num_examples, self.shard_size_mb,
                             self.num_shards)


@dataclasses.dataclass
class Outcome:
  """What a runner did: shards written; the rest goes into the manifest and summary."""
  totals: dict[str, SplitTotals]
  shard_lengths: dict[str, list[int]]
  rejected: list[convert.Rejected]
  downscaled: list[dict[str, Any]]  # {'file', 'from': [w, h]} of each downscaled image.
  files_read: int
  label_rows: list[labels_lib.RowProblem] = dataclasses.field(default_factory=list)  # Unused.


def downscaled_entry(record: convert.Converted) -> dict[str, Any]:
  return {'file': record.name, 'from': list(record.downscaled_from)}


def choose_num_shards(num_bytes: int, num_examples: int, shard_size_mb: float,
                      num_shards: int | None) -> int:
  if num_shards is None:
    num_shards = -(-num_bytes // int(shard_size_mb * 2**20))
  return max(1, min(num_shards, num_examples))


def write_shard(directory: str, split: str, index: int, num_shards: int,
                examples: Iterable[bytes]) -> int:
  """One complete shard from serialized examples in order; returns its length."""
  path = posixpath.join(directory, contract.shard_name(split, index, num_shards))
  length = 0
  with files.atomic_path(path) as temporary:
    with files.tensorflow().io.TFRecordWriter(temporary) as writer:
      for example in examples:
        writer.write(example)
        length += 1
  return length


def write_split(directory: str, split: str, num_shards: int,
                indexed_examples: Iterable[tuple[int, bytes]]) -> list[int]:
  """Every shard of a split from (shard index, example) in shard order, the empty
  ones included; returns the shard lengths."""
  lengths = []
  for index, group in itertools.groupby(indexed_examples, key=lambda pair: pair[0]):
    while len(lengths) < index:
      lengths.append(write_shard(directory, split, len(lengths), num_shards, ()))
    lengths.append(write_shard(directory, split, index, num_shards,
                               (example for _, example in group)))
  while len(lengths) < num_shards:
    lengths.append(write_shard(directory, split, len(lengths), num_shards, ()))
  return lengths
