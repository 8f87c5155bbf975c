"""Files, local or gs://: one atomic writer (a file or a folder), one folder walker.

Every file the project writes goes through `atomic_path` (or `write_text`,
`write_bytes`): it is written under a temporary name beside the target and
renamed into place only when complete, and removed when writing fails (a
full disk), so no half-written file is ever left under its real name.
`replace_folder` does the same for a folder (a SavedModel), swapping the new
one in so that the target never goes missing.

Paths with a scheme (gs://...) go through tf.io.gfile; TensorFlow is loaded
only when a function here first needs it, because the conversion's worker
processes import this module and must start without it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import posixpath
import shutil
import logging as python_logging
from typing import Callable, Iterator

from absl import logging

TEMP_PREFIX = '.incomplete-'
# Operating-system litter that is not part of any data set.
_IGNORED_PARTS = ('__MACOSX',)


@functools.lru_cache(maxsize=1)
def tensorflow():
  """TensorFlow, imported on first use."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # Conversion workers never load it.
  return tf


def gfile():
  return tensorflow().io.gfile


def is_url(path: str) -> bool:
  return '://' in str(path)


# ---- Writing. ----

def _temporary(path: str) -> str:
  directory, name = posixpath.split(str(path)) if is_url(path) else os.path.split(str(path))
  return (posixpath.join if is_url(path) else os.path.join)(directory, TEMP_PREFIX + name)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path`; renamed to `path` when the block succeeds, removed
  when it fails."""
  temporary = _temporary(path)
  try:
    yield temporary
    if is_url(path):
      gfile().rename(temporary, path, overwrite=True)
    else:
      os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(Exception):
      remove(temporary)
    raise


def write_bytes(path: str, content: bytes) -> None:
  with atomic_path(path) as temporary:
    with open_file(temporary, 'wb') as f:
      f.write(content)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


def open_file(path: str, mode: str = 'rb'):
  return gfile().GFile(path, mode) if is_url(path) else open(path, mode)  # pylint: disable=consider-using-with


def remove(path: str) -> None:
  """Removes a file or a folder tree, if there is one."""
  if is_url(path):
    if gfile().isdir(path):
      gfile().rmtree(path)
    elif gfile().exists(path):
      gfile().remove(path)
  elif os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(first: str, second: str) -> bool:
  """Swaps two local paths in one step (Linux renameat2); False where that is not possible."""
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (AttributeError, OSError):
    return False
  at_cwd = -100  # AT_FDCWD
  return renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second),
                   _RENAME_EXCHANGE) == 0


def replace_folder(path: str, write: Callable[[str], None]) -> str:
  """Calls write(temporary folder), then puts that folder at `path`, replacing what was there.

  Locally on Linux the old and the new folder are exchanged in one step, so a
  reader finds one or the other, never neither; elsewhere the old folder is
  moved aside first (a short gap). A failed write leaves `path` as it was.
  """
  temporary = _temporary(path.rstrip('/'))
  remove(temporary)
  try:
    write(temporary)
    if is_url(path):
      remove(path)
      gfile().rename(temporary, path, overwrite=True)
    elif os.path.isdir(path) and _exchange(temporary, path):
      pass  # The old folder is now at `temporary`: removed below.
    else:
      aside = temporary + '.old'
      remove(aside)
      if os.path.lexists(path):
        os.replace(path, aside)
      os.replace(temporary, path)
      remove(aside)
  finally:
    with contextlib.suppress(Exception):
      remove(temporary)
  return path


@contextlib.contextmanager
def quiet():
  """Checkpoint and SavedModel writing log each step at INFO; a user needs only the result."""
  verbosity, tf_level = logging.get_verbosity(), tensorflow().get_logger().level
  logging.set_verbosity(logging.WARNING)
  tensorflow().get_logger().setLevel(python_logging.WARNING)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)
    tensorflow().get_logger().setLevel(tf_level)


# ---- Reading folders. ----

def ignored(name: str) -> bool:
  """Hidden files and folders (`._x`, `.DS_Store`), and operating-system litter (`__MACOSX`)."""
  parts = name.split('/')
  return any(part in _IGNORED_PARTS or part.startswith('.') and part not in ('.', '..')
             for part in parts)


def _local_entries(directory: str) -> Iterator[tuple[str, bool, int]]:
  with os.scandir(directory) as found:
    for entry in found:
      try:
        if entry.is_dir():
          yield entry.name, True, 0
        elif entry.is_file():
          yield entry.name, False, entry.stat().st_size
      except OSError:
        continue  # Vanished, or a link to nowhere: nothing to read.


def _url_entries(directory: str) -> Iterator[tuple[str, bool, int]]:
  for name in gfile().listdir(directory):
    name = name.rstrip('/')
    path = posixpath.join(directory, name)
    if gfile().isdir(path):
      yield name, True, 0
    else:
      yield name, False, gfile().stat(path).length


def walk(root: str) -> list[tuple[str, str, int]]:
  """(name relative to root, path, size) of every file under `root`, sorted by name.

  The one folder walker. Hidden files and OS litter are left out; symlinked
  folders are followed, and each real folder is read once (under the first
  name that reaches it), so a link loop or a second link to a folder adds nothing.
  """
  url = is_url(root)
  entries = _url_entries if url else _local_entries
  join = posixpath.join if url else os.path.join
  seen, found = set(), []

  def visit(directory: str, prefix: str) -> None:
    real = directory.rstrip('/') if url else os.path.realpath(directory)
    if real in seen:
      return
    seen.add(real)
    for name, is_folder, size in sorted(entries(directory)):
      relative = prefix + name
      if ignored(relative):
        continue
      if is_folder:
        visit(join(directory, name), relative + '/')
      else:
        found.append((relative, join(directory, name), size))
  visit(root, '')
  return sorted(found)


def read_bytes(path: str, limit: int = -1) -> bytes:
  """At most `limit` bytes of a file (all of it for -1)."""
  with open_file(path, 'rb') as f:
    return f.read(limit) if limit >= 0 else f.read()


def exists(path: str) -> bool:
  return gfile().exists(path) if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return gfile().isdir(path) if is_url(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
  if is_url(path):
    gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  return [name.rstrip('/') for name in gfile().listdir(path)] if is_url(path) else os.listdir(path)


def size(path: str) -> int:
  """A file's size in bytes, from the file system (nothing is read)."""
  return gfile().stat(path).length if is_url(path) else os.path.getsize(path)


def rename(source: str, target: str) -> None:
  """Moves a file to `target`, replacing what is there."""
  if is_url(source):
    gfile().rename(source, target, overwrite=True)
  else:
    os.replace(source, target)
