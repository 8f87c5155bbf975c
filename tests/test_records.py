"""The conversion: the per-image function, records.convert, and the records it writes."""

import collections
import hashlib
import io
import json
import os
import statistics as statistics_lib
import sys
import tarfile
import zipfile

import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from agegender import contract
from agegender.records import convert
from agegender.records import labels
from agegender.records.runners import local
from agegender import records
from agegender.records import synthetic

import folders  # tests/folders.py

OPTIONS = convert.ConvertOptions()


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


def _manifest_without_timings(directory):
  manifest = json.loads(folders.read_folder(directory)[contract.MANIFEST_NAME])
  for key in ('elapsed_s', 'images_per_s', 'records_dir'):
    manifest['summary'].pop(key)
  return manifest


# The per-image function.

def test_rgb_jpeg_is_stored_unchanged(faces):
  name, data = next(iter(faces.items()))
  result = convert.convert_image(name, data, OPTIONS)
  assert isinstance(result, convert.Converted)
  assert result.content_hash == hashlib.sha256(data).digest()
  assert result.split == convert.split_of(result.position, OPTIONS.split)
  row = tf.io.parse_single_example(result.example, contract.feature_spec())
  assert row['image'].numpy() == data
  assert row['file_name'].numpy().decode() == name


@pytest.mark.parametrize('index, kind, detail', [
    (0, convert.BAD_NAME, 'datetime'),
    (1, convert.BAD_NAME, 'age out of range'),
    (2, convert.EMPTY, 'no bytes'),
    (3, convert.TRUNCATED, 'truncated'),
    (4, convert.NOT_AN_IMAGE, 'cannot identify'),
])
def test_bad_inputs_are_rejected_with_the_reason(faces, index, kind, detail):
  name, data = list(folders.bad_files(faces).items())[index]
  result = convert.convert_image(name, data, OPTIONS)
  assert isinstance(result, convert.Rejected)
  assert (result.name, result.kind) == (name, kind)
  assert detail in result.reason


