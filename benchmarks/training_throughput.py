"""Does the input pipeline hold training back? Training images/s, fed two ways, in one run.

  python benchmarks/training_throughput.py [--source=synthetic|PATH]
      [--storages=source,jpeg@128,raw@128 | --records_dirs=DIR,DIR,...]
      [--models=default,seed_cnn] [--variants=float32,mixed_float16,mixed_float16+xla]
      [--warmup=N] [--steps=N] [--rounds=N] [--json=PATH] [--table=PATH]

For every model and variant (precision, with or without XLA) the model trains
through the project's own loop, `trainer.step_function` over
`trainer.train_step` on `loop.make_strategy('one_device')` (the first GPU, or
the CPU), with the dataset placed by `pipeline.distribute_dataset`, exactly as
`trainer.fit` runs it, fed:

1. pipeline:  `pipeline.make_dataset` over the records of each storage (source
   JPEG, JPEG or raw at a size: whatever each --records_dirs holds), training
   mode (shard and record shuffle, decode, resize, prefetch; the step flips
   and shifts on the device);
2. in-memory: one uint8 batch of that pipeline held in memory and repeated
   (`tf.data.Dataset.from_tensors(batch).repeat()`): the input costs nothing,
   so this is the rate of the model and the step alone.

The ratio pipeline / in-memory near 1 means the input keeps up; well below 1
means training waits for input. Also the input alone (the pipeline iterated
without a model) per storage, and the bytes of one batch as it crosses to the
device (uint8 images) against the same batch with float32 images.

Why this shape: the in-memory rate is the ceiling the input can only lower, so
the ratio is the one figure that says whether to spend effort on the input.
The two ways take turns within each round (in-memory, then each storage) and
each keeps its best round, so a busy moment on a shared machine favors none.
Timing starts after --warmup steps (tracing, XLA compilation and filling the
shuffle buffer are left out) and ends once the device has finished the last
step. The learning rate and the model's quality play no part; the figures are
rates, never thresholds.

Without --records_dirs, the images of --source (default: --synthetic_count
synthetic faces) are converted into --work_dir in each of --storages: the
source's JPEG bytes, JPEG re-encoded at a size, raw pixels at a size (what
make_records' --image_format and --image_size give), in this one process: each
`python -m agegender.make_records` would load TensorFlow again, which on two
busy cores costs more than converting a small set. With --budget_s, a
(model, variant) cell that would end past it (judged by the longest cell so
far) is skipped and listed in the JSON, which is rewritten after every cell,
so a run cut short keeps what it measured. The step is traced (and compiled)
once per cell: every feed gives batches of one static shape.
`benchmarks/gpu_check.sh` runs the whole matrix on three storages.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

from absl import app
from absl import flags

import machine  # benchmarks/machine.py, beside this script

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['default', 'seed_cnn'],
                  'Models to train; "default" is the configuration\'s default model.')
flags.DEFINE_list('variants', ['float32'],
                  'Precision of each run, float32 or mixed_float16, with "+xla" to compile the '
                  'step with XLA (jit_compile), e.g. float32,mixed_float16,mixed_float16+xla.')
flags.DEFINE_list('records_dirs', [],
                  'Records to read, one folder per storage (default: --source converted into '
                  'each of --storages).')
flags.DEFINE_string('source', 'synthetic', 'Images to convert without --records_dirs: '
                    'synthetic, or a folder or archive of UTKFace JPEGs (as make_records\' '
                    '--source).')
flags.DEFINE_list('storages', ['source'], 'Storages to convert --source into: source (its '
                  'JPEG bytes), jpeg@SIZE (re-encoded at SIZE), raw@SIZE (uint8 pixels).')
flags.DEFINE_integer('synthetic_count', 2000, 'Faces of --source=synthetic.')
flags.DEFINE_string('work_dir', None, 'Where converted records go, kept for the next run '
                    '(default: a temporary folder, deleted at exit).')
flags.DEFINE_integer('batch_size', 128, 'Global batch size.')
flags.DEFINE_integer('image_size', 128, 'Model input size.')
flags.DEFINE_integer('warmup', 5, 'Untimed steps before each timing (tracing, compiling, '
                     'filling buffers).')
flags.DEFINE_integer('steps', 20, 'Timed training steps per way and round.')
flags.DEFINE_integer('input_steps', 50, 'Timed batches of the input alone per round.')
flags.DEFINE_integer('rounds', 2, 'Rounds, the ways taking turns; the best round of each counts.')
flags.DEFINE_float('budget_s', 0.0, 'Seconds for the whole run, conversion included (0: no '
                   'limit): a (model, variant) cell that would not end in time, judged by the '
                   'longest so far, is skipped and listed as such.')
flags.DEFINE_string('json', None, 'Write the figures to this JSON file (after every cell).')
flags.DEFINE_string('table', None, 'Also write the table to this text file.')

PRECISIONS = ('float32', 'mixed_float16')
XLA_SUFFIX = '+xla'


# ---- The matrix. ----

def parse_variant(variant: str) -> tuple[str, bool]:
  """'mixed_float16+xla' -> ('mixed_float16', True)."""
  precision, xla = variant, False
  if variant.endswith(XLA_SUFFIX):
    precision, xla = variant[:-len(XLA_SUFFIX)], True
  if precision not in PRECISIONS:
    raise app.UsageError(f'--variants: {variant!r} is not one of {", ".join(PRECISIONS)}, '
                         f'with or without {XLA_SUFFIX}')
  return precision, xla


def resolve_models(names: list[str]) -> list[str]:
  """Model names with 'default' replaced by the configuration's default, each once."""
  from agegender.training import config as config_lib  # pylint: disable=g-import-not-at-top
  default = config_lib.ModelConfig().model
  resolved = [default if name == 'default' else name for name in names]
  unknown = [name for name in resolved if name not in config_lib.MODELS]
  if unknown:
    raise app.UsageError(f'--models: unknown {", ".join(unknown)}; expected default or one '
                         f'of {", ".join(config_lib.MODELS)}')
  return list(dict.fromkeys(resolved))


