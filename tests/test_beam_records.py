"""beam_records: the Beam runner writes the local runner's output, byte for byte.

Beam start-up is slow, so module fixtures run each conversion once (local and
DirectRunner: on the synthetic set, on a folder with copies and bad files, and
on photos with --find_faces and a --labels table) and the tests compare what
they wrote.
"""

import contextlib
import io
import json
import os
import sys

import pytest
import tensorflow_datasets as tfds
from absl import flags
from absl.testing import flagsaver

from agegender import files
from agegender import cli
from agegender import contract
from agegender.records import convert
from agegender.records import labels
from agegender import make_records
from agegender.records import publish
from agegender import records
from agegender.records import synthetic

import folders  # tests/folders.py

BEAM_OPTIONS = ('--runner=DirectRunner --direct_num_workers=2 '
                '--direct_running_mode=multi_processing')
TIMINGS = ('elapsed_s', 'images_per_s', 'records_dir')


def _folder_with_copies_and_bad_files(root):
  faces = dict(synthetic.generate_synthetic(30, seed=5, image_size=64))
  files = {f'UTKFace/{name}': data for name, data in faces.items()}
  files.update({f'crop_part1/{name}': faces[name] for name in sorted(faces)[:6]})
  # Two pictures whose copies disagree: one on age, one on gender.
  for index, name in enumerate(sorted(faces)[6:8]):
    face = labels.parse_utkface_name(name)
    other = (labels.Labels(face.age + 1 if face.age < labels.MAX_AGE else 0, face.gender,
                           face.race) if index == 0 else
             labels.Labels(face.age, 1 - face.gender, face.race))
    files[f'other/{labels.utkface_name(other, f"2099010100000000{index}")}'] = faces[name]
  files.update(folders.bad_files(faces))
  files['.hidden/30_0_1_20170101000000005.jpg'] = faces[sorted(faces)[0]]
  return folders.write_folder(root, files)


