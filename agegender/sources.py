"""Sources of UTKFace images, each opened as a stream of (name, bytes).

A source spec is one of:

- ``kaggle``: Kaggle's ``jangedoo/utkface-new``, through kagglehub (which keeps
  its own cache; see kagglehub's KAGGLEHUB_CACHE setting);
- ``synthetic``: generated faces (agegender.synthetic);
- a path to a folder (searched recursively), a ``.tar``, ``.tar.gz``/``.tgz``
  or ``.zip`` archive. Folder paths with a scheme (``gs://...``) are read
  through tf.io.gfile.

Archives are read member by member: nothing is extracted to disk. Names are
only ever parsed for labels, never used as paths, so a hostile member name
(``../../x``) cannot reach anything.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import tarfile
import zipfile
from typing import Any, Callable, Iterator

from agegender import cli

KAGGLE = 'kaggle'
SYNTHETIC = 'synthetic'
KAGGLE_DATASET = 'jangedoo/utkface-new'
TAR_SUFFIXES = ('.tar', '.tar.gz', '.tgz')
ZIP_SUFFIXES = ('.zip',)
# Operating-system litter that is not part of any data set.
_IGNORED_PARTS = ('__MACOSX',)


@dataclasses.dataclass(frozen=True)
class Source:
  """An opened source: iterate it for (name, bytes); `total` may be None (unknown)."""
  spec: str
  kind: str
  location: str | None
  total: int | None
  _entries: Callable[[], Iterator[tuple[str, bytes]]]

  def __iter__(self) -> Iterator[tuple[str, bytes]]:
    return self._entries()

  def describe(self) -> dict[str, Any]:
    return {'spec': self.spec, 'kind': self.kind, 'location': self.location}


def normalize_spec(spec: str) -> str:
  """The spec as the manifest records it: keywords as they are, local paths absolute."""
  spec = str(spec)
  if spec in (KAGGLE, SYNTHETIC) or '://' in spec:
    return spec
  return os.path.abspath(os.path.expanduser(spec))


def open_source(spec: str, *, synthetic_count: int = 3000, seed: int = 0) -> Source:
  """Opens a source spec; raises cli.UsageError when it cannot be read."""
  spec = str(spec)
  if spec == SYNTHETIC:
    return _synthetic_source(synthetic_count, seed)
  if spec == KAGGLE:
    return _kaggle_source()
  return open_path(normalize_spec(spec), spec=spec)


def open_path(path: str, spec: str | None = None) -> Source:
  spec = path if spec is None else spec
  if '://' in path:
    return _gfile_folder_source(path, spec)
  if os.path.isdir(path):
    return _folder_source(path, spec)
  if not os.path.exists(path):
    raise cli.UsageError(
        f'source {spec!r} does not exist; expected a folder, a .tar/.tar.gz/.tgz '
        'or .zip archive, "kaggle" or "synthetic"')
  lower = path.lower()
  if lower.endswith(TAR_SUFFIXES):
    return _tar_source(path, spec)
  if lower.endswith(ZIP_SUFFIXES):
    return _zip_source(path, spec)
  raise cli.UsageError(
      f'source {spec!r} is not a folder or a supported archive '
      '(.tar, .tar.gz, .tgz, .zip)')


def _ignored(name: str) -> bool:
  parts = name.split('/')
  return any(part in _IGNORED_PARTS or part.startswith('.') and part not in ('.', '..')
             for part in parts)


def _member_name(name: str) -> str:
  while name.startswith('./'):  # tar's usual prefix; not part of the name.
    name = name[2:]
  return name


def _synthetic_source(count: int, seed: int) -> Source:
  from agegender import synthetic  # pylint: disable=g-import-not-at-top
  if count <= 0:
    raise cli.UsageError(f'--synthetic_count must be positive, got {count}')
  return Source(spec=SYNTHETIC, kind=SYNTHETIC, location=None, total=count,
                _entries=lambda: synthetic.generate_synthetic(count, seed))


def _first_line(error: BaseException, limit: int = 160) -> str:
  text = str(error).strip().splitlines()
  text = text[0] if text else ''
  return text if len(text) <= limit else text[:limit] + '...'


def _kaggle_source() -> Source:
  try:
    import kagglehub  # pylint: disable=g-import-not-at-top
    path = kagglehub.dataset_download(KAGGLE_DATASET)
  except Exception as e:  # pylint: disable=broad-except
    # Offline, kagglehub raises requests' ConnectionError; other failures
    # (credentials, quota) deserve the same way out.
    raise cli.UsageError(
        f'cannot download the UTKFace data set {KAGGLE_DATASET} from Kaggle '
        f'({type(e).__name__}: {_first_line(e)}). Without network access, pass '
        '--source=PATH with a local copy of UTKFace (a folder, a .tar.gz or '
        "Kaggle's .zip), or --source=synthetic for generated faces.") from None
  source = open_path(str(path), spec=KAGGLE)
  return dataclasses.replace(source, kind=KAGGLE)


def folder_files(root: str) -> Iterator[tuple[str, str]]:
  """(name relative to root, full path) of every file under a local or gs:// folder.

  The one listing every runner uses, so they all see the same names in the same order.
  """
  if '://' in root:
    return _gfile_folder_files(root)
  return _local_folder_files(root)


def _local_folder_files(root: str) -> Iterator[tuple[str, str]]:
  """(name relative to root, full path) of every file, in a stable order."""
  for directory, subdirectories, files in os.walk(root):
    subdirectories.sort()
    relative = os.path.relpath(directory, root)
    for file in sorted(files):
      name = file if relative == '.' else posixpath.join(
          relative.replace(os.sep, '/'), file)
      if not _ignored(name):
        yield name, os.path.join(directory, file)


def _folder_source(root: str, spec: str) -> Source:
  def entries():
    for name, path in _local_folder_files(root):
      with open(path, 'rb') as f:
        yield name, f.read()
  total = sum(1 for _ in _local_folder_files(root))
  return Source(spec=spec, kind='folder', location=root, total=total, _entries=entries)


def _gfile_folder_files(root: str) -> Iterator[tuple[str, str]]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for directory, subdirectories, files in tf.io.gfile.walk(root):
    subdirectories.sort()
    for file in sorted(files):
      path = posixpath.join(directory, file)
      name = posixpath.relpath(path, root.rstrip('/'))
      if not _ignored(name):
        yield name, path


def _gfile_folder_source(root: str, spec: str) -> Source:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.isdir(root):
    raise cli.UsageError(f'source {spec!r} is not a folder')

  def entries():
    for name, path in _gfile_folder_files(root):
      with tf.io.gfile.GFile(path, 'rb') as f:
        yield name, f.read()
  return Source(spec=spec, kind='folder', location=root, total=None, _entries=entries)


def _tar_source(path: str, spec: str) -> Source:
  def entries():
    try:
      # Stream mode ('r|*'): one pass, members read as they come.
      with tarfile.open(path, mode='r|*') as archive:
        for member in archive:
          name = _member_name(member.name)
          if member.isfile() and not _ignored(name):
            yield name, archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
      raise cli.UsageError(f'cannot read the archive {spec!r}: {_first_line(e)}') from None
  return Source(spec=spec, kind='tar', location=path, total=None, _entries=entries)


def _zip_members(path: str, spec: str) -> list[zipfile.ZipInfo]:
  try:
    with zipfile.ZipFile(path) as archive:
      return [info for info in archive.infolist()
              if not info.is_dir() and not _ignored(info.filename)]
  except (zipfile.BadZipFile, OSError) as e:
    raise cli.UsageError(f'cannot read the archive {spec!r}: {_first_line(e)}') from None


def _zip_source(path: str, spec: str) -> Source:
  members = _zip_members(path, spec)

  def entries():
    try:
      with zipfile.ZipFile(path) as archive:
        for info in members:
          yield _member_name(info.filename), archive.read(info)
    except (zipfile.BadZipFile, OSError) as e:
      raise cli.UsageError(f'cannot read the archive {spec!r}: {_first_line(e)}') from None
  return Source(spec=spec, kind='zip', location=path, total=len(members), _entries=entries)
