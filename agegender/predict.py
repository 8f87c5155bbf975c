"""Age and gender for image files.

  python -m agegender.predict --model_dir=runs/seed_cnn face.jpg photos/ [--json]

Takes files and folders (searched recursively for .jpg, .jpeg, .png, .bmp and
.gif) and prints one line per image: file, predicted age, gender, and the
model's probability of that gender, tab-separated; with --json, one JSON
object per line. A file that is not a readable image gets an error line
(stderr, or a JSON line with "error") and the others go on; the exit status is
non-zero only when no image could be predicted.

The model is the run's model.keras, loaded in Keras's safe mode, and images
go through the pipeline's own preprocessing.
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
  return f'{result["file"]}\t{result["age"]:.1f}\t{result["gender"]}\t{result["probability"]:.3f}'


# ---- The command line. ----

def define_flags():
  flags.DEFINE_string('model_dir', None, 'The training run whose model.keras predicts.')
  flags.DEFINE_bool('json', False, 'Print one JSON object per line instead of text.')
  flags.DEFINE_integer('batch_size', 64, 'Images per prediction batch.')


FLAGS = flags.FLAGS


def main(argv):
  paths = argv[1:]
  if not FLAGS.model_dir:
    raise cli.UsageError('--model_dir is required')
  if not paths:
    raise cli.UsageError('give at least one image file or folder')
  if FLAGS.batch_size <= 0:
    raise cli.UsageError(f'--batch_size must be positive, got {FLAGS.batch_size}')
  model = export.load_keras_model(FLAGS.model_dir)
  predicted = 0
  for result in predict_paths(model, paths, FLAGS.batch_size):
    if FLAGS.json:
      print(json.dumps(result), flush=True)
    elif 'error' in result:
      print(f'{result["file"]}: error: {result["error"]}', file=sys.stderr, flush=True)
    else:
      print(format_line(result), flush=True)
    predicted += 'error' not in result
  if not predicted:
    raise cli.UsageError('no image could be predicted')
  return 0


def console_main():
  define_flags()
  cli.run(main, extra_errors=(FileNotFoundError,))


if __name__ == '__main__':
  console_main()
