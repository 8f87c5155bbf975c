"""Training: absl flags -> one TrainConfig -> train_and_evaluate(config).

  python -m agegender.train --epochs=10
  python -m agegender.train --model=tiny --image_size=64 --model_dir=runs/demo

Everything a run writes lands in --model_dir (default runs/<model>):

  model.keras         the best model by validation age MAE (Keras format)
  export/             the serving SavedModel (encoded image bytes in)
  history.csv         one row per epoch: losses and metrics, train and validation
  learning_curves.png loss, gender accuracy and age MAE, train against validation
  metrics.json/.txt   the test-split evaluation (see agegender.evaluate)
  predicted_age.png   predicted against true age on the test split
  logs/               TensorBoard logs
  backup/             the resumable state (weights, optimizer, epoch)
  config.json         the run's configuration

A run stopped at any point (even by kill -9) and started again with the same
flags continues from its last finished epoch. Delete --model_dir (or choose
another) to start over.

The training loop is `train_and_evaluate(config)`, a function of plain
arguments; the flags below are turned into its TrainConfig in
`config_from_flags` and nowhere else. The distribution strategy is chosen in
`make_strategy` alone, and every strategy (one device, one host's GPUs,
several hosts) runs the same loop, `run_epochs`: a `strategy.run` of the
model's own train_step driving Keras's callbacks, because Keras 3's `fit`
fails under MultiWorkerMirroredStrategy (keras-team/keras#20585). Under
multi_worker only the chief writes to --model_dir; the other workers write to a
temporary folder of their own (or --worker_dir), started from the chief's saved
state. The age head starts at the training split's mean age (its bias), so
that the first epochs learn faces rather than the scale of years.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import tempfile
from typing import Any, Sequence

from absl import flags
from absl import logging

from agegender import cli
from agegender import contract
from agegender import model as model_lib
from agegender import pipeline

STRATEGIES = ('auto', 'one_device', 'mirrored', 'multi_worker')


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the command line's flags; console_main calls it.

  Not at import: agegender.make_records defines some of the same names
  (records_dir, image_size, seed), and a process that imports both modules as
  libraries (a test session, a later tool) must not see them collide.
  """
  own = {'flag_values': flag_values}
  flags.DEFINE_string('records_dir', 'records', 'Records written by agegender.make_records.',
                      **own)
  flags.DEFINE_string('model_dir', None,
                      'Where the run writes everything (default: runs/<model>).', **own)
  flags.DEFINE_enum('model', model_lib.SEED_CNN, list(model_lib.MODELS), 'The model to train.',
                    **own)
  flags.DEFINE_enum('weights', 'none', list(model_lib.WEIGHTS),
                    'Initial weights of a keras.applications backbone (imagenet: downloaded).',
                    **own)
  flags.DEFINE_integer('image_size', contract.DEFAULT_IMAGE_SIZE,
                       'Side of the square input images, in pixels.', **own)
  flags.DEFINE_list('filters', None,
                    'Conv filters per block (default 64,128,256; 16,32,64 for tiny).', **own)
  flags.DEFINE_integer('dense_units', None,
                       'Units of the dense layer before the heads (default 256; 32 for tiny).',
                       **own)
  flags.DEFINE_float('dropout', None, 'Dropout before the heads (default 0.5; 0 for tiny).',
                     **own)
  flags.DEFINE_integer('epochs', 10, 'Epochs to train (a resumed run ends at the same epoch).',
                       **own)
  flags.DEFINE_integer('batch_size', 128, 'Global batch size (split over the replicas).', **own)
  flags.DEFINE_float('learning_rate', 1e-4, 'Adam learning rate.', **own)
  flags.DEFINE_float('gender_loss_weight', 1.0, 'Weight of the gender loss in the total loss.',
                     **own)
  flags.DEFINE_float('age_loss_weight', 1.0, 'Weight of the age loss in the total loss.', **own)
  flags.DEFINE_enum('age_loss', 'mse', list(model_lib.AGE_LOSSES),
                    'Age loss: mse (the reference), mae or huber (delta 5 years).', **own)
  flags.DEFINE_bool('augment', False,
                    'Random flips, brightness, contrast and small shifts of training images.',
                    **own)
  flags.DEFINE_integer('shuffle_buffer', pipeline.DEFAULT_SHUFFLE_BUFFER, 'Training shuffle buffer, in examples.', **own)
  flags.DEFINE_integer('seed', 0, 'Seed of the weights, the shuffle and the augmentation.',
                       **own)
  flags.DEFINE_bool('deterministic', False,
                    'Deterministic input order and ops (same seed, same run); slower.', **own)
  flags.DEFINE_bool('cache', False, 'Keep the serialized records in memory after the first '
                    'epoch (decoding still runs every epoch).', **own)
  flags.DEFINE_bool('skip_corrupt', False, 'Skip corrupt records (counted and logged per shard) '
                    'instead of stopping with an error that names the shard.', **own)
  flags.DEFINE_bool('mixed_precision', False,
                    'mixed_float16 compute (for GPUs); the output heads stay float32.', **own)
  flags.DEFINE_bool('jit_compile', False, 'Compile the training step with XLA.', **own)
  flags.DEFINE_integer('steps_per_execution', 1, 'Training steps per tf.function call.', **own)
  flags.DEFINE_enum('distribution_strategy', 'auto', list(STRATEGIES),
                    'auto: MirroredStrategy over all local GPUs when there are several, else '
                    'the default device; one_device: the first GPU (or the CPU); '
                    'mirrored: MirroredStrategy over all local GPUs; multi_worker: '
                    'MultiWorkerMirroredStrategy over the cluster in TF_CONFIG.', **own)
  flags.DEFINE_string('data_service', None,
                      'A tf.data service dispatcher, grpc://HOST:PORT, whose workers run the '
                      'training input pipeline (see agegender.data_service).', **own)
  flags.DEFINE_float('data_service_timeout', pipeline.DATA_SERVICE_TIMEOUT,
                     'Seconds without a batch from --data_service after which an epoch ends '
                     'with what arrived (a stopped service worker; 0: wait forever).', **own)
  flags.DEFINE_string('worker_dir', None,
                      'multi_worker: where a worker other than the chief keeps its training '
                      'state (default: a temporary folder, deleted at exit).', **own)
  flags.DEFINE_integer('early_stopping_patience', 0,
                       'Stop after this many epochs without a better validation age MAE '
                       '(0: off).', **own)
  flags.DEFINE_integer('reduce_lr_patience', 0,
                       'Multiply the learning rate by --reduce_lr_factor after this many epochs '
                       'without a better validation age MAE (0: off).', **own)
  flags.DEFINE_float('reduce_lr_factor', 0.5, 'Learning-rate reduction factor.', **own)
  flags.DEFINE_float('min_learning_rate', 1e-6, 'Lowest learning rate the reduction goes to.',
                     **own)
  flags.DEFINE_bool('tensorboard', True, 'Write TensorBoard logs to MODEL_DIR/logs.', **own)
  flags.DEFINE_bool('export', True, 'Export the serving SavedModel to MODEL_DIR/export.', **own)
  flags.DEFINE_integer('verbose', 1,
                       'Keras progress: 0 silent, 1 progress bar, 2 a line per epoch.', **own)


