"""Labels from a CSV table (--labels) or a name pattern (--name_pattern), unknown genders."""

import collections
import csv
import io
import json
import tarfile

import pytest
import tensorflow as tf

from agegender import contract
from agegender import records
from agegender.records import convert
from agegender.records import labels
from agegender.records import synthetic

import folders  # tests/folders.py

GENDER_TEXTS = {0: ('0', 'm', 'M', 'male', 'Male'), 1: ('1', 'f', 'F', 'female', 'FEMALE')}


@pytest.fixture(scope='module')
def people():
  """200 generated faces under names that are not UTKFace's, and each one's labels."""
  faces = synthetic.generate_synthetic(200, seed=31, image_size=48)
  return {f'people/{index // 50}/p{index:04d}.jpg': (data, labels.parse_utkface_name(name))
          for index, (name, data) in enumerate(faces)}


def _csv(rows, header=('path', 'age', 'gender', 'race')):
  out = io.StringIO()
  writer = csv.writer(out)
  writer.writerow(header)
  writer.writerows(rows)
  return out.getvalue().encode('utf-8')


def _records(out):
  """{file_name: (age, gender, race, image bytes, split)} of every record written."""
  manifest = contract.read_manifest(out)
  rows = {}
  for split in contract.SPLITS:
    for record in tf.data.TFRecordDataset(contract.split_shards(manifest, split)):
      row = tf.io.parse_single_example(record, contract.feature_spec())
      rows[row['file_name'].numpy().decode()] = (
          int(row['age']), int(row['gender']), int(row['race']), row['image'].numpy(), split)
  return rows


