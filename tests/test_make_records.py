"""The make_records command line: flags, summary, one-line errors and exit codes."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import requests
from absl import flags
from absl.testing import flagsaver

from agegender import cli
from agegender import contract
from agegender import faces
from agegender import make_records
from agegender import options
from agegender.records import conversion

FLAG_NAMES = ('source', 'records_dir', 'split', 'image_format', 'image_size', 'jpeg_quality',
              'shard_size_mb', 'num_shards', 'workers', 'synthetic_count', 'seed',
              'overwrite', 'skip_if_done', 'label_conflicts', 'max_file_mb', 'max_image_pixels',
              'large_images', 'labels', 'name_pattern', 'find_faces')


def _run(monkeypatch, *args):
  """Runs the entry point in this process; returns its exit status."""
  monkeypatch.setattr(sys, 'argv', ['make_records', '--noprogress', *args])
  with flagsaver.flagsaver():
    with pytest.raises(SystemExit) as exited:
      cli.run(make_records.main)
    flags.FLAGS.unparse_flags()
  return exited.value.code


def _error_line(capsys):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'Traceback' not in err[0], err
  assert ': error: ' in err[0]
  return err[0]


def test_every_flag_is_defined_in_the_module():
  defined = {flag.name for flag in flags.FLAGS.get_flags_for_module(make_records)}
  assert set(FLAG_NAMES) <= defined


def test_helpfull_shows_each_flag_once_with_its_fields_default():
  text = flags.FLAGS.get_help()  # What --helpfull prints.
  for field in dataclasses.fields(conversion.ConvertConfig):
    shown = re.findall(rf'^  --(?:\[no\])?{field.name}:', text, flags=re.MULTILINE)
    assert len(shown) == 1, field.name
    default = options.default_of(field)
    assert flags.FLAGS[field.name].default == (
        [str(v) for v in default] if isinstance(default, tuple) else default), field.name


def test_converts_and_then_is_up_to_date(monkeypatch, capsys, tmp_path):
  args = ('--source=synthetic', '--synthetic_count=20', f'--records_dir={tmp_path}',
          '--split=0.6,0.2,0.2', '--image_size=32', '--num_shards=2')
  assert _run(monkeypatch, *args) in (0, None)
  out = capsys.readouterr().out
  assert 'accepted: train' in out and 'duplicates dropped: 0' in out
  assert 'label conflicts: none' in out
  manifest = contract.read_manifest(str(tmp_path))
  assert manifest['flags']['split'] == [0.6, 0.2, 0.2]
  assert manifest['image_storage'] == {'format': 'jpeg', 'size': 32, 'jpeg_quality': 95}
  assert all(len(split['shards']) == 2 for split in manifest['splits'].values())

  assert _run(monkeypatch, *args, '--skip_if_done') in (0, None)
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 1 and 'up to date' in out[0]

  assert _run(monkeypatch, *args) == 2
  assert '--overwrite' in _error_line(capsys)
  assert _run(monkeypatch, *args[:-1], '--num_shards=3', '--skip_if_done') == 2
  line = _error_line(capsys)
  assert 'num_shards=2 (now 3)' in line and '--overwrite' in line


@pytest.mark.parametrize('args, message', [
    (('--source=/no/such/folder',), 'does not exist'),
    (('--source=synthetic', '--image_format=raw'), 'image size'),
    (('--source=synthetic', '--image_format=raw'), '--image_size'),
    (('--source=synthetic', '--split=0.8,x,0.1'), 'needs numbers'),
    (('--source=synthetic', '--split=0.5,0.2,0.2'), '--split'),
    (('--source=synthetic', '--max_file_mb=0'), '--max_file_mb'),
    (('--source=synthetic', '--label_conflicts=vote'), 'label_conflicts'),
    (('--source=synthetic', '--image_format=png'), 'image_format'),
    (('--source=synthetic', 'extra'), 'unexpected arguments'),
    (('--source=synthetic', '--labels=faces.csv'), '--labels is for a folder or an archive'),
    (('--source=.', '--labels=/no/such/table.csv'), 'labels table /no/such/table.csv does not'),
    (('--source=.', '--name_pattern=(?P<age>'), '--name_pattern is not a regular expression'),
    (('--source=.', '--labels=x.csv', '--name_pattern=x'), 'unset --labels or --name_pattern'),
])
def test_bad_input_is_one_line_and_status_2(monkeypatch, capsys, tmp_path, args, message):
  assert _run(monkeypatch, f'--records_dir={tmp_path}', *args) == 2
  assert message in _error_line(capsys)


def test_offline_kaggle_is_one_line(monkeypatch, capsys, tmp_path):
  import kagglehub

  def offline(handle):
    raise requests.exceptions.ConnectionError('Failed to resolve api.kaggle.com')
  monkeypatch.setattr(kagglehub, 'dataset_download', offline)
  assert _run(monkeypatch, f'--records_dir={tmp_path}') == 2
  line = _error_line(capsys)
  assert '--source=PATH' in line and '--source=synthetic' in line


def test_without_opencv_find_faces_is_one_line(monkeypatch, capsys, tmp_path):
  monkeypatch.setitem(sys.modules, 'cv2', None)  # `import cv2` fails.
  assert _run(monkeypatch, f'--records_dir={tmp_path}', '--source=.', '--find_faces') == 2
  line = _error_line(capsys)
  assert line.endswith(f'error: {faces.MISSING_OPENCV} (check --find_faces)')


def test_the_real_command_line(tmp_path):
  command = [sys.executable, '-m', 'agegender.make_records', '--source=synthetic',
             '--synthetic_count=12', f'--records_dir={tmp_path}']
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
  assert done.returncode == 0, done.stderr
  assert 'total 12' in done.stdout
  again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
  assert again.returncode == 2
  assert 'agegender.make_records: error: records already exist' in again.stderr
  assert 'Traceback' not in again.stderr