# The quantity that picks the best model, reduces the learning rate and stops early.
MONITOR = 'val_age_output_mae'
MODEL_FILE = 'model.keras'
HISTORY_FILE = 'history.csv'
CURVES_FILE = 'learning_curves.png'
CONFIG_FILE = 'config.json'
BACKUP_DIR = 'backup'
LOGS_DIR = 'logs'
EXPORT_DIR = 'export'


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run needs, as plain values."""
  records_dir: str = 'records'
  model_dir: str = ''  # Empty: runs/<model>.
  model: str = model_lib.SEED_CNN
  weights: str = 'none'
  image_size: int = contract.DEFAULT_IMAGE_SIZE
  filters: tuple[int, ...] | None = None
  dense_units: int | None = None
  dropout: float | None = None
  epochs: int = 10
  batch_size: int = 128
  learning_rate: float = 1e-4
  gender_loss_weight: float = 1.0
  age_loss_weight: float = 1.0
  age_loss: str = 'mse'
  augment: bool = False
  shuffle_buffer: int = pipeline.DEFAULT_SHUFFLE_BUFFER
  seed: int = 0
  deterministic: bool = False
  cache: bool = False
  skip_corrupt: bool = False
  mixed_precision: bool = False
  jit_compile: bool = False
  steps_per_execution: int = 1
  distribution_strategy: str = 'auto'
  early_stopping_patience: int = 0
  reduce_lr_patience: int = 0
  reduce_lr_factor: float = 0.5
  min_learning_rate: float = 1e-6
  tensorboard: bool = True
  export: bool = True
  verbose: int = 1
  data_service: str | None = None
  data_service_timeout: float = pipeline.DATA_SERVICE_TIMEOUT  # 0: wait forever.
  worker_dir: str | None = None  # None: a temporary folder.

  def __post_init__(self):
    if not self.model_dir:
      object.__setattr__(self, 'model_dir', os.path.join('runs', self.model))

  def path(self, name: str) -> str:
    return os.path.join(self.model_dir, name)


def _integers(values: Sequence[str] | None, flag: str) -> tuple[int, ...] | None:
  if not values:
    return None
  try:
    return tuple(int(value) for value in values)
  except ValueError:
    raise cli.UsageError(f'--{flag} must be integers separated by commas, '
                         f'got {",".join(values)}') from None


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> TrainConfig:
  """The one place where flags become a TrainConfig."""
  values = {field.name: flag_values[field.name].value for field in dataclasses.fields(TrainConfig)}
  values['model_dir'] = values['model_dir'] or ''
  values['data_service'] = values['data_service'] or None
  values['worker_dir'] = values['worker_dir'] or None
  values['filters'] = _integers(values['filters'], 'filters')
  return TrainConfig(**values)


def _positive(config: TrainConfig, names: Sequence[str]) -> None:
  for name in names:
    value = getattr(config, name)
    if value is not None and value <= 0:
      raise cli.UsageError(f'--{name} must be positive, got {value}')


def split_sizes(records_dir: str) -> dict[str, int]:
  """Examples per split, from the manifest; raises RecordsError when the records cannot train."""
  manifest = contract.read_manifest(records_dir)
  sizes = {split: int(manifest['splits'].get(split, {}).get('num_examples', 0))
           for split in contract.SPLITS}
  empty = [split for split, size in sizes.items() if size == 0]
  if empty:
    raise contract.RecordsError(
        f'the records at {records_dir} have no {" or ".join(empty)} examples; '
        'convert more images with `python -m agegender.make_records`')
  return sizes


def check_config(config: TrainConfig) -> dict[str, int]:
  """Raises UsageError or RecordsError for what would fail later; returns the split sizes."""
  _positive(config, ('epochs', 'batch_size', 'learning_rate', 'shuffle_buffer',
                     'steps_per_execution', 'reduce_lr_factor', 'image_size', 'dense_units'))
  for name in ('early_stopping_patience', 'reduce_lr_patience', 'gender_loss_weight',
               'age_loss_weight', 'min_learning_rate', 'data_service_timeout'):
    if getattr(config, name) < 0:
      raise cli.UsageError(f'--{name} must not be negative, got {getattr(config, name)}')
  if config.model not in model_lib.MODELS:
    raise cli.UsageError(f'unknown model {config.model!r}; expected one of '
                         f'{", ".join(model_lib.MODELS)}')
  if config.distribution_strategy not in STRATEGIES:
    raise cli.UsageError(f'unknown distribution strategy {config.distribution_strategy!r}; '
                         f'expected one of {", ".join(STRATEGIES)}')
  if config.distribution_strategy == 'multi_worker' and not os.environ.get('TF_CONFIG'):
    raise cli.UsageError('--distribution_strategy=multi_worker needs the cluster in the '
                         'TF_CONFIG environment variable')
  if config.data_service:
    from agegender import data_service  # pylint: disable=g-import-not-at-top
    data_service.parse_address(config.data_service)
    if config.cache:
      raise cli.UsageError('--cache does not go with --data_service (each service worker '
                           'would cache only the shards it happened to read)')
  return split_sizes(config.records_dir)


def make_strategy(name: str):
  """The tf.distribute strategy a run trains under: chosen here and nowhere else."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if name == 'multi_worker':
    # Before anything else starts TensorFlow's runtime, which it configures for collectives.
    return tf.distribute.MultiWorkerMirroredStrategy()
  gpus = tf.config.list_logical_devices('GPU')
  if name == 'auto':
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
  if name == 'one_device':
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else '/cpu:0')
  if name == 'mirrored':
    return tf.distribute.MirroredStrategy()
  raise cli.UsageError(f'unknown distribution strategy {name!r}')


