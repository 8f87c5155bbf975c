"""Age and gender for image files: face crops, or the faces found in whole photos.

  python -m agegender.predict --model_dir=runs/compact_cnn face.jpg photos/ [--json]
  python -m agegender.predict --model_dir=runs/compact_cnn --find_faces photo.jpg [--annotate=DIR]
  python -m agegender.predict --model_dir=runs/compact_cnn --tflite [--tflite_model=PATH] face.jpg

Takes files and folders (searched recursively for .jpg, .jpeg, .png, .bmp and
.gif) and prints one line per image: file, predicted age, gender, and the
model's probability of that gender, tab-separated; the age is followed by
the model's 80% interval in whole years, `34.2 (27-41)`, when it has one
(the distribution head; a regression head prints the age alone). With
--json, one JSON object per line, with "age_low" and "age_high" (equal to
"age" for a regression head). A file that is not a readable image gets an error line
(stderr, or a JSON line with "error") and the others go on; the exit status is
non-zero only when no image could be predicted.

The model is the run's model.keras, loaded in Keras's safe mode, or with
--tflite its model.tflite (or --tflite_model) run by LiteRT; images go through
the pipeline's own preprocessing either way.

--find_faces: each file is a photo; agegender.faces finds the faces (YuNet) and
crops each aligned by the eyes as UTKFace's crops are, and each face gets a
line: file, face box (left,top,width,height in the photo's pixels), age,
gender, probability; JSON lines add "box", "landmarks", "score" and "crop" (the
bounding box of the aligned square fed to the model, which may reach past the
photo's edges). A photo without a face gets an error line.
--annotate=DIR writes a PNG copy of each photo there (NAME.png, NAME-2.png for a
second photo of that name), with boxes and labels drawn.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Iterator

import numpy as np
import tensorflow as tf

from agegender import contract
from agegender import faces
from agegender import files
from agegender import options
from agegender.data import preprocess
from agegender.records import labels as labels_lib
from agegender.serving import export
from agegender.serving import lite
from agegender.training import model as model_lib

# The packaged model: inside the package, so `pip install .` carries it.
PACKAGED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            'models')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
NO_FACE = 'no face found'


@dataclasses.dataclass(frozen=True)
class PredictConfig:
  """What `python -m agegender.predict` runs, and how it reads and prints."""
  model_dir: str = options.option('', 'The training run whose model.keras predicts (empty: the '
                                  'packaged model, trained on UTKFace: non-commercial research '
                                  'use only).')
  json: bool = options.option(False, 'Print one JSON object per line instead of text.')
  batch_size: int = options.option(64, 'Images per prediction batch.', lower=1)
  find_faces: bool = options.option(True, 'Each file is a photo: find the faces, align each '
                                    'by the eyes as UTKFace\'s crops are, and print one line '
                                    'per face with its box (a face crop gives one face); '
                                    '--nofind_faces: each file is one face crop, fed whole.')
  annotate: str = options.option('', 'With --find_faces: write a copy of each photo to this '
                                 'folder (as PNG) with the faces\' boxes and labels drawn.')
  score_threshold: float = options.option(faces.SCORE_THRESHOLD, 'With --find_faces: the '
                                          'detector\'s confidence a face needs (0-1); higher '
                                          'gives fewer false faces and misses more.',
                                          lower=0, upper=1)
  tflite: bool = options.option(False, 'Run MODEL_DIR/model.tflite with LiteRT instead of '
                                'model.keras (write it with `python -m agegender.export '
                                '--tflite`).')
  tflite_model: str = options.option('', 'A .tflite file to run (implies --tflite), e.g. '
                                     'MODEL_DIR/model_fp16.tflite.')


def image_files(paths: Iterable[str]) -> Iterator[tuple[str, str | None]]:
  """(path, None) for each image to predict, or (path, reason) for a path that gives none."""
  for path in paths:
    if os.path.isdir(path):
      found = [file for name, file, _ in files.walk(path)
               if name.lower().endswith(IMAGE_EXTENSIONS)]
      yield from ((file, None) for file in found)
      if not found:
        yield path, f'no image files ({", ".join(IMAGE_EXTENSIONS)}) in this folder'
    elif os.path.isfile(path):
      yield path, None
    else:
      yield path, 'no such file or folder'


def load_pixels(path: str) -> tuple[np.ndarray | None, str | None]:
  """A file's pixels, uint8 RGB [H, W, 3], decoded as the pipeline decodes; or a reason."""
  try:
    encoded = files.read_bytes(path)
    return tf.io.decode_image(encoded, channels=3, expand_animations=False).numpy(), None
  except OSError as e:
    return None, e.strerror or str(e)
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
    return None, export.UNREADABLE


def prediction(path: str, age: float, female_probability: float, age_low: float | None = None,
               age_high: float | None = None) -> dict[str, Any]:
  """One image's result; age_low, age_high: its interval (None: the age, no interval)."""
  gender = int(female_probability >= 0.5)
  low, high = (age if value is None else value for value in (age_low, age_high))
  return {'file': path, 'age': round(float(age), 1), 'age_low': round(float(low), 1),
          'age_high': round(float(high), 1), 'gender': labels_lib.GENDERS[gender],
          'probability': round(float(female_probability if gender else 1 - female_probability), 4),
          'female_probability': round(float(female_probability), 4)}


