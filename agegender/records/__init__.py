"""Conversion: face sources into sharded TFRecords (`build`), without importing TensorFlow.

  labels      labels from a name, a pattern or a table, checked against the contract
  sources     a folder, archive, Kaggle or generated faces as a stream of (name, bytes)
  convert     the per-image work: decode once, hash, split, serialize (run in the workers)
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
