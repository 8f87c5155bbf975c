"""Age and gender for image files: `python -m agegender.predict`.

  python -m agegender.predict photo.jpg photos/ [--json] [--annotate=DIR]   # the packaged model
  python -m agegender.predict --model_dir=runs/compact_cnn photo.jpg
  python -m agegender.predict --model_dir=runs/compact_cnn --nofind_faces face_crop.jpg
  python -m agegender.predict --model_dir=runs/compact_cnn --tflite [--tflite_model=PATH] face.jpg

See agegender.serving.predict for what it prints.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from agegender import cli
from agegender import faces
from agegender.serving import predict


def _check(settings: predict.PredictConfig, paths: list[str]) -> None:
  if not paths:
    raise cli.UsageError('give at least one image file or folder')
  if settings.annotate and not settings.find_faces:
    raise cli.UsageError('--annotate draws the faces that --find_faces finds; give both')
  if settings.find_faces:
    try:
      faces.detect(np.zeros([1, 1, 3], np.uint8))
    except ImportError as e:
      raise cli.UsageError(str(e)) from None
  if settings.annotate:
    try:
      os.makedirs(settings.annotate, exist_ok=True)
    except OSError as e:
      raise cli.UsageError(f'--annotate={settings.annotate}: {e.strerror or e}') from None


def main(argv):
  paths = argv[1:]
  settings = cli.from_flags(predict.PredictConfig)
  _check(settings, paths)
  model = predict.load_model(settings.model_dir, settings.tflite, settings.tflite_model)
  if settings.find_faces:
    results = predict.predict_photos(model, paths, settings.annotate or None,
                                     settings.score_threshold)
  else:
    results = predict.predict_paths(model, paths, settings.batch_size)
  predicted = 0
  for result in results:
    if settings.json:
      print(json.dumps(result), flush=True)
    elif 'error' in result:
      print(f'{result["file"]}: error: {result["error"]}', file=sys.stderr, flush=True)
    else:
      print(predict.format_line(result), flush=True)
    predicted += 'error' not in result
  if not predicted:
    raise cli.UsageError('no face found in any photo' if settings.find_faces
                         else 'no image could be predicted')
  return 0


def console_main():
  cli.define_flags(predict.PredictConfig)
  cli.run(main)


if __name__ == '__main__':
  console_main()
