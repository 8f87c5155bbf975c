"""Crop a face aligned by the eyes exactly as UTKFace's 200x200 crops are aligned.

  similarity(face, size) -> 2x3 matrix             photo pixels -> crop pixels (eyes -> targets)
  align(pixels, face, size) -> uint8 [size, size, 3]
  refine(pixels, face) -> Face                     landmarks re-detected as the calibration did
  crop_corners(face, size) -> [4, 2]               the crop's corners in the photo
  subject_crop(pixels) -> (Face, pixels)           a labelled photo's one face (conversion)
  face_crops(pixels) -> [(Face, pixels)]           every face of a photo (prediction)
  draw_boxes(pixels, labelled_boxes) -> PIL image  for predict --annotate

Conversion and prediction call the same align(), so a photo's face reaches the model framed as
the training crops were. Imports numpy, PIL and (lazily) cv2 only.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from PIL import ImageDraw

# Names, not the module: the package's `detect` is the function, which hides the module.
from agegender.faces.detect import MAX_SIDE  # pylint: disable=g-importing-member
from agegender.faces.detect import MIN_FACE  # pylint: disable=g-importing-member
from agegender.faces.detect import SCORE_THRESHOLD  # pylint: disable=g-importing-member
from agegender.faces.detect import TURNS  # pylint: disable=g-importing-member
from agegender.faces.detect import Face  # pylint: disable=g-importing-member
from agegender.faces.detect import _cv2  # pylint: disable=g-importing-member
from agegender.faces.detect import check_pixels  # pylint: disable=g-importing-member
from agegender.faces.detect import detect  # pylint: disable=g-importing-member
from agegender.faces.detect import landmarks_of  # pylint: disable=g-importing-member
from agegender.faces.detect import subject  # pylint: disable=g-importing-member

CROP_SIZE = 200
# Median eye centres (x, y) YuNet finds in UTKFace's 200x200 crops, the subject's right eye on the
# viewer's left: 9,513 training-split crops (every 2nd) in edge-replicated margins, quartiles about
# +-3 px. Remeasure: python benchmarks/face_crop_calibration.py --source=UTKFace.tar
EYE_RIGHT = (56.6, 57.5)
EYE_LEFT = (135.9, 57.4)
# refine(): rounds of re-detection (the second still helps turned faces), the re-detection's
# least score (the face already passed detect's), and how far from the targets its eyes may be,
# in target eye distances.
REFINE_ROUNDS = 2
REFINE_THRESHOLD = 0.3
REFINE_REACH = 0.5


def similarity(face_or_landmarks, size: int = CROP_SIZE) -> np.ndarray:
  """The 2x3 matrix (rotation, uniform scale, shift) taking the detected eyes onto
  EYE_RIGHT and EYE_LEFT scaled to a size x size crop."""
  if size < 1:
    raise ValueError(f'the crop size must be positive, got {size}')
  points = landmarks_of(face_or_landmarks)
  # As complex numbers a similarity is z -> a z + b; two point pairs fix a and b.
  source_right, source_left = complex(*points[0]), complex(*points[1])
  scale = size / CROP_SIZE
  target_right, target_left = complex(*EYE_RIGHT) * scale, complex(*EYE_LEFT) * scale
  if abs(source_left - source_right) < 1e-6:
    raise ValueError(f'the two eyes coincide at {points[0].tolist()}: no alignment')
  a = (target_left - target_right) / (source_left - source_right)
  b = target_right - a * source_right
  return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


def align(pixels, face_or_landmarks, size: int = CROP_SIZE) -> np.ndarray:
  """The size x size crop of the face, its eyes on UTKFace's; outside the photo the photo's
  edge pixels repeat (a black band is a hard edge UTKFace's crops rarely have)."""
  return _warp(check_pixels(pixels), similarity(face_or_landmarks, size), size)


def _warp(pixels: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
  cv2 = _cv2()
  shrink = 1 / np.hypot(matrix[0, 0], matrix[1, 0])
  corners = _corners(matrix, size)
  reach = int(np.ceil(1.5 * shrink)) + 2  # The blur's reach below: 3 sigma.
  limit = np.array([pixels.shape[1], pixels.shape[0]])
  low = np.clip(np.floor(corners.min(axis=0)).astype(int) - reach, 0, limit)
  high = np.clip(np.ceil(corners.max(axis=0)).astype(int) + reach, 0, limit)
  if np.all(high > low):  # Only the part of the photo the crop samples: big photos stay cheap.
    pixels = pixels[low[1]:high[1], low[0]:high[0]]
    matrix = np.hstack([matrix[:, :2], matrix[:, 2:] + matrix[:, :2] @ low[:, None]])
  source = np.ascontiguousarray(pixels)
  # Shrinking a lot with bilinear sampling alone aliases; blur first to about the crop's scale.
  if shrink > 2:
    source = cv2.GaussianBlur(source, (0, 0), sigmaX=0.5 * shrink)
  return cv2.warpAffine(source, matrix, (size, size), flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE)


def _corners(matrix: np.ndarray, size: int) -> np.ndarray:
  """The size x size crop's corners, in the pixels `matrix` maps from, float [4, 2]."""
  back = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
  corners = np.array([[0, 0, 1], [size, 0, 1], [size, size, 1], [0, size, 1]], np.float64)
  return corners @ back[:2].T


def refine(pixels, face: Face, rounds: int = REFINE_ROUNDS) -> Face:
  """The face with its landmarks re-detected as the calibration measured EYE_RIGHT and EYE_LEFT:
  on its aligned 200x200 crop in a margin of half that, upright and at UTKFace's scale.

  YuNet's eyes on faces turned or small in the photo are rougher; on the calibration
  benchmark's scenes two rounds cut their error from 0.12-0.14 of the eye distance to
  0.04-0.07. Where the crop shows no face near the expected eyes, the face comes back as it was.
  """
  pixels = check_pixels(pixels)
  margin = CROP_SIZE // 2
  targets = np.array([EYE_RIGHT, EYE_LEFT]) + margin
  for _ in range(rounds):
    matrix = similarity(face)
    matrix[:, 2] += margin
    found = detect(_warp(pixels, matrix, CROP_SIZE + 2 * margin), score_threshold=REFINE_THRESHOLD,
                   turns=(0,))
    errors = [np.hypot(*(np.array(f.landmarks[:2]) - targets).T).max() for f in found]
    if not found or min(errors) > REFINE_REACH * (EYE_LEFT[0] - EYE_RIGHT[0]):
      break
    back = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
    points = np.array(found[int(np.argmin(errors))].landmarks) @ back[:2, :2].T + back[:2, 2]
    face = face._replace(landmarks=tuple((float(x), float(y)) for x, y in points))
  return face


def crop_corners(face_or_landmarks, size: int = CROP_SIZE) -> np.ndarray:
  """The aligned crop's corners in photo pixels, float [4, 2]: top left, top right, bottom
  right, bottom left of the crop (a rotated square in the photo)."""
  return _corners(similarity(face_or_landmarks, size), size)


def crop_box(face_or_landmarks, size: int = CROP_SIZE) -> tuple[float, float, float, float]:
  """The (left, top, width, height) around the aligned crop's corners, in photo pixels."""
  corners = crop_corners(face_or_landmarks, size)
  (left, top), (right, bottom) = corners.min(axis=0), corners.max(axis=0)
  return float(left), float(top), float(right - left), float(bottom - top)


def subject_crop(pixels, size: int = CROP_SIZE, score_threshold: float = SCORE_THRESHOLD,
                 min_face: float = MIN_FACE, max_side: int = MAX_SIDE,
                 turns: tuple[int, ...] = TURNS) -> tuple[Face, np.ndarray]:
  """(face, aligned crop) of the one face a labelled photo is about: detect, subject (its
  ValueError when there is no face or two similar ones), refine, align."""
  pixels = check_pixels(pixels)
  face = subject(detect(pixels, score_threshold, min_face, max_side, turns))
  face = refine(pixels, face)
  return face, align(pixels, face, size)


def face_crops(pixels, size: int = CROP_SIZE, score_threshold: float = SCORE_THRESHOLD,
               min_face: float = MIN_FACE, max_side: int = MAX_SIDE,
               turns: tuple[int, ...] = TURNS) -> list[tuple[Face, np.ndarray]]:
  """(refined face, aligned size x size crop) for every face in the photo, in reading order."""
  pixels = check_pixels(pixels)
  faces = [refine(pixels, face) for face in detect(pixels, score_threshold, min_face, max_side,
                                                    turns)]
  return [(face, align(pixels, face, size)) for face in faces]


def draw_boxes(pixels, labelled_boxes) -> Image.Image:
  """A PIL image of the photo (same size) with each (box, label) drawn and the label on a filled
  band above it (below, when it touches the top).

  box: (left, top, width, height), a Face (its detector box), or [4, 2] corners as crop_corners
  gives (drawn as that quadrilateral).
  """
  image = Image.fromarray(check_pixels(pixels))
  draw = ImageDraw.Draw(image)
  line = max(2, min(image.size) // 200)
  for box, label in labelled_boxes:
    if isinstance(box, Face):
      box = box.box
    points = np.asarray(box, dtype=np.float64)
    if points.shape == (4, 2):
      draw.polygon([tuple(p) for p in points], outline=(0, 255, 0), width=line)
      (left, top), (right, bottom) = points.min(axis=0), points.max(axis=0)
    elif points.shape == (4,):
      left, top, right, bottom = points[0], points[1], points[0] + points[2], points[1] + points[3]
      draw.rectangle([left, top, right, bottom], outline=(0, 255, 0), width=line)
    else:
      raise ValueError(f'a box is (left, top, width, height) or [4, 2] corners, got shape '
                       f'{list(points.shape)}')
    text_left, text_top, text_right, text_bottom = draw.textbbox((0, 0), label)
    text_height = text_bottom - text_top + 4
    y = top - text_height if top >= text_height else bottom
    draw.rectangle([left, y, left + text_right - text_left + 4, y + text_height], fill=(0, 255, 0))
    draw.text((left + 2, y + 2 - text_top), label, fill=(0, 0, 0))
  return image