def storage_label(records_dir: str) -> str:
  """'source JPEG', 'JPEG@128' or 'raw@128', from the records' manifest."""
  from agegender import contract  # pylint: disable=g-import-not-at-top
  storage = contract.image_storage(contract.read_manifest(records_dir))
  if storage.is_source_bytes:
    return 'source JPEG'
  return f'{"raw" if storage.format == contract.RAW else "JPEG"}@{storage.size}'


def parse_storage(storage: str) -> dict[str, Any]:
  """'source' -> {}; 'jpeg@128' -> {'image_format': 'jpeg', 'image_size': 128}: the
  arguments of records.convert (make_records' --image_format and --image_size)."""
  if storage == 'source':
    return {}
  image_format, _, size = storage.partition('@')
  if image_format not in ('jpeg', 'raw') or not size.isdigit() or int(size) <= 0:
    raise app.UsageError(f'--storages: {storage!r} is not source, jpeg@SIZE or raw@SIZE')
  return {'image_format': image_format, 'image_size': int(size)}


def convert_storages(source: str, storages: list[str], work_dir: str,
                     synthetic_count: int) -> list[str]:
  """Records of `source` in each storage under work_dir; records already there from the same
  source and settings are kept (a second run converts nothing)."""
  from agegender import records  # pylint: disable=g-import-not-at-top
  name = 'synthetic-%d' % synthetic_count if source == 'synthetic' else os.path.basename(
      os.path.normpath(source))
  records_dirs = []
  for storage in storages:
    records_dir = os.path.join(work_dir, f'{name}-{storage.replace("@", "-")}')
    start = time.monotonic()
    summary = records.build(source, records_dir, synthetic_count=synthetic_count,
                              skip_if_done=True, progress=False, **parse_storage(storage))
    print(f'records: {source} as {storage} in {records_dir} '
          f'({"up to date" if summary.get("up_to_date") else "converted"}, '
          f'{time.monotonic() - start:.1f} s)', flush=True)
    records_dirs.append(records_dir)
  return records_dirs


