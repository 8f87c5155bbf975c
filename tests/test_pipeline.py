"""make_dataset and the preprocessing functions, over small records written here.

Each fixture image carries its labels in its pixels (the top rows are one
color computed from age and gender), so alignment of images and labels can be
checked after shuffling; the bottom rows are textured so resizing matters. Batches are uint8 pixels; the
model scales them (tests/test_model.py).
"""

import io
import json
import logging
import os
import struct
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from agegender.training import config as config_lib
from agegender import contract
from agegender.training import model as model_lib
from agegender.data import pipeline
from agegender.data import preprocess
from agegender.data import shard_reader
from agegender.training import trainer

SIZE = 32            # Target size in these tests, small for speed.
SHARDS = 3
PER_SHARD = 8
NUM_TRAIN = SHARDS * PER_SHARD
STORAGES = {
    'source_jpeg': contract.ImageStorage(contract.JPEG),
    'jpeg_at_size': contract.ImageStorage(contract.JPEG, size=SIZE, jpeg_quality=95),
    'raw_at_size': contract.ImageStorage(contract.RAW, size=SIZE),
}


# ---------------------------------------------------------------------------
# Fixture records.

def data_config(root, **values):
  """The DataConfig make_dataset takes, for records under `root`, at SIZE pixels."""
  values.setdefault('image_size', SIZE)
  return config_lib.DataConfig(records_dir=str(root), **values)


def labels_of(index):
  return index % 40, index % 2, index % 5  # age, gender, race


def label_color(age, gender):
  return (40 + 5 * age, 60 + 120 * gender, 128)


