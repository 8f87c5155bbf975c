"""Where YuNet puts the eyes in real UTKFace crops: agegender.faces' alignment targets, and checks.

  python benchmarks/face_crop_calibration.py --source=../shared/data/UTKFace.tar [--json out.json]
      [--passes=align,scenes,large] [--every=2] [--examples=/tmp/aligned.png]

calibrate (always): each UTKFace crop IS the framing the model learned, so the eyes YuNet finds
  in them are where align() must put a photo's eyes: EYE_RIGHT, EYE_LEFT in faces/align.py are
  the medians over training-split crops (content-hash split), every --every-th, each set in an
  edge-replicated margin of half its side (a face in a photo has surroundings), one face each.
align: each crop aligned by its own eyes: their error by construction, re-detected, and how far
  the aligned crop is from the original (mean absolute pixel difference, IoU, scale, rotation).
scenes: 21 training-split faces pasted into 5 generated 640x480 scenes, some turned 15-90
  degrees, some 24-64 px: found and false faces, eye errors detected and refined, at each score
  threshold; false faces in 100 faceless scenes and in 16 faceless scikit-image photos.
large: 6 faces (40-400 px) in a 4000x3000 scene, detected at each max_side: found and seconds.
UTKFace is for non-commercial research only.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import time

import cv2
import numpy as np
from absl import app
from absl import flags
from PIL import Image
from skimage import data as skimage_data

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # pylint: disable=g-import-not-at-top,wrong-import-position
from scenes import background  # pylint: disable=wrong-import-position

from agegender import faces  # pylint: disable=wrong-import-position

flags.DEFINE_string('source', '../shared/data/UTKFace.tar', 'UTKFace as a .tar (or .tar.gz).')
flags.DEFINE_integer('every', 2, 'Measure every n-th training crop (the archive is sorted by '
                     'age, so a share taken this way spans every age).')
flags.DEFINE_list('passes', ['align', 'scenes', 'large'], 'What to run after calibrate.')
flags.DEFINE_integer('redetect', 1000, 'align: re-detect on this many aligned crops.')
flags.DEFINE_string('examples', None, 'align: write 4 crops and their aligned crops here (PNG).')
flags.DEFINE_integer('seed', 0, 'scenes and large: the seed of placements and backgrounds.')
flags.DEFINE_string('json', None, 'Also write the figures here as JSON.')
FLAGS = flags.FLAGS
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
# scenes: (side px, rotation degrees counter-clockwise) of the 21 pasted faces.
SCENE_FACES = ((96, 0), (128, 0), (160, 0), (200, 0), (112, 0), (128, 15), (144, -20), (120, 30),
               (160, -35), (128, 45), (140, -50), (150, 60), (128, -75), (160, 90), (136, -90),
               (24, 0), (32, 0), (40, 0), (48, 0), (56, 0), (64, 20))
EMPTY_SCENES = 100
# scikit-image's sample photos (its `test` extra, no download): with one face, and without.
FACE_PHOTOS = ('astronaut', 'camera')
FACELESS_PHOTOS = ('coffee', 'chelsea', 'rocket', 'immunohistochemistry', 'hubble_deep_field',
                   'retina', 'logo', 'colorwheel', 'coins', 'page', 'text', 'moon', 'brick',
                   'grass', 'gravel', 'clock')
LARGE_SIDES = (40, 56, 80, 120, 200, 400)
NOTE = 'UTKFace: non-commercial research use only'
MAX_SIDES = (640, 960, 1280, 1920, 2560, 4000)


def split_of(content: bytes) -> str:
  """The content-hash split, as agegender.convert's hash_position and split_of compute it
  (copied: that module is moving; the first 8 bytes of sha256, big-endian, against the ranges)."""
  position = int.from_bytes(hashlib.sha256(content).digest()[:8], 'big')
  start, total = 0, 0.0
  for name, fraction in zip(('train', 'validation', 'test'), (0.8, 0.1, 0.1), strict=True):
    total += fraction
    end = 2**64 if name == 'test' else round(total * 2**64)
    if start <= position < end:
      return name
    start = end
  raise AssertionError(f'position {position} outside every split')


def training_crops(source: str, every: int):
  """(name, uint8 RGB pixels) of every `every`-th training-split image, in archive order."""
  index = 0
  with tarfile.open(source) as archive:
    for member in (m for m in archive if m.isfile() and m.name.lower().endswith('.jpg')):
      data = archive.extractfile(member).read()
      if split_of(data) == 'train':
        if index % every == 0:
          yield member.name, np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
        index += 1


def detect_in_margin(pixels: np.ndarray):
  """YuNet's faces on the crop set in an edge-replicated margin, in the crop's coordinates;
  upright only (turns=(0,)): UTKFace's crops are upright, and it takes a third of the time."""
  margin = max(pixels.shape[:2]) // 2
  padded = np.pad(pixels, ((margin, margin), (margin, margin), (0, 0)), mode='edge')
  return [faces.Face((f.box[0] - margin, f.box[1] - margin) + f.box[2:],
                     tuple((x - margin, y - margin) for x, y in f.landmarks), f.score)
          for f in faces.detect(padded, turns=(0,))]