def _run_make_records(*args):
  """The entry point in this process; returns (exit status, stdout, stderr)."""
  out, err = io.StringIO(), io.StringIO()
  argv = sys.argv
  sys.argv = ['make_records', '--noprogress', *args]
  try:
    with flagsaver.flagsaver(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      with pytest.raises(SystemExit) as exited:
        cli.run(make_records.main)
      flags.FLAGS.unparse_flags()
  finally:
    sys.argv = argv
  return exited.value.code, out.getvalue(), err.getvalue()


def _without_timings(manifest):
  manifest = json.loads(manifest)
  for key in TIMINGS:
    manifest['summary'].pop(key)
  return manifest


@pytest.fixture(scope='module')
def outputs(tmp_path_factory):
  """{'synthetic' | 'folder': {'local' | 'beam': (data set folder, summary or printout)}}."""
  pytest.importorskip('apache_beam',
                      reason="Apache Beam is not installed: pip install -e '.[beam]'")
  root = tmp_path_factory.mktemp('beam')
  folder = _folder_with_copies_and_bad_files(root / 'src')
  result = {'synthetic': {}, 'folder': {}}

  # The synthetic set through the library, with several shards per split.
  kwargs = dict(synthetic_count=60, seed=3, shard_size_mb=0.05)
  for runner in ('local', 'beam'):
    out = str(root / f'synthetic-{runner}')
    summary = records.build('synthetic', out, progress=False, runner=runner,
                              beam_pipeline_options=BEAM_OPTIONS, **kwargs)
    result['synthetic'][runner] = (contract.dataset_dir(out), summary)

  # The folder through the command line, printout included.
  for runner in ('local', 'beam'):
    out = str(root / f'folder-{runner}')
    status, stdout, stderr = _run_make_records(
        f'--source={folder}', f'--records_dir={out}', '--num_shards=3', '--image_size=32',
        f'--runner={runner}', f'--beam_pipeline_options={BEAM_OPTIONS}')
    assert status in (0, None), stderr
    result['folder'][runner] = (contract.dataset_dir(out), stdout)
  return result


@pytest.mark.parametrize('source', ['synthetic', 'folder'])
def test_shards_and_tfds_metadata_are_byte_identical(outputs, source):
  local, beam = (folders.read_folder(outputs[source][runner][0]) for runner in ('local', 'beam'))
  assert local.keys() == beam.keys()
  assert not [name for name in beam if name.startswith(files.TEMP_PREFIX)]
  shard_names = [name for name in local if '.tfrecord-' in name]
  assert len(shard_names) > len(contract.SPLITS)  # Several shards in some split.
  for name in shard_names + list(publish.TFDS_FILES):
    assert beam[name] == local[name], name
  assert _without_timings(beam[contract.MANIFEST_NAME]) == _without_timings(
      local[contract.MANIFEST_NAME])


def test_the_library_returns_the_same_summary(outputs):
  local, beam = (dict(outputs['synthetic'][runner][1]) for runner in ('local', 'beam'))
  for summary in (local, beam):
    for key in TIMINGS:
      summary.pop(key)
  assert beam == local
  assert beam['accepted_total'] == 60 and beam['rejected_total'] == 0


def test_rejects_duplicates_and_label_conflicts_are_reported_alike(outputs):
  manifests = {runner: contract.read_manifest(outputs['folder'][runner][0])
               for runner in ('local', 'beam')}
  beam = manifests['beam']
  assert beam['rejected'] == manifests['local']['rejected']
  assert sorted(r['file'] for r in beam['rejected']) == [
      'bad/130_0_0_20170101000000001.jpg', 'bad/30_0_0_20170101000000002.jpg',
      'bad/30_0_1_20170101000000004.jpg', 'bad/30_1_0_20170101000000003.jpg',
      'bad/not_a_utkface_name.jpg']
  assert beam['summary']['rejected'] == {convert.BAD_NAME: 2, convert.EMPTY: 1,
                                         convert.NOT_AN_IMAGE: 1, convert.TRUNCATED: 1}
  # Six crop_part1 copies; the hidden folder is not read.
  assert beam['duplicates'] == manifests['local']['duplicates']
  assert beam['summary']['duplicates'] == len(beam['duplicates']) == 6
  # Two pictures whose copies disagree: every copy dropped.
  assert beam['label_conflicts'] == manifests['local']['label_conflicts']
  assert [len(c['files']) for c in beam['label_conflicts']] == [2, 2]
  assert all(c['kept'] is None for c in beam['label_conflicts'])
  assert beam['summary']['accepted_total'] == 28
  assert beam['label_statistics'] == manifests['local']['label_statistics']


def test_the_printed_summary_is_the_local_one(outputs):
  local, beam = (outputs['folder'][runner][1].strip().splitlines()
                 for runner in ('local', 'beam'))
  assert len(beam) == 7 and beam[0].startswith('make_records: wrote ')
  assert beam[1:6] == local[1:6]  # Accepted ... downscaled; then timings.
  assert 'duplicates dropped: 6' in beam[3]
  assert 'label conflicts: 2 images whose copies disagree (4 files)' in beam[4]


@pytest.mark.parametrize('source', ['synthetic', 'folder'])
def test_tfds_reads_the_beam_output(outputs, source):
  directory = outputs[source]['beam'][0]
  manifest = contract.read_manifest(directory)
  builder = tfds.builder_from_directory(directory)
  for split in contract.SPLITS:
    rows = list(tfds.as_numpy(builder.as_dataset(split=split)))
    assert len(rows) == manifest['splits'][split]['num_examples']
    for row in rows:
      parsed = labels.parse_utkface_name(row['file_name'].decode())
      assert (row['age'], row['gender'], row['race']) == (parsed.age, parsed.gender,
                                                          parsed.race)


def test_without_beam_the_beam_runner_says_how_to_install_it(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'apache_beam', None)  # `import apache_beam` fails.
  status, _, stderr = _run_make_records('--source=synthetic', '--synthetic_count=5',
                                        f'--records_dir={tmp_path}', '--runner=beam')
  lines = stderr.strip().splitlines()
  assert status == 2 and len(lines) == 1, stderr
  assert 'error: the Beam runner needs Apache Beam' in lines[0]
  assert "pip install -e '.[beam]'" in lines[0] and '--runner=beam' in lines[0]
  assert not os.path.exists(contract.dataset_dir(str(tmp_path)))
  # The local runner never needs it.
  status, stdout, stderr = _run_make_records('--source=synthetic', '--synthetic_count=5',
                                             f'--records_dir={tmp_path}')
  assert status in (0, None), stderr
  assert 'total 5' in stdout


@pytest.fixture(scope='module')
def face_outputs(tmp_path_factory):
  """{'local' | 'beam': data set folder} of photos converted with --find_faces and --labels.

  Beam runs on threads here (Beam still pickles every step, the table among its arguments):
  its worker processes start in seconds, and the fixture above already has them.
  """
  pytest.importorskip('apache_beam',
                      reason="Apache Beam is not installed: pip install -e '.[beam]'")
  root = tmp_path_factory.mktemp('beam-faces')
  photos = {f'photos/p{index}.jpg': folders.face_photo(index) for index in range(4)}
  photos.update({'photos/empty.jpg': folders.no_face_photo(), 'photos/two.jpg':
                 folders.two_faces_photo(), 'photos/no_row.jpg': folders.face_photo(9)})
  rows = [f'photos/p{index}.jpg,{20 + index},{"mf"[index % 2]},' for index in range(4)]
  rows += ['photos/empty.jpg,30,,1', 'photos/two.jpg,40,f,2', 'photos/gone.jpg,50,m,3']
  table = root / 'labels.csv'
  table.write_text('path,age,gender,race\n' + '\n'.join(rows) + '\n')
  folder = folders.write_folder(root / 'src', photos)
  threads = BEAM_OPTIONS.replace('multi_processing', 'multi_threading')
  result = {}
  for runner in ('local', 'beam'):
    out = str(root / runner)
    records.build(folder, out, labels=str(table), find_faces=True, num_shards=2, workers=2,
                  runner=runner, beam_pipeline_options=threads, progress=False)
    result[runner] = contract.dataset_dir(out)
  return result


def test_found_faces_and_table_labels_are_byte_identical(face_outputs):
  local, beam = (folders.read_folder(face_outputs[runner]) for runner in ('local', 'beam'))
  assert local.keys() == beam.keys()
  for name in local:
    if name != contract.MANIFEST_NAME:
      assert beam[name] == local[name], name
  manifest = _without_timings(beam[contract.MANIFEST_NAME])
  assert manifest == _without_timings(local[contract.MANIFEST_NAME])
  assert manifest['summary']['accepted_total'] == 4
  assert manifest['summary']['rejected'] == {convert.NO_LABEL_ROW: 1, convert.NO_FACE: 1,
                                             convert.TWO_FACES: 1}
  assert [row['file'] for row in manifest['label_rows_rejected']] == ['photos/gone.jpg']


def test_a_beam_run_that_finds_nothing_keeps_the_existing_records(outputs, tmp_path):
  del outputs  # Only for its skip where Beam is missing.
  out = str(tmp_path / 'records')
  records.build('synthetic', out, synthetic_count=12, progress=False)
  before = folders.read_folder(contract.dataset_dir(out))
  bad = folders.write_folder(tmp_path / 'bad', {'notes.txt': b'no faces here',
                                         '30_0_0_20170101000000002.jpg': b''})
  status, _, stderr = _run_make_records(
      f'--source={bad}', f'--records_dir={out}', '--overwrite', '--runner=beam',
      f'--beam_pipeline_options={BEAM_OPTIONS}')
  assert status == 2 and len(stderr.strip().splitlines()) == 1, stderr
  assert folders.read_folder(contract.dataset_dir(out)) == before
  assert os.listdir(os.path.dirname(contract.dataset_dir(out))) == [contract.VERSION]
