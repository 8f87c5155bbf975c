"""Faces in whole photos: detect them, and crop each the way UTKFace's crops are framed.

The model learned from UTKFace's aligned 200x200 crops: the face centred a
little above the middle, with hair, ears and chin inside the frame. A photo
fed whole is nothing like that. This module finds faces with OpenCV's bundled
Haar cascade (`haarcascade_frontalface_default.xml`, shipped in the
opencv-python-headless wheel, so nothing downloads at run time), then widens
and shifts each detected box by the calibrated ratios below into the square
that UTKFace's crop of that face would be.

  detect(pixels) -> [Box]                       where the faces are
  utkface_crop(box, (width, height)) -> Box     the UTKFace-framed square around one
  crop_pixels(pixels, crop) -> uint8 pixels     that square, padded where it leaves the photo
  face_crops(pixels) -> [(box, crop, pixels)]   all three for a photo

Pixels are uint8 RGB [H, W, 3]. Errors are plain ValueError (ImportError when
OpenCV is missing); entry points turn them into flags' words.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

MISSING_OPENCV = "finding faces needs OpenCV: pip install -e '.[faces]'"
CASCADE_FILE = 'haarcascade_frontalface_default.xml'

# Medians of the cascade's boxes on 4,600 UTKFace training-split crops (every 4th, each set in
# an edge-padded margin); re-measure: python benchmarks/face_crop_calibration.py --source UTKFace.tar
# The crop's side in detected-box sides (the cascade's box spans about the whole crop):
CROP_SCALE = 0.9662
# The crop's centre minus the box's centre, in box sides (positive: right, down):
CROP_SHIFT_X = 0.0028
CROP_SHIFT_Y = 0.0837

# detectMultiScale's settings, from benchmarks/faces.py on 400 pasted UTKFace test crops: 3
# overlapping hits to keep a box find 92.0% (OpenCV's usual 5: 88.8%) for 0.20 false boxes a
# scene (0.13); a 1.05 step between scales finds more still (95.2%) but also two false faces in
# the one real photo at hand (scikit-image's astronaut), where 1.1 finds only hers. No face under
# 24 pixels (the cascade's window).
SCALE_FACTOR = 1.1
MIN_NEIGHBORS = 3
MIN_FACE = 24


class Box(NamedTuple):
  """A rectangle in pixels: left and top may be negative for a crop that leaves the photo."""
  left: int
  top: int
  width: int
  height: int

  def to_json(self) -> list[int]:
    return [int(value) for value in self]


def _cv2():
  try:
    import cv2  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(MISSING_OPENCV) from None
  return cv2


@functools.lru_cache(maxsize=1)
def _cascade():
  cv2 = _cv2()
  cascade = cv2.CascadeClassifier(cv2.data.haarcascades + CASCADE_FILE)
  if cascade.empty():
    raise ImportError(f'OpenCV {cv2.__version__} ships no {CASCADE_FILE}; '
                      "pip install -e '.[faces]' installs one that does")
  return cascade


def _check_pixels(pixels) -> np.ndarray:
  pixels = np.asarray(pixels)
  if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
    raise ValueError(f'expected uint8 RGB pixels [height, width, 3], got {pixels.dtype} '
                     f'{list(pixels.shape)}')
  if min(pixels.shape[:2]) == 0:
    raise ValueError(f'the image is empty: {list(pixels.shape)}')
  return pixels


def detect(pixels, min_face: int = MIN_FACE, min_neighbors: int = MIN_NEIGHBORS) -> list[Box]:
  """The faces' boxes, as the cascade frames them (about brow to mouth), in reading order.

  min_neighbors: overlapping hits a box needs; more finds fewer faces and fewer false ones.
  """
  pixels = _check_pixels(pixels)
  if min_neighbors < 1 or min_face < 1:
    raise ValueError(f'min_neighbors and min_face must be positive, got {min_neighbors} and '
                     f'{min_face}')
  cv2 = _cv2()
  gray = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
  found = _cascade().detectMultiScale(gray, scaleFactor=SCALE_FACTOR, minNeighbors=min_neighbors,
                                      minSize=(min_face, min_face))
  boxes = [Box(*(int(value) for value in box)) for box in np.reshape(found, (-1, 4))]
  return sorted(boxes, key=lambda box: (box.top, box.left))


def utkface_crop(box: Box, image_size: tuple[int, int],
                 scale: float = CROP_SCALE, shift_x: float = CROP_SHIFT_X,
                 shift_y: float = CROP_SHIFT_Y) -> Box:
  """The square that frames the detected face as UTKFace's crops do.

  image_size: the photo's (width, height); the square may reach past its
  edges (crop_pixels pads there) so that a face near an edge keeps the framing
  the model learned rather than a shifted one.
  """
  width, height = image_size
  if box.width <= 0 or box.height <= 0:
    raise ValueError(f'a face box needs a positive size, got {box.width}x{box.height}')
  if width <= 0 or height <= 0:
    raise ValueError(f'an image needs a positive size, got {width}x{height}')
  side = max(box.width, box.height)
  centre_x = box.left + box.width / 2 + shift_x * side
  centre_y = box.top + box.height / 2 + shift_y * side
  crop_side = max(1, round(scale * side))
  return Box(round(centre_x - crop_side / 2), round(centre_y - crop_side / 2), crop_side, crop_side)


def crop_pixels(pixels, crop: Box) -> np.ndarray:
  """The crop's pixels; where it leaves the photo, the photo's edge pixels repeated.

  Edge padding, not black: a black band is a hard edge that UTKFace's crops
  rarely have, and the repeated border keeps the crop's colours close to
  what the model saw.
  """
  pixels = _check_pixels(pixels)
  height, width = pixels.shape[:2]
  if crop.width <= 0 or crop.height <= 0:
    raise ValueError(f'a crop needs a positive size, got {crop.width}x{crop.height}')
  rows = np.clip(np.arange(crop.top, crop.top + crop.height), 0, height - 1)
  columns = np.clip(np.arange(crop.left, crop.left + crop.width), 0, width - 1)
  return pixels[rows[:, None], columns[None, :]]


def face_crops(pixels, min_face: int = MIN_FACE,
               min_neighbors: int = MIN_NEIGHBORS) -> list[tuple[Box, Box, np.ndarray]]:
  """(detected box, UTKFace-framed crop box, crop pixels) for each face in the photo."""
  pixels = _check_pixels(pixels)
  size = (pixels.shape[1], pixels.shape[0])
  results = []
  for box in detect(pixels, min_face, min_neighbors):
    crop = utkface_crop(box, size)
    results.append((box, crop, crop_pixels(pixels, crop)))
  return results


def draw_boxes(pixels, labelled_boxes):
  """A PIL image of the photo (same size) with each (box, label) drawn: the box, and the label
  on a filled band above it (below, when the box touches the top)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  image = Image.fromarray(_check_pixels(pixels))
  draw = ImageDraw.Draw(image)
  line = max(2, min(image.size) // 200)
  for box, label in labelled_boxes:
    right, bottom = box.left + box.width, box.top + box.height
    draw.rectangle([box.left, box.top, right, bottom], outline=(0, 255, 0), width=line)
    left, top, text_right, text_bottom = draw.textbbox((0, 0), label)
    text_height = text_bottom - top + 4
    y = box.top - text_height if box.top >= text_height else bottom
    draw.rectangle([box.left, y, box.left + text_right - left + 4, y + text_height],
                   fill=(0, 255, 0))
    draw.text((box.left + 2, y + 2 - top), label, fill=(0, 0, 0))
  return image
