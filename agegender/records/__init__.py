"""Conversion: face sources into sharded TFRecords (`build`), without importing TensorFlow.

  labels      labels from a name, a pattern or a table, checked against the contract
  sources     a folder, archive, Kaggle or generated faces as a stream of (name, bytes)
  convert     the per-image work: labels, decode once, find the face (--find_faces), hash,
              split, serialize (run in the workers, which never import TensorFlow)
  shards      copies and conflicts, per-split totals, shard writing
  publish     tfds metadata, the manifest, the lock and the staging folder
  runners/    local (processes on this machine) and beam (Apache Beam)
  conversion  the one public entry, build(): checks, locks, runs a runner, publishes
"""

from agegender.records.conversion import build
from agegender.records.conversion import DEFAULT_JPEG_QUALITY
from agegender.records.conversion import DEFAULT_MAX_FILE_MB
from agegender.records.conversion import DEFAULT_MAX_IMAGE_PIXELS
from agegender.records.conversion import DEFAULT_SHARD_SIZE_MB
from agegender.records.conversion import DEFAULT_SYNTHETIC_COUNT
from agegender.records.conversion import format_summary

__all__ = ['DEFAULT_JPEG_QUALITY', 'DEFAULT_MAX_FILE_MB', 'DEFAULT_MAX_IMAGE_PIXELS',
           'DEFAULT_SHARD_SIZE_MB', 'DEFAULT_SYNTHETIC_COUNT', 'build', 'format_summary']
