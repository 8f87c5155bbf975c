"""A generated data set in UTKFace's naming and image format.

Each image is a face-like ellipse on a noisy background, drawn so that its
labels can be learned from the pixels:

- age: the older the face, the larger the ellipse and the darker the skin
  shade, plus horizontal "wrinkle" lines from age 40 on;
- gender: a red mark above the face for female, a blue bar below it for male,
  and a slightly wider ellipse for male;
- race: the skin tone's hue.

Noise (position jitter, background, pixel noise, JPEG compression) keeps it
from being trivial. Image i depends only on (seed, i), so any prefix of a
larger set equals the smaller set.
"""

from __future__ import annotations

import io
import os
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from agegender.records import labels as labels_lib

MAX_SYNTHETIC_AGE = 90
# Skin tones by race (White, Black, Asian, Indian, Others), RGB at mid age.
_SKIN_TONES = ((230, 190, 170), (120, 80, 60), (225, 200, 150), (175, 125, 95),
               (200, 160, 130))
_JPEG_QUALITY = 90


def synthetic_labels(rng: np.random.Generator) -> labels_lib.Labels:
  return labels_lib.Labels(age=int(rng.integers(1, MAX_SYNTHETIC_AGE + 1)),
                           gender=int(rng.integers(0, 2)),
                           race=int(rng.integers(0, len(_SKIN_TONES))))


def draw_face(face: labels_lib.Labels, rng: np.random.Generator,
              image_size: int) -> np.ndarray:
  """An image_size x image_size x 3 uint8 picture whose content follows `face`."""
  s = image_size / 200  # Drawing coordinates are for 200 x 200.
  background = tuple(int(v) for v in rng.integers(40, 140, size=3))
  image = Image.new('RGB', (image_size, image_size), background)
  draw = ImageDraw.Draw(image)
  youth = 1 - face.age / MAX_SYNTHETIC_AGE
  shade = 0.55 + 0.45 * youth
  skin = tuple(int(c * shade) for c in _SKIN_TONES[face.race])
  radius_y = (45 + 40 * face.age / MAX_SYNTHETIC_AGE) * s
  radius_x = radius_y * (0.82 if face.gender == 0 else 0.7)
  cx, cy = (100 + rng.normal(0, 6)) * s, (105 + rng.normal(0, 6)) * s
  draw.ellipse((cx - radius_x, cy - radius_y, cx + radius_x, cy + radius_y), fill=skin)
  for dx in (-0.4, 0.4):  # Eyes.
    ex, ey, er = cx + dx * radius_x, cy - 0.2 * radius_y, 0.1 * radius_x
    draw.ellipse((ex - er, ey - er, ex + er, ey + er), fill=(30, 30, 30))
  if face.age >= 40:  # Wrinkles, more of them with age.
    for k in range((face.age - 30) // 15):
      y = cy - 0.55 * radius_y + k * 0.08 * radius_y
      draw.line((cx - 0.4 * radius_x, y, cx + 0.4 * radius_x, y), fill=(70, 50, 40),
                width=max(1, int(2 * s)))
  if face.gender == 1:
    mark = 12 * s
    mx, my = cx, cy - radius_y - mark
    draw.ellipse((mx - mark, my - mark, mx + mark, my + mark), fill=(220, 30, 60))
  else:
    y = min(cy + radius_y + 8 * s, image_size - 6 * s)
    draw.rectangle((cx - 30 * s, y, cx + 30 * s, y + 8 * s), fill=(30, 60, 220))
  pixels = np.asarray(image, dtype=np.float32)
  pixels += rng.normal(0, 12, size=pixels.shape)
  return np.clip(pixels, 0, 255).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray, quality: int = _JPEG_QUALITY) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


def synthetic_name(face: labels_lib.Labels, seed: int, index: int) -> str:
  # UTKFace's datetime field: digits, unique per (seed, index).
  return labels_lib.utkface_name(face, f'{seed % 10**6:06d}{index:010d}')


def generate_synthetic(count: int, seed: int = 0,
                       image_size: int = 200) -> Iterator[tuple[str, bytes]]:
  """Yields `count` (UTKFace file name, JPEG bytes) pairs, the same for the same seed."""
  for index in range(count):
    rng = np.random.default_rng([seed, index])
    face = synthetic_labels(rng)
    yield synthetic_name(face, seed, index), encode_jpeg(draw_face(face, rng, image_size))


def write_synthetic_folder(path: str, count: int, seed: int = 0) -> str:
  """Writes generate_synthetic(count, seed) as files into `path`; returns `path`."""
  os.makedirs(path, exist_ok=True)
  for name, data in generate_synthetic(count, seed):
    with open(os.path.join(path, name), 'wb') as f:
      f.write(data)
  return str(path)
