"""Reading shards: each one's records, checked against the count its manifest lists.

TFRecordDataset stops at the first corrupt record; a short count then tells a
damaged shard from a whole one, and names it. With skip_corrupt the records
past the damage that still pass their checksums are read too, and the
skipped ones are counted in a warning.
"""

from __future__ import annotations

import struct

from absl import logging
import tensorflow as tf

from agegender import contract

# Read-ahead per open shard.
READ_BUFFER_BYTES = 256 * 1024
# Records counted at a time when checking a shard against the manifest.
COUNT_BLOCK = 64


class DamagedShardError(contract.RecordsError):
  """A shard whose records do not match its manifest (corrupt or truncated)."""

  def __init__(self, message: str):
    super().__init__(message, hint='{skip_corrupt} skips corrupt records')


# The start of the error a damaged shard raises while a dataset is read.
DAMAGED_SHARD = 'corrupt or truncated shard '



def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
  """The checksum TFRecord framing stores (CRC-32C, masked)."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def records_after_damage(data: bytes, good: int) -> list[bytes]:
  """The records of a damaged TFRecord file past its first `good` ones that
  still pass their checksums. A record whose data fails its checksum is
  skipped (its length is trusted, since the length has its own checksum); a
  length that fails its checksum, or a truncated tail, ends the file."""
  offset = 0
  for _ in range(good):  # Already read and verified by TFRecordDataset.
    (length,) = struct.unpack_from('<Q', data, offset)
    offset += 12 + length + 4
  records = []
  while offset + 12 <= len(data):
    header = data[offset:offset + 8]
    (length,) = struct.unpack('<Q', header)
    (header_crc,) = struct.unpack_from('<I', data, offset + 8)
    if _masked_crc32c(header) != header_crc or offset + 12 + length + 4 > len(data):
      break
    record = data[offset + 12:offset + 12 + length]
    (record_crc,) = struct.unpack_from('<I', data, offset + 12 + length)
    if _masked_crc32c(record) == record_crc:
      records.append(record)
    offset += 12 + length + 4
  return records


def _rescue_records(path: tf.Tensor, read: tf.Tensor, expected: tf.Tensor) -> tf.Tensor:
  """With skip_corrupt, at the end of a damaged shard: the records past the
  damage that are whole, and a warning with the count of those skipped."""
  name = path.numpy().decode('utf-8')
  with tf.io.gfile.GFile(name, 'rb') as f:
    rescued = records_after_damage(f.read(), int(read))
  skipped = int(expected) - int(read) - len(rescued)
  logging.warning('skip_corrupt: skipped %d corrupt record(s) of the %d in shard %s '
                  '(read %d before the damage and %d after it)',
                  skipped, int(expected), name, int(read), len(rescued))
  return tf.constant(rescued, tf.string, shape=[len(rescued)])


def _shard_end(path, read, expected, skip_corrupt: bool) -> tf.Tensor:
  """The records to add at a shard's end: none when the count is whole;
  otherwise an error naming the shard, or, with skip_corrupt, those
  `_rescue_records` finds past the damage."""
  complete = tf.equal(read, expected)
  nothing = tf.constant([], tf.string)
  if skip_corrupt:
    def rescue():
      records = tf.py_function(_rescue_records, [path, read, expected], tf.string)
      return tf.ensure_shape(records, [None])
    return tf.cond(complete, lambda: nothing, rescue)
  message = tf.strings.join([
      DAMAGED_SHARD, path, ': read ', tf.strings.as_string(read),
      ' of the ', tf.strings.as_string(expected), ' records its manifest lists'])
  with tf.control_dependencies([tf.debugging.Assert(complete, [message])]):
    return tf.identity(nothing)


def read_shard(path: tf.Tensor, expected: tf.Tensor, skip_corrupt: bool) -> tf.data.Dataset:
  """The records of one shard, checked against the count its manifest lists.

  TFRecordDataset stops at the first corrupt record (ignore_errors ends the
  file there, it does not stall); a short count then tells a damaged shard
  from a whole one and names it. Records are counted in blocks, so the check
  costs next to nothing per record.
  """
  blocks = tf.data.TFRecordDataset(path, buffer_size=READ_BUFFER_BYTES).ignore_errors()
  blocks = blocks.batch(COUNT_BLOCK).map(lambda block: (block, False))
  end = tf.data.Dataset.from_tensors((tf.constant([], tf.string), True))

  def count(read, element):
    block, is_end = element
    block = tf.cond(is_end, lambda: _shard_end(path, read, expected, skip_corrupt),
                    lambda: block)
    return read + tf.size(block, tf.int64), block

  return blocks.concatenate(end).scan(tf.constant(0, tf.int64), count).unbatch()


def count_records(path: str) -> int:
  """The records of a TFRecord file that read whole, up to its first damage."""
  dataset = tf.data.TFRecordDataset(path, buffer_size=READ_BUFFER_BYTES).ignore_errors()
  return int(dataset.batch(COUNT_BLOCK).reduce(
      tf.constant(0, tf.int64), lambda total, block: total + tf.size(block, tf.int64)))


def find_damaged(manifest: dict, splits) -> DamagedShardError | None:
  """The first shard of `splits` whose records do not match the manifest's count, as the error
  to raise; None when every shard is whole. Run after a read failed, to say which shard."""
  for split in splits:
    shards = manifest['splits'][split]['shards']
    for path, shard in zip(contract.split_shards(manifest, split), shards):
      read, expected = count_records(path), int(shard['num_examples'])
      if read != expected:
        return DamagedShardError(f'{DAMAGED_SHARD}{path}: read {read} of the {expected} records '
                                 'its manifest lists')
  return None
