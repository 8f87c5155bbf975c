"""records: the per-image function, the conversion, and the records it writes."""

import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import zipfile

import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from agegender import cli, contract, labels, records, synthetic

import folders  # tests/folders.py

OPTIONS = records.ConvertOptions()


@pytest.fixture(scope='module')
def faces():
  return dict(synthetic.generate_synthetic(40, seed=11, image_size=64))


def _jpeg(mode, color, image_format='JPEG'):
  buffer = io.BytesIO()
  Image.new(mode, (24, 24), color).save(buffer, format=image_format)
  return buffer.getvalue()


def _read_split(records_root, split):
  """A split's records, through the pipeline's parsing spec, in shard order."""
  manifest = contract.read_manifest(records_root)
  dataset = tf.data.TFRecordDataset(contract.split_shards(manifest, split))
  return [{key: value.numpy() for key, value in tf.io.parse_single_example(
      record, contract.feature_spec()).items()} for record in dataset]


def _assert_labels_match_names(rows):
  for row in rows:
    parsed = labels.parse_utkface_name(row['file_name'].decode())
    assert (row['age'], row['gender'], row['race']) == (parsed.age, parsed.gender, parsed.race)


def _files(directory):
  result = {}
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), 'rb') as f:
      result[name] = f.read()
  return result


def _manifest_without_timings(directory):
  manifest = json.loads(_files(directory)[contract.MANIFEST_NAME])
  for key in ('elapsed_s', 'images_per_s', 'records_dir'):
    manifest['summary'].pop(key)
  return manifest


# The per-image function.

def test_rgb_jpeg_is_stored_unchanged(faces):
  name, data = next(iter(faces.items()))
  result = records.convert_image(name, data, OPTIONS)
  assert isinstance(result, records.Converted)
  assert result.content_hash == hashlib.sha256(data).digest()
  assert result.split == records.split_of(result.position, OPTIONS.split)
  row = tf.io.parse_single_example(result.example, contract.feature_spec())
  assert row['image'].numpy() == data
  assert row['file_name'].numpy().decode() == name


@pytest.mark.parametrize('index, kind, detail', [
    (0, records.BAD_NAME, 'datetime'),
    (1, records.BAD_NAME, 'age out of range'),
    (2, records.EMPTY, 'no bytes'),
    (3, records.TRUNCATED, 'truncated'),
    (4, records.NOT_AN_IMAGE, 'cannot identify'),
])
def test_bad_inputs_are_rejected_with_the_reason(faces, index, kind, detail):
  name, data = list(folders.bad_files(faces).items())[index]
  result = records.convert_image(name, data, OPTIONS)
  assert isinstance(result, records.Rejected)
  assert (result.name, result.kind) == (name, kind)
  assert detail in result.reason


@pytest.mark.parametrize('data', [
    _jpeg('RGB', (10, 200, 30), image_format='PNG'),  # A PNG named .jpg.
    _jpeg('L', 128),
    _jpeg('CMYK', (10, 20, 30, 40)),
], ids=['png', 'grayscale', 'cmyk'])
def test_other_images_become_rgb_jpegs(data):
  result = records.convert_image('30_1_2_20170101000000000.jpg', data, OPTIONS)
  image = tf.io.parse_single_example(result.example, contract.feature_spec())['image']
  assert image.numpy() != data
  assert tf.io.decode_jpeg(image).shape == (24, 24, 3)


def test_resized_and_raw_storage(faces):
  name, data = next(iter(faces.items()))
  for storage in (contract.ImageStorage('jpeg', 16, 90), contract.ImageStorage('raw', 16)):
    options = records.ConvertOptions(storage=storage, jpeg_quality=90)
    image = tf.io.parse_single_example(
        records.convert_image(name, data, options).example, contract.feature_spec())['image']
    if storage.format == 'raw':
      assert tf.io.decode_raw(image, tf.uint8).shape == (16 * 16 * 3,)
    else:
      assert tf.io.decode_jpeg(image).shape == (16, 16, 3)


def test_split_and_shard_follow_the_bytes_not_the_name(faces):
  data = faces[sorted(faces)[0]]
  first = records.convert_image('20_0_0_20170101000000000.jpg', data, OPTIONS)
  second = records.convert_image('dir/70_1_3_20990101000000000.jpg.chip.jpg', data, OPTIONS)
  assert (first.content_hash, first.split) == (second.content_hash, second.split)
  ranges = records.split_ranges((0.8, 0.1, 0.1))
  assert ranges['train'][0] == 0 and ranges['test'][1] == 2**64
  assert ranges['train'][1] == ranges['validation'][0]
  start, end = ranges['validation']
  assert [records.shard_of(p, (start, end), 4) for p in (start, end - 1)] == [0, 3]


# The conversion.

