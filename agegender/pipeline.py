"""The streaming input pipeline: sharded TFRecords to batches for Keras `fit`.

For one split, in this order::

  shards from the manifest -> (training: shuffle shard order each epoch)
  -> read shards in parallel (interleave), each checked against its record count
  -> (cache) -> (training: bounded record shuffle) -> batch
  -> parse the batch -> decode / resize / normalize (-> augment) -> prefetch

Nothing holds the data set in memory: peak memory is bounded by the shuffle
buffer and the prefetched batches, whatever the size of the split. Every stage
runs with AUTOTUNE parallelism.

Preprocessing is one function, `preprocess_encoded_image` (encoded bytes to a
normalized float32 image), with its tail `normalize_image` (pixels to a
resized, normalized float32 image). Training, evaluation, export and predict
all call them, so serving never drifts from training.

Several GPUs or hosts: build the dataset per input pipeline and let the
strategy place batches on the devices, which also prefetches them to the GPU::

  dataset = distribute_dataset(
      lambda ctx: make_dataset(records_dir, 'train', batch_size=GLOBAL_BATCH,
                               training=True, input_context=ctx),
      strategy)
"""

from __future__ import annotations

import queue
import struct
import threading
from typing import Any, Callable

from absl import logging
import tensorflow as tf

from agegender import contract

AUTOTUNE = tf.data.AUTOTUNE
GENDER_OUTPUT = contract.GENDER_OUTPUT
AGE_OUTPUT = contract.AGE_OUTPUT

# Records in the training shuffle buffer: about this many times the stored
# bytes per image of memory (32 MB for UTKFace's source JPEGs). Shard order is
# shuffled and up to MAX_PARALLEL_SHARDS shards interleave before it, so a small
# buffer still mixes well, and memory stays flat however large the data set.
DEFAULT_SHUFFLE_BUFFER = 2_000
# Shards read at once in training; more mixes better, each costs a read buffer.
MAX_PARALLEL_SHARDS = 16
# Decodes in flight within one batch.
DECODE_PARALLELISM = 16
# Read-ahead per open shard.
READ_BUFFER_BYTES = 256 * 1024
# Records counted at a time when checking a shard against the manifest.
COUNT_BLOCK = 64
# Seconds without a batch from the tf.data service after which a pass ends.
DATA_SERVICE_TIMEOUT = 60.0


# ---------------------------------------------------------------------------
# Preprocessing: the one path from pixels or bytes to the model's input.

def normalize_image(image: Any, image_size: int = contract.DEFAULT_IMAGE_SIZE) -> tf.Tensor:
  """Pixels to the model's input: float32 [..., S, S, 3] in [0, 1].

  `image` is one image [H, W, C] or a batch [B, H, W, C] of uint8 (0..255) or
  any real dtype on the same 0..255 scale, with 1 (gray), 3 or 4 (alpha
  dropped) channels. It is resized with bilinear interpolation unless it
  already has the target size.
  """
  image = tf.convert_to_tensor(image)
  image = _to_rgb(image)
  image = tf.cast(image, tf.float32)
  target = (image_size, image_size)
  static_size = tuple(image.shape[-3:-1])
  if static_size != target:
    dynamic_size = tf.shape(image)[-3:-1]
    is_target = tf.reduce_all(tf.equal(dynamic_size, target))
    image = tf.cond(is_target, lambda: image, lambda: tf.image.resize(image, target))
    image = tf.ensure_shape(image, image.shape[:-3].concatenate([image_size, image_size, 3]))
  # A product, not a division: graph optimizers may turn x / 255 into
  # x * (1 / 255), and eager, graph and tf.data results must agree bit for bit.
  return tf.clip_by_value(image * (1.0 / 255.0), 0.0, 1.0)


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
  channels = image.shape[-1]
  if channels == 1:
    return tf.image.grayscale_to_rgb(image)
  if channels == 4:
    return image[..., :3]
  if channels != 3:
    raise ValueError(f'expected 1, 3 or 4 channels, got shape {image.shape}')
  return image


