"""Where the faces are in a photo: the YuNet detector through OpenCV's `cv2.FaceDetectorYN`.

  detect(pixels) -> [Face]      every face: box, five landmarks, score, in photo pixels
  subject(faces) -> Face        the one face a labelled photo is about, or ValueError why not

Pixels are uint8 RGB [H, W, 3]. The model (`yunet/yunet_s_640_640.onnx`, Apache 2.0, see
`yunet/PROVENANCE.md`) ships inside the package; nothing downloads. This module imports only
numpy and (lazily) cv2, never TensorFlow, so conversion workers stay light.

Threads: OpenCV runs each detection on its own thread pool (one thread a core). A pool of
conversion processes should call `set_threads(1)` in each worker's initializer, or N workers
start N x cores threads that fight over the same cores.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import os
import threading
from typing import NamedTuple

import numpy as np

MISSING_OPENCV = "finding faces needs OpenCV: pip install -e '.[faces]'"
MODEL_FILE = 'yunet_s_640_640.onnx'

# benchmarks/face_crop_calibration.py (scenes): 21 training-split faces pasted into 5 scenes,
# some turned 15-90 degrees, some 24-64 px: 0.7 finds 20-21 with no false face (--every=2), 17-20
# with 0-3 false over five other draws of faces (--every=50, seeds 0-4), and no false face in 16
# faceless scikit-image photos, where 0.6 finds 2 and 0.5 finds 6-7. 0.9, OpenCV's usual, misses
# a third: turned and small faces.
SCORE_THRESHOLD = 0.7
# Boxes under this side (photo px) are dropped; YuNet finds faces down to about 10 px.
MIN_FACE = 10
# Photos are shrunk to this long side for detection, so time and memory stay bounded: on a
# 4000x3000 photo 1280 finds faces from 56 px crops (1.4% of the side) in 0.4 s; full size finds
# 40 px ones too, in 5.5 s.
MAX_SIDE = 1280
# The detector's own settings: boxes overlapping more than this are one face; the most it keeps.
NMS_THRESHOLD = 0.3
TOP_K = 5000
# Searched by default, in degrees counter-clockwise: YuNet finds faces turned up to about 45
# degrees; turned more it still finds some but puts their eyes where an upright face's would be.
# Without the diagonals a face near 45 degrees is half-turned for every search and missed (five
# draws of the calibration's scenes: 17-20 of 21 found, 0-3 false at 0.7; with them 19-21, 0-1
# false). A diagonal search turns the photo on a canvas that holds all of it, at TILTED_SCALE:
# (W + H) / (2 sqrt 2) a side, about half a 4:3 photo's pixels (at full scale, twice: 19-21
# found, none false, for about twice the time).
TURNS = (0, 90, 270, 45, 315)
# The turns detect() accepts: right angles turn exactly (cv2.rotate), the others are resampled.
ALL_TURNS = (0, 45, 90, 135, 180, 225, 270, 315)
# The other turns' canvas is searched at this scale of the photo's (detection's) pixels: faces
# turned near 45 degrees are searched at half their size there.
TILTED_SCALE = 0.5
# A face found only in a turned search needs this much more confidence: turned searches see
# stripes and textures as faces (a striped test scene scored 0.75 turned, nothing upright).
TURNED_MARGIN = 0.1
# Across turns, a box with more than this share of its area inside a higher-scoring one is dropped.
CONTAINED = 0.5
# subject(): a second face at least this fraction of the largest's side makes the photo's
# labels ambiguous (whose age?); smaller ones are background people, posters, reflections.
SIMILAR_SIZE = 0.7


class Face(NamedTuple):
  """One detected face, in photo pixels (floats; the box may reach past the photo's edges).

  box: (left, top, width, height).
  landmarks: five (x, y): the subject's right eye (on the viewer's left), left eye, nose tip,
    right and left mouth corner.
  score: the detector's confidence, 0 to 1.
  """
  box: tuple[float, float, float, float]
  landmarks: tuple[tuple[float, float], ...]
  score: float

  @property
  def side(self) -> float:
    """The box's longer side: the face's size."""
    return max(self.box[2], self.box[3])

  def to_json(self) -> dict:
    return {'box': [round(v, 1) for v in self.box],
            'landmarks': [[round(x, 1), round(y, 1)] for x, y in self.landmarks],
            'score': round(self.score, 3)}


def _cv2():
  # Lazy: OpenCV comes from the optional `faces` extra; without it the package still imports.
  try:
    import cv2  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(MISSING_OPENCV) from None
  if not hasattr(cv2, 'FaceDetectorYN'):
    raise ImportError(f'OpenCV {cv2.__version__} has no FaceDetectorYN (4.8 or later has); '
                      "pip install -e '.[faces]'")
  return cv2


def set_threads(count: int) -> None:
  """OpenCV's threads for detection and alignment in this process (1 in pool workers)."""
  _cv2().setNumThreads(count)