def device_name() -> str:
  """The device the step runs on: the first GPU's name, else the CPU's description."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gpus = tf.config.list_physical_devices('GPU')
  if gpus:
    details = tf.config.experimental.get_device_details(gpus[0])
    return (f'{details.get("device_name", "GPU")} ({len(gpus)} GPU(s) seen, one used); '
            f'host {machine.describe_cpu()}')
  return f'CPU only, {machine.describe_cpu()}'


# ---- Timing. ----

def _wait_for_device(task) -> None:
  """Returns once the device has run every step queued so far: reading a weight back to the
  host waits for the device's queue (a GPU runs kernels after the host has moved on)."""
  task.model.trainable_variables[0].numpy()


def training_rate(run_steps, iterator, task, warmup: int, steps: int) -> float:
  """Training images/s over `steps` calls of `run_steps` after `warmup` untimed ones; like
  `trainer.run_pass`, each call's step count is read on the host before the next."""
  for _ in range(warmup):
    run_steps(iterator)
  _wait_for_device(task)
  examples = 0
  start = time.perf_counter()
  for _ in range(steps):
    ran, seen = run_steps(iterator)
    if not int(ran):
      raise RuntimeError('the training data ended during a measurement')
    examples += int(seen)
  _wait_for_device(task)
  return examples / (time.perf_counter() - start)


def input_rate(iterator, warmup: int, steps: int) -> float:
  """Images/s of the input alone: batches taken from the pipeline on the host, no model."""
  for _ in range(warmup):
    next(iterator)
  images = 0
  start = time.perf_counter()
  for _ in range(steps):
    images += int(next(iterator)[0].shape[0])
  return images / (time.perf_counter() - start)


def batch_bytes(batch) -> tuple[int, int]:
  """Bytes of one batch as the pipeline yields it, and with its images as float32 (what the
  pipeline yielded before images stayed uint8 to the device)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  images, targets = batch
  rest = sum(t.numpy().nbytes for t in tf.nest.flatten(targets))
  return images.numpy().nbytes + rest, int(tf.size(images)) * 4 + rest


# ---- The measurement. ----

def _data_config(records_dir: str, batch_size: int, image_size: int):
  from agegender.training import config as config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.DataConfig(records_dir=records_dir, image_size=image_size,
                               batch_size=batch_size)


def _training_batches(records_dir: str, batch_size: int, image_size: int):
  """The training pipeline as agegender.train builds it, repeated, in full batches of one
  static shape.

  Full batches: a short one would make XLA compile again during a timing. One static
  shape: batches of raw records come with an unknown batch dimension, those of JPEG records
  and the in-memory batch with a known one, and each shape would trace (and compile) the
  step again; `ensure_shape` costs microseconds a batch.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from agegender.data import pipeline  # pylint: disable=g-import-not-at-top
  shape = [batch_size, image_size, image_size, 3]
  dataset = pipeline.make_dataset(_data_config(records_dir, batch_size, image_size), 'train',
                                  training=True, drop_remainder=True)
  return dataset.map(lambda images, targets: (tf.ensure_shape(images, shape), targets)).repeat()


def measure_inputs(storages: dict[str, str], *, batch_size: int, image_size: int, warmup: int,
                   input_steps: int, rounds: int) -> dict[str, dict[str, Any]]:
  """Per storage: the input alone (best of `rounds`), bytes per batch, and one batch."""
  inputs = {}
  for label, records_dir in storages.items():
    iterator = iter(_training_batches(records_dir, batch_size, image_size))
    rates = [input_rate(iterator, warmup, input_steps) for _ in range(rounds)]
    batch = next(iterator)
    uint8_bytes, float32_bytes = batch_bytes(batch)
    inputs[label] = {'records_dir': records_dir, 'input_alone_images_per_s': max(rates),
                     'input_alone_rounds': rates, 'bytes_per_batch': uint8_bytes,
                     'float32_bytes_per_batch': float32_bytes, 'batch': batch}
  return inputs


