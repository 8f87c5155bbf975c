"""make_dataset and the preprocessing functions, over small records written here.

Each fixture image carries its labels in its pixels (the top rows are one
color computed from age and gender), so alignment of images and labels can be
checked after shuffling; the bottom rows are textured so resizing matters.
"""

import io
import json
import logging
import os
import struct
import threading

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from agegender import contract
from agegender import pipeline

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

def labels_of(index):
  return index % 40, index % 2, index % 5  # age, gender, race


def label_color(age, gender):
  return (40 + 5 * age, 60 + 120 * gender, 128)


def labels_from_image(image):
  """(age, gender) read back from a normalized image's top rows."""
  top = image[:image.shape[0] // 4].reshape(-1, 3).mean(axis=0) * 255
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

def test_shapes_dtypes_and_value_range(records):
  dataset = pipeline.make_dataset(records, 'train', batch_size=10, image_size=SIZE)
  batches = list(dataset)
  assert [len(images) for images, _ in batches] == [10, 10, 4]
  images, targets = batches[0]
  assert images.dtype == tf.float32 and images.shape == (10, SIZE, SIZE, 3)
  assert set(targets) == {'gender_output', 'age_output'}
  for target in targets.values():
    assert target.dtype == tf.float32 and target.shape == (10, 1)
  all_images = np.concatenate([images.numpy() for images, _ in batches])
  assert all_images.min() >= 0.0 and all_images.max() <= 1.0
  assert all_images.max() > 0.9 and all_images.min() < 0.1  # The texture spans the range.


def test_metadata_and_drop_remainder(records):
  dataset = pipeline.make_dataset(records, 'train', batch_size=10, image_size=SIZE,
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
  dataset = pipeline.make_dataset(any_records, 'train', batch_size=7, training=True,
                                  image_size=SIZE, shuffle_buffer=100)
  seen = 0
  for images, targets in dataset.as_numpy_iterator():
    for image, age, gender in zip(images, targets['age_output'][:, 0],
                                  targets['gender_output'][:, 0]):
      assert labels_from_image(image) == (age, gender)
      seen += 1
  assert seen == NUM_TRAIN


def test_training_shuffles_and_reads_every_record_once_per_epoch(records):
  dataset = pipeline.make_dataset(records, 'train', batch_size=5, training=True,
                                  image_size=SIZE, include_metadata=True)
  expected = train_names(records)
  first, second = names_of(epoch(dataset)), names_of(epoch(dataset))
  assert sorted(first) == expected and sorted(second) == expected
  assert first != second  # Reshuffled each epoch (24! orders: equal only by a bug).


def test_evaluation_order_is_stable(records):
  dataset = pipeline.make_dataset(records, 'train', batch_size=5, image_size=SIZE,
                                  include_metadata=True)
  assert names_of(epoch(dataset)) == names_of(epoch(dataset))
  assert sorted(names_of(epoch(dataset))) == train_names(records)


def test_deterministic_mode_repeats_order_and_augmentation(records):
  def run():
    dataset = pipeline.make_dataset(records, 'train', batch_size=6, training=True,
                                    image_size=SIZE, augment=True, deterministic=True,
                                    seed=7, include_metadata=True)
    return [epoch(dataset) for _ in range(2)]

  first_run, second_run = run(), run()
  for epoch_a, epoch_b in zip(first_run, second_run):
    assert names_of(epoch_a) == names_of(epoch_b)
    for batch_a, batch_b in zip(epoch_a, epoch_b):
      np.testing.assert_array_equal(batch_a[0], batch_b[0])
  # Different epochs of one run differ in order.
  assert names_of(first_run[0]) != names_of(first_run[1])


def test_augmentation_changes_images_within_range(records):
  plain = pipeline.make_dataset(records, 'train', batch_size=NUM_TRAIN, image_size=SIZE,
                                include_metadata=True)
  augmented = pipeline.make_dataset(records, 'train', batch_size=NUM_TRAIN, training=True,
                                    image_size=SIZE, augment=True, include_metadata=True)
  (plain_images, _, plain_meta), = epoch(plain)
  (images, _, meta), = epoch(augmented)
  by_name = dict(zip(plain_meta['file_name'], plain_images))
  assert images.min() >= 0.0 and images.max() <= 1.0
  changed = [not np.array_equal(image, by_name[name])
             for image, name in zip(images, meta['file_name'])]
  assert sum(changed) > NUM_TRAIN // 2


def test_augmentation_is_off_by_default_in_training(records):
  plain = pipeline.make_dataset(records, 'train', batch_size=NUM_TRAIN, image_size=SIZE,
                                include_metadata=True)
  training = pipeline.make_dataset(records, 'train', batch_size=NUM_TRAIN, training=True,
                                   image_size=SIZE, include_metadata=True)
  (plain_images, _, plain_meta), = epoch(plain)
  (images, _, meta), = epoch(training)
  by_name = dict(zip(plain_meta['file_name'], plain_images))
  for image, name in zip(images, meta['file_name']):
    np.testing.assert_array_equal(image, by_name[name])


def test_cache_gives_the_same_records(records):
  dataset = pipeline.make_dataset(records, 'train', batch_size=5, training=True,
                                  image_size=SIZE, cache=True, include_metadata=True)
  expected = train_names(records)
  assert sorted(names_of(epoch(dataset))) == expected
  assert sorted(names_of(epoch(dataset))) == expected


# ---------------------------------------------------------------------------
# Preprocessing: one function for every caller.

@pytest.mark.parametrize('storage', ['source_jpeg', 'jpeg_at_size'])
def test_pipeline_jpeg_decode_equals_preprocess_encoded_image(storage, tmp_path):
  root = write_records(tmp_path, STORAGES[storage])
  dataset = pipeline.make_dataset(root, 'train', batch_size=NUM_TRAIN, image_size=SIZE,
                                  include_metadata=True)
  (images, _, metadata), = epoch(dataset)
  for image, name in zip(images, metadata['file_name']):
    index = index_of(name)
    expected = pipeline.preprocess_encoded_image(stored_image(index, STORAGES[storage]), SIZE)
    np.testing.assert_array_equal(image, expected.numpy())


def test_raw_storage_equals_normalize_image_of_the_pixels(tmp_path):
  root = write_records(tmp_path, STORAGES['raw_at_size'])
  dataset = pipeline.make_dataset(root, 'train', batch_size=NUM_TRAIN, image_size=SIZE,
                                  include_metadata=True)
  (images, _, metadata), = epoch(dataset)
  for image, name in zip(images, metadata['file_name']):
    index = index_of(name)
    pixels = fixture_pixels(index, SIZE, SIZE)
    np.testing.assert_array_equal(image, pixels * np.float32(1 / 255))


def test_raw_storage_resizes_to_another_size(tmp_path):
  root = write_records(tmp_path, STORAGES['raw_at_size'])
  images, _ = next(iter(pipeline.make_dataset(root, 'train', batch_size=4, image_size=20)))
  assert images.shape == (4, 20, 20, 3)


def test_preprocess_encoded_image_on_png_and_grayscale():
  pixels = fixture_pixels(3, 50, 40)
  rgba = np.concatenate([pixels, np.full((50, 40, 1), 200, np.uint8)], axis=-1)
  from_png = pipeline.preprocess_encoded_image(encode(rgba, 'PNG'), SIZE).numpy()
  np.testing.assert_allclose(
      from_png, pipeline.normalize_image(pixels, SIZE).numpy(), atol=1e-6)
  assert labels_from_image(from_png) == labels_of(3)[:2]

  gray = np.tile(np.arange(60, dtype=np.uint8)[:, None] * 4, (1, 30))
  for encoded in (encode(gray, 'PNG'), encode(gray, 'JPEG', quality=95)):
    image = pipeline.preprocess_encoded_image(encoded, SIZE).numpy()
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.float32
    np.testing.assert_array_equal(image[..., 0], image[..., 1])
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    assert 0.0 <= image.min() < 0.05 and 0.9 < image.max() <= 1.0


def test_normalize_image_on_a_batch_equals_each_image():
  batch = np.stack([fixture_pixels(i, 45, 45) for i in range(3)])
  together = pipeline.normalize_image(batch, SIZE).numpy()
  assert together.shape == (3, SIZE, SIZE, 3)
  for image, one in zip(batch, together):
    np.testing.assert_allclose(one, pipeline.normalize_image(image, SIZE).numpy(), atol=1e-6)


def test_preprocess_in_a_serving_function_on_a_string_batch():
  encoded = [encode(fixture_pixels(i, 30 + i, 40)) for i in range(3)]

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
  def serve(images):
    return pipeline.preprocess_encoded_batch(images, SIZE)

  batch = serve(tf.constant(encoded)).numpy()
  for one, image in zip(encoded, batch):
    np.testing.assert_array_equal(image, pipeline.preprocess_encoded_image(one, SIZE).numpy())


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
  dataset = pipeline.make_dataset(root, 'train', batch_size=4, training=True, image_size=SIZE)
  with pytest.raises(tf.errors.OpError, match=f'{os.path.basename(shard)}: read 3 of the 8'):
    for _ in dataset:
      pass


def test_truncated_shard_fails_naming_the_shard(tmp_path):
  root = write_records(tmp_path, STORAGES['raw_at_size'])
  shard = contract.split_shards(contract.read_manifest(root), 'train')[2]
  data = open(shard, 'rb').read()
  open(shard, 'wb').write(data[:len(data) - 100])
  with pytest.raises(tf.errors.OpError, match=f'{os.path.basename(shard)}: read 7 of the 8'):
    for _ in pipeline.make_dataset(root, 'train', batch_size=4, image_size=SIZE):
      pass


def test_skip_corrupt_moves_on_counts_and_logs(damaged_records, caplog):
  root, shard, where = damaged_records
  dataset = pipeline.make_dataset(root, 'train', batch_size=4, training=True, image_size=SIZE,
                                  skip_corrupt=True, include_metadata=True)
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
    pipeline.make_dataset(str(tmp_path / 'nothing'), 'train')
  root = write_records(tmp_path / 'records', STORAGES['raw_at_size'])
  with pytest.raises(contract.RecordsError, match='unknown split'):
    pipeline.make_dataset(root, 'test')
  empty = write_records(tmp_path / 'empty', STORAGES['raw_at_size'],
                        splits=(('train', 1, 2), ('validation', 0, 0)))
  with pytest.raises(contract.RecordsError, match="'validation'.*has no records"):
    pipeline.make_dataset(empty, 'validation')
  shard = contract.split_shards(contract.read_manifest(root), 'train')[0]
  os.remove(shard)
  with pytest.raises(contract.RecordsError, match='missing'):
    pipeline.make_dataset(root, 'train')


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
    dataset = pipeline.make_dataset(root, 'train', batch_size=4, training=True,
                                    image_size=SIZE, input_context=context,
                                    include_metadata=True)
    batches = epoch(dataset)
    assert max(len(batch[0]) for batch in batches) == 2  # Global 4 over 2 replicas.
    per_worker.append(set(names_of(batches)))
  shards = contract.split_shards(manifest, 'train')
  expected = [set(n.decode() for n in all_names(tf.data.TFRecordDataset(shards[w::2])))
              for w in range(2)]
  assert per_worker == expected
  assert not per_worker[0] & per_worker[1]
  assert len(per_worker[0] | per_worker[1]) == 12

  context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=0)
  with pytest.raises(contract.RecordsError, match='1 shard.*2 input pipelines'):
    pipeline.make_dataset(root, 'validation', input_context=context)


def test_distribute_dataset_on_the_cpu_keeps_the_batches(records):
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')

  def dataset_fn(context):
    return pipeline.make_dataset(records, 'train', batch_size=8, image_size=SIZE,
                                 input_context=context, include_metadata=True)

  distributed = pipeline.distribute_dataset(dataset_fn, strategy)
  plain = epoch(dataset_fn(None))
  for (images, _, metadata), expected in zip(distributed, plain):
    np.testing.assert_array_equal(images.numpy(), expected[0])
    np.testing.assert_array_equal(metadata['file_name'].numpy(), expected[2]['file_name'])
  assert 'CPU' in images.device