def quartiles(values: np.ndarray) -> list[float]:
  return [round(float(v), 2) for v in np.percentile(values, [25, 50, 75], axis=0).ravel()]


def calibrate(figures: dict) -> list[tuple[np.ndarray, faces.Face]]:
  """Eye medians over the training crops; returns the (crop, face) pairs with one face."""
  started, measured, ratios, total = time.time(), [], [], 0
  for _, pixels in training_crops(FLAGS.source, FLAGS.every):
    found, total = detect_in_margin(pixels), total + 1
    if len(found) == 1:
      measured.append((pixels, found[0]))
    elif found:  # What subject() would make of it: the second face's side over the largest's.
      ratios.append(sorted((f.side for f in found), reverse=True)[1] / max(f.side for f in found))
  eyes = np.array([face.landmarks[:2] for _, face in measured])  # [N, 2 eyes, (x, y)]
  row = figures['calibrate'] = {
      'crops': total, 'one_face': len(measured), 'several_faces': len(ratios),
      'several_rejected_by_subject': int(np.sum(np.array(ratios) >= faces.SIMILAR_SIZE)),
      'seconds': round(time.time() - started, 1),
      'eye_right_q1_median_q3': quartiles(eyes[:, 0]),
      'eye_left_q1_median_q3': quartiles(eyes[:, 1])}
  print(f'calibrate: {total} training crops (every {FLAGS.every}): one face in {len(measured)} '
        f'({len(measured) / total:.1%}), several in {len(ratios)} (subject() rejects '
        f'{row["several_rejected_by_subject"]}), none in {total - len(measured) - len(ratios)}; '
        f'{row["seconds"]} s')
  for name, column in (('EYE_RIGHT', 0), ('EYE_LEFT', 1)):
    low, mid, high = np.percentile(eyes[:, column], [25, 50, 75], axis=0)
    print(f'  {name} median ({mid[0]:.1f}, {mid[1]:.1f}), quartiles x {low[0]:.1f}-{high[0]:.1f} '
          f'y {low[1]:.1f}-{high[1]:.1f} (align.py has {getattr(faces, name)})')
  return measured


def square_iou(corners: np.ndarray, side: float) -> float:
  """IoU of a convex quadrilateral with the square [0, side]^2."""
  square = np.array([[0, 0], [side, 0], [side, side], [0, side]], np.float32)
  overlap, _ = cv2.intersectConvexConvex(corners.astype(np.float32), square)
  area = cv2.contourArea(corners.astype(np.float32))
  return overlap / (area + side * side - overlap)


