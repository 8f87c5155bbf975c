"""Source folders for the conversion tests: files written from a {name: bytes} dict."""

import os


def write_folder(root, files):
  """Writes {'a/b.jpg': bytes, ...} under `root` (created if missing); returns str(root)."""
  os.makedirs(root, exist_ok=True)
  for name, data in files.items():
    path = os.path.join(root, *name.split('/'))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(data)
  return str(root)


def read_folder(directory):
  """{name: bytes} of the files directly in `directory`, by name."""
  result = {}
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), 'rb') as f:
      result[name] = f.read()
  return result


def bad_files(faces):
  """One file of each kind make_records rejects, made from a face of `faces` where needed."""
  data = faces[sorted(faces)[0]]
  return {
      'bad/not_a_utkface_name.jpg': data,
      'bad/130_0_0_20170101000000001.jpg': data,
      'bad/30_0_0_20170101000000002.jpg': b'',
      'bad/30_1_0_20170101000000003.jpg': data[:len(data) // 2],
      'bad/30_0_1_20170101000000004.jpg': b'plain text, not an image',
  }