def _predict_images(model, images: list[np.ndarray]) -> list[tuple[float, float, float, float]]:
  """(age, female probability, age_low, age_high) of each uint8 image, each resized as every
  training image."""
  size = export.image_size_of(model)
  batch = np.stack([preprocess.resize_pixels(image, size).numpy() for image in images])
  outputs = model.predict_on_batch(batch)
  columns = (outputs[contract.AGE_OUTPUT], outputs[contract.GENDER_OUTPUT],
             *model_lib.age_interval(outputs))
  return list(zip(*(np.reshape(column, -1).tolist() for column in columns), strict=True))


def _predict_chunk(model, chunk: list[tuple[str, str | None]]):
  loaded = [(path, *(load_pixels(path) if reason is None else (None, reason)))
            for path, reason in chunk]
  images = [image for _, image, _ in loaded if image is not None]
  predicted = iter(_predict_images(model, images) if images else [])
  for path, image, reason in loaded:
    if image is None:
      yield {'file': path, 'error': reason}
    else:
      yield prediction(path, *next(predicted))


def predict_paths(model, paths: Iterable[str], batch_size: int = 64) -> Iterator[dict[str, Any]]:
  """One result per image (or per unreadable path), in order: a prediction or {'file', 'error'}."""
  chunk = []
  for entry in image_files(paths):
    chunk.append(entry)
    if len(chunk) == batch_size:
      yield from _predict_chunk(model, chunk)
      chunk = []
  if chunk:
    yield from _predict_chunk(model, chunk)


def format_age(result: dict[str, Any]) -> str:
  """'34.2 (27-41)': the age and its interval in whole years; the age alone without one."""
  low, high = result.get('age_low', result['age']), result.get('age_high', result['age'])
  interval = f' ({low:.0f}-{high:.0f})' if high > low else ''
  return f'{result["age"]:.1f}{interval}'


def format_line(result: dict[str, Any]) -> str:
  box = '\t' + ','.join(f'{value:.0f}' for value in result['box']) if 'box' in result else ''
  return (f'{result["file"]}{box}\t{format_age(result)}\t{result["gender"]}\t'
          f'{result["probability"]:.3f}')


def packaged_model_dir() -> str:
  """The packaged model's folder; FileNotFoundError when this copy carries none."""
  if not os.path.isfile(os.path.join(PACKAGED_DIR, contract.MODEL_FILE)):
    raise FileNotFoundError(f'no packaged model at {PACKAGED_DIR}; give --model_dir, a trained '
                            'run')
  return PACKAGED_DIR


def load_model(model_dir: str = '', tflite: bool = False, tflite_model: str = ''):
  """model.keras, or a TFLite model behind the same two calls (lite.LiteModel); with neither
  model_dir nor tflite_model, the packaged model's."""
  if not model_dir and not tflite_model:
    model_dir = packaged_model_dir()
    if tflite:
      tflite_model = os.path.join(model_dir, lite.TFLITE_FP16_FILE)  # The one it ships.
  if tflite or tflite_model:
    path = tflite_model or os.path.join(model_dir, lite.TFLITE_FILE)
    try:
      return lite.LiteModel(path)
    except ValueError as e:  # A missing LiteRT is an ImportError that says how to install it.
      raise contract.ArgumentError('tflite_model' if tflite_model else 'model_dir', str(e)) from None
  return export.load_keras_model(model_dir)


# ---- Faces in whole photos. ----

def predict_faces(model, pixels: np.ndarray, path: str = '',
                  score_threshold: float = faces.SCORE_THRESHOLD) -> list[dict[str, Any]]:
  """One prediction per face found in a photo (uint8 RGB [H, W, 3]), in reading order, each
  with the detector's box, landmarks and score and the aligned crop's box."""
  found = faces.face_crops(pixels, score_threshold=score_threshold)
  if not found:
    return []
  predicted = _predict_images(model, [crop for _, crop in found])
  return [{**prediction(path, *values), **face.to_json(),
           'crop': [round(value, 1) for value in faces.crop_box(face)]}
          for (face, _), values in zip(found, predicted, strict=True)]


def predict_photos(model, paths: Iterable[str], annotate_dir: str | None = None,
                   score_threshold: float = faces.SCORE_THRESHOLD) -> Iterator[dict[str, Any]]:
  """Per photo, one result per face found, or one {'file', 'error'} (no face, unreadable)."""
  written = set()
  for path, reason in image_files(paths):
    pixels, reason = load_pixels(path) if reason is None else (None, reason)
    if pixels is None:
      yield {'file': path, 'error': reason}
      continue
    results = predict_faces(model, pixels, path, score_threshold)
    if annotate_dir:
      labels = [(r['box'], f'{format_age(r)} {r["gender"]} {r["probability"]:.2f}')
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