def test_a_file_that_ends_too_soon_is_truncated_and_bad_bytes_are_corrupt(faces):
  data = faces[sorted(faces)[0]]
  for cut in (40, 200, len(data) // 2, len(data) - 2):  # In the header, in the pixels.
    result = convert.convert_image('30_1_0_20170101000000003.jpg', data[:cut], OPTIONS)
    assert (result.kind, result.name) == (convert.TRUNCATED, '30_1_0_20170101000000003.jpg')
  scan = data.index(b'\xff\xda') + 40
  broken = data[:scan] + b'\xff\xd8' + data[scan + 2:]  # A start-of-image marker mid-scan.
  result = convert.convert_image('30_1_0_20170101000000003.jpg', broken, OPTIONS)
  assert (result.kind, result.reason) == (convert.CORRUPT,
                                          'broken data stream when reading image file')


@pytest.mark.parametrize('data', [
    _jpeg('RGB', (10, 200, 30), image_format='PNG'),  # A PNG named .jpg.
    _jpeg('L', 128),
    _jpeg('CMYK', (10, 20, 30, 40)),
], ids=['png', 'grayscale', 'cmyk'])
def test_other_images_become_rgb_jpegs(data):
  result = convert.convert_image('30_1_2_20170101000000000.jpg', data, OPTIONS)
  image = tf.io.parse_single_example(result.example, contract.feature_spec())['image']
  assert image.numpy() != data
  assert tf.io.decode_jpeg(image).shape == (24, 24, 3)


def test_resized_and_raw_storage(faces):
  name, data = next(iter(faces.items()))
  for storage in (contract.ImageStorage('jpeg', 16, 90), contract.ImageStorage('raw', 16)):
    options = convert.ConvertOptions(storage=storage, jpeg_quality=90)
    image = tf.io.parse_single_example(
        convert.convert_image(name, data, options).example, contract.feature_spec())['image']
    if storage.format == 'raw':
      assert tf.io.decode_raw(image, tf.uint8).shape == (16 * 16 * 3,)
    else:
      assert tf.io.decode_jpeg(image).shape == (16, 16, 3)


def test_split_and_shard_follow_the_bytes_not_the_name(faces):
  data = faces[sorted(faces)[0]]
  first = convert.convert_image('20_0_0_20170101000000000.jpg', data, OPTIONS)
  second = convert.convert_image('dir/70_1_3_20990101000000000.jpg.chip.jpg', data, OPTIONS)
  assert (first.content_hash, first.split) == (second.content_hash, second.split)
  ranges = convert.split_ranges((0.8, 0.1, 0.1))
  assert ranges['train'][0] == 0 and ranges['test'][1] == 2**64
  assert ranges['train'][1] == ranges['validation'][0]
  start, end = ranges['validation']
  assert [convert.shard_of(p, (start, end), 4) for p in (start, end - 1)] == [0, 3]


# The conversion.

def test_kaggle_layout_with_duplicates_and_bad_files(tmp_path, faces):
  files = {}
  for name, data in faces.items():
    files[f'UTKFace/{name}'] = data
    files[f'utkface_aligned_cropped/UTKFace/{name}'] = data
  for name in sorted(faces)[:5]:
    files[f'crop_part1/{name}'] = faces[name]
  files.update(folders.bad_files(faces))
  summary = records.build(folders.write_folder(tmp_path / 'src', files), str(tmp_path / 'out'),
                            progress=False)

  assert summary['accepted_total'] == len(faces)
  assert summary['duplicates'] == len(faces) + 5
  assert summary['rejected'] == {convert.BAD_NAME: 2, convert.EMPTY: 1,
                                 convert.NOT_AN_IMAGE: 1, convert.TRUNCATED: 1}
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
    records.build(str(source), str(out), num_shards=2, progress=False)
    outputs.append(folders.read_folder(contract.dataset_dir(str(out))))
  shards = [{k: v for k, v in files.items() if '.tfrecord-' in k} for files in outputs]
  assert len(shards[0]) == 6
  assert shards[0] == shards[1] == shards[2]


def test_reruns_are_byte_identical_and_shards_ordered_by_hash(tmp_path, faces):
  folder = folders.write_folder(tmp_path / 'src', faces)
  outputs = []
  for workers in (1, 3):
    out = str(tmp_path / f'out-{workers}')
    records.build(folder, out, shard_size_mb=0.02, workers=workers, progress=False)
    outputs.append(contract.dataset_dir(out))
  first, second = (folders.read_folder(d) for d in outputs)
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
    records.build(source, out, progress=False)
    splits.append({row['image']: split for split in contract.SPLITS
                   for row in _read_split(out, split)})
  assert len(splits[1]) == len(faces) + len(more)
  assert {image: splits[1][image] for image in splits[0]} == splits[0]


def test_existing_output_is_kept_unless_asked(tmp_path):
  out = str(tmp_path / 'out')
  records.build('synthetic', out, synthetic_count=20, progress=False)
  with pytest.raises(contract.ArgumentError, match='already exist') as raised:
    records.build('synthetic', out, synthetic_count=20, progress=False)
  assert raised.value.field == 'overwrite'
  up_to_date = records.build('synthetic', out, synthetic_count=20, skip_if_done=True,
                               progress=False)
  assert up_to_date['up_to_date'] and 'up to date' in records.format_summary(up_to_date)
  with pytest.raises(contract.ArgumentError, match=r'synthetic_count=20 \(now 21\)'):
    records.build('synthetic', out, synthetic_count=21, skip_if_done=True, progress=False)
  with pytest.raises(contract.ArgumentError, match='source'):
    records.build(str(tmp_path), out, skip_if_done=True, progress=False)
  replaced = records.build('synthetic', out, synthetic_count=21, overwrite=True,
                             progress=False)
  assert replaced['accepted_total'] == 21 and not replaced['up_to_date']


def test_nothing_valid_is_an_error_and_writes_nothing(tmp_path, faces):
  folder = folders.write_folder(tmp_path / 'src', folders.bad_files(faces))
  with pytest.raises(contract.ArgumentError, match='no valid images.*all 5 files rejected'):
    records.build(folder, str(tmp_path / 'out'), progress=False)
  assert [files for _, _, files in os.walk(tmp_path / 'out') if files] == []
  with pytest.raises(contract.ArgumentError, match='no files found'):
    records.build(folders.write_folder(tmp_path / 'empty', {}), str(tmp_path / 'out'), progress=False)


@pytest.mark.parametrize('image_format, image_size', [('jpeg', None), ('jpeg', 32), ('raw', 32)])
def test_tfds_reads_the_records(tmp_path, image_format, image_size):
  out = str(tmp_path / 'out')
  records.build('synthetic', out, synthetic_count=30, image_format=image_format,
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


def test_bad_arguments_name_the_argument_and_no_flag(tmp_path):
  for kwargs, argument, message in (
      ({'image_format': 'raw'}, 'image_size', 'image size'),
      ({'split': (0.5, 0.2, 0.2)}, 'split', 'sum to 1'),
      ({'jpeg_quality': 0}, 'jpeg_quality', 'JPEG quality'),
      ({'label_conflicts': 'vote'}, 'label_conflicts', 'drop, keep_first'),
      ({'max_file_mb': 0}, 'max_file_mb', 'positive')):
    with pytest.raises(contract.ArgumentError, match=message) as raised:
      records.build('synthetic', str(tmp_path), synthetic_count=5, **kwargs)
    assert raised.value.field == argument and '--' not in str(raised.value)
  assert not os.path.exists(tmp_path / 'utkface')


def test_workers_are_processes_without_tensorflow():
  assert 'tensorflow' in sys.modules  # Loaded here, as in every command.
  with local.process_pool(2) as pool:
    pid, loaded = pool.submit(
        eval, "__import__('os').getpid(), 'tensorflow' in __import__('sys').modules").result()
  assert pid != os.getpid() and not loaded


def test_the_process_pool_converts_as_one_process_does(faces):
  stream = list(faces.items()) + list(folders.bad_files(faces).items())
  alone = list(local.convert_stream(stream, OPTIONS, workers=1))
  assert list(local.convert_stream(stream, OPTIONS, workers=2, chunk_size=3)) == alone
  assert [r.name for r in alone] == [name for name, _ in stream]


# Copies whose labels disagree.

def _folder_with_agreeing_and_disagreeing_copies(root, faces):
  """Every face once under UTKFace/; one agreeing copy and two disagreeing ones elsewhere."""
  names = sorted(faces)
  files = {f'UTKFace/{name}': faces[name] for name in names}
  files[f'crop_part1/{names[0]}'] = faces[names[0]]
  first, second = (labels.parse_utkface_name(name) for name in names[1:3])
  older = labels.Labels(first.age + 1 if first.age < labels.MAX_AGE else 0, first.gender,
                        first.race)
  other_gender = labels.Labels(second.age, 1 - second.gender, second.race)
  conflicts = [sorted([f'UTKFace/{names[1]}',
                       f'crop_part1/{labels.utkface_name(older, "20990101000000001")}']),
               sorted([f'UTKFace/{names[2]}',
                       f'crop_part1/{labels.utkface_name(other_gender, "20990101000000002")}'])]
  files[conflicts[0][1]], files[conflicts[1][1]] = faces[names[1]], faces[names[2]]
  return folders.write_folder(root, files), sorted(conflicts)


def test_a_picture_whose_copies_disagree_is_dropped_and_listed(tmp_path, faces):
  folder, conflicts = _folder_with_agreeing_and_disagreeing_copies(tmp_path / 'src', faces)
  out = str(tmp_path / 'out')
  summary = records.build(folder, out, workers=1, progress=False)

  assert summary['accepted_total'] == len(faces) - 2
  assert (summary['duplicates'], summary['label_conflicts'],
          summary['label_conflict_files']) == (1, 2, 4)
  assert ('label conflicts: 2 images whose copies disagree (4 files), all copies dropped'
          in records.format_summary(summary))
  manifest = contract.read_manifest(out)
  assert manifest['label_conflicts'] == [{'files': files, 'kept': None} for files in conflicts]
  assert [d['file'] for d in manifest['duplicates']] == [f'crop_part1/{sorted(faces)[0]}']
  rows = [row for split in contract.SPLITS for row in _read_split(out, split)]
  dropped = {faces[name] for name in sorted(faces)[1:3]}
  assert len(rows) == len(faces) - 2 and not dropped & {row['image'] for row in rows}
  _assert_labels_match_names(rows)


def test_keeping_the_first_copy_of_a_conflict_keeps_its_smallest_name(tmp_path, faces):
  folder, conflicts = _folder_with_agreeing_and_disagreeing_copies(tmp_path / 'src', faces)
  out = str(tmp_path / 'out')
  summary = records.build(folder, out, label_conflicts='keep_first', workers=1,
                            progress=False)

  assert summary['accepted_total'] == len(faces)
  assert 'the smallest name of each kept' in records.format_summary(summary)
  manifest = contract.read_manifest(out)
  assert manifest['label_conflicts'] == [{'files': files, 'kept': files[0]}
                                         for files in conflicts]
  names = {row['file_name'].decode() for split in contract.SPLITS
           for row in _read_split(out, split)}
  assert {files[0] for files in conflicts} <= names
  assert not {files[1] for files in conflicts} & names


def test_the_manifest_holds_each_splits_label_statistics(tmp_path):
  out = str(tmp_path / 'out')
  records.build('synthetic', out, synthetic_count=60, seed=2, split=(0.5, 0.5, 0.0),
                  workers=1, progress=False)
  manifest = contract.read_manifest(out)
  for split in contract.SPLITS:
    rows = _read_split(out, split)
    ages = [int(row['age']) for row in rows]
    genders = collections.Counter(int(row['gender']) for row in rows)
    statistics = contract.label_statistics(manifest, split)
    assert set(statistics) == {'num_examples', 'mean_age', 'age_std', 'majority_gender',
                               'majority_share'}
    assert statistics['num_examples'] == len(rows)
    if not rows:  # The empty test split.
      assert statistics == {'num_examples': 0, 'mean_age': 0.0, 'age_std': 0.0,
                            'majority_gender': 0, 'majority_share': 0.0}
      continue
    assert statistics['mean_age'] == pytest.approx(statistics_lib.fmean(ages))
    assert statistics['age_std'] == pytest.approx(statistics_lib.pstdev(ages))
    majority, count = max(sorted(genders.items()), key=lambda item: item[1])
    assert statistics['majority_gender'] == majority
    assert statistics['majority_share'] == pytest.approx(count / len(rows))

  del manifest['label_statistics']  # As an older version wrote it.
  with pytest.raises(contract.RecordsError, match='older version.*convert them again'):
    contract.label_statistics(manifest, 'train')
