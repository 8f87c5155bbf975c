"""Age and gender for image files: face crops, or the faces found in whole photos.

  python -m agegender.predict --model_dir=runs/compact_cnn face.jpg photos/ [--json]
  python -m agegender.predict --model_dir=runs/compact_cnn --find_faces photo.jpg [--annotate=DIR]
  python -m agegender.predict --model_dir=runs/compact_cnn --tflite [--tflite_model=PATH] face.jpg

Takes files and folders (searched recursively for .jpg, .jpeg, .png, .bmp and
.gif) and prints one line per image: file, predicted age, gender, and the
model's probability of that gender, tab-separated; with --json, one JSON
object per line. A file that is not a readable image gets an error line
(stderr, or a JSON line with "error") and the others go on; the exit status is
non-zero only when no image could be predicted.

The model is the run's model.keras, loaded in Keras's safe mode, or with
--tflite its model.tflite (or --tflite_model) run by LiteRT; images go through
the pipeline's own preprocessing either way.

--find_faces: each file is a photo; agegender.faces finds the faces and crops
each as UTKFace's crops are framed, and each face gets a line: file, face box
(left,top,width,height in the photo's pixels), age, gender, probability; JSON
lines add "box" and "crop" (the square that was fed to the model, which may
reach past the photo's edges). A photo without a face gets an error line.
--annotate=DIR writes a PNG copy of each photo there (NAME.png, NAME-2.png for a
second photo of that name), with boxes and labels drawn.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterable, Iterator

from absl import flags
import numpy as np
import tensorflow as tf

from agegender import cli
from agegender import contract
from agegender import export
from agegender import labels as labels_lib
from agegender import preprocess

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')


def image_files(paths: Iterable[str]) -> Iterator[tuple[str, str | None]]:
  """(path, None) for each image to predict, or (path, reason) for a path that gives none."""
  for path in paths:
    if os.path.isdir(path):
      found = False
      for folder, subfolders, names in os.walk(path):
        subfolders.sort()
        for name in sorted(names):
          if name.lower().endswith(IMAGE_EXTENSIONS):
            found = True
            yield os.path.join(folder, name), None
      if not found:
        yield path, f'no image files ({", ".join(IMAGE_EXTENSIONS)}) in this folder'
    elif os.path.isfile(path):
      yield path, None
    else:
      yield path, 'no such file or folder'


def _load_image(path: str, image_size: int) -> tuple[np.ndarray | None, str | None]:
  try:
    with open(path, 'rb') as f:
      encoded = f.read()
    return preprocess.preprocess_encoded_image(encoded, image_size=image_size).numpy(), None
  except OSError as e:
    return None, e.strerror or str(e)
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
    return None, export.UNREADABLE


def prediction(path: str, age: float, female_probability: float) -> dict[str, Any]:
  gender = int(female_probability >= 0.5)
  return {'file': path, 'age': round(float(age), 1), 'gender': labels_lib.GENDERS[gender],
          'probability': round(float(female_probability if gender else 1 - female_probability), 4),
          'female_probability': round(float(female_probability), 4)}


def _predict_chunk(model, chunk: list[tuple[str, str | None]], image_size: int):
  loaded = [(path, *(_load_image(path, image_size) if reason is None else (None, reason)))
            for path, reason in chunk]
  images = [image for _, image, _ in loaded if image is not None]
  outputs = model.predict_on_batch(np.stack(images)) if images else {}
  ages = iter(np.reshape(outputs.get(contract.AGE_OUTPUT, []), -1))
  females = iter(np.reshape(outputs.get(contract.GENDER_OUTPUT, []), -1))
  for path, image, reason in loaded:
    if image is None:
      yield {'file': path, 'error': reason}
    else:
      yield prediction(path, next(ages), next(females))


def predict_paths(model, paths: Iterable[str], batch_size: int = 64) -> Iterator[dict[str, Any]]:
  """One result per image (or per unreadable path), in order: a prediction or {'file', 'error'}."""
  image_size = export.image_size_of(model)
  chunk = []
  for entry in image_files(paths):
    chunk.append(entry)
    if len(chunk) == batch_size:
      yield from _predict_chunk(model, chunk, image_size)
      chunk = []
  if chunk:
    yield from _predict_chunk(model, chunk, image_size)


def format_line(result: dict[str, Any]) -> str:
  box = '\t' + ','.join(str(value) for value in result['box']) if 'box' in result else ''
  return (f'{result["file"]}{box}\t{result["age"]:.1f}\t{result["gender"]}\t'
          f'{result["probability"]:.3f}')


# ---- Faces in whole photos. ----

NO_FACE = 'no face found'


def _load_pixels(path: str) -> tuple[np.ndarray | None, str | None]:
  try:
    with open(path, 'rb') as f:
      encoded = f.read()
    # As preprocess.preprocess_encoded_image decodes: the crops see the training decoder's pixels.
    return tf.io.decode_image(encoded, channels=3, expand_animations=False).numpy(), None
  except OSError as e:
    return None, e.strerror or str(e)
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
    return None, export.UNREADABLE


def predict_faces(model, pixels: np.ndarray, path: str = '',
                  min_neighbors: int | None = None) -> list[dict[str, Any]]:
  """One prediction per face found in a photo (uint8 RGB [H, W, 3]), each with its box and
  the UTKFace-framed crop box that the model saw, in reading order."""
  from agegender import faces  # pylint: disable=g-import-not-at-top
  found = faces.face_crops(pixels, min_neighbors=min_neighbors or faces.MIN_NEIGHBORS)
  if not found:
    return []
  size = export.image_size_of(model)
  # The crops through the same resize as every training image.
  images = np.stack([preprocess.resize_pixels(crop, size).numpy() for _, _, crop in found])
  outputs = model.predict_on_batch(images)
  ages = np.reshape(outputs[contract.AGE_OUTPUT], -1)
  females = np.reshape(outputs[contract.GENDER_OUTPUT], -1)
  return [{**prediction(path, age, female), 'box': box.to_json(), 'crop': crop.to_json()}
          for (box, crop, _), age, female in zip(found, ages, females, strict=True)]


def predict_photos(model, paths: Iterable[str], annotate_dir: str | None = None,
                   min_neighbors: int | None = None) -> Iterator[dict[str, Any]]:
  """Per photo, one result per face found, or one {'file', 'error'} (no face, unreadable)."""
  from agegender import faces  # pylint: disable=g-import-not-at-top
  written = set()
  for path, reason in image_files(paths):
    pixels, reason = _load_pixels(path) if reason is None else (None, reason)
    if pixels is None:
      yield {'file': path, 'error': reason}
      continue
    results = predict_faces(model, pixels, path, min_neighbors)
    if annotate_dir:
      labels = [(faces.Box(*r['box']), f'{r["age"]:.0f} {r["gender"]} {r["probability"]:.2f}')
                for r in results]
      stem = os.path.splitext(os.path.basename(path))[0]
      # Photos of one name in different folders get -2, -3...: none overwrites another.
      name, count = f'{stem}.png', 1
      while name in written:
        count += 1
        name = f'{stem}-{count}.png'
      written.add(name)
      faces.draw_boxes(pixels, labels).save(os.path.join(annotate_dir, name))
    yield from results or [{'file': path, 'error': NO_FACE}]


# ---- The command line. ----

def define_flags():
  flags.DEFINE_string('model_dir', None, 'The training run whose model.keras predicts.')
  flags.DEFINE_bool('json', False, 'Print one JSON object per line instead of text.')
  flags.DEFINE_integer('batch_size', 64, 'Images per prediction batch.')
  flags.DEFINE_bool('find_faces', False, 'Each file is a photo: find the faces, crop each as '
                    'UTKFace does, and print one line per face with its box.')
  flags.DEFINE_string('annotate', None, 'With --find_faces: write a copy of each photo to this '
                      'folder (as PNG) with the faces\' boxes and labels drawn.')
  flags.DEFINE_integer('min_neighbors', None, 'With --find_faces: overlapping detections a face '
                       'needs (default: agegender.faces.MIN_NEIGHBORS, 3); more gives fewer '
                       'false faces and misses more.')
  flags.DEFINE_bool('tflite', False, 'Run MODEL_DIR/model.tflite with LiteRT instead of '
                    'model.keras (write it with `python -m agegender.export --tflite`).')
  flags.DEFINE_string('tflite_model', None, 'A .tflite file to run (implies --tflite), e.g. '
                      'MODEL_DIR/model_fp16.tflite.')


def load_model(model_dir: str | None, tflite: bool, tflite_model: str | None):
  """model.keras, or a TFLite model behind the same two calls (agegender.lite.LiteModel)."""
  if tflite or tflite_model:
    from agegender import lite  # pylint: disable=g-import-not-at-top
    try:
      return lite.LiteModel(tflite_model or os.path.join(model_dir, lite.TFLITE_FILE))
    except (ImportError, ValueError) as e:
      raise cli.UsageError(str(e)) from None
  return export.load_keras_model(model_dir)


FLAGS = flags.FLAGS


def main(argv):
  paths = argv[1:]
  if not FLAGS.model_dir and not FLAGS.tflite_model:
    raise cli.UsageError('--model_dir is required (or --tflite_model)')
  if not paths:
    raise cli.UsageError('give at least one image file or folder')
  if FLAGS.batch_size <= 0:
    raise cli.UsageError(f'--batch_size must be positive, got {FLAGS.batch_size}')
  if FLAGS.min_neighbors is not None and FLAGS.min_neighbors < 1:
    raise cli.UsageError(f'--min_neighbors must be positive, got {FLAGS.min_neighbors}')
  if FLAGS.annotate and not FLAGS.find_faces:
    raise cli.UsageError('--annotate draws the faces that --find_faces finds; give both')
  if FLAGS.find_faces:
    try:
      from agegender import faces  # pylint: disable=g-import-not-at-top
      faces.detect(np.zeros([1, 1, 3], np.uint8))
    except ImportError as e:
      raise cli.UsageError(str(e)) from None
  if FLAGS.annotate:
    try:
      os.makedirs(FLAGS.annotate, exist_ok=True)
    except OSError as e:
      raise cli.UsageError(f'--annotate={FLAGS.annotate}: {e.strerror or e}') from None
  model = load_model(FLAGS.model_dir, FLAGS.tflite, FLAGS.tflite_model)
  results = (predict_photos(model, paths, FLAGS.annotate, FLAGS.min_neighbors) if FLAGS.find_faces
             else predict_paths(model, paths, FLAGS.batch_size))
  predicted = 0
  for result in results:
    if FLAGS.json:
      print(json.dumps(result), flush=True)
    elif 'error' in result:
      print(f'{result["file"]}: error: {result["error"]}', file=sys.stderr, flush=True)
    else:
      print(format_line(result), flush=True)
    predicted += 'error' not in result
  if not predicted:
    raise cli.UsageError('no face found in any photo' if FLAGS.find_faces
                         else 'no image could be predicted')
  return 0


def console_main():
  define_flags()
  cli.run(main, extra_errors=(FileNotFoundError,))


if __name__ == '__main__':
  console_main()