def measure_cell(model_name: str, precision: str, xla: bool, inputs: dict[str, dict], *,
                 batch_size: int, image_size: int, warmup: int, steps: int,
                 rounds: int) -> list[dict[str, Any]]:
  """One model in one variant: in-memory and every storage's pipeline, taking turns for
  `rounds` rounds; one row per storage, each with the variant's in-memory rate."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from agegender.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from agegender import contract  # pylint: disable=g-import-not-at-top
  from agegender.data import pipeline  # pylint: disable=g-import-not-at-top
  from agegender.training import loop  # pylint: disable=g-import-not-at-top
  from agegender.training import trainer  # pylint: disable=g-import-not-at-top
  first = next(iter(inputs.values()))
  config = config_lib.make_config(
      records_dir=first['records_dir'], image_size=image_size, batch_size=batch_size,
      model=model_name, mixed_precision=precision == 'mixed_float16', jit_compile=xla,
      verbose=0)
  config_lib.check(config)
  keras.utils.set_random_seed(config.data.seed)
  strategy = loop.make_strategy('one_device')
  manifest = contract.read_manifest(first['records_dir'])
  with strategy.scope():
    task = loop.build_task(config, contract.label_statistics(manifest, 'train'),
                            steps_per_epoch=warmup + steps, global_batch_size=batch_size)
  run_steps = trainer.step_function(task, strategy, trainer.train_step,
                                    config.run.steps_per_execution, config.run.jit_compile)
  feeds = {'in-memory': pipeline.distribute_dataset(
      tf.data.Dataset.from_tensors(first['batch']).repeat(), strategy)}
  for label, stored in inputs.items():
    feeds[label] = pipeline.distribute_dataset(
        _training_batches(stored['records_dir'], batch_size, image_size), strategy)
  iterators = {way: iter(dataset) for way, dataset in feeds.items()}
  rates: dict[str, list[float]] = {way: [] for way in feeds}
  for _ in range(rounds):
    for way, iterator in iterators.items():
      rates[way].append(training_rate(run_steps, iterator, task, warmup, steps))
  in_memory = max(rates['in-memory'])
  rows = []
  for label, stored in inputs.items():
    streamed = max(rates[label])
    rows.append({
        'model': model_name, 'storage': label, 'precision': precision, 'xla': xla,
        'pipeline_images_per_s': streamed, 'in_memory_images_per_s': in_memory,
        'ratio': streamed / in_memory,
        'input_alone_images_per_s': stored['input_alone_images_per_s'],
        'bytes_per_batch': stored['bytes_per_batch'],
        'float32_bytes_per_batch': stored['float32_bytes_per_batch'],
        'pipeline_rounds': rates[label], 'in_memory_rounds': rates['in-memory']})
  return rows


def run_matrix(storages: dict[str, str], models: list[str], variants: list[str], *,
               batch_size: int, image_size: int, warmup: int, steps: int, input_steps: int,
               rounds: int, deadline: float | None = None, on_update=None) -> dict[str, Any]:
  """Every (model, variant) cell over every storage; `on_update(result)` after each cell.

  deadline (time.monotonic()): a cell that would end after it, were it to take as long as
  the longest cell so far, is skipped.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  start = time.monotonic()
  longest = 0.0
  result: dict[str, Any] = {
      'device': device_name(), 'tensorflow': tf.__version__,
      'loop': 'agegender.training.trainer.step_function(train_step) on loop.make_strategy("one_device")',
      'batch_size': batch_size, 'image_size': image_size, 'warmup': warmup, 'steps': steps,
      'input_steps': input_steps, 'rounds': rounds,
      'matrix': {'models': models, 'storages': list(storages), 'variants': variants},
      'records_dirs': storages, 'load_average_start': list(os.getloadavg()), 'rows': [],
      'skipped': []}
  inputs = measure_inputs(storages, batch_size=batch_size, image_size=image_size,
                          warmup=warmup, input_steps=input_steps, rounds=rounds)
  for model_name in models:
    for variant in variants:
      precision, xla = parse_variant(variant)
      cell_start = time.monotonic()
      if deadline is not None and cell_start + longest > deadline:
        result['skipped'].append({'model': model_name, 'precision': precision, 'xla': xla})
        continue
      for row in measure_cell(model_name, precision, xla, inputs, batch_size=batch_size,
                              image_size=image_size, warmup=warmup, steps=steps, rounds=rounds):
        result['rows'].append({'device': result['device'], **row})
      longest = max(longest, time.monotonic() - cell_start)
      result['load_average_end'] = list(os.getloadavg())
      result['seconds'] = time.monotonic() - start
      if on_update:
        on_update(result)
  result['load_average_end'] = list(os.getloadavg())
  result['seconds'] = time.monotonic() - start
  return result


