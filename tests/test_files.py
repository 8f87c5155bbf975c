"""agegender.files: the one atomic writer, for files and for folders (a SavedModel)."""

import os
import threading

import pytest

from agegender import files


def _write_folder(content):
  def write(directory):
    os.makedirs(directory)
    with open(os.path.join(directory, 'saved_model.pb'), 'w') as f:
      f.write(content)
  return write


def _read(folder):
  with open(os.path.join(folder, 'saved_model.pb')) as f:
    return f.read()


def test_a_folder_is_replaced_whole_and_nothing_is_left_beside_it(tmp_path):
  target = str(tmp_path / 'export')
  files.replace_folder(target, _write_folder('first'))
  files.replace_folder(target, _write_folder('second'))
  assert _read(target) == 'second'
  assert sorted(os.listdir(tmp_path)) == ['export']


def test_a_failed_write_leaves_the_old_folder_as_it_was(tmp_path):
  target = str(tmp_path / 'export')
  files.replace_folder(target, _write_folder('first'))

  def broken(directory):
    _write_folder('half')(directory)
    raise OSError('disk full')
  with pytest.raises(OSError, match='disk full'):
    files.replace_folder(target, broken)
  assert _read(target) == 'first'
  assert sorted(os.listdir(tmp_path)) == ['export']


def test_a_reader_always_finds_an_export_while_it_is_replaced(tmp_path):
  (tmp_path / 'a').mkdir()
  (tmp_path / 'b').mkdir()
  if not files._exchange(str(tmp_path / 'a'), str(tmp_path / 'b')):  # pylint: disable=protected-access
    pytest.skip('this file system cannot exchange two folders in one step (renameat2)')
  os.rmdir(tmp_path / 'a')
  os.rmdir(tmp_path / 'b')
  target = str(tmp_path / 'export')
  files.replace_folder(target, _write_folder('0'))
  missing, done = [], threading.Event()

  def read():
    while not done.is_set():
      try:
        _read(target)
      except FileNotFoundError:
        missing.append(1)
  reader = threading.Thread(target=read)
  reader.start()
  try:
    for index in range(1, 60):
      files.replace_folder(target, _write_folder(str(index)))
  finally:
    done.set()
    reader.join()
  assert _read(target) == '59'
  assert not missing


def test_a_file_appears_only_when_complete(tmp_path):
  target = str(tmp_path / 'card.json')
  with pytest.raises(RuntimeError):
    with files.atomic_path(target) as temporary:
      with open(temporary, 'w') as f:
        f.write('{"half')
      raise RuntimeError('stopped')
  assert os.listdir(tmp_path) == []
  files.write_text(target, '{}')
  assert open(target).read() == '{}' and os.listdir(tmp_path) == ['card.json']
