"""The TFLite models against the Keras model: accuracy on the test split, size and latency.

  python -m agegender.export --model_dir=RUN --tflite
  python benchmarks/tflite.py --records_dir=/work/records_utk --model_dir=RUN [--json out.json]

Runs model.keras, model.tflite and model_fp16.tflite over the same test
batches (agegender.evaluate.predict_split: the pipeline's make_dataset,
training=False) and reports each one's age MAE, gender accuracy and (a
distribution head's) age interval coverage, its difference from Keras's,
the file's size, and the median latency of one image (uint8, already
decoded: the model alone) over --runs calls, with 1 thread and with the
default threads (and, with 1 thread, the process's CPU time per call: the
wall time on a shared machine includes waiting for a core). Targets: each
TFLite model within 0.05 years of age MAE and 0.2 percentage points of gender
accuracy of the Keras model.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # pylint: disable=g-import-not-at-top,wrong-import-position

from agegender.serving import evaluate  # pylint: disable=wrong-import-position
from agegender.serving import export  # pylint: disable=wrong-import-position
from agegender.serving import lite  # pylint: disable=wrong-import-position

flags.DEFINE_string('records_dir', 'records', 'Records written by agegender.make_records.')
flags.DEFINE_string('model_dir', None, 'The run: model.keras and, from export --tflite, the '
                    'TFLite models.', required=True)
flags.DEFINE_string('split', 'test', 'The split to measure on.')
flags.DEFINE_integer('runs', 200, 'Single-image calls per latency figure (after 20 warm-up).')
flags.DEFINE_string('json', None, 'Also write the figures here as JSON.')
FLAGS = flags.FLAGS
TARGET_AGE_MAE = 0.05
TARGET_GENDER_POINTS = 0.2


def latency_ms(model, image: np.ndarray, runs: int) -> tuple[float, float]:
  """The median wall time and process CPU time of one predict_on_batch on one image, in ms.

  On a shared machine the wall time counts waiting for a core; with one
  thread the CPU time is the work itself.
  """
  for _ in range(20):
    model.predict_on_batch(image)
  wall, cpu = [], []
  for _ in range(runs):
    started, started_cpu = time.perf_counter(), time.process_time()
    model.predict_on_batch(image)
    wall.append(time.perf_counter() - started)
    cpu.append(time.process_time() - started_cpu)
  return float(np.median(wall) * 1000), float(np.median(cpu) * 1000)


def accuracy(predictions) -> dict[str, float]:
  """Age MAE, gender accuracy (of the faces with a gender) and the interval's coverage."""
  true_age = predictions['true_age']
  age_mae = np.mean(np.abs(predictions['predicted_age'] - true_age))
  known = predictions['true_gender'] >= 0
  correct = (predictions['gender_probability'] >= 0.5) == (predictions['true_gender'] == 1)
  inside = (predictions['age_low'] <= true_age) & (true_age <= predictions['age_high'])
  return {'age_mae': float(age_mae), 'gender_accuracy': float(np.mean(correct[known])),
          'coverage': float(np.mean(inside)), 'count': int(len(correct))}


def main(argv):
  del argv
  keras_model = export.load_keras_model(FLAGS.model_dir)
  size = export.image_size_of(keras_model)
  image = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
  paths = {'keras': export.keras_model_path(FLAGS.model_dir),
           **{f'tflite {p}': path for p, path in lite.tflite_paths(FLAGS.model_dir).items()}}
  rows = {}
  for name, path in paths.items():
    if name == 'keras':
      model, threaded = keras_model, None
    else:
      model, threaded = lite.LiteModel(path, num_threads=1), lite.LiteModel(path)
    row = accuracy(evaluate.predict_split(model, FLAGS.records_dir, FLAGS.split))
    row['size_mb'] = os.path.getsize(path) / 2**20
    one = latency_ms(model, image, FLAGS.runs) if threaded else (None, None)
    row['latency_ms_1_thread'], row['cpu_ms_1_thread'] = one
    row['latency_ms_default_threads'] = latency_ms(threaded or model, image, FLAGS.runs)[0]
    rows[name] = row
  reference = rows['keras']
  for row in rows.values():
    row['age_mae_difference'] = row['age_mae'] - reference['age_mae']
    row['gender_points_difference'] = 100 * (row['gender_accuracy'] - reference['gender_accuracy'])
    row['within_target'] = (abs(row['age_mae_difference']) <= TARGET_AGE_MAE
                            and abs(row['gender_points_difference']) <= TARGET_GENDER_POINTS)
  figures = {'model_dir': os.path.abspath(FLAGS.model_dir), 'image_size': size,
             'split': FLAGS.split, 'records_dir': FLAGS.records_dir,
             'machine': machine.describe_cpu(), 'runs': FLAGS.runs, 'models': rows,
             'note': 'measured on UTKFace: non-commercial research use only'}
  print(f'{FLAGS.split} split of {FLAGS.records_dir} ({reference["count"]} images), model '
        f'{figures["model_dir"]} ({size}x{size}), {figures["machine"]}')
  print(f'{"model":16}{"age MAE":>9}{"diff":>8}{"gender acc":>12}{"diff pp":>9}{"coverage":>10}'
        f'{"MB":>7}{"ms 1 thr":>10}{"CPU ms 1 thr":>14}{"ms default":>12}')
  for name, row in rows.items():
    one, cpu = row['latency_ms_1_thread'], row['cpu_ms_1_thread']
    print(f'{name:16}{row["age_mae"]:9.3f}{row["age_mae_difference"]:+8.3f}'
          f'{100 * row["gender_accuracy"]:11.2f}%{row["gender_points_difference"]:+9.2f}'
          f'{row["coverage"]:10.3f}'
          f'{row["size_mb"]:7.2f}{"-" if one is None else f"{one:.2f}":>10}'
          f'{"-" if cpu is None else f"{cpu:.2f}":>14}'
          f'{row["latency_ms_default_threads"]:12.2f}')
  print(f'(keras: predict_on_batch; target: within {TARGET_AGE_MAE} years and '
        f'{TARGET_GENDER_POINTS} points of Keras; UTKFace: non-commercial research use only)')
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(figures, f, indent=2)
  return 0


if __name__ == '__main__':
  app.run(main)