def _check_batch_size(config: TrainConfig, strategy) -> None:
  if config.batch_size % strategy.num_replicas_in_sync:
    raise cli.UsageError(f'--batch_size={config.batch_size} must divide evenly over '
                         f'{strategy.num_replicas_in_sync} replicas')


def _split_dataset(config: TrainConfig, split: str, training: bool, batch_size: int,
                   input_context=None):
  return pipeline.make_dataset(
      config.records_dir, split, batch_size=batch_size, training=training,
      image_size=config.image_size, shuffle_buffer=config.shuffle_buffer,
      augment=config.augment and training, deterministic=config.deterministic,
      seed=config.seed, cache=config.cache, skip_corrupt=config.skip_corrupt,
      input_context=input_context,
      data_service=config.data_service if training else None,
      data_service_timeout=config.data_service_timeout or None)


def training_input(config: TrainConfig, strategy):
  """The training split, one input pipeline per worker (its InputContext), batched per
  replica; one pass is one epoch."""

  def dataset_fn(input_context):
    # make_dataset divides the global batch among the replicas itself.
    return _split_dataset(config, 'train', True, config.batch_size, input_context)

  return pipeline.distribute_dataset(dataset_fn, strategy)


def validation_input(config: TrainConfig, num_examples: int, strategy=None):
  """The validation split in global batches, split over `strategy`'s replicas (each
  worker takes every n-th batch)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  dataset = _split_dataset(config, 'validation', False, config.batch_size)
  batches = math.ceil(num_examples / config.batch_size)
  dataset = dataset.apply(tf.data.experimental.assert_cardinality(batches))
  return dataset if strategy is None else pipeline.distribute_dataset(dataset, strategy)


# ---- History and learning curves. ----

def read_history(path: str) -> list[dict[str, float]]:
  """history.csv's rows, one per epoch in order: a repeated epoch keeps its last row."""
  if not os.path.exists(path):
    return []
  by_epoch = {}
  with open(path, newline='') as f:
    for row in csv.DictReader(f):
      try:
        by_epoch[int(row['epoch'])] = {key: float(value) for key, value in row.items()
                                       if value not in ('', None)}
      except (KeyError, ValueError):
        continue  # A row cut short by a kill.
  return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def write_history(path: str, rows: list[dict[str, float]]) -> None:
  if not rows:
    return
  columns = ['epoch'] + sorted({key for row in rows for key in row} - {'epoch'})
  with open(path + '.partial', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for row in rows:
      writer.writerow({**row, 'epoch': int(row['epoch'])})
  os.replace(path + '.partial', path)


def plot_learning_curves(rows: list[dict[str, float]], path: str) -> str | None:
  """Loss, gender accuracy and age MAE per epoch, train against validation, as one PNG."""
  if not rows:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = (('loss', 'loss'), ('gender_output_accuracy', 'gender accuracy'),
            ('age_output_mae', 'age MAE (years)'))
  epochs = [int(row['epoch']) + 1 for row in rows]
  figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
  for axis, (key, title) in zip(axes, panels, strict=True):
    for prefix, label in (('', 'train'), ('val_', 'validation')):
      values = [row.get(prefix + key, math.nan) for row in rows]
      axis.plot(epochs, values, marker='o', markersize=3, label=label)
    axis.set(title=title, xlabel='epoch')
    axis.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return path


# ---- The run. ----

def _resuming(config: TrainConfig) -> bool:
  return os.path.exists(os.path.join(config.path(BACKUP_DIR), 'training_metadata.json'))


# A resumed run must build the same model its saved state came from.
_ARCHITECTURE = ('model', 'weights', 'image_size', 'filters', 'dense_units', 'dropout',
                 'mixed_precision')


def _check_same_model(config: TrainConfig) -> None:
  try:
    with open(config.path(CONFIG_FILE)) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return
  current = json.loads(json.dumps(dataclasses.asdict(config)))  # Tuples as JSON lists.
  changed = [name for name in _ARCHITECTURE if saved.get(name) != current[name]]
  if changed:
    raise cli.UsageError(
        f'{config.model_dir} holds a run of another model ({", ".join(changed)} differ); '
        'choose another --model_dir, or delete it to start over')


def _best_so_far(config: TrainConfig, resuming: bool) -> float | None:
  """On resume, the best validation age MAE already saved, so a worse epoch cannot replace it."""
  if not resuming or not os.path.exists(config.path(MODEL_FILE)):
    return None
  values = [row[MONITOR] for row in read_history(config.path(HISTORY_FILE)) if MONITOR in row]
  return min(values) if values else None


def _tensorboard_installed() -> bool:
  # TensorFlow 2.21 no longer installs TensorBoard; tf.summary needs it.
  if importlib.util.find_spec('tensorboard') is not None:
    return True
  logging.warning('TensorBoard is not installed (pip install tensorboard): no logs in %s',
                  LOGS_DIR)
  return False


def make_callbacks(config: TrainConfig, resuming: bool) -> list:
  import keras  # pylint: disable=g-import-not-at-top
  callbacks = [
      keras.callbacks.ModelCheckpoint(
          config.path(MODEL_FILE), monitor=MONITOR, mode='min', save_best_only=True,
          initial_value_threshold=_best_so_far(config, resuming)),
      keras.callbacks.CSVLogger(config.path(HISTORY_FILE), append=resuming),
  ]
  if config.tensorboard and _tensorboard_installed():
    callbacks.append(keras.callbacks.TensorBoard(config.path(LOGS_DIR), profile_batch=0))
  if config.reduce_lr_patience:
    callbacks.append(keras.callbacks.ReduceLROnPlateau(
        monitor=MONITOR, mode='min', factor=config.reduce_lr_factor,
        patience=config.reduce_lr_patience, min_lr=config.min_learning_rate, verbose=1))
  if config.early_stopping_patience:
    callbacks.append(keras.callbacks.EarlyStopping(
        monitor=MONITOR, mode='min', patience=config.early_stopping_patience, verbose=1))
  # Last, so the saved state includes this epoch's learning-rate change and history row.
  callbacks.append(keras.callbacks.BackupAndRestore(
      config.path(BACKUP_DIR), delete_checkpoint=False, double_checkpoint=True))
  return callbacks


def _build_compiled_model(config: TrainConfig, initial_age: float):
  model = model_lib.build_model(
      config.model, image_size=config.image_size, filters=config.filters,
      dense_units=config.dense_units, dropout=config.dropout, weights=config.weights,
      initial_age=initial_age, mixed_precision=config.mixed_precision)
  return model_lib.compile_model(
      model, learning_rate=config.learning_rate, age_loss=config.age_loss,
      gender_loss_weight=config.gender_loss_weight, age_loss_weight=config.age_loss_weight,
      jit_compile=config.jit_compile, steps_per_execution=config.steps_per_execution)


def _write_config(config: TrainConfig) -> None:
  with open(config.path(CONFIG_FILE), 'w') as f:
    json.dump(dataclasses.asdict(config), f, indent=2)


# ---- The training loop, one for every strategy. ----

def _head_loss_metrics(model) -> list:
  """The means of each output's loss that Keras's compiled loss keeps (not the total loss)."""
  import keras  # pylint: disable=g-import-not-at-top
  return [metric for metric in model.metrics
          if type(metric) is keras.metrics.Mean and metric.name != 'loss']  # pylint: disable=unidiomatic-typecheck


@contextlib.contextmanager
def _weighted_by_examples(metrics, examples):
  """While a step is traced, `metrics` count each update as `examples` samples.

  Keras weighs each output's loss by the batch's static size, which a tf.data
  batch does not have: every batch then counts once, however many examples it
  holds, while the total loss counts examples. A short last batch, and under
  several replicas a replica's empty share of it, would make the logged loss
  differ from the sum of its parts; weighted by examples, the parts add up.
  """
  originals = {id(metric): metric.update_state for metric in metrics}

  def weighted(original):
    def update_state(values, sample_weight=None):
      return original(values, examples if sample_weight is None else sample_weight)
    return update_state

  for metric in metrics:
    metric.update_state = weighted(originals[id(metric)])
  try:
    yield
  finally:
    for metric in metrics:
      metric.update_state = originals[id(metric)]


def _step_function(model, strategy, step, steps_per_execution: int):
  """A tf.function running up to `steps_per_execution` of `step` (the model's train_step or
  test_step) on every replica; returns (steps run, examples seen) over all replicas, 0 steps
  at the end of the data."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  replica_step = tf.function(step, jit_compile=True) if model.jit_compile else step
  head_losses = _head_loss_metrics(model)

  def on_replica(data):
    examples = tf.shape(data[0], out_type=tf.int64)[0]
    with _weighted_by_examples(head_losses, examples):
      replica_step(data)
    return examples

  @tf.function
  def run_steps(iterator):
    steps = tf.constant(0, tf.int64)
    examples = tf.constant(0, tf.int64)
    for _ in tf.range(steps_per_execution):
      # Under several workers, every worker runs the step until all are out of data.
      optional = iterator.get_next_as_optional()
      if not optional.has_value():
        break
      sizes = strategy.run(on_replica, args=(optional.get_value(),))
      examples += strategy.reduce('SUM', sizes, axis=None)
      steps += 1
    return steps, examples

  return run_steps


def _logs(model) -> dict[str, float]:
  # Metric variables sum over the replicas and workers when read here.
  return {name: float(value) for name, value in model.get_metrics_result().items()}


def _run_pass(run_steps, dataset, callbacks, hook: str, model=None) -> tuple[int, int, dict]:
  """One pass over `dataset`; returns (steps, examples, logs of the last step)."""
  iterator = iter(dataset)
  steps = examples = 0
  logs = {}
  while True:
    getattr(callbacks, f'on_{hook}_batch_begin')(steps)
    ran, seen = run_steps(iterator)
    if not int(ran):
      return steps, examples, logs
    steps += int(ran)
    examples += int(seen)
    logs = _logs(run_steps.model)
    getattr(callbacks, f'on_{hook}_batch_end')(steps - 1, logs)
    if model is not None and model.stop_training:
      return steps, examples, logs


def run_epochs(model, strategy, train_data, validation_data, *, epochs: int, steps_per_epoch: int,
               train_examples: int, callbacks: Sequence = (), verbose: int = 1):
  """Keras fit's epochs, progress bar and callbacks, on `strategy.run` of the compiled model's
  own train_step and test_step.

  `train_data` and `validation_data` are distributed datasets (one pass is one epoch). An epoch
  that sees fewer than `train_examples` records (records lost with a stopped tf.data service
  worker) logs how many. Returns the Keras History.
  """
  import keras  # pylint: disable=g-import-not-at-top
  steps_per_execution = max(1, int(model.steps_per_execution or 1))
  train_steps = _step_function(model, strategy, model.train_step, steps_per_execution)
  test_steps = _step_function(model, strategy, model.test_step, steps_per_execution)
  train_steps.model = test_steps.model = model
  callbacks = keras.callbacks.CallbackList(
      list(callbacks), add_history=True, add_progbar=verbose != 0, verbose=verbose,
      epochs=epochs, steps=steps_per_epoch, model=model)
  model.stop_training = False
  callbacks.on_train_begin()
  # BackupAndRestore's on_train_begin restores the state and sets where to start.
  initial_epoch = getattr(model, '_initial_epoch', None) or 0
  epoch_logs = {}
  for epoch in range(initial_epoch, epochs):
    model.reset_metrics()
    callbacks.on_epoch_begin(epoch)
    _, examples, _ = _run_pass(train_steps, train_data, callbacks, 'train', model)
    epoch_logs = _logs(model)
    if examples < train_examples:
      logging.warning('epoch %d trained on %d of the %d training records: %d lost (with a '
                      'tf.data service worker that stopped, or skipped as corrupt)',
                      epoch + 1, examples, train_examples, train_examples - examples)
    model.reset_metrics()
    callbacks.on_test_begin()
    _run_pass(test_steps, validation_data, callbacks, 'test')
    validation_logs = _logs(model)
    callbacks.on_test_end(validation_logs)
    epoch_logs.update({f'val_{name}': value for name, value in validation_logs.items()})
    callbacks.on_epoch_end(epoch, epoch_logs)
    if model.stop_training:
      break
  callbacks.on_train_end(epoch_logs)
  return model.history


def _is_chief(strategy) -> bool:
  return strategy.extended.should_checkpoint


def _worker_config(config: TrainConfig, strategy, temporary: str) -> TrainConfig:
  """The config this worker runs: the chief's own; another worker's writes to --worker_dir
  (or `temporary`), starting from a copy of the chief's saved state (resume) and history (best
  so far) where the chief's --model_dir can be read."""
  if _is_chief(strategy):
    return config
  own = config.worker_dir or temporary
  os.makedirs(own, exist_ok=True)
  for name in (BACKUP_DIR, HISTORY_FILE, MODEL_FILE, CONFIG_FILE):
    source = config.path(name)
    if os.path.isdir(source):
      shutil.copytree(source, os.path.join(own, name), dirs_exist_ok=True)
    elif os.path.isfile(source):
      shutil.copy2(source, own)
  return dataclasses.replace(config, model_dir=own)


