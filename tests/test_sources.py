"""sources: every source kind as a (name, bytes) stream, and their errors."""

import io
import os
import tarfile
import tracemalloc
import zipfile

import pytest
import requests

from agegender import contract
from agegender import files as files_lib
from agegender.records import sources
from agegender.records import synthetic

import folders  # tests/folders.py


@pytest.fixture(scope='module')
def faces():
  return dict(synthetic.generate_synthetic(4, seed=7, image_size=48))


def _nested(faces):
  """Kaggle's layout: the same images in several folders, plus litter to ignore."""
  files = {}
  for name, data in faces.items():
    files[f'UTKFace/{name}'] = data
    files[f'utkface_aligned_cropped/UTKFace/{name}'] = data
  first = sorted(faces)[0]
  files[f'crop_part1/{first}'] = faces[first]
  files['.DS_Store'] = b'litter'
  files['__MACOSX/UTKFace/._x.jpg'] = b'litter'
  return files


def _kept(files):
  return {name: data for name, data in files.items() if not files_lib.ignored(name)}


def test_folder_is_searched_recursively(tmp_path, faces):
  files = _nested(faces)
  folders.write_folder(tmp_path, files)
  source = sources.open_source(str(tmp_path))
  assert source.kind == 'folder' and source.total == len(_kept(files))
  assert dict(source) == _kept(files)
  assert [name for name, _ in source] == sorted(_kept(files))


@pytest.mark.parametrize('suffix, mode', [('.tar', 'w'), ('.tar.gz', 'w:gz'), ('.tgz', 'w:gz')])
def test_tar_archives_are_streamed(tmp_path, faces, suffix, mode):
  files = _nested(faces)
  path = tmp_path / f'utkface{suffix}'
  with tarfile.open(path, mode) as archive:
    for name, data in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      archive.addfile(info, io.BytesIO(data))
  source = sources.open_source(str(path))
  assert source.kind == 'tar'
  assert dict(source) == _kept(files)
  assert os.listdir(tmp_path) == [path.name]  # Nothing extracted.


def test_zip_archive_is_streamed(tmp_path, faces):
  files = _nested(faces)
  path = tmp_path / 'archive.zip'
  with zipfile.ZipFile(path, 'w') as archive:
    for name, data in files.items():
      archive.writestr(name, data)
  source = sources.open_source(str(path))
  assert source.kind == 'zip' and source.total == len(_kept(files))
  assert dict(source) == _kept(files)


def test_member_names_are_never_used_as_paths(tmp_path, faces):
  name, data = next(iter(faces.items()))
  path = tmp_path / 'hostile.tar.gz'
  with tarfile.open(path, 'w:gz') as archive:
    for hostile in (f'../../{name}', f'/abs/{name}'):
      info = tarfile.TarInfo(hostile)
      info.size = len(data)
      archive.addfile(info, io.BytesIO(data))
  assert [n for n, _ in sources.open_source(str(path))] == [f'../../{name}', f'/abs/{name}']
  assert sorted(os.listdir(tmp_path)) == ['hostile.tar.gz']
  assert not os.path.exists(tmp_path.parent.parent / name)


def test_synthetic_source():
  source = sources.open_source('synthetic', synthetic_count=3, seed=4)
  assert source.kind == 'synthetic' and source.total == 3
  assert list(source) == list(synthetic.generate_synthetic(3, seed=4))


@pytest.mark.parametrize('make, reason', [
    (lambda tmp: str(tmp / 'missing'), 'does not exist'),
    (lambda tmp: (tmp / 'faces.rar').write_bytes(b'x') and str(tmp / 'faces.rar'),
     'not a folder or a supported archive'),
    (lambda tmp: (tmp / 'bad.zip').write_bytes(b'not a zip') and str(tmp / 'bad.zip'),
     'cannot read the archive'),
])
def test_bad_paths_are_argument_errors_about_the_source(tmp_path, make, reason):
  with pytest.raises(contract.ArgumentError, match=reason) as raised:
    list(sources.open_source(make(tmp_path)))
  assert raised.value.field == 'source'


def test_truncated_tar_gz_is_an_argument_error(tmp_path, faces):
  path = tmp_path / 'cut.tar.gz'
  with tarfile.open(path, 'w:gz') as archive:
    for name, data in faces.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      archive.addfile(info, io.BytesIO(data))
  path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
  with pytest.raises(contract.ArgumentError, match='cannot read the archive'):
    list(sources.open_source(str(path)))