def test_kaggle_layout_with_duplicates_and_bad_files(tmp_path, faces):
  files = {}
  for name, data in faces.items():
    files[f'UTKFace/{name}'] = data
    files[f'utkface_aligned_cropped/UTKFace/{name}'] = data
  for name in sorted(faces)[:5]:
    files[f'crop_part1/{name}'] = faces[name]
  files.update(folders.bad_files(faces))
  summary = records.convert(folders.write_folder(tmp_path / 'src', files), str(tmp_path / 'out'),
                            progress=False)

  assert summary['accepted_total'] == len(faces)
  assert summary['duplicates'] == len(faces) + 5
  assert summary['rejected'] == {records.BAD_NAME: 2, records.EMPTY: 1,
                                 records.NOT_AN_IMAGE: 1, records.TRUNCATED: 1}
  manifest = contract.read_manifest(str(tmp_path / 'out'))
  assert sorted(r['file'] for r in manifest['rejected']) == sorted(folders.bad_files(faces))
  assert all(d['same_as'] == 'UTKFace/' + d['file'].rsplit('/', 1)[-1]
             for d in manifest['duplicates'])
  rows = [row for split in contract.SPLITS for row in _read_split(str(tmp_path / 'out'), split)]
  assert sorted(row['file_name'].decode() for row in rows) == sorted(
      f'UTKFace/{name}' for name in faces)
  assert {row['image'] for row in rows} == set(faces.values())
  _assert_labels_match_names(rows)
  assert sum(manifest['histograms']['train']['gender'].values()) == summary['accepted']['train']


def test_archives_give_the_folders_records(tmp_path, faces):
  folder = folders.write_folder(tmp_path / 'src', faces)
  with tarfile.open(tmp_path / 'faces.tar.gz', 'w:gz') as archive:
    archive.add(folder, arcname='.')
  with zipfile.ZipFile(tmp_path / 'faces.zip', 'w') as archive:
    for name, data in faces.items():
      archive.writestr(name, data)
  outputs = []
  for source in (folder, tmp_path / 'faces.tar.gz', tmp_path / 'faces.zip'):
    out = tmp_path / f'out-{len(outputs)}'
    records.convert(str(source), str(out), num_shards=2, progress=False)
    outputs.append(_files(contract.dataset_dir(str(out))))
  shards = [{k: v for k, v in files.items() if '.tfrecord-' in k} for files in outputs]
  assert len(shards[0]) == 6
  assert shards[0] == shards[1] == shards[2]