def labels_from_image(image):
  """(age, gender) read back from a uint8 image's top rows."""
  top = image[:image.shape[0] // 4].reshape(-1, 3).mean(axis=0)
  return int(round((top[0] - 40) / 5)), int(round((top[1] - 60) / 120))


def fixture_pixels(index, height, width):
  age, gender, _ = labels_of(index)
  rng = np.random.default_rng(index)
  pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  pixels[:height // 2] = label_color(age, gender)
  return pixels


def encode(pixels, fmt='JPEG', **kwargs):
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def stored_image(index, storage):
  if storage.format == contract.RAW:
    return fixture_pixels(index, storage.size, storage.size).tobytes()
  if storage.size:
    return encode(fixture_pixels(index, storage.size, storage.size), quality=95)
  # Source bytes: sizes differ from image to image, like real crops do.
  return encode(fixture_pixels(index, 40 + 7 * (index % 6), 48 + 5 * (index % 4)), quality=95)


FIRST_DATETIME = 20170101000000000


def file_name_of(index):
  age, gender, race = labels_of(index)
  return f'{age}_{gender}_{race}_{FIRST_DATETIME + index}.jpg.chip.jpg'


def index_of(file_name):
  return int(file_name.decode().split('_')[3].split('.')[0]) - FIRST_DATETIME


def write_records(root, storage, splits=(('train', SHARDS, PER_SHARD),
                                         ('validation', 1, 5))):
  """Shards and a manifest as make_records writes them; returns the root."""
  directory = contract.dataset_dir(str(root))
  tf.io.gfile.makedirs(directory)
  manifest = {'manifest_format': contract.MANIFEST_FORMAT, 'dataset': contract.DATASET_NAME,
              'version': contract.VERSION, 'image_storage': storage.to_json(), 'splits': {}}
  index = 0
  for split, num_shards, per_shard in splits:
    shards = []
    for shard in range(num_shards):
      name = contract.shard_name(split, shard, num_shards)
      with tf.io.TFRecordWriter(os.path.join(directory, name)) as writer:
        for _ in range(per_shard):
          age, gender, race = labels_of(index)
          writer.write(contract.serialize_example(
              stored_image(index, storage), age, gender, race, file_name_of(index)))
          index += 1
      shards.append({'file': name, 'num_examples': per_shard})
    manifest['splits'][split] = {'num_examples': num_shards * per_shard, 'shards': shards}
  with open(os.path.join(directory, contract.MANIFEST_NAME), 'w') as f:
    json.dump(manifest, f)
  return str(root)


@pytest.fixture(scope='module', params=list(STORAGES))
def any_records(request, tmp_path_factory):
  return write_records(tmp_path_factory.mktemp(request.param), STORAGES[request.param])


@pytest.fixture(scope='module')
def records(tmp_path_factory):
  return write_records(tmp_path_factory.mktemp('source_jpeg'), STORAGES['source_jpeg'])


def train_names(root):
  manifest = contract.read_manifest(root)
  return sorted(name.decode() for name in all_names(
      tf.data.TFRecordDataset(contract.split_shards(manifest, 'train'))))


def all_names(serialized):
  spec = contract.feature_spec()
  return [tf.io.parse_single_example(record, spec)[contract.FILE_NAME].numpy()
          for record in serialized]


def epoch(dataset):
  """One pass as numpy: a list of (images, targets[, metadata]) batches."""
  return [tuple(element) for element in dataset.as_numpy_iterator()]


def names_of(batches):
  return [name.decode() for batch in batches for name in batch[2]['file_name']]


# ---------------------------------------------------------------------------
# Batches.

def test_batches_are_uint8_pixels_at_one_byte_per_value(records):
  dataset = pipeline.make_dataset(data_config(records, batch_size=10), 'train')
  batches = list(dataset)
  assert [len(images) for images, _ in batches] == [10, 10, 4]
  images, targets = batches[0]
  assert images.dtype == tf.uint8 and images.shape == (10, SIZE, SIZE, 3)
  # A quarter of float32's bytes: what crosses to the device and over the tf.data service.
  assert images.numpy().nbytes == 10 * SIZE * SIZE * 3
  assert set(targets) == {'gender_output', 'age_output'}
  for target in targets.values():
    assert target.dtype == tf.float32 and target.shape == (10, 1)
  all_images = np.concatenate([images.numpy() for images, _ in batches])
  assert all_images.max() > 230 and all_images.min() < 25  # Not scaled: the texture spans 0..255.


def test_the_model_scales_pipeline_batches_as_pixels_scaled_by_hand(records):
  """uint8 batches into the model give what float pixels / 255 give the network after its
  scaling layer: the scaling moved into the model, the numbers did not change."""
  model = model_lib.build_model(config_lib.ModelConfig(model='tiny', dropout=0.0), SIZE,
                                mean_age=30.0, age_std=10.0)
  scaled = model.get_layer('scale').output
  heads = {name: model.get_layer(name).output for name in ('gender_output', 'age_output')}
  network = keras.Model(scaled, heads)  # The layers after the scaling, on float input.
  images, _ = next(iter(pipeline.make_dataset(data_config(records, batch_size=8), 'train')))
  by_hand = images.numpy().astype(np.float32) * np.float32(1 / 255)
  outputs, expected = model.predict_on_batch(images), network.predict_on_batch(by_hand)
  for name in ('gender_output', 'age_output'):
    np.testing.assert_array_equal(outputs[name], expected[name])


def test_metadata_and_drop_remainder(records):
  dataset = pipeline.make_dataset(data_config(records, batch_size=10), 'train',
                                  include_metadata=True, drop_remainder=True)
  batches = epoch(dataset)
  assert len(batches) == NUM_TRAIN // 10
  _, targets, metadata = batches[0]
  assert set(metadata) == {'race', 'file_name', 'age', 'gender'}
  for name, age, gender, race in zip(metadata['file_name'], metadata['age'],
                                     metadata['gender'], metadata['race']):
    index = index_of(name)
    assert (age, gender, race) == labels_of(index)
  np.testing.assert_array_equal(targets['age_output'][:, 0], metadata['age'])
  np.testing.assert_array_equal(targets['gender_output'][:, 0], metadata['gender'])


def test_labels_stay_with_their_images_for_each_storage(any_records):
  dataset = pipeline.make_dataset(data_config(any_records, batch_size=7, shuffle_buffer=100),
                                  'train', training=True)
  seen = 0
  for images, targets in dataset.as_numpy_iterator():
    for image, age, gender in zip(images, targets['age_output'][:, 0],
                                  targets['gender_output'][:, 0]):
      assert labels_from_image(image) == (age, gender)
      seen += 1
  assert seen == NUM_TRAIN


def test_training_shuffles_and_reads_every_record_once_per_epoch(records):
  dataset = pipeline.make_dataset(data_config(records, batch_size=5), 'train', training=True,
                                  include_metadata=True)
  expected = train_names(records)
  first, second = names_of(epoch(dataset)), names_of(epoch(dataset))
  assert sorted(first) == expected and sorted(second) == expected
  assert first != second  # Reshuffled each epoch (24! orders: equal only by a bug).


def test_evaluation_order_is_stable(records):
  dataset = pipeline.make_dataset(data_config(records, batch_size=5), 'train',
                                  include_metadata=True)
  assert names_of(epoch(dataset)) == names_of(epoch(dataset))
  assert sorted(names_of(epoch(dataset))) == train_names(records)


def test_deterministic_mode_repeats_order_and_images(records):
  def run():
    data = data_config(records, batch_size=6, deterministic=True, seed=7)
    dataset = pipeline.make_dataset(data, 'train', training=True, include_metadata=True)
    return [epoch(dataset) for _ in range(2)]

  first_run, second_run = run(), run()
  for epoch_a, epoch_b in zip(first_run, second_run):
    assert names_of(epoch_a) == names_of(epoch_b)
    for batch_a, batch_b in zip(epoch_a, epoch_b):
      np.testing.assert_array_equal(batch_a[0], batch_b[0])
  # Different epochs of one run differ in order.
  assert names_of(first_run[0]) != names_of(first_run[1])


def flips_and_shifts(image):
  """Every image augment_batch can make of `image`: flipped or not, then shifted by up to
  the pad (a crop of the reflect-padded image)."""
  pad = max(1, image.shape[0] // 16)
  size = image.shape[0]
  for flipped in (image, image[:, ::-1]):
    padded = np.pad(flipped, [(pad, pad), (pad, pad), (0, 0)], mode='reflect')
    for top in range(2 * pad + 1):
      for left in range(2 * pad + 1):
        yield padded[top:top + size, left:left + size]


def augmenting_task(augment=True, seed=0):
  optimizer = keras.optimizers.Adam()
  # flip_shift, named: the flips and shifts below are exactly what it makes (the other policies
  # are tests/test_augment.py's).
  return trainer.Task(model=None, optimizer=optimizer, optim=None, age_unit=1.0,
                      global_batch_size=NUM_TRAIN, metrics={}, augment=augment,
                      augment_policy='flip_shift', seed=seed)


def test_the_training_step_trains_on_a_flip_and_a_small_shift_of_each_image(records):
  plain = pipeline.make_dataset(data_config(records, batch_size=NUM_TRAIN), 'train')
  (originals, _), = epoch(plain)
  task = augmenting_task()
  images = trainer.training_images(task, tf.constant(originals)).numpy()
  assert images.dtype == np.uint8
  changed = 0
  for image, original in zip(images, originals):
    # Exactly one of the flips and shifts: integer work, no pixel is rescaled.
    assert any(np.array_equal(image, candidate) for candidate in flips_and_shifts(original))
    changed += not np.array_equal(image, original)
  assert changed > NUM_TRAIN // 2
  # The same step and seed give the same batch; the next step another one.
  np.testing.assert_array_equal(trainer.training_images(task, tf.constant(originals)), images)
  task.optimizer.iterations.assign_add(1)
  assert not np.array_equal(trainer.training_images(task, tf.constant(originals)), images)
  other_seed = trainer.training_images(augmenting_task(seed=1), tf.constant(originals))
  assert not np.array_equal(other_seed, images)


def test_without_augmentation_the_training_step_trains_on_the_stored_images(records):
  plain = pipeline.make_dataset(data_config(records, batch_size=NUM_TRAIN), 'train')
  (originals, _), = epoch(plain)
  images = trainer.training_images(augmenting_task(augment=False), tf.constant(originals))
  np.testing.assert_array_equal(images, originals)


def test_training_batches_carry_the_evaluation_images(records):
  # The pipeline never augments (the step does, on the device): the CPU only decodes.
  plain = pipeline.make_dataset(data_config(records, batch_size=NUM_TRAIN), 'train',
                                include_metadata=True)
  training = pipeline.make_dataset(data_config(records, batch_size=NUM_TRAIN, augment=True),
                                   'train', training=True, include_metadata=True)
  (plain_images, _, plain_meta), = epoch(plain)
  (images, _, meta), = epoch(training)
  by_name = dict(zip(plain_meta['file_name'], plain_images))
  for image, name in zip(images, meta['file_name']):
    np.testing.assert_array_equal(image, by_name[name])


def test_cache_gives_the_same_records(records):
  dataset = pipeline.make_dataset(data_config(records, batch_size=5, cache=True), 'train',
                                  training=True, include_metadata=True)
  expected = train_names(records)
  assert sorted(names_of(epoch(dataset))) == expected
  assert sorted(names_of(epoch(dataset))) == expected


# ---------------------------------------------------------------------------
# Preprocessing: one function for every caller.

@pytest.mark.parametrize('storage', ['source_jpeg', 'jpeg_at_size'])
def test_pipeline_jpeg_decode_equals_preprocess_encoded_image(storage, tmp_path):
  root = write_records(tmp_path, STORAGES[storage])
  dataset = pipeline.make_dataset(data_config(root, batch_size=NUM_TRAIN), 'train',
                                  include_metadata=True)
  (images, _, metadata), = epoch(dataset)
  for image, name in zip(images, metadata['file_name']):
    index = index_of(name)
    expected = preprocess.preprocess_encoded_image(stored_image(index, STORAGES[storage]), SIZE)
    assert expected.dtype == tf.uint8
    np.testing.assert_array_equal(image, expected.numpy())


def test_raw_storage_at_the_size_gives_the_stored_pixels_unchanged(tmp_path):
  root = write_records(tmp_path, STORAGES['raw_at_size'])
  dataset = pipeline.make_dataset(data_config(root, batch_size=NUM_TRAIN), 'train',
                                  include_metadata=True)
  (images, _, metadata), = epoch(dataset)
  for image, name in zip(images, metadata['file_name']):
    np.testing.assert_array_equal(image, fixture_pixels(index_of(name), SIZE, SIZE))


def test_raw_storage_resizes_to_another_size(tmp_path):
  root = write_records(tmp_path, STORAGES['raw_at_size'])
  images, _, metadata = next(iter(pipeline.make_dataset(
      data_config(root, batch_size=4, image_size=20), 'train', include_metadata=True)))
  assert images.shape == (4, 20, 20, 3) and images.dtype == tf.uint8
  for image, name in zip(images, metadata['file_name'].numpy()):
    pixels = fixture_pixels(index_of(name), SIZE, SIZE)
    np.testing.assert_array_equal(image, preprocess.resize_pixels(pixels, 20))


def test_preprocess_encoded_image_on_png_and_grayscale():
  pixels = fixture_pixels(3, 50, 40)
  rgba = np.concatenate([pixels, np.full((50, 40, 1), 200, np.uint8)], axis=-1)
  from_png = preprocess.preprocess_encoded_image(encode(rgba, 'PNG'), SIZE).numpy()
  assert from_png.dtype == np.uint8
  np.testing.assert_array_equal(from_png, preprocess.resize_pixels(pixels, SIZE).numpy())
  assert labels_from_image(from_png) == labels_of(3)[:2]

  gray = np.tile(np.arange(60, dtype=np.uint8)[:, None] * 4, (1, 30))
  for encoded in (encode(gray, 'PNG'), encode(gray, 'JPEG', quality=95)):
    image = preprocess.preprocess_encoded_image(encoded, SIZE).numpy()
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], image[..., 1])
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    assert image.min() < 13 and image.max() > 225


def test_resize_pixels_rounds_to_the_nearest_level_and_passes_the_size_unchanged():
  pixels = fixture_pixels(2, 45, 45)
  resized = preprocess.resize_pixels(pixels, SIZE).numpy()
  by_hand = tf.image.resize(pixels.astype(np.float32), (SIZE, SIZE)).numpy()
  assert resized.dtype == np.uint8
  np.testing.assert_array_equal(resized, np.round(np.clip(by_hand, 0, 255)).astype(np.uint8))
  at_size = fixture_pixels(2, SIZE, SIZE)
  np.testing.assert_array_equal(preprocess.resize_pixels(at_size, SIZE), at_size)


def test_resize_pixels_on_a_batch_equals_each_image():
  batch = np.stack([fixture_pixels(i, 45, 45) for i in range(3)])
  together = preprocess.resize_pixels(batch, SIZE).numpy()
  assert together.shape == (3, SIZE, SIZE, 3) and together.dtype == np.uint8
  for image, one in zip(batch, together):
    np.testing.assert_array_equal(one, preprocess.resize_pixels(image, SIZE).numpy())


def test_preprocess_in_a_serving_function_on_a_string_batch():
  encoded = [encode(fixture_pixels(i, 30 + i, 40)) for i in range(3)]

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
  def serve(images):
    return preprocess.preprocess_encoded_batch(images, SIZE)

  batch = serve(tf.constant(encoded)).numpy()
  assert batch.dtype == np.uint8
  for one, image in zip(encoded, batch):
    np.testing.assert_array_equal(image, preprocess.preprocess_encoded_image(one, SIZE).numpy())


# ---------------------------------------------------------------------------
# Damaged records.

def record_offsets(path):
  """(start, data length) of every record in a TFRecord file."""
  data = open(path, 'rb').read()
  offsets, position = [], 0
  while position < len(data):
    (length,) = struct.unpack('<Q', data[position:position + 8])
    offsets.append((position, length))
    position += 12 + length + 4
  return offsets


def flip_byte(path, record, where):
  """Flips one byte of a record: in its data (which fails the data checksum)
  or in its length (which fails the length checksum)."""
  start, length = record_offsets(path)[record]
  position = start + 12 + length // 2 if where == 'data' else start + 2
  data = bytearray(open(path, 'rb').read())
  data[position] ^= 0xFF
  open(path, 'wb').write(bytes(data))


@pytest.fixture(params=['data', 'length'])
def damaged_records(request, tmp_path):
  root = write_records(tmp_path, STORAGES['raw_at_size'])
  shard = contract.split_shards(contract.read_manifest(root), 'train')[1]
  flip_byte(shard, 3, request.param)
  return root, shard, request.param


def test_corrupt_record_fails_naming_the_shard(damaged_records):
  root, shard, _ = damaged_records
  dataset = pipeline.make_dataset(data_config(root, batch_size=4), 'train', training=True)
  with pytest.raises(tf.errors.OpError, match=f'{os.path.basename(shard)}: read 3 of the 8'):
    for _ in dataset:
      pass
  # The one sentence the train entry point shows (adding its --skip_corrupt hint), found by
  # counting the shards again, not by reading the error's text.
  damaged = shard_reader.find_damaged(contract.read_manifest(root), contract.SPLITS)
  assert str(damaged) == (
      f'corrupt or truncated shard {shard}: read 3 of the 8 records its manifest lists')


def test_truncated_shard_fails_naming_the_shard(tmp_path):
  root = write_records(tmp_path, STORAGES['raw_at_size'])
  shard = contract.split_shards(contract.read_manifest(root), 'train')[2]
  data = open(shard, 'rb').read()
  open(shard, 'wb').write(data[:len(data) - 100])
  with pytest.raises(tf.errors.OpError, match=f'{os.path.basename(shard)}: read 7 of the 8'):
    for _ in pipeline.make_dataset(data_config(root, batch_size=4), 'train'):
      pass


def test_skip_corrupt_moves_on_counts_and_logs(damaged_records, caplog):
  root, shard, where = damaged_records
  dataset = pipeline.make_dataset(data_config(root, batch_size=4, skip_corrupt=True), 'train',
                                  training=True, include_metadata=True)
  result = []
  # Hang guard: ignore_errors on a corrupt TFRecord has stalled in some TensorFlow versions.
  reader = threading.Thread(target=lambda: result.append(epoch(dataset)), daemon=True)
  with caplog.at_level(logging.WARNING):
    reader.start()
    reader.join(timeout=60)
  assert not reader.is_alive(), 'iteration over a corrupt shard did not finish'
  (batches,) = result
  # A corrupt record's data: that record alone is lost. A corrupt length: the
  # framing past it cannot be trusted, so the rest of the shard is.
  skipped, after = (1, 4) if where == 'data' else (5, 0)
  names = names_of(batches)
  assert len(names) == NUM_TRAIN - skipped and len(set(names)) == len(names)
  assert set(names) <= {file_name_of(i) for i in range(NUM_TRAIN)}
  for images, targets, _ in batches:  # Rescued records are whole.
    for image, age, gender in zip(images, targets['age_output'][:, 0],
                                  targets['gender_output'][:, 0]):
      assert labels_from_image(image) == (age, gender)
  messages = [r.getMessage() for r in caplog.records if 'skip_corrupt' in r.getMessage()]
  assert messages == [f'skip_corrupt: skipped {skipped} corrupt record(s) of the 8 in shard '
                      f'{shard} (read 3 before the damage and {after} after it)']


def test_missing_shard_and_records_are_clear_errors(tmp_path):
  with pytest.raises(contract.RecordsError, match='make_records'):
    pipeline.make_dataset(data_config(tmp_path / 'nothing'), 'train')
  root = write_records(tmp_path / 'records', STORAGES['raw_at_size'])
  with pytest.raises(contract.RecordsError, match='unknown split'):
    pipeline.make_dataset(data_config(root), 'test')
  empty = write_records(tmp_path / 'empty', STORAGES['raw_at_size'],
                        splits=(('train', 1, 2), ('validation', 0, 0)))
  with pytest.raises(contract.RecordsError, match="'validation'.*has no records"):
    pipeline.make_dataset(data_config(empty), 'validation')
  shard = contract.split_shards(contract.read_manifest(root), 'train')[0]
  os.remove(shard)
  with pytest.raises(contract.RecordsError, match='missing'):
    pipeline.make_dataset(data_config(root), 'train')


# ---------------------------------------------------------------------------
# Several workers and devices.

def test_input_context_of_two_workers_splits_the_shards(tmp_path):
  root = write_records(tmp_path, STORAGES['raw_at_size'],
                       splits=(('train', 4, 3), ('validation', 1, 2)))
  manifest = contract.read_manifest(root)
  per_worker = []
  for worker in range(2):
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker,
                                         num_replicas_in_sync=2)
    dataset = pipeline.make_dataset(data_config(root, batch_size=4), 'train', training=True,
                                    input_context=context, include_metadata=True)
    batches = epoch(dataset)
    assert max(len(batch[0]) for batch in batches) == 2  # Global 4 over 2 replicas.
    per_worker.append(set(names_of(batches)))
  shards = contract.split_shards(manifest, 'train')
  expected = [set(n.decode() for n in all_names(tf.data.TFRecordDataset(shards[w::2])))
              for w in range(2)]
  assert per_worker == expected
  assert not per_worker[0] & per_worker[1]
  assert len(per_worker[0] | per_worker[1]) == 12
  # Fewer shards than input pipelines: tests/test_sharding.py.


def test_distribute_dataset_on_the_cpu_keeps_the_batches(records):
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')

  def dataset_fn(context):
    return pipeline.make_dataset(data_config(records, batch_size=8), 'train',
                                 input_context=context, include_metadata=True)

  distributed = pipeline.distribute_dataset(dataset_fn, strategy)
  plain = epoch(dataset_fn(None))
  for (images, _, metadata), expected in zip(distributed, plain):
    np.testing.assert_array_equal(images.numpy(), expected[0])
    np.testing.assert_array_equal(metadata['file_name'].numpy(), expected[2]['file_name'])
  assert 'CPU' in images.device