def test_kaggle_offline_names_the_other_sources(monkeypatch):
  import kagglehub

  def offline(handle):
    raise requests.exceptions.ConnectionError(
        "HTTPSConnectionPool(host='api.kaggle.com', port=443): Max retries\nexceeded")
  monkeypatch.setattr(kagglehub, 'dataset_download', offline)
  with pytest.raises(contract.ArgumentError) as raised:
    sources.open_source('kaggle')
  message = str(raised.value)
  assert raised.value.field == 'source' and 'local copy' in raised.value.hint
  assert '\n' not in message and '--' not in message
  assert 'ConnectionError' in message and 'local copy' in message


def test_kaggle_reads_the_downloaded_folder(monkeypatch, tmp_path, faces):
  import kagglehub
  folders.write_folder(tmp_path, _nested(faces))
  handles = []
  monkeypatch.setattr(kagglehub, 'dataset_download',
                      lambda handle: handles.append(handle) or str(tmp_path))
  source = sources.open_source('kaggle')
  assert handles == ['jangedoo/utkface-new']
  assert source.kind == 'kaggle' and source.location == str(tmp_path)
  assert dict(source) == _kept(_nested(faces))


def test_normalize_spec_keeps_keywords_and_absolutizes_paths():
  assert sources.normalize_spec('kaggle') == 'kaggle'
  assert sources.normalize_spec('synthetic') == 'synthetic'
  assert sources.normalize_spec('gs://bucket/faces') == 'gs://bucket/faces'
  assert sources.normalize_spec('faces') == os.path.abspath('faces')


def test_symlinked_folders_are_followed_and_each_real_folder_read_once(tmp_path, faces):
  real, root = tmp_path / 'storage', tmp_path / 'kaggle'
  first = sorted(faces)[0]
  folders.write_folder(real / 'UTKFace', faces)
  folders.write_folder(real / 'crop_part1', {first: faces[first]})
  root.mkdir()
  os.symlink(real / 'UTKFace', root / 'UTKFace')
  os.symlink(real / 'crop_part1', root / 'crop_part1')
  os.symlink(real / 'UTKFace', root / 'UTKFace_again')  # A second way to the same folder.
  os.symlink(root, real / 'UTKFace' / 'loop')  # Back to the top: a loop.
  source = sources.open_source(str(root))
  expected = {f'UTKFace/{name}': data for name, data in faces.items()}
  expected[f'crop_part1/{first}'] = faces[first]
  assert source.total == len(expected)
  assert list(source) == sorted(expected.items())


def _zeros(size):
  """A file-like object of `size` zero bytes, never held whole."""
  class Zeros(io.RawIOBase):
    left = size

    def readable(self):
      return True

    def readinto(self, buffer):
      count = min(len(buffer), self.left)
      buffer[:count] = bytes(count)
      self.left -= count
      return count
  return io.BufferedReader(Zeros())


BIG = 48 * 2**20
BIG_NAME = '30_0_0_20170101000000009.jpg'


def _big_folder(tmp_path, faces):
  folder = folders.write_folder(tmp_path / 'folder', faces)
  with open(os.path.join(folder, BIG_NAME), 'wb') as f:
    f.truncate(BIG)  # Sparse: no disk used.
  return folder


def _big_zip(tmp_path, faces):
  path = tmp_path / 'big.zip'
  with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED) as archive:
    for name, data in faces.items():
      archive.writestr(name, data)
    with archive.open(BIG_NAME, 'w') as member, _zeros(BIG) as zeros:
      while chunk := zeros.read(2**20):
        member.write(chunk)
  return str(path)


def _big_tar(tmp_path, faces):
  path = tmp_path / 'big.tar.gz'
  with tarfile.open(path, 'w:gz', compresslevel=1) as archive:
    for name, data in {**faces, BIG_NAME: None}.items():
      info = tarfile.TarInfo(name)
      info.size = BIG if data is None else len(data)
      archive.addfile(info, _zeros(BIG) if data is None else io.BytesIO(data))
  return str(path)


@pytest.mark.parametrize('make', [_big_folder, _big_zip, _big_tar], ids=['folder', 'zip', 'tar'])
def test_a_file_over_the_bound_is_never_read(tmp_path, faces, make):
  path = make(tmp_path, faces)
  bound = 2**20
  tracemalloc.start()
  try:
    entries = dict(sources.open_source(path, max_file_bytes=bound))
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert entries[BIG_NAME] == sources.TooLarge(BIG, bound)
  assert {k: v for k, v in entries.items() if k != BIG_NAME} == faces
  # Its size came from the header or the file system; skipping a gzip member inflates
  # one block at a time (at most about 10 MB for zeros).
  assert peak < BIG // 3
