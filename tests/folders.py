"""Source folders for the conversion tests: files written from a {name: bytes} dict, and
photos with real faces for --find_faces."""

import io
import os

import numpy as np
import skimage.data
from PIL import Image


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


# Photos with real faces, for --find_faces: scikit-image's astronaut (one face) pasted into
# generated backgrounds, scaled, shifted and turned a little.

_HEAD = (120, 10, 330, 240)  # Left, top, right, bottom around Eileen Collins' head.


def _jpeg(image, quality=90):
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


def _background(rng, size):
  base = rng.integers(30, 200, size=3)
  ramp = np.linspace(0, 1, size)[None, :, None] * rng.integers(-60, 60, size=3)
  pixels = base + ramp + rng.normal(0, 10, size=(size, size, 3))
  return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _head(rng, scale):
  head = Image.fromarray(skimage.data.astronaut()).crop(_HEAD)
  head = head.resize((round(head.width * scale), round(head.height * scale)),
                     Image.Resampling.BILINEAR)
  return head.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR,
                     fillcolor=tuple(int(v) for v in rng.integers(30, 200, size=3)))


def face_photo(index, size=320):
  """JPEG bytes of a size x size photo with one face, different for each index."""
  rng = np.random.default_rng([7, index])
  photo = _background(rng, size)
  head = _head(rng, rng.uniform(0.55, 0.9))
  photo.paste(head, (int(rng.integers(0, size - head.width)),
                     int(rng.integers(0, size - head.height))))
  return _jpeg(photo)


def two_faces_photo(size=400):
  """Two faces of the same size side by side: whose labels would those be?"""
  rng = np.random.default_rng(100)
  photo = _background(rng, size)
  for left in (0, size // 2):
    head = _head(rng, 0.6)
    photo.paste(head, (left, (size - head.height) // 2))
  return _jpeg(photo)


def no_face_photo(size=320):
  """Noise: no face anywhere."""
  return _jpeg(Image.fromarray(np.random.default_rng(3).integers(0, 255, (size, size, 3),
                                                                 dtype=np.uint8)))
