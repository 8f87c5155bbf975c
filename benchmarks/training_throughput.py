"""Does the input pipeline hold training back? Training images/s, two ways, in one run.

  python benchmarks/training_throughput.py [--model=seed_cnn|tiny] [--steps=N] [--json=PATH]

1. pipeline:  the model trains on pipeline.make_dataset over the records, as
   agegender.train does (read, shuffle, decode, resize, normalize, prefetch).
2. in-memory: the same compiled model trains on one batch of that pipeline,
   held in memory and repeated: the input costs nothing.

Both train through agegender.train.run_epochs, the loop every training run
uses, on one device (the first GPU, or the CPU).

Also the input alone (the pipeline iterated without a model). The ratio
pipeline / in-memory near 1 means the input keeps up; well below 1 means
training waits for input. Without --records_dir it converts --count synthetic
faces (UTKFace's 200x200 JPEGs, stored unchanged) into a temporary folder.
Timing starts after --warmup steps, so tracing and buffer filling are left out.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time

from absl import app
from absl import flags

from agegender import model as model_lib

flags.DEFINE_enum('model', model_lib.SEED_CNN, list(model_lib.MODELS), 'Model to train.')
flags.DEFINE_integer('steps', 10, 'Timed training steps per way.')
flags.DEFINE_integer('warmup', 3, 'Untimed steps before timing starts.')
flags.DEFINE_integer('repeats', 2, 'Rounds, alternating the two ways; the best round of each counts.')
flags.DEFINE_integer('batch_size', 128, 'Batch size.')
flags.DEFINE_integer('image_size', 128, 'Model input size.')
flags.DEFINE_string('records_dir', None, 'Records to read (default: synthetic, converted here).')
flags.DEFINE_integer('count', 2000, 'Synthetic faces to convert without --records_dir.')
flags.DEFINE_bool('mixed_precision', False, 'mixed_float16 compute (for GPUs).')
flags.DEFINE_string('json', None, 'Also write the results to this JSON file.')
FLAGS = flags.FLAGS


class _BatchClock:
  """Times the training batches after the first `warmup`."""

  def __init__(self, warmup: int):
    import keras  # pylint: disable=g-import-not-at-top
    clock = self
    self.times = []

    class Callback(keras.callbacks.Callback):
      def on_train_batch_end(self, batch, logs=None):
        clock.times.append(time.perf_counter())

    self.callback = Callback()
    self.warmup = warmup

  def seconds(self) -> float:
    return self.times[-1] - self.times[self.warmup - 1]


def _train_images_per_second(model, strategy, dataset, steps: int, warmup: int,
                             batch_size: int) -> float:
  """One epoch of `warmup + steps` batches of `dataset` through train.run_epochs."""
  from agegender import train  # pylint: disable=g-import-not-at-top
  clock = _BatchClock(warmup)
  # One batch of validation: run_epochs ends each epoch with it, after the timed steps.
  train.run_epochs(
      model, strategy, strategy.experimental_distribute_dataset(dataset.take(warmup + steps)),
      strategy.experimental_distribute_dataset(dataset.take(1)), epochs=1,
      steps_per_epoch=warmup + steps, train_examples=(warmup + steps) * batch_size,
      callbacks=[clock.callback], verbose=0)
  return steps * batch_size / clock.seconds()


def _input_images_per_second(dataset, steps: int, warmup: int, batch_size: int) -> float:
  iterator = iter(dataset)
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  return steps * batch_size / (time.perf_counter() - start)


def device_name() -> str:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gpus = tf.config.list_physical_devices('GPU')
  if gpus:
    details = tf.config.experimental.get_device_details(gpus[0])
    return f'{len(gpus)} x {details.get("device_name", "GPU")}'
  return f'CPU only, {os.cpu_count()} cores ({platform.processor() or platform.machine()})'


def measure(records_dir: str, model_name: str, *, steps: int, warmup: int, batch_size: int,
            image_size: int, mixed_precision: bool, repeats: int = 2) -> dict:
  """Images/s of training on the pipeline, on one in-memory batch, and of the input alone.

  The two training ways alternate for `repeats` rounds and each keeps its best
  round, so that a neighbour's load on a shared machine does not pick the winner.
  """
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from agegender import pipeline  # pylint: disable=g-import-not-at-top
  from agegender import train  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(0)
  strategy = train.make_strategy('one_device')
  streamed = pipeline.make_dataset(records_dir, 'train', batch_size=batch_size, training=True,
                                   image_size=image_size, drop_remainder=True).repeat()
  with strategy.scope():
    model = model_lib.compile_model(model_lib.build_model(
        model_name, image_size=image_size, initial_age=30.0, mixed_precision=mixed_precision))
    # Optimizer and metric variables now, under the strategy, as agegender.train does.
    model._symbolic_build(data_batch=streamed.element_spec)  # pylint: disable=protected-access
  one_batch = next(iter(streamed))
  in_memory = tf.data.Dataset.from_tensors(one_batch).repeat()
  rounds = {'pipeline': [], 'in_memory': []}
  for _ in range(repeats):
    for way, dataset in (('in_memory', in_memory), ('pipeline', streamed)):
      rounds[way].append(_train_images_per_second(model, strategy, dataset, steps, warmup,
                                                  batch_size))
  results = {
      'model': model_name, 'batch_size': batch_size, 'image_size': image_size,
      'steps': steps, 'repeats': repeats, 'mixed_precision': mixed_precision,
      'loop': 'agegender.train.run_epochs', 'strategy': type(strategy).__name__,
      'device': device_name(), 'tensorflow': tf.__version__,
      'input_alone_images_per_s': _input_images_per_second(streamed, steps * 3, warmup,
                                                           batch_size),
      'pipeline_images_per_s': max(rounds['pipeline']),
      'in_memory_images_per_s': max(rounds['in_memory']),
      'rounds': rounds,
  }
  results['ratio'] = results['pipeline_images_per_s'] / results['in_memory_images_per_s']
  return results


def format_table(results: dict) -> str:
  return '\n'.join([
      f'training throughput: {results["model"]}, batch {results["batch_size"]}, '
      f'{results["image_size"]}px, best of {results["repeats"]} rounds of {results["steps"]} '
      f'steps, through {results["loop"]} ({results["strategy"]}) on {results["device"]}',
      f'  {"input alone (no model)":<32} {results["input_alone_images_per_s"]:>10.1f} images/s',
      f'  {"training on the pipeline":<32} {results["pipeline_images_per_s"]:>10.1f} images/s',
      f'  {"training on one in-memory batch":<32} {results["in_memory_images_per_s"]:>10.1f} '
      'images/s',
      f'  {"ratio pipeline / in-memory":<32} {results["ratio"]:>10.2f}'])


def _synthetic_records(count: int) -> str:
  from agegender import records  # pylint: disable=g-import-not-at-top
  root = tempfile.mkdtemp(prefix='agegender-benchmark-')
  records.convert('synthetic', root, synthetic_count=count, progress=False)
  return root


def main(argv):
  del argv
  if min(FLAGS.steps, FLAGS.warmup, FLAGS.batch_size, FLAGS.repeats) <= 0:
    raise app.UsageError('--steps, --warmup, --batch_size and --repeats must be positive')
  records_dir = FLAGS.records_dir or _synthetic_records(FLAGS.count)
  results = measure(records_dir, FLAGS.model, steps=FLAGS.steps, warmup=FLAGS.warmup,
                    batch_size=FLAGS.batch_size, image_size=FLAGS.image_size,
                    mixed_precision=FLAGS.mixed_precision, repeats=FLAGS.repeats)
  print(format_table(results))
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  app.run(main)