def preprocess_encoded_image(encoded: Any,
                             image_size: int = contract.DEFAULT_IMAGE_SIZE) -> tf.Tensor:
  """Encoded bytes (JPEG, PNG, BMP or GIF; any size; gray or color) to
  float32 [S, S, 3] in [0, 1]."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  return normalize_image(image, image_size)


def preprocess_encoded_batch(encoded: Any,
                             image_size: int = contract.DEFAULT_IMAGE_SIZE) -> tf.Tensor:
  """A batch of encoded images [B] to float32 [B, S, S, 3], each through
  `preprocess_encoded_image` (sizes may differ within the batch)."""
  return tf.map_fn(
      lambda one: preprocess_encoded_image(one, image_size), encoded,
      fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
      parallel_iterations=DECODE_PARALLELISM)


def augment_image(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """A training-time variation of one normalized image [S, S, 3]: horizontal
  flip, small brightness and contrast changes and a small random shift (a
  crop of the reflect-padded image). Stateless: the same seed [2] gives the
  same result, in any thread."""
  flip_seed, brightness_seed, contrast_seed, crop_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  image = tf.image.stateless_random_brightness(image, 0.1, brightness_seed)
  image = tf.image.stateless_random_contrast(image, 0.9, 1.1, contrast_seed)
  pad = max(1, image.shape[0] // 16)
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode='REFLECT')
  image = tf.image.stateless_random_crop(padded, tf.shape(image), crop_seed)
  return tf.clip_by_value(image, 0.0, 1.0)


def _augment_batch(images: tf.Tensor, element_seeds: tf.Tensor, seed: int) -> tf.Tensor:
  seeds = tf.stack([element_seeds, tf.fill(tf.shape(element_seeds), tf.cast(seed, tf.int64))],
                   axis=1)
  return tf.map_fn(lambda args: augment_image(*args), (images, seeds),
                   fn_output_signature=tf.TensorSpec(images.shape[1:], tf.float32),
                   parallel_iterations=DECODE_PARALLELISM)


# ---------------------------------------------------------------------------
# Reading shards, each checked against the record count the manifest lists.

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
      'corrupt or truncated shard ', path, ': read ', tf.strings.as_string(read),
      ' of the ', tf.strings.as_string(expected), ' records its manifest lists '
      '(skip_corrupt=True skips corrupt records)'])
  with tf.control_dependencies([tf.debugging.Assert(complete, [message])]):
    return tf.identity(nothing)


def _read_shard(path: tf.Tensor, expected: tf.Tensor, skip_corrupt: bool) -> tf.data.Dataset:
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


def _split_shards(manifest: dict[str, Any], split: str,
                  input_context) -> tuple[list[str], list[int]]:
  """Paths and record counts of the shards this input pipeline reads."""
  paths = contract.split_shards(manifest, split)
  counts = [int(shard['num_examples']) for shard in manifest['splits'][split]['shards']]
  if not paths:
    raise contract.RecordsError(f'split {split!r} of {manifest["directory"]} has no records')
  missing = [path for path in paths if not tf.io.gfile.exists(path)]
  if missing:
    raise contract.RecordsError(
        f'{len(missing)} shard(s) of split {split!r} listed in the manifest are missing, '
        f'e.g. {missing[0]}; rerun make_records')
  if input_context is not None:
    workers = input_context.num_input_pipelines
    if len(paths) < workers:
      raise contract.RecordsError(
          f'split {split!r} has {len(paths)} shard(s) for {workers} input pipelines; '
          f'each worker reads whole shards: rerun make_records with --num_shards of at '
          f'least {workers}')
    index = input_context.input_pipeline_id
    paths, counts = paths[index::workers], counts[index::workers]
  return paths, counts


# ---------------------------------------------------------------------------
# The dataset.

def _decode_batch(serialized: tf.Tensor, storage: contract.ImageStorage,
                  image_size: int) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
  features = tf.io.parse_example(serialized, contract.feature_spec())
  encoded = features.pop(contract.IMAGE)
  if storage.format == contract.RAW:
    pixels = tf.io.decode_raw(encoded, tf.uint8)
    pixels = tf.reshape(pixels, [-1, storage.size, storage.size, 3])
    images = normalize_image(pixels, image_size)
  else:
    images = preprocess_encoded_batch(encoded, image_size)
  return images, features


def _to_model_inputs(images, features, include_metadata: bool):
  targets = {GENDER_OUTPUT: tf.cast(features[contract.GENDER], tf.float32)[:, None],
             AGE_OUTPUT: tf.cast(features[contract.AGE], tf.float32)[:, None]}
  if include_metadata:
    return images, targets, features
  return images, targets


def make_dataset(records_dir: str,
                 split: str,
                 *,
                 batch_size: int = 128,
                 training: bool = False,
                 image_size: int = contract.DEFAULT_IMAGE_SIZE,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 augment: bool = False,
                 deterministic: bool = False,
                 seed: int = 0,
                 cache: bool = False,
                 skip_corrupt: bool = False,
                 input_context: tf.distribute.InputContext | None = None,
                 drop_remainder: bool = False,
                 include_metadata: bool = False,
                 data_service: str | None = None,
                 data_service_timeout: float | None = DATA_SERVICE_TIMEOUT) -> tf.data.Dataset:
  """The batches of one split of the records under `records_dir`.

  Yields `(images, targets)`: images float32 [B, S, S, 3] in [0, 1], targets
  `{'gender_output': float32 [B, 1], 'age_output': float32 [B, 1]}` (age in
  years). With `include_metadata`, a third element `{'age', 'gender', 'race':
  int64 [B], 'file_name': string [B]}`.

  training: shuffle the shard order every epoch and the records through a
    buffer of `shuffle_buffer` serialized records (the pipeline's main
    memory: about `shuffle_buffer` times the stored bytes per image); augment
    only if `augment`. One pass over the dataset is one epoch (no repeat).
    Outside training the order is the same on every run.
  deterministic: the same order and augmentation on every run, from `seed`.
    Off by default, which lets parallel stages hand out whatever is ready.
  cache: keep the split's serialized records in memory after the first
    epoch (about its size on disk); decoding still runs every epoch.
  skip_corrupt: corrupt records are skipped, and their count logged per
    shard (absl warning); by default a corrupt or truncated shard is an error
    naming it.
  input_context: this input pipeline reads shards i, i+n, ... of the split,
    and `batch_size` is the global batch, divided among the replicas.
  data_service: a tf.data service dispatcher, grpc://HOST:PORT. Everything up
    to the finished batches runs on its workers, which take the shards one at
    a time (dynamic sharding: each record once per epoch, spread over the
    workers up at the time); this process only receives batches. A worker
    lost mid-epoch loses the rest of its shards for that epoch. Not with
    `cache` (each worker would cache only the shards it happened to read).
  data_service_timeout: with a data_service, the seconds without a batch
    after which the pass ends (None: wait forever). TensorFlow's client
    would otherwise wait forever for the shards of a worker that stopped.
  """
  if data_service and cache:
    raise ValueError('cache and data_service do not go together: each service worker '
                     'would cache only the shards it happened to read')
  manifest = contract.read_manifest(records_dir)
  storage = contract.image_storage(manifest)
  paths, counts = _split_shards(manifest, split, input_context)
  if input_context is not None:
    batch_size = input_context.get_per_replica_batch_size(batch_size)
  shuffle_seed = seed if deterministic else None

  shards = tf.data.Dataset.from_tensor_slices((paths, tf.constant(counts, tf.int64)))
  if training:
    shards = shards.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
  records = shards.interleave(
      lambda path, expected: _read_shard(path, expected, skip_corrupt),
      cycle_length=min(len(paths), MAX_PARALLEL_SHARDS), block_length=1,
      num_parallel_calls=AUTOTUNE)
  if cache:
    records = records.cache()
  if training:
    records = records.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True)

  augmenting = training and augment
  if augmenting:
    element_seeds = tf.data.Dataset.random(seed=shuffle_seed, rerandomize_each_iteration=True)
    records = tf.data.Dataset.zip(records, element_seeds)
  batches = records.batch(batch_size, drop_remainder=drop_remainder)

  def preprocess(serialized, element_seeds=None):
    images, features = _decode_batch(serialized, storage, image_size)
    if augmenting:
      images = _augment_batch(images, element_seeds, seed)
    return _to_model_inputs(images, features, include_metadata)

  batches = batches.map(preprocess, num_parallel_calls=AUTOTUNE)

  options = tf.data.Options()
  options.deterministic = deterministic or not training
  if input_context is not None:
    # Already sharded by file above.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF)
  if data_service:
    batches = batches.with_options(options).apply(tf.data.experimental.service.distribute(
        processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC,
        service=data_service))
    if data_service_timeout:
      batches = _ending_after_silence(batches, data_service_timeout)
  batches = batches.prefetch(AUTOTUNE)
  return batches.with_options(options)


def _ending_after_silence(dataset: tf.data.Dataset, timeout: float) -> tf.data.Dataset:
  """`dataset`, ended (with a warning) when no element comes for `timeout` seconds.

  TensorFlow 2.21's tf.data service client waits forever for the shards of a
  worker the dispatcher has dropped (it logs "Lost worker ... due to
  timeout"); this bounds the wait, so the epoch ends with what the other
  workers delivered. The elements pass through a thread of this process.
  """
  end = object()

  def elements():
    ready = queue.Queue(maxsize=2)
    stop = threading.Event()

    def receive():
      for element in dataset:
        while not stop.is_set():
          try:
            ready.put(element, timeout=1.0)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      ready.put(end)

    threading.Thread(target=receive, daemon=True, name='data_service_receive').start()
    try:
      while True:
        try:
          element = ready.get(timeout=timeout)
        except queue.Empty:
          logging.warning('no batch from the tf.data service for %.0f s: ending the epoch '
                          'with what arrived (a worker stopped?)', timeout)
          return
        if element is end:
          return
        yield element
    finally:
      stop.set()

  return tf.data.Dataset.from_generator(elements, output_signature=dataset.element_spec)


def distribute_dataset(dataset_or_fn: tf.data.Dataset | Callable[[tf.distribute.InputContext],
                                                                  tf.data.Dataset],
                       strategy: tf.distribute.Strategy):
  """Spreads batches over `strategy`'s replicas and prefetches each replica's
  next batches into its device's memory (GPU memory where there is a GPU; on
  the CPU the batches are unchanged).

  Pass a function of a `tf.distribute.InputContext` (calling `make_dataset`
  with `input_context=`) to have each worker read its own shards.
  """
  options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
  if callable(dataset_or_fn) and not isinstance(dataset_or_fn, tf.data.Dataset):
    return strategy.distribute_datasets_from_function(dataset_or_fn, options)
  return strategy.experimental_distribute_dataset(dataset_or_fn, options)
