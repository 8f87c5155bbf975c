"""The streaming input pipeline: sharded TFRecords to batches for training and evaluation.

For one split, in this order::

  shards from the manifest -> (training: shuffle shard order each epoch)
  -> read shards in parallel (interleave), each checked against its record count
  -> (cache) -> (training: bounded record shuffle) -> batch
  -> parse the batch -> decode / resize to uint8 -> prefetch

Nothing holds the data set in memory: peak memory is bounded by the shuffle
buffer and the prefetched batches, whatever the size of the split. Images stay
uint8 to the device; the model scales them (see agegender.data.preprocess), and
the training step flips and shifts them there, so the CPU's work per image
is the decode and the resize alone.

Several GPUs or hosts: build the dataset per input pipeline and let the
strategy place batches on the devices, which also prefetches them to the GPU::

  dataset = distribute_dataset(
      lambda ctx: make_dataset(data_config, 'train', training=True, input_context=ctx),
      strategy)
"""

from __future__ import annotations

from typing import Any, Callable

from absl import logging
import tensorflow as tf

from agegender.training import config as config_lib
from agegender import contract
from agegender.data import preprocess
from agegender.data import service
from agegender.data import shard_reader

AUTOTUNE = tf.data.AUTOTUNE
# The split that reads every split of the records, in the manifest's order: a whole set
# (one converted only for evaluation need not be split).
ALL = 'all'
# Shards read at once in training; more mixes better, each costs a read buffer.
MAX_PARALLEL_SHARDS = 16


def _split_shards(manifest: dict[str, Any], split: str,
                  input_context) -> tuple[list[str], list[int], int]:
  """Paths and record counts of the shards this input pipeline reads, and every how
  many-th of their records it keeps (1: all; n: sharding by record)."""
  names = list(manifest['splits']) if split == ALL else [split]
  paths = [path for name in names for path in contract.split_shards(manifest, name)]
  counts = [int(shard['num_examples']) for name in names
            for shard in manifest['splits'][name]['shards']]
  if not paths:
    raise contract.RecordsError(f'split {split!r} of {manifest["directory"]} has no records')
  missing = [path for path in paths if not tf.io.gfile.exists(path)]
  if missing:
    raise contract.RecordsError(
        f'{len(missing)} shard(s) of split {split!r} listed in the manifest are missing, '
        f'e.g. {missing[0]}; convert the records again')
  if input_context is None or input_context.num_input_pipelines == 1:
    return paths, counts, 1
  workers, index = input_context.num_input_pipelines, input_context.input_pipeline_id
  if len(paths) < workers:
    # As tf.data's DATA auto-shard policy does: every pipeline reads every shard.
    logging.warning('split %r has %d shard(s) for %d input pipelines: each pipeline reads '
                    'every shard and keeps one record in every %d (more shards would let each '
                    'read only its own)', split, len(paths), workers, workers)
    return paths, counts, workers
  return paths[index::workers], counts[index::workers], 1


def _decode_batch(serialized: tf.Tensor, storage: contract.ImageStorage,
                  image_size: int) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
  features = tf.io.parse_example(serialized, contract.feature_spec())
  encoded = features.pop(contract.IMAGE)
  if storage.format == contract.RAW:
    pixels = tf.reshape(tf.io.decode_raw(encoded, tf.uint8),
                        [-1, storage.size, storage.size, 3])
    return preprocess.resize_pixels(pixels, image_size), features
  return preprocess.preprocess_encoded_batch(encoded, image_size), features


def _to_model_inputs(images, features, include_metadata: bool):
  targets = {contract.GENDER_OUTPUT: tf.cast(features[contract.GENDER], tf.float32)[:, None],
             contract.AGE_OUTPUT: tf.cast(features[contract.AGE], tf.float32)[:, None]}
  if include_metadata:
    return images, targets, features
  return images, targets


def make_dataset(data: config_lib.DataConfig, split: str, *, training: bool = False,
                 input_context: tf.distribute.InputContext | None = None,
                 include_metadata: bool = False, drop_remainder: bool = False,
                 manifest: dict[str, Any] | None = None) -> tf.data.Dataset:
  """The batches of one split of the records under `data.records_dir` (ALL: of every split).

  Yields `(images, targets)`: images uint8 [B, S, S, 3] (S = data.image_size),
  targets `{'gender_output': float32 [B, 1], 'age_output': float32 [B, 1]}`
  (age in years; gender labels.UNKNOWN_GENDER, -1, where the source gave none). With
  `include_metadata`, a third element `{'age', 'gender',
  'race': int64 [B], 'file_name': string [B]}`.

  training: shuffle the shard order every epoch and the records through a
    buffer of `data.shuffle_buffer` serialized records; read through
    `data.data_service` if set. (The training step flips and shifts the
    images on the device: `trainer.training_images`.) One pass is one
    epoch (no repeat). Outside training the order is the same on every run.
  data.deterministic: the same order on every run, from
    `data.seed`. Off by default, which lets parallel stages hand out whatever
    is ready.
  input_context: this input pipeline reads shards i, i+n, ... of the split
    (or, with fewer shards than pipelines, every n-th record of all of them),
    and `data.batch_size` is the global batch, divided among the replicas.
  manifest: the records' manifest, when the caller has read it (read here otherwise).
  """
  manifest = manifest or contract.read_manifest(data.records_dir)
  storage = contract.image_storage(manifest)
  paths, counts, every = _split_shards(manifest, split, input_context)
  batch_size = data.batch_size
  if input_context is not None:
    batch_size = input_context.get_per_replica_batch_size(batch_size)
  # Sharding by record needs the same order in every pipeline: one seed, ordered reads.
  by_record = every > 1
  shuffle_seed = data.seed if data.deterministic or by_record else None

  shards = tf.data.Dataset.from_tensor_slices((paths, tf.constant(counts, tf.int64)))
  if training:
    shards = shards.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
  records = shards.interleave(
      lambda path, expected: shard_reader.read_shard(path, expected, data.skip_corrupt),
      cycle_length=min(len(paths), MAX_PARALLEL_SHARDS), block_length=1,
      num_parallel_calls=AUTOTUNE, deterministic=True if by_record else None)
  if by_record:
    records = records.shard(every, input_context.input_pipeline_id)
  if data.cache:
    records = records.cache()
  if training:
    records = records.shuffle(data.shuffle_buffer,
                              seed=data.seed if data.deterministic else None,
                              reshuffle_each_iteration=True)

  batches = records.batch(batch_size, drop_remainder=drop_remainder)

  def parse(serialized):
    images, features = _decode_batch(serialized, storage, data.image_size)
    return _to_model_inputs(images, features, include_metadata)

  batches = batches.map(parse, num_parallel_calls=AUTOTUNE)

  options = tf.data.Options()
  options.deterministic = data.deterministic or not training
  if input_context is not None:
    # Already sharded above, by file or by record.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF)
  batches = batches.with_options(options)
  if training and data.data_service:
    batches = service.distribute(batches, data.data_service,
                                 timeout=data.data_service_timeout or None)
  return batches.prefetch(AUTOTUNE)


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
