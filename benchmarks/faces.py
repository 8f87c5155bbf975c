"""Finding and recropping faces in photos, measured on UTKFace test crops pasted into scenes.

  python benchmarks/faces.py --records_dir=/work/records_utk --model_dir=RUN [--json out.json]

Takes --faces crops of the records' test split (their source JPEG bytes and
labels, as make_records stored them; the split follows from each image's
content hash, so neither the model nor the calibration saw them) and pastes
them, 1 to 3 a scene at random places and sides (--min_side..--max_side), into
generated 640x480 scenes (blurred noise, gradients, stripes, checks), saved as
JPEG and decoded as predict decodes a photo; seeded, so every run makes the
same scenes. Then agegender.faces finds and recrops the faces.

A pasted face is found when the crop that faces.utkface_crop makes of a
detection overlaps the pasted square with IoU >= 0.5 (the best such
detection); other detections are false. On the found faces the model's
predictions on the recrops are compared with its predictions on the original
crops (decoded as the pipeline does): age MAE against the true ages for both,
the mean absolute difference of the two predictions, and how often the
gender agrees. Rows: the calibrated crop, and for comparison the detector's
box taken as the crop (no calibration). Targets: >= 95% found; recropped age
MAE within 1 year of the original crops'. UTKFace is for non-commercial
research only.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time

import numpy as np
import tensorflow as tf
from absl import app
from absl import flags
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # pylint: disable=g-import-not-at-top,wrong-import-position

from agegender import contract  # pylint: disable=wrong-import-position
from agegender.serving import export  # pylint: disable=wrong-import-position
from agegender import faces  # pylint: disable=wrong-import-position
from agegender.data import preprocess  # pylint: disable=wrong-import-position

flags.DEFINE_string('records_dir', 'records', 'Records written by agegender.make_records from '
                    'UTKFace, with source JPEG bytes.')
flags.DEFINE_string('model_dir', None, 'The run whose model.keras predicts.', required=True)
flags.DEFINE_integer('faces', 1000, 'Test-split crops to paste.')
flags.DEFINE_integer('min_side', 80, 'Smallest side of a pasted crop, in scene pixels.')
flags.DEFINE_integer('max_side', 320, 'Largest side of a pasted crop.')
flags.DEFINE_integer('seed', 0, 'Seed of the scenes and placements.')
flags.DEFINE_integer('min_neighbors', faces.MIN_NEIGHBORS, 'The detector\'s overlapping hits '
                     'to keep a box (agegender.faces.detect).')
flags.DEFINE_string('json', None, 'Also write the figures here as JSON.')
FLAGS = flags.FLAGS
WIDTH, HEIGHT = 640, 480
MATCH_IOU = 0.5


def test_crops(records_dir: str, count: int):
  """(encoded JPEG, age, gender) of the first `count` records of the test split."""
  manifest = contract.read_manifest(records_dir)
  spec = contract.feature_spec()
  dataset = tf.data.TFRecordDataset(contract.split_shards(manifest, 'test')).take(count)
  for serialized in dataset:
    example = tf.io.parse_single_example(serialized, spec)
    yield (example[contract.IMAGE].numpy(), int(example[contract.AGE]),
           int(example[contract.GENDER]))


def background(rng: np.random.Generator) -> np.ndarray:
  """A 640x480 scene without faces: blurred noise, a gradient, stripes or checks."""
  kind = rng.integers(4)
  y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
  colour_a, colour_b = rng.uniform(0, 255, (2, 3))
  if kind == 0:
    small = rng.uniform(0, 255, (HEIGHT // 16, WIDTH // 16, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((WIDTH, HEIGHT), Image.BICUBIC))
  if kind == 1:
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * x + np.sin(angle) * y)
    t = (t - t.min()) / (t.max() - t.min())
  elif kind == 2:
    period, angle = rng.uniform(8, 60), rng.uniform(0, np.pi)
    t = 0.5 + 0.5 * np.sin((np.cos(angle) * x + np.sin(angle) * y) * 2 * np.pi / period)
  else:
    cell = rng.integers(10, 60)
    t = ((x // cell + y // cell) % 2).astype(np.float32)
  pixels = colour_a + t[..., None] * (colour_b - colour_a)
  pixels += rng.normal(0, 6, pixels.shape)
  return np.clip(pixels, 0, 255).astype(np.uint8)


def iou(a: faces.Box, b: faces.Box) -> float:
  width = min(a.left + a.width, b.left + b.width) - max(a.left, b.left)
  height = min(a.top + a.height, b.top + b.height) - max(a.top, b.top)
  overlap = max(0, width) * max(0, height)
  return overlap / (a.width * a.height + b.width * b.height - overlap)


def place(rng: np.random.Generator, count: int) -> list[faces.Box]:
  """Up to `count` squares inside the scene that do not overlap."""
  placed = []
  for _ in range(count * 20):
    if len(placed) == count:
      break
    side = int(rng.integers(FLAGS.min_side, FLAGS.max_side + 1))
    box = faces.Box(int(rng.integers(0, WIDTH - side + 1)), int(rng.integers(0, HEIGHT - side + 1)),
                    side, side)
    if all(iou(box, other) == 0 for other in placed):
      placed.append(box)
  return placed


def scenes(crops, rng: np.random.Generator):
  """(decoded scene pixels, [(pasted square, crop index)]) until the crops run out."""
  crops = list(crops)
  index = 0
  while index < len(crops):
    scene = Image.fromarray(background(rng))
    pasted = []
    for square in place(rng, int(rng.integers(1, 4))):
      if index == len(crops):
        break
      face = Image.open(io.BytesIO(crops[index])).convert('RGB')
      scene.paste(face.resize((square.width, square.height), Image.BILINEAR),
                  (square.left, square.top))
      pasted.append((square, index))
      index += 1
    buffer = io.BytesIO()
    scene.save(buffer, format='JPEG', quality=90)
    # Decoded as predict decodes a photo.
    yield tf.io.decode_image(buffer.getvalue(), channels=3).numpy(), pasted


def predict(model, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  outputs = model.predict_on_batch(np.stack(images))
  return (np.reshape(outputs[contract.AGE_OUTPUT], -1),
          np.reshape(outputs[contract.GENDER_OUTPUT], -1) >= 0.5)


def found_by_side(sides: dict[int, int], found: set[int]) -> dict[str, float]:
  """The share found among the faces pasted at each quarter of the side range."""
  edges = np.linspace(FLAGS.min_side, FLAGS.max_side + 1, 5).round().astype(int)
  shares = {}
  for low, high in zip(edges[:-1], edges[1:], strict=True):
    pasted = [index for index, side in sides.items() if low <= side < high]
    shares[f'{low}-{high - 1}'] = sum(index in found for index in pasted) / max(1, len(pasted))
  return shares


def main(argv):
  del argv
  started = time.time()
  model = export.load_keras_model(FLAGS.model_dir)
  size = export.image_size_of(model)
  records = list(test_crops(FLAGS.records_dir, FLAGS.faces))
  rng = np.random.default_rng(FLAGS.seed)
  variants = {'calibrated': {}, 'box as crop': {'scale': 1.0, 'shift_x': 0.0, 'shift_y': 0.0}}
  found = {name: [] for name in variants}  # (crop index, recrop pixels at the model's size)
  false_detections = {name: 0 for name in variants}
  matched_iou = {name: [] for name in variants}
  sides = {}  # Pasted side of each crop index.
  scene_count = 0
  for pixels, pasted in scenes((jpeg for jpeg, _, _ in records), rng):
    scene_count += 1
    boxes = faces.detect(pixels, min_neighbors=FLAGS.min_neighbors)
    for name, calibration in variants.items():
      crops = [faces.utkface_crop(box, (WIDTH, HEIGHT), **calibration) for box in boxes]
      used = set()
      for square, index in pasted:
        sides[index] = square.width
        overlaps = [(iou(crop, square), i) for i, crop in enumerate(crops) if i not in used]
        best, best_index = max(overlaps, default=(0.0, -1))
        if best >= MATCH_IOU:
          used.add(best_index)
          matched_iou[name].append(best)
          recrop = faces.crop_pixels(pixels, crops[best_index])
          found[name].append((index, preprocess.resize_pixels(recrop, size).numpy()))
      false_detections[name] += len(crops) - len(used)
  originals = [preprocess.preprocess_encoded_image(jpeg, size).numpy() for jpeg, _, _ in records]
  ages = np.array([age for _, age, _ in records])
  genders = np.array([gender == 1 for _, _, gender in records])
  rows = {}
  for name in variants:
    indices = np.array([index for index, _ in found[name]], dtype=int)
    original_age, original_gender = predict(model, [originals[i] for i in indices])
    recrop_age, recrop_gender = predict(model, [image for _, image in found[name]])
    original_mae = float(np.mean(np.abs(original_age - ages[indices])))
    recrop_mae = float(np.mean(np.abs(recrop_age - ages[indices])))
    rows[name] = {
        'found': len(indices), 'found_share': len(indices) / len(records),
        'false_detections_per_scene': false_detections[name] / scene_count,
        'mean_iou': float(np.mean(matched_iou[name])),
        'original_age_mae': original_mae, 'recrop_age_mae': recrop_mae,
        'age_mae_difference': recrop_mae - original_mae,
        'mean_abs_age_difference': float(np.mean(np.abs(recrop_age - original_age))),
        'gender_agreement': float(np.mean(recrop_gender == original_gender)),
        'original_gender_accuracy': float(np.mean(original_gender == genders[indices])),
        'recrop_gender_accuracy': float(np.mean(recrop_gender == genders[indices])),
        'found_share_by_side': found_by_side(sides, set(indices.tolist())),
    }
  figures = {'model': os.path.abspath(export.keras_model_path(FLAGS.model_dir)),
             'image_size': size, 'faces': len(records), 'scenes': scene_count,
             'scene_size': [WIDTH, HEIGHT], 'sides': [FLAGS.min_side, FLAGS.max_side],
             'seed': FLAGS.seed, 'match_iou': MATCH_IOU,
             'detector': {'scale_factor': faces.SCALE_FACTOR, 'min_neighbors': FLAGS.min_neighbors},
             'calibration': {'scale': faces.CROP_SCALE, 'shift_x': faces.CROP_SHIFT_X,
                             'shift_y': faces.CROP_SHIFT_Y},
             'machine': machine.describe_cpu(), 'seconds': round(time.time() - started, 1),
             'rows': rows, 'note': 'UTKFace test-split crops: non-commercial research use only'}
  print(f'{len(records)} UTKFace test-split crops in {scene_count} scenes of {WIDTH}x{HEIGHT} '
        f'(sides {FLAGS.min_side}-{FLAGS.max_side}, seed {FLAGS.seed}, min_neighbors '
        f'{FLAGS.min_neighbors}); model {figures["model"]} '
        f'({size}x{size}); {figures["machine"]}, {figures["seconds"]} s')
  print(f'{"crop":12}{"found":>8}{"false/scene":>12}{"IoU":>6}{"MAE orig":>9}{"MAE recrop":>11}'
        f'{"|diff|":>8}{"gender agree":>13}')
  for name, row in rows.items():
    print(f'{name:12}{100 * row["found_share"]:7.1f}%{row["false_detections_per_scene"]:12.3f}'
          f'{row["mean_iou"]:6.2f}{row["original_age_mae"]:9.2f}{row["recrop_age_mae"]:11.2f}'
          f'{row["mean_abs_age_difference"]:8.2f}{100 * row["gender_agreement"]:12.1f}%')
  print('found by pasted side: ' + ', '.join(
      f'{span} px {100 * share:.1f}%'
      for span, share in rows['calibrated']['found_share_by_side'].items()))
  print(f'(found: the recrop overlaps the pasted crop with IoU >= {MATCH_IOU}; MAE over the found '
        'faces; UTKFace: non-commercial research use only)')
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(figures, f, indent=2)
  return 0


if __name__ == '__main__':
  app.run(main)