def test_reruns_are_byte_identical_and_shards_ordered_by_hash(tmp_path, faces):
  folder = folders.write_folder(tmp_path / 'src', faces)
  outputs = []
  for workers in (1, 3):
    out = str(tmp_path / f'out-{workers}')
    records.convert(folder, out, shard_size_mb=0.02, workers=workers, progress=False)
    outputs.append(contract.dataset_dir(out))
  first, second = (_files(d) for d in outputs)
  first.pop(contract.MANIFEST_NAME), second.pop(contract.MANIFEST_NAME)
  assert first == second
  assert _manifest_without_timings(outputs[0]) == _manifest_without_timings(outputs[1])

  manifest = contract.read_manifest(outputs[0])
  train = manifest['splits']['train']
  assert len(train['shards']) == -(-train['num_bytes'] // int(0.02 * 2**20)) > 1
  hashes = [hashlib.sha256(row['image']).digest() for row in _read_split(outputs[0], 'train')]
  assert len(hashes) == train['num_examples'] and hashes == sorted(hashes)


def test_splits_are_stable_under_renaming_and_adding(tmp_path, faces):
  def renamed(name):
    face = labels.parse_utkface_name(name)
    return f'moved/{face.age}_{face.gender}_{face.race}_99{name.split("_")[3]}'

  before = folders.write_folder(tmp_path / 'before', faces)
  more = dict(synthetic.generate_synthetic(15, seed=12, image_size=64))
  after = folders.write_folder(tmp_path / 'after', {**{renamed(n): d for n, d in faces.items()}, **more})
  splits = []
  for source in (before, after):
    out = str(tmp_path / f'out-{len(splits)}')
    records.convert(source, out, progress=False)
    splits.append({row['image']: split for split in contract.SPLITS
                   for row in _read_split(out, split)})
  assert len(splits[1]) == len(faces) + len(more)
  assert {image: splits[1][image] for image in splits[0]} == splits[0]


def test_a_killed_conversion_reruns_to_the_clean_output(tmp_path, faces, monkeypatch):
  folder = folders.write_folder(tmp_path / 'src', faces)
  clean, crashed = str(tmp_path / 'clean'), str(tmp_path / 'crashed')
  records.convert(folder, clean, num_shards=3, progress=False)

  finish = records._ShardWriter._finish_current
  calls = []

  def crash_on_second_shard(writer):
    calls.append(writer)
    if len(calls) == 2:
      raise RuntimeError('killed')
    finish(writer)
  monkeypatch.setattr(records._ShardWriter, '_finish_current', crash_on_second_shard)
  with pytest.raises(RuntimeError, match='killed'):
    records.convert(folder, crashed, num_shards=3, progress=False)
  left = os.listdir(contract.dataset_dir(crashed))
  assert contract.MANIFEST_NAME not in left
  assert [n for n in left if n.startswith(records.TEMP_PREFIX)] == [
      records.TEMP_PREFIX + contract.shard_name('train', 1, 3)]
  with pytest.raises(contract.RecordsError):
    contract.read_manifest(crashed)

  monkeypatch.setattr(records._ShardWriter, '_finish_current', finish)
  records.convert(folder, crashed, num_shards=3, progress=False)
  assert _files(contract.dataset_dir(crashed)).keys() == _files(contract.dataset_dir(clean)).keys()
  for name, data in _files(contract.dataset_dir(clean)).items():
    if name != contract.MANIFEST_NAME:
      assert _files(contract.dataset_dir(crashed))[name] == data, name


def test_existing_output_is_kept_unless_asked(tmp_path):
  out = str(tmp_path / 'out')
  records.convert('synthetic', out, synthetic_count=20, progress=False)
  with pytest.raises(cli.UsageError, match='--overwrite'):
    records.convert('synthetic', out, synthetic_count=20, progress=False)
  up_to_date = records.convert('synthetic', out, synthetic_count=20, skip_if_done=True,
                               progress=False)
  assert up_to_date['up_to_date'] and 'up to date' in records.format_summary(up_to_date)
  with pytest.raises(cli.UsageError, match=r'--synthetic_count=20 \(now 21\).*--overwrite'):
    records.convert('synthetic', out, synthetic_count=21, skip_if_done=True, progress=False)
  with pytest.raises(cli.UsageError, match='source'):
    records.convert(str(tmp_path), out, skip_if_done=True, progress=False)
  replaced = records.convert('synthetic', out, synthetic_count=21, overwrite=True,
                             progress=False)
  assert replaced['accepted_total'] == 21 and not replaced['up_to_date']


def test_nothing_valid_is_an_error_and_writes_nothing(tmp_path, faces):
  folder = folders.write_folder(tmp_path / 'src', folders.bad_files(faces))
  with pytest.raises(cli.UsageError, match='no valid images.*all 5 files rejected'):
    records.convert(folder, str(tmp_path / 'out'), progress=False)
  assert not os.path.exists(tmp_path / 'out')
  with pytest.raises(cli.UsageError, match='no files found'):
    records.convert(folders.write_folder(tmp_path / 'empty', {}), str(tmp_path / 'out'), progress=False)


@pytest.mark.parametrize('image_format, image_size', [('jpeg', None), ('jpeg', 32), ('raw', 32)])
def test_tfds_reads_the_records(tmp_path, image_format, image_size):
  out = str(tmp_path / 'out')
  records.convert('synthetic', out, synthetic_count=30, image_format=image_format,
                  image_size=image_size, progress=False)
  ours = _read_split(out, 'train')
  builder = tfds.builder_from_directory(contract.dataset_dir(out))
  theirs = list(tfds.as_numpy(builder.as_dataset(split='train')))
  assert [r['file_name'] for r in theirs] == [r['file_name'] for r in ours]
  _assert_labels_match_names(theirs)
  size = image_size or 200
  assert all(r['image'].shape == (size, size, 3) for r in theirs)
  assert contract.image_storage(contract.read_manifest(out)) == contract.ImageStorage(
      image_format, image_size, 95 if image_format == 'jpeg' and image_size else None)
  if image_format == 'raw':
    assert theirs[0]['image'].tobytes() == ours[0]['image']


def test_bad_options_are_usage_errors(tmp_path):
  for kwargs, message in (({'image_format': 'raw'}, 'image size'),
                          ({'split': (0.5, 0.2, 0.2)}, 'sum to 1'),
                          ({'jpeg_quality': 0}, 'jpeg_quality')):
    with pytest.raises(cli.UsageError, match=message):
      records.convert('synthetic', str(tmp_path), synthetic_count=5, **kwargs)


def test_workers_are_processes_without_tensorflow():
  assert 'tensorflow' in sys.modules  # Loaded here, as in every command.
  with records.process_pool(2) as pool:
    pid, loaded = pool.submit(
        eval, "__import__('os').getpid(), 'tensorflow' in __import__('sys').modules").result()
  assert pid != os.getpid() and not loaded


def test_the_process_pool_converts_as_one_process_does(faces):
  stream = list(faces.items()) + list(folders.bad_files(faces).items())
  alone = list(records.convert_stream(stream, OPTIONS, workers=1))
  assert list(records.convert_stream(stream, OPTIONS, workers=2, chunk_size=3)) == alone
  assert [r.name for r in alone] == [name for name, _ in stream]