@functools.lru_cache(maxsize=64)
def _detector(process: int, thread: int):
  """One detector per process and thread: it holds the input size, so threads must not share
  one, and a forked child must not reuse its parent's."""
  del process, thread  # The cache's key only.
  cv2 = _cv2()
  model = importlib.resources.files(__package__).joinpath('yunet', MODEL_FILE)
  with importlib.resources.as_file(model) as path:
    if not os.path.isfile(path):
      raise ImportError(f'the face detector model is missing: {path}; reinstall agegender')
    with _quiet(cv2):
      return cv2.FaceDetectorYN.create(str(path), '', (320, 320), SCORE_THRESHOLD,
                                       NMS_THRESHOLD, TOP_K)


@contextlib.contextmanager
def _quiet(cv2):
  """OpenCV 5 warns, for every detector made, that its new engine ignores targets: not news."""
  logging = getattr(cv2.utils, 'logging', None)  # 4.10 has none, and no such warning.
  if logging is None:
    yield
    return
  level = logging.getLogLevel()
  logging.setLogLevel(logging.LOG_LEVEL_ERROR)
  try:
    yield
  finally:
    logging.setLogLevel(level)


def check_pixels(pixels) -> np.ndarray:
  """The pixels as a uint8 [H, W, 3] array, or ValueError saying what they are instead."""
  pixels = np.asarray(pixels)
  if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
    raise ValueError(f'expected uint8 RGB pixels [height, width, 3], got {pixels.dtype} '
                     f'{list(pixels.shape)}')
  if min(pixels.shape[:2]) == 0:
    raise ValueError(f'the image is empty: {list(pixels.shape)}')
  return pixels


def detect(pixels, score_threshold: float = SCORE_THRESHOLD, min_face: float = MIN_FACE,
           max_side: int = MAX_SIDE, turns: tuple[int, ...] = TURNS) -> list[Face]:
  """Every face in the photo, in reading order (top to bottom, then left to right).

  score_threshold: the least confidence kept; lower finds more small, turned or blurred faces
    and more false ones.
  min_face: the least box side kept, in photo pixels.
  max_side: the photo is shrunk (never enlarged) to this long side for detection; the faces
    come back in the photo's own pixels. At 1280 the smallest found are about 1.4% of the
    long side (a 56 px UTKFace-framed face in a 4000 px photo).
  turns: the photo is also searched turned by these degrees counter-clockwise (ALL_TURNS),
    each a full detection; where two turns find one face the higher score wins.
  """
  pixels = check_pixels(pixels)
  if not 0 <= score_threshold <= 1:
    raise ValueError(f'score_threshold must be within [0, 1], got {score_threshold}')
  if min_face < 0 or max_side < 32:
    raise ValueError(f'min_face must be >= 0 and max_side >= 32, got {min_face} and {max_side}')
  if not turns or not set(turns) <= set(ALL_TURNS):
    raise ValueError(f'turns must be some of {", ".join(map(str, ALL_TURNS))}, got {turns}')
  cv2 = _cv2()
  height, width = pixels.shape[:2]
  scale = min(1.0, max_side / max(height, width))
  small = np.ascontiguousarray(pixels)
  if scale < 1:
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = cv2.resize(small, size, interpolation=cv2.INTER_AREA)
  bgr = cv2.cvtColor(small, cv2.COLOR_RGB2BGR)
  rotations = {90: cv2.ROTATE_90_COUNTERCLOCKWISE, 180: cv2.ROTATE_180,
               270: cv2.ROTATE_90_CLOCKWISE}
  detector = _detector(os.getpid(), threading.get_ident())
  detector.setScoreThreshold(score_threshold)
  rows = []
  for turn in dict.fromkeys(turns):
    if turn % 90:
      turned, untilt = _tilted(bgr, turn)
    else:
      turned, untilt = (cv2.rotate(bgr, rotations[turn]) if turn else bgr), None
    detector.setInputSize((turned.shape[1], turned.shape[0]))
    _, found = detector.detect(turned)
    least = min(1.0, score_threshold + TURNED_MARGIN) if turn else score_threshold
    for row in np.reshape(found, (-1, 15)) if found is not None else ():
      # Said to come back NaN on blank images: no face there.
      if np.all(np.isfinite(row)) and row[14] >= least:
        rows.append(_untilt(row, untilt) if turn % 90 else
                    _unturn(row, turn, bgr.shape[1], bgr.shape[0]))
  # Shrinking maps pixel centres x to (x + 0.5) * size / width - 0.5, per axis.
  back = np.array([width / bgr.shape[1], height / bgr.shape[0]])
  faces = []
  for row in _suppress(rows) if len(turns) > 1 else rows:
    box = np.concatenate([(row[0:2] + 0.5) * back - 0.5, row[2:4] * back])
    points = (row[4:14].reshape(5, 2) + 0.5) * back - 0.5
    face = Face(tuple(float(v) for v in box), tuple((float(x), float(y)) for x, y in points),
                float(row[14]))
    if face.side >= min_face:
      faces.append(face)
  return sorted(faces, key=lambda face: (face.box[1], face.box[0]))