def test_every_record_has_its_rows_labels_and_half_the_genders_are_unknown(tmp_path, people):
  rows, expected = [], {}
  for index, (path, (_, face)) in enumerate(sorted(people.items())):
    # Every second row leaves the gender out; the others use each coding in turn.
    gender = '' if index % 2 else GENDER_TEXTS[face.gender][index // 2 % 5]
    race = '' if index % 7 == 0 else str(face.race)
    rows.append((path, face.age, gender, race))
    expected[path] = (face.age, labels.UNKNOWN_GENDER if index % 2 else face.gender,
                      labels.UNKNOWN_RACE if index % 7 == 0 else face.race)
  folder = folders.write_folder(tmp_path / 'src', {p: data for p, (data, _) in people.items()})
  table = tmp_path / 'labels.csv'
  table.write_bytes(_csv(rows))
  out = str(tmp_path / 'out')
  summary = records.build(folder, out, labels=str(table), workers=1, progress=False)

  assert summary['accepted_total'] == 200 and summary['rejected_total'] == 0
  assert summary['label_table']['rows'] == 200 and summary['label_table']['rows_rejected'] == {}
  written = _records(out)
  assert {path: row[:3] for path, row in written.items()} == expected
  assert {path: row[3] for path, row in written.items()} == {
      path: data for path, (data, _) in people.items()}
  manifest = contract.read_manifest(out)
  assert manifest['flags']['labels'] == str(table)
  assert len(manifest['flags']['labels_sha256']) == 64
  assert sum(manifest['histograms'][split]['gender']['-1']
             for split in contract.SPLITS) == 100
  # The majority gender and its share count the known genders only.
  train = collections.Counter(row[1] for row in written.values() if row[4] == 'train')
  known = {gender: train[gender] for gender in (0, 1)}
  majority, count = max(sorted(known.items()), key=lambda item: item[1])
  statistics = contract.label_statistics(manifest, 'train')
  assert statistics['num_examples'] == sum(train.values())
  assert statistics['majority_gender'] == majority
  assert statistics['majority_share'] == pytest.approx(count / sum(known.values()))
  assert manifest['histograms']['train']['gender'] == {
      '-1': train[-1], '0': train[0], '1': train[1]}


@pytest.mark.parametrize('text, gender', [
    ('0', 0), ('1', 1), ('m', 0), ('F', 1), ('Male', 0), ('female', 1), (' MALE ', 0),
    ('', labels.UNKNOWN_GENDER)])
def test_gender_codings(text, gender):
  assert labels.parse_values('30', text, '2') == labels.Labels(30, gender, 2)


@pytest.mark.parametrize('age, gender, race, field', [
    ('130', 'm', '', 'age'), ('x', 'm', '', 'age'), ('', 'm', '', 'age'),
    ('30', 'x', '', 'gender'), ('30', '2', '', 'gender'), ('30', 'm', '5', 'race'),
    ('30', 'm', 'w', 'race')])
def test_bad_values_name_the_label(age, gender, race, field):
  with pytest.raises(labels.LabelError) as raised:
    labels.parse_values(age, gender, race)
  assert raised.value.field == field


def test_bad_rows_and_unlabelled_files_are_counted_and_listed(tmp_path, people):
  names = sorted(people)[:12]
  files = {name: people[name][0] for name in names}
  files['copies/same_as_0.jpg'] = files[names[0]]  # A copy whose row agrees...
  files['copies/same_as_1.jpg'] = files[names[1]]  # ...and one whose row disagrees.
  ages = {name: people[name][1].age for name in names}
  rows = [(name, ages[name], 'f', '') for name in names[:8]]
  rows += [('copies/same_as_0.jpg', ages[names[0]], 'f', ''),
           ('copies/same_as_1.jpg', (ages[names[1]] + 1) % 100, 'f', ''),
           ('missing/nobody.jpg', 30, 'm', ''),       # line 12: no such file
           (names[8], 130, 'm', ''),                  # line 13: age out of range
           (names[9], 30, 'x', ''),                   # line 14: bad gender
           (names[10], 30, 'm', ''),                  # lines 15 and 16: a duplicate
           (names[10], 30, 'm', ''),
           ('', 30, 'm', '')]                         # line 17: no path
  # names[11] has no row.
  table = tmp_path / 'labels.csv'
  table.write_bytes(_csv(rows))
  out = str(tmp_path / 'out')
  summary = records.build(folders.write_folder(tmp_path / 'src', files), out,
                          labels=str(table), workers=1, progress=False)

  assert summary['rejected'] == {convert.BAD_LABEL_ROW: 3, convert.NO_LABEL_ROW: 1}
  assert summary['label_table'] == {
      'file': str(table), 'rows': 16, 'rows_rejected_total': 6,
      'rows_rejected': {'bad age': 1, 'bad gender': 1, 'duplicate row': 2, 'missing file': 1,
                        'no path': 1}}
  assert (summary['accepted_total'], summary['duplicates'], summary['label_conflicts']) == (
      7, 1, 1)
  text = records.format_summary(summary)
  assert 'label table: 16 rows; rows not used: bad age 1, bad gender 1, duplicate row 2' in text
  manifest = contract.read_manifest(out)
  assert [(row['line'], row['file'], row['reason'].split(':')[0])
          for row in manifest['label_rows_rejected']] == [
      (12, 'missing/nobody.jpg', 'missing file'), (13, names[8], 'bad age'),
      (14, names[9], 'bad gender'), (15, names[10], 'duplicate row'),
      (16, names[10], 'duplicate row'), (17, '', 'no path')]
  assert 'age out of range' in manifest['label_rows_rejected'][1]['reason']
  reasons = {row['file']: row['reason'] for row in manifest['rejected']}
  assert reasons[names[11]].startswith('no label row: no row')
  assert reasons[names[8]] == ('bad label row: line 13 of the labels table: age out of range '
                               '0..120: 130')
  assert 'lines 15, 16' in reasons[names[10]]
  assert manifest['label_conflicts'] == [
      {'files': sorted(['copies/same_as_1.jpg', names[1]]), 'kept': None}]
  assert manifest['duplicates'] == [{'file': names[0], 'same_as': 'copies/same_as_0.jpg'}]


def test_an_archive_table_and_an_edited_table(tmp_path, people):
  names = sorted(people)[:6]
  path = tmp_path / 'faces.tar.gz'
  with tarfile.open(path, 'w:gz') as archive:
    for name in names:
      info = tarfile.TarInfo(f'./{name}')  # Paths in the table leave out tar's './'.
      info.size = len(people[name][0])
      archive.addfile(info, io.BytesIO(people[name][0]))
  table = tmp_path / 'labels.csv'
  table.write_bytes(_csv([(name, 40, 'm', 1) for name in names], ('Path', 'Age', 'Gender',
                                                                   'Race')))
  out = str(tmp_path / 'out')
  records.build(str(path), out, labels=str(table), workers=1, progress=False)
  assert {row[:3] for row in _records(out).values()} == {(40, 0, 1)}
  again = records.build(str(path), out, labels=str(table), skip_if_done=True, progress=False)
  assert again['up_to_date']
  table.write_bytes(_csv([(name, 41, 'm', 1) for name in names]))
  with pytest.raises(contract.ArgumentError, match='labels_sha256=') as raised:
    records.build(str(path), out, labels=str(table), skip_if_done=True, progress=False)
  assert raised.value.field == 'skip_if_done'
  with pytest.raises(contract.ArgumentError, match=rf'labels={table} \(now None\)'):
    records.build(str(path), out, name_pattern=r'p(?P<age>\d+)\.jpg', skip_if_done=True,
                  progress=False)


def test_a_name_pattern_labels_other_naming_schemes(tmp_path, people):
  files, expected = {}, {}
  for index, name in enumerate(sorted(people)[:30]):
    data, face = people[name]
    gender = 'mf'[face.gender] if index % 3 else 'x'  # 'x': unknown, by the pattern's design.
    file_name = f'set/{face.age:03d}-{gender}-{index:03d}.jpg'
    files[file_name] = data
    expected[file_name] = (face.age, face.gender if index % 3 else labels.UNKNOWN_GENDER, -1)
  files['set/readme.jpg'] = people[sorted(people)[0]][0]
  out = str(tmp_path / 'out')
  summary = records.build(folders.write_folder(tmp_path / 'src', files), out,
                          name_pattern=r'(?P<age>\d+)-(?:(?P<gender>[mf])|x)-\d+\.jpg',
                          workers=1, progress=False)
  assert summary['rejected'] == {convert.BAD_NAME: 1}
  assert {path: row[:3] for path, row in _records(out).items()} == expected
  [rejected] = contract.read_manifest(out)['rejected']
  assert rejected['file'] == 'set/readme.jpg' and 'does not match' in rejected['reason']


@pytest.mark.parametrize('settings, field, message', [
    ({'labels': '{tmp}/none.csv'}, 'labels', 'does not exist'),
    ({'labels': '{tmp}/header.csv'}, 'labels', 'no age column'),
    ({'labels': '{tmp}/latin1.csv'}, 'labels', 'not UTF-8'),
    ({'labels': '{tmp}/header.csv', 'name_pattern': 'x'}, 'name_pattern', 'not both'),
    ({'name_pattern': '(?P<age>'}, 'name_pattern', 'not a regular expression'),
    ({'name_pattern': r'\d+'}, 'name_pattern', 'no group'),
])
def test_unusable_tables_and_patterns_are_argument_errors(tmp_path, settings, field, message):
  (tmp_path / 'header.csv').write_bytes(b'path,gender\na.jpg,m\n')
  (tmp_path / 'latin1.csv').write_bytes('path,age\nb\xe9b\xe9.jpg,1\n'.encode('latin-1'))
  folder = folders.write_folder(tmp_path / 'src', {'a.jpg': b'x'})
  settings = {k: v.format(tmp=tmp_path) for k, v in settings.items()}
  with pytest.raises(contract.ArgumentError, match=message) as raised:
    records.build(folder, str(tmp_path / 'out'), progress=False, **settings)
  assert raised.value.field == field and '\n' not in str(raised.value)


def test_a_table_over_the_bound_is_refused_unread(tmp_path, monkeypatch):
  table = tmp_path / 'big.csv'
  table.write_bytes(b'path,age\n' + b'a.jpg,1\n' * 100)
  monkeypatch.setattr(labels, 'MAX_TABLE_BYTES', 100)
  with pytest.raises(contract.ArgumentError, match='more than the bound of 100') as raised:
    labels.read_table(str(table))
  assert raised.value.field == 'labels'


def test_synthetic_faces_need_no_table_and_files_no_table_finds_are_explained(tmp_path, people):
  with pytest.raises(contract.ArgumentError, match='folder or an archive') as raised:
    records.build('synthetic', str(tmp_path / 'out'), labels=str(tmp_path / 'x.csv'))
  assert raised.value.field == 'labels'
  name = sorted(people)[0]
  folder = folders.write_folder(tmp_path / 'src', {name: people[name][0]})
  table = tmp_path / 'labels.csv'
  table.write_bytes(_csv([(f'src/{name}', 30, 'm', 0)]))  # One folder too many.
  with pytest.raises(contract.ArgumentError, match='no label row 1') as raised:
    records.build(folder, str(tmp_path / 'out'), labels=str(table), progress=False)
  assert f"'{name}'" in raised.value.hint and f"'src/{name}'" in raised.value.hint


def test_records_made_before_these_flags_stay_up_to_date(tmp_path):
  out = str(tmp_path / 'out')
  records.build('synthetic', out, synthetic_count=6, workers=1, progress=False)
  path = tmp_path / 'out' / contract.DATASET_NAME / contract.VERSION / contract.MANIFEST_NAME
  manifest = json.loads(path.read_text())
  for key in ('labels', 'labels_sha256', 'name_pattern', 'find_faces'):
    del manifest['flags'][key]  # As an older make_records wrote them.
  path.write_text(json.dumps(manifest))
  assert records.build('synthetic', out, synthetic_count=6, skip_if_done=True)['up_to_date']
  with pytest.raises(contract.ArgumentError, match=r'find_faces=False \(now True\)'):
    records.build('synthetic', out, synthetic_count=6, find_faces=True, skip_if_done=True)