def check_alignment(measured: list, figures: dict) -> None:
  started, targets = time.time(), np.array([faces.EYE_RIGHT, faces.EYE_LEFT])
  rows, redetected = [], []
  step = max(1, len(measured) // FLAGS.redetect)
  for index, (pixels, face) in enumerate(measured):
    matrix, aligned = faces.similarity(face), faces.align(pixels, face)
    eyes = np.array(face.landmarks[:2]) @ matrix[:, :2].T + matrix[:, 2]
    rows.append((np.abs(eyes - targets).mean(), np.abs(aligned.astype(np.int16) - pixels).mean(),
                 # The crop against itself moved 2 px: a scale for the difference before it.
                 np.abs(pixels[:, 2:].astype(np.int16) - pixels[:, :-2]).mean(),
                 square_iou(faces.crop_corners(face), faces.CROP_SIZE), 1 / np.hypot(*matrix[:, 0]),
                 abs(np.degrees(np.arctan2(matrix[1, 0], matrix[0, 0])))))
    if index % step == 0 and len(again := detect_in_margin(aligned)) == 1:
      redetected.append(np.abs(np.array(again[0].landmarks[:2]) - targets).mean(axis=0))
  rows, redetected = np.array(rows), np.array(redetected)
  row = figures['align'] = {
      'crops': len(measured), 'seconds': round(time.time() - started, 1),
      'eye_error_by_construction_px': float(rows[:, 0].mean()), 'redetected': len(redetected),
      'redetected_eye_mean_abs_error_xy_px': [round(float(v), 2) for v in redetected.mean(axis=0)],
      'mean_abs_pixel_difference': round(float(rows[:, 1].mean()), 2),
      'same_crop_shifted_2px_difference': round(float(rows[:, 2].mean()), 2),
      'crop_square_iou_q1_median_q3': quartiles(rows[:, 3]),
      'scale_q1_median_q3': quartiles(rows[:, 4]),
      'abs_rotation_degrees_q1_median_q3': quartiles(rows[:, 5])}
  print(f'align: {len(measured)} crops aligned by their own eyes; {row["seconds"]} s')
  for name, value in list(row.items())[2:]:
    print(f'  {name}: {value}')
  if FLAGS.examples:  # Two typical rotations (the median's and the third's), the two largest.
    pairs = [measured[i] for i in np.argsort(rows[:, 5])[[len(rows) // 2, len(rows) // 3, -2, -1]]]
    sheet = np.vstack([np.hstack([pixels, faces.align(pixels, face)]) for pixels, face in pairs])
    for row in range(len(pairs)):
      for x, y in targets:
        cv2.circle(sheet, (200 + round(x), 200 * row + round(y)), 2, (255, 0, 0), -1)
    Image.fromarray(sheet).save(FLAGS.examples)
    print(f'  examples (original | aligned, targets in red): {FLAGS.examples}')


def paste(scene: np.ndarray, crop: np.ndarray, face: faces.Face, side: int, angle: float,
          centre: tuple[float, float]) -> np.ndarray:
  """Pastes the crop at `side` px, turned `angle` degrees, centred at `centre`; its eyes there."""
  small = cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA)
  matrix = cv2.getRotationMatrix2D((side / 2, side / 2), angle, 1.0)
  matrix[:, 2] += np.array(centre) - side / 2
  size = (scene.shape[1], scene.shape[0])
  warped = cv2.warpAffine(small, matrix, size, flags=cv2.INTER_LINEAR)
  mask = cv2.warpAffine(np.ones((side, side), np.float32), matrix, size, flags=cv2.INTER_LINEAR)
  scene[:] = (scene * (1 - mask[..., None]) + warped * mask[..., None]).round().astype(np.uint8)
  eyes = np.array(face.landmarks[:2]) * side / crop.shape[1]
  return eyes @ matrix[:, :2].T + matrix[:, 2]


def place(rng, scene_size, faces_here) -> list[tuple[float, float]] | None:
  """Centres where the faces' turned squares do not overlap, or None when they did not fit."""
  width, height = scene_size
  placed = []
  for side, angle in faces_here:
    reach = side * (abs(np.cos(np.radians(angle))) + abs(np.sin(np.radians(angle)))) / 2 + 4
    for _ in range(200):
      centre = rng.uniform(reach, width - reach), rng.uniform(reach, height - reach)
      if all(max(abs(centre[0] - x), abs(centre[1] - y)) > reach + r for x, y, r in placed):
        placed.append((*centre, reach))
        break
    else:
      return None
  return [(x, y) for x, y, _ in placed]


def as_photo(scene: np.ndarray) -> np.ndarray:
  """Saved as a JPEG and decoded, as a photo reaches the detector."""
  Image.fromarray(scene).save(buffer := io.BytesIO(), format='JPEG', quality=90)
  return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert('RGB'))


def eye_error(face: faces.Face, eyes: np.ndarray) -> float:
  """The mean distance of the face's eyes from the true ones, in true eye distances."""
  return float(np.hypot(*(np.array(face.landmarks[:2]) - eyes).T).mean() /
               np.hypot(*(eyes[1] - eyes[0])))


def score(found: list[faces.Face], truths: list[np.ndarray]) -> tuple[dict, int]:
  """({truth index: its face}, false faces): found when both eyes lie within half the eye
  distance of the pasted face's eyes, in the right order."""
  matched = {}
  for index, eyes in enumerate(truths):
    tolerance = 0.5 * np.hypot(*(eyes[1] - eyes[0]))
    hits = [face for face in found if face not in matched.values() and
            np.all(np.hypot(*(np.array(face.landmarks[:2]) - eyes).T) < tolerance)]
    if hits:
      matched[index] = hits[0]
  return matched, len(found) - len(matched)


def scenes(measured: list, figures: dict) -> None:
  """Detects once at the lowest threshold and keeps each threshold's faces: YuNet's suppression,
  and detect()'s across turns, go from high scores to low, so this equals detecting at each."""
  rng = np.random.default_rng(FLAGS.seed)
  picks = rng.choice(len(measured), len(SCENE_FACES), replace=False)
  lowest, photos, started = min(THRESHOLDS), [], time.time()
  for group in np.array_split(rng.permutation(len(SCENE_FACES)), 5):
    centres = None
    while centres is None:
      scene = background(rng, 640, 480)
      centres = place(rng, (640, 480), [SCENE_FACES[i] for i in group])
    truths = [paste(scene, *measured[picks[i]], *SCENE_FACES[i], centre)
              for i, centre in zip(group, centres, strict=True)]
    photo = as_photo(scene)
    photos.append((photo, faces.detect(photo, score_threshold=lowest), group, truths))
  milliseconds = (time.time() - started) / len(photos) * 1000
  empty = [faces.detect(as_photo(background(rng, 640, 480)), score_threshold=lowest)
           for _ in range(EMPTY_SCENES)]
  samples = {name: faces.detect(photo_of(name), score_threshold=lowest)
             for name in (*FACE_PHOTOS, *FACELESS_PHOTOS)}
  rows = figures['scenes'] = {'ms_per_scene': round(milliseconds, 1)}
  for threshold in sorted({*THRESHOLDS, faces.SCORE_THRESHOLD}):
    def keep(found, threshold=threshold):
      return [face for face in found if face.score >= threshold]
    found, false, errors = set(), 0, []
    for photo, detected, group, truths in photos:
      matched, wrong = score(keep(detected), truths)
      found, false = found | {int(group[i]) for i in matched}, false + wrong
      errors += [(eye_error(face, truths[i]), eye_error(faces.refine(photo, face), truths[i]))
                 for i, face in matched.items()] if threshold == faces.SCORE_THRESHOLD else []
    row = rows[str(threshold)] = {
        'found': len(found), 'false': false,
        'missed': [SCENE_FACES[i] for i in range(len(SCENE_FACES)) if i not in found],
        'false_in_empty_scenes': sum(len(keep(detected)) for detected in empty),
        'face_photos_found_alone': sum(len(keep(samples[name])) == 1 for name in FACE_PHOTOS),
        'false_in_faceless_photos': sum(len(keep(samples[name])) for name in FACELESS_PHOTOS)}
    print(f'scenes at {threshold}: found {len(found)} of {len(SCENE_FACES)}, {false} false '
          f'(missed, as (side, degrees): {row["missed"]}); {row["false_in_empty_scenes"]} false in '
          f'{EMPTY_SCENES} empty scenes; scikit-image photos: {row["face_photos_found_alone"]} of '
          f'{len(FACE_PHOTOS)} faces found alone, {row["false_in_faceless_photos"]} false in '
          f'{len(FACELESS_PHOTOS)} without faces')
    if errors:
      row['eye_error_detected_refined'] = np.mean(errors, axis=0).round(3).tolist()
      print(f'  eye error of the found faces, in eye distances: {row["eye_error_detected_refined"]}'
            ' detected, refined')
  print(f'scenes: {milliseconds:.0f} ms a 640x480 scene')


def photo_of(name: str) -> np.ndarray:
  """A scikit-image sample photo as uint8 RGB."""
  pixels = np.asarray(getattr(skimage_data, name)())
  return np.ascontiguousarray(np.dstack([pixels] * 3 if pixels.ndim == 2 else [pixels[..., :3]]))


def large(measured: list, figures: dict) -> None:
  rng = np.random.default_rng(FLAGS.seed + 1)
  small = background(rng, 800, 600)
  centres = place(rng, (4000, 3000), [(side, 0) for side in LARGE_SIDES])  # Room to spare.
  scene = cv2.resize(small, (4000, 3000), interpolation=cv2.INTER_CUBIC)
  picks = rng.choice(len(measured), len(LARGE_SIDES), replace=False)
  truths = [paste(scene, *measured[p], side, 0, centre)
            for p, side, centre in zip(picks, LARGE_SIDES, centres, strict=True)]
  photo, rows = as_photo(scene), figures.setdefault('large', {})
  for max_side in MAX_SIDES:
    started = time.time()
    matched, false = score(faces.detect(photo, max_side=max_side), truths)
    row = rows[str(max_side)] = {'found_sides': [LARGE_SIDES[i] for i in sorted(matched)],
                                 'false': false, 'seconds': round(time.time() - started, 2)}
    print(f'large: 4000x3000 at max_side {max_side}: found the faces of side '
          f'{row["found_sides"]} of {list(LARGE_SIDES)}, {false} false, {row["seconds"]} s')


def main(argv):
  del argv
  started = time.time()
  figures = {'source': os.path.basename(FLAGS.source), 'every': FLAGS.every,
             'machine': machine.describe_cpu(), 'opencv': cv2.__version__,
             'score_threshold': faces.SCORE_THRESHOLD, 'note': NOTE}
  print(f'{figures["machine"]}, OpenCV {cv2.__version__}, threshold {faces.SCORE_THRESHOLD}')
  measured = calibrate(figures)
  for name, run in (('align', check_alignment), ('scenes', scenes), ('large', large)):
    if name in FLAGS.passes:
      run(measured, figures)
  figures['seconds'] = round(time.time() - started, 1)
  print(f'{figures["seconds"]} s in all on {figures["machine"]}')
  print(NOTE)
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(figures, f, indent=2)
  return 0


if __name__ == '__main__':
  app.run(main)
