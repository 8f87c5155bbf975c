"""Sources of face images, each opened as a stream of (name, bytes).

A source spec is one of:

- ``kaggle``: Kaggle's ``jangedoo/utkface-new``, through kagglehub (which keeps
  its own cache; see kagglehub's KAGGLEHUB_CACHE setting);
- ``synthetic``: generated faces (agegender.records.synthetic);
- a path to a folder (listed by files.walk, the one folder walker: searched
  recursively, symlinked folders followed once, hidden files and __MACOSX
  left out), a ``.tar``, ``.tar.gz``/``.tgz`` or ``.zip`` archive. Folder
  paths with a scheme (``gs://...``) are read through files.gfile().

A name is the file's path relative to the source's root (the folder, or the
archive's top without tar's ``./``): what labels are parsed from, and what a
labels table's ``path`` column names.

Archives are read member by member: nothing is extracted to disk. Names are
only ever parsed for labels, never used as paths, so a hostile member name
(``../../x``) cannot reach anything.

A file or member larger than `max_file_bytes` is never read: its size comes
from the file system or the archive's header, and the stream yields a
`TooLarge` in place of its bytes, which the conversion rejects. So one huge
member (a zip of zeros) costs no memory.
"""

from __future__ import annotations

import dataclasses
import os
import tarfile
import zipfile
from typing import Any, Callable, Iterator

from agegender import contract
from agegender import files
from agegender.records import synthetic

KAGGLE = 'kaggle'
SYNTHETIC = 'synthetic'
KAGGLE_DATASET = 'jangedoo/utkface-new'
TAR_SUFFIXES = ('.tar', '.tar.gz', '.tgz')
ZIP_SUFFIXES = ('.zip',)
DEFAULT_MAX_FILE_BYTES = 32 * 2**20  # Far above any face crop (UTKFace's are about 6 KB).


@dataclasses.dataclass(frozen=True)
class TooLarge:
  """Stands for the bytes of a file that was not read: it is over the bound."""
  size: int
  limit: int


@dataclasses.dataclass(frozen=True)
class Source:
  """An opened source: iterate it for (name, bytes or TooLarge); `total` may be None."""
  spec: str
  kind: str
  location: str | None
  total: int | None
  entries: Callable[[], Iterator[tuple[str, bytes | TooLarge]]]

  def __iter__(self) -> Iterator[tuple[str, bytes | TooLarge]]:
    return self.entries()

  def describe(self) -> dict[str, Any]:
    return {'spec': self.spec, 'kind': self.kind, 'location': self.location}


def normalize_spec(spec: str) -> str:
  """The spec as the manifest records it: keywords as they are, local paths absolute."""
  spec = str(spec)
  if spec in (KAGGLE, SYNTHETIC) or '://' in spec:
    return spec
  return os.path.abspath(os.path.expanduser(spec))