# ---- Output. ----

def format_table(result: dict[str, Any]) -> str:
  load = result.get('load_average_start', [0.0])[0], result.get('load_average_end', [0.0])[0]
  lines = [
      f'training throughput on {result["device"]}; TensorFlow {result["tensorflow"]}',
      f'batch {result["batch_size"]}, {result["image_size"]}px; best of {result["rounds"]} '
      f'round(s) of {result["steps"]} steps after {result["warmup"]} untimed; load average '
      f'{load[0]:.1f} at the start, {load[1]:.1f} at the end',
      f'{"model":<20} {"storage":<12} {"precision":<14} {"xla":<4} {"pipeline":>10} '
      f'{"in-memory":>10} {"ratio":>6} {"input alone":>12} {"MB/batch":>9} {"f32 MB":>7}']
  for row in result['rows']:
    lines.append(
        f'{row["model"]:<20} {row["storage"]:<12} {row["precision"]:<14} '
        f'{"on" if row["xla"] else "off":<4} {row["pipeline_images_per_s"]:10,.1f} '
        f'{row["in_memory_images_per_s"]:10,.1f} {row["ratio"]:6.2f} '
        f'{row["input_alone_images_per_s"]:12,.0f} {row["bytes_per_batch"] / 1e6:9.2f} '
        f'{row["float32_bytes_per_batch"] / 1e6:7.2f}')
  lines.append('(images/s; ratio = pipeline / in-memory; MB/batch: the uint8 batch the device '
               'receives, f32 MB: the same batch with float32 images)')
  for cell in result['skipped']:
    lines.append(f'skipped (it would have ended past --budget_s): {cell["model"]} '
                 f'{cell["precision"]} xla {"on" if cell["xla"] else "off"}')
  return '\n'.join(lines)


def write_json(path: str, result: dict[str, Any]) -> None:
  """Written whole, then renamed into place: a run killed mid-write leaves the last cell's."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  partial = f'{path}.partial'
  with open(partial, 'w') as f:
    json.dump(result, f, indent=2)
  os.replace(partial, path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if min(FLAGS.steps, FLAGS.warmup, FLAGS.input_steps, FLAGS.batch_size, FLAGS.rounds) <= 0:
    raise app.UsageError('--steps, --warmup, --input_steps, --batch_size and --rounds must be '
                         'positive')
  for variant in FLAGS.variants:
    parse_variant(variant)
  for storage in FLAGS.storages:
    parse_storage(storage)
  models = resolve_models(FLAGS.models)
  deadline = time.monotonic() + FLAGS.budget_s if FLAGS.budget_s else None
  with tempfile.TemporaryDirectory(prefix='training_throughput-') as temporary:
    records_dirs = FLAGS.records_dirs or convert_storages(
        FLAGS.source, FLAGS.storages, FLAGS.work_dir or temporary, FLAGS.synthetic_count)
    measure_and_report(records_dirs, models, deadline)


def measure_and_report(records_dirs: list[str], models: list[str],
                       deadline: float | None) -> None:
  storages: dict[str, str] = {}
  for records_dir in records_dirs:
    label = storage_label(records_dir)
    if label in storages:
      raise app.UsageError(f'--records_dirs: {storages[label]} and {records_dir} both hold '
                           f'{label} records')
    storages[label] = records_dir
  on_update = (lambda result: write_json(FLAGS.json, result)) if FLAGS.json else None
  result = run_matrix(storages, models, FLAGS.variants, batch_size=FLAGS.batch_size,
                      image_size=FLAGS.image_size, warmup=FLAGS.warmup, steps=FLAGS.steps,
                      input_steps=FLAGS.input_steps, rounds=FLAGS.rounds,
                      deadline=deadline, on_update=on_update)
  table = format_table(result)
  print(table)
  if FLAGS.json:
    write_json(FLAGS.json, result)
  if FLAGS.table:
    with open(FLAGS.table, 'w') as f:
      f.write(table + '\n')


if __name__ == '__main__':
  app.run(main)