def fit(config: TrainConfig, sizes: dict[str, int], extra_callbacks: Sequence = (),
        strategy=None):
  """Trains under the configured strategy (or `strategy`); returns the Keras History."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from agegender import evaluate  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(config.seed)
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  strategy = strategy or make_strategy(config.distribution_strategy)
  _check_batch_size(config, strategy)
  with tempfile.TemporaryDirectory(prefix='agegender-worker-') as temporary:
    config = _worker_config(config, strategy, temporary)
    resuming = _resuming(config)
    train_data = training_input(config, strategy)
    with strategy.scope():
      model = _build_compiled_model(
          config, initial_age=evaluate.label_statistics(config.records_dir, 'train')['mean_age'])
      # Optimizer and metric variables now, before BackupAndRestore loads them.
      batch_spec = _split_dataset(config, 'validation', False, config.batch_size).element_spec
      model._symbolic_build(data_batch=batch_spec)  # pylint: disable=protected-access
    return run_epochs(
        model, strategy, train_data, validation_input(config, sizes['validation'], strategy),
        epochs=config.epochs, steps_per_epoch=math.ceil(sizes['train'] / config.batch_size),
        train_examples=sizes['train'],
        callbacks=make_callbacks(config, resuming) + list(extra_callbacks),
        verbose=config.verbose)


def train_and_evaluate(config: TrainConfig, extra_callbacks: Sequence = ()) -> dict[str, Any]:
  """Trains, keeps the best model, evaluates it on the test split and exports it.

  Returns {'model_dir', 'epochs_trained' (this call), 'history' (all epochs'
  rows), 'metrics' (the test evaluation), 'export_dir' (or None)}. Under
  multi_worker, a worker other than the chief trains its part and returns
  model_dir, metrics and export_dir None and no history: the chief writes them.
  """
  from agegender import evaluate  # pylint: disable=g-import-not-at-top
  from agegender import export  # pylint: disable=g-import-not-at-top
  sizes = check_config(config)
  if _resuming(config):
    _check_same_model(config)
  strategy = make_strategy(config.distribution_strategy)
  if not _is_chief(strategy):
    history = fit(config, sizes, extra_callbacks, strategy)
    return {'model_dir': None, 'epochs_trained': len(history.epoch), 'history': [],
            'metrics': None, 'export_dir': None}
  os.makedirs(config.model_dir, exist_ok=True)
  _write_config(config)
  history = fit(config, sizes, extra_callbacks, strategy)
  rows = read_history(config.path(HISTORY_FILE))
  write_history(config.path(HISTORY_FILE), rows)  # Drops an epoch repeated after a kill.
  plot_learning_curves(rows, config.path(CURVES_FILE))
  if not os.path.exists(config.path(MODEL_FILE)):
    history.model.save(config.path(MODEL_FILE))  # No epoch had a finite validation MAE.
  best = export.load_keras_model(config.path(MODEL_FILE))
  metrics = evaluate.evaluate_model(best, config.records_dir, split='test',
                                    output_dir=config.model_dir)
  export_dir = export.export_saved_model(best, config.path(EXPORT_DIR)) if config.export else None
  return {'model_dir': config.model_dir, 'epochs_trained': len(history.epoch),
          'history': rows, 'metrics': metrics, 'export_dir': export_dir}


def main(argv):
  from agegender import evaluate  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = config_from_flags()
  result = train_and_evaluate(config)
  if result['model_dir'] is None:
    print(f'trained {result["epochs_trained"]} epoch(s) as a worker; the chief writes the outputs')
    return 0
  print(evaluate.format_table(result['metrics'], 'test'))
  print(f'outputs in {config.model_dir}')
  return 0


def console_main():
  define_flags()
  cli.run(main)


if __name__ == '__main__':
  console_main()