def _unturn(row: np.ndarray, turn: int, width: int, height: int) -> np.ndarray:
  """A detection row (box, 5 landmarks, score) found in the image turned `turn` degrees
  counter-clockwise, in the unturned width x height image's pixels (centres on integers)."""
  if not turn:
    return row
  points = np.vstack([row[0:2], row[0:2] + row[2:4], row[4:14].reshape(5, 2)])
  x, y = points[:, 0], points[:, 1]
  if turn == 90:
    points = np.stack([width - 1 - y, x], axis=1)
  elif turn == 180:
    points = np.stack([width - 1 - x, height - 1 - y], axis=1)
  else:
    points = np.stack([y, height - 1 - x], axis=1)
  corners = points[:2]
  low, high = corners.min(axis=0), corners.max(axis=0)
  return np.concatenate([low, high - low, points[2:].ravel(), row[14:15]])


def _tilted(image: np.ndarray, turn: int) -> tuple[np.ndarray, np.ndarray]:
  """The image turned `turn` degrees counter-clockwise on a square canvas that holds all of it
  (edges repeated past it), and the 2x3 matrix from the canvas's pixels back to the image's."""
  cv2 = _cv2()
  height, width = image.shape[:2]
  side = int(np.ceil((width + height) / np.sqrt(2) * TILTED_SCALE))  # Enough for any turn.
  matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), turn, TILTED_SCALE)
  matrix[:, 2] += (side - width) / 2, (side - height) / 2
  turned = cv2.warpAffine(image, matrix, (side, side), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)
  return turned, cv2.invertAffineTransform(matrix)


def _untilt(row: np.ndarray, back: np.ndarray) -> np.ndarray:
  """A detection row found on a _tilted canvas, in the image's pixels: the landmarks exactly,
  the box upright about its centre mapped back, its size scaled back (the face is upright in
  neither)."""
  points = np.vstack([row[0:2] + row[2:4] / 2, row[4:14].reshape(5, 2)]) @ back[:, :2].T + (
      back[:, 2])
  size = row[2:4] * np.hypot(*back[:, 0])
  return np.concatenate([points[0] - size / 2, size, points[1:].ravel(), row[14:15]])


def _suppress(rows: list[np.ndarray]) -> list[np.ndarray]:
  """Of rows found in several turns, the highest score's where boxes overlap by more than
  NMS_THRESHOLD (IoU) or one lies mostly (CONTAINED) inside the other: a face turned sideways
  shows YuNet face-like parts inside it (a nose and mouth, say) that are no face."""
  kept = []
  for row in sorted(rows, key=lambda row: -row[14]):
    if all(not _overlaps(row[:4], other[:4]) for other in kept):
      kept.append(row)
  return kept


def _overlaps(a: np.ndarray, b: np.ndarray) -> bool:
  width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
  height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
  overlap = max(0.0, width) * max(0.0, height)
  areas = a[2] * a[3], b[2] * b[3]
  return (overlap > NMS_THRESHOLD * (sum(areas) - overlap) or
          overlap > CONTAINED * max(1e-9, min(areas)))


def subject(faces: list[Face], similar_size: float = SIMILAR_SIZE) -> Face:
  """The face a labelled photo is about: the largest, unless another comes close.

  Raises ValueError when there is no face, or when a second face's side is at least
  `similar_size` of the largest's (whose labels would those be?).
  """
  if not faces:
    raise ValueError('no face found')
  ranked = sorted(faces, key=lambda face: face.side, reverse=True)
  if len(ranked) > 1 and ranked[1].side >= similar_size * ranked[0].side:
    raise ValueError(f'{len(faces)} faces, two of similar size ({ranked[0].side:.0f} and '
                     f'{ranked[1].side:.0f} px): which one the labels describe is unclear')
  return ranked[0]


def landmarks_of(face_or_landmarks) -> np.ndarray:
  """A Face's landmarks, or landmarks given directly, as a float [N, 2] array (N >= 2)."""
  points = face_or_landmarks.landmarks if isinstance(face_or_landmarks, Face) else face_or_landmarks
  points = np.asarray(points, dtype=np.float64)
  if points.ndim != 2 or points.shape[1] != 2 or len(points) < 2:
    raise ValueError(f'expected landmarks as (x, y) pairs, eyes first, got shape '
                     f'{list(points.shape)}')
  if not np.all(np.isfinite(points[:2])):
    raise ValueError(f'the eye landmarks must be finite, got {points[:2].tolist()}')
  return points