def open_source(spec: str, *, synthetic_count: int = 3000, seed: int = 0,
                max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Source:
  """Opens a source spec; raises contract.ArgumentError when it cannot be read."""
  spec = str(spec)
  if spec == SYNTHETIC:
    return _synthetic_source(synthetic_count, seed)
  if spec == KAGGLE:
    return _kaggle_source(max_file_bytes)
  return open_path(normalize_spec(spec), spec=spec, max_file_bytes=max_file_bytes)


def open_path(path: str, spec: str | None = None,
              max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Source:
  spec = path if spec is None else spec
  if files.is_url(path) or os.path.isdir(path):
    return _folder_source(path, spec, max_file_bytes)
  if not os.path.exists(path):
    raise contract.ArgumentError(
        'source', f'source {spec!r} does not exist; expected a folder, a .tar/.tar.gz/.tgz '
        'or .zip archive, "kaggle" or "synthetic"')
  lower = path.lower()
  if lower.endswith(TAR_SUFFIXES):
    return _tar_source(path, spec, max_file_bytes)
  if lower.endswith(ZIP_SUFFIXES):
    return _zip_source(path, spec, max_file_bytes)
  raise contract.ArgumentError(
      'source', f'source {spec!r} is not a folder or a supported archive '
      '(.tar, .tar.gz, .tgz, .zip)')


def _member_name(name: str) -> str:
  while name.startswith('./'):  # tar's usual prefix; not part of the name.
    name = name[2:]
  return name


def _synthetic_source(count: int, seed: int) -> Source:
  if count <= 0:
    raise contract.ArgumentError('synthetic_count',
                                 f'the synthetic count must be positive, got {count}')
  return Source(spec=SYNTHETIC, kind=SYNTHETIC, location=None, total=count,
                entries=lambda: synthetic.generate_synthetic(count, seed))


def _first_line(error: BaseException, limit: int = 160) -> str:
  text = str(error).strip().splitlines()
  text = text[0] if text else ''
  return text if len(text) <= limit else text[:limit] + '...'


def _kaggle_source(max_file_bytes: int) -> Source:
  try:
    # Lazy: only the Kaggle source needs it, and it is slow to import.
    import kagglehub  # pylint: disable=g-import-not-at-top
    path = kagglehub.dataset_download(KAGGLE_DATASET)
  except Exception as e:  # pylint: disable=broad-except
    # Offline, kagglehub raises requests' ConnectionError; other failures
    # (credentials, quota) deserve the same way out.
    raise contract.ArgumentError(
        'source', f'cannot download the UTKFace data set {KAGGLE_DATASET} from Kaggle '
        f'({type(e).__name__}: {_first_line(e)}); a local copy of UTKFace or the '
        'synthetic source converts without network access',
        hint='without network access, set {source}=PATH to a local copy of UTKFace (a folder, '
        "a .tar.gz or Kaggle's .zip), or {source}=synthetic for generated faces") from None
  source = open_path(str(path), spec=KAGGLE, max_file_bytes=max_file_bytes)
  return dataclasses.replace(source, kind=KAGGLE)


# Folders: listed by files.walk, the one folder walker.

def read_file(name: str, path: str, size: int,
              max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> tuple[str, bytes | TooLarge]:
  """A listed file's bytes, or TooLarge when its listed size is over the bound."""
  if size > max_file_bytes:
    return name, TooLarge(size, max_file_bytes)
  # At most one byte past the bound: a file that grew since it was listed is not read whole.
  try:
    data = files.read_bytes(path, max_file_bytes + 1)
  except OSError as e:
    raise contract.ArgumentError('source', f'cannot read {path}: {_first_line(e)}') from None
  if len(data) > max_file_bytes:
    return name, TooLarge(len(data), max_file_bytes)
  return name, data


def _folder_source(root: str, spec: str, max_file_bytes: int) -> Source:
  if files.is_url(root) and not files.isdir(root):
    raise contract.ArgumentError('source', f'source {spec!r} is not a folder')
  listed = files.walk(root)

  def entries():
    for name, path, size in listed:
      yield read_file(name, path, size, max_file_bytes)
  return Source(spec=spec, kind='folder', location=root, total=len(listed), entries=entries)


# Archives.

def _archive_error(spec: str, error: BaseException) -> contract.ArgumentError:
  return contract.ArgumentError('source',
                                f'cannot read the archive {spec!r}: {_first_line(error)}')


def _tar_source(path: str, spec: str, max_file_bytes: int) -> Source:
  def entries():
    try:
      # Stream mode ('r|*'): one pass, members read as they come; a member
      # not read is skipped in blocks, never held in memory.
      with tarfile.open(path, mode='r|*') as archive:
        for member in archive:
          name = _member_name(member.name)
          if not member.isfile() or files.ignored(name):
            continue
          if member.size > max_file_bytes:
            yield name, TooLarge(member.size, max_file_bytes)
          else:
            yield name, archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
      raise _archive_error(spec, e) from None
  return Source(spec=spec, kind='tar', location=path, total=None, entries=entries)


def _zip_members(path: str, spec: str) -> list[zipfile.ZipInfo]:
  try:
    with zipfile.ZipFile(path) as archive:
      return [info for info in archive.infolist()
              if not info.is_dir() and not files.ignored(info.filename)]
  except (zipfile.BadZipFile, OSError) as e:
    raise _archive_error(spec, e) from None


def _zip_source(path: str, spec: str, max_file_bytes: int) -> Source:
  members = _zip_members(path, spec)

  def entries():
    try:
      with zipfile.ZipFile(path) as archive:
        for info in members:
          name = _member_name(info.filename)
          # zipfile never returns more than the header's size, so the bound holds.
          if info.file_size > max_file_bytes:
            yield name, TooLarge(info.file_size, max_file_bytes)
          else:
            yield name, archive.read(info)
    except (zipfile.BadZipFile, OSError) as e:
      raise _archive_error(spec, e) from None
  return Source(spec=spec, kind='zip', location=path, total=len(members), entries=entries)
