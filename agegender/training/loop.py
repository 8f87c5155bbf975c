"""A run: from a Config to a trained, evaluated and exported model.

  train_and_evaluate(config)   trains (or resumes), keeps the best model by
                               validation age MAE, evaluates it on the test
                               split and exports it

The records' manifest is read once here and handed down; see agegender.train
for what a run writes and how it resumes.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Sequence

from absl import logging
import keras
import tensorflow as tf

from agegender import contract
from agegender import files
from agegender.data import pipeline
from agegender.data import shard_reader
from agegender.serving import evaluate
from agegender.serving import export
from agegender.training import config as config_lib
from agegender.training import model as model_lib
from agegender.training import run_state
from agegender.training import trainer


def make_strategy(name: str):
  """The tf.distribute strategy a run trains under: chosen here and nowhere else."""
  if name == 'multi_worker':
    if not os.environ.get('TF_CONFIG'):
      raise contract.ArgumentError('distribution_strategy', 'distribution_strategy=multi_worker '
                                   'needs the cluster in the TF_CONFIG environment variable')
    # Before anything else starts TensorFlow's runtime, which it configures for collectives.
    return tf.distribute.MultiWorkerMirroredStrategy()
  gpus = tf.config.list_logical_devices('GPU')
  if name == 'auto':
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
  if name == 'one_device':
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else '/cpu:0')
  return tf.distribute.MirroredStrategy()


def split_sizes(manifest: dict[str, Any]) -> dict[str, int]:
  """Examples per split; raises RecordsError when the records cannot train."""
  sizes = {split: int(manifest['splits'].get(split, {}).get('num_examples', 0))
           for split in contract.SPLITS}
  empty = [split for split, size in sizes.items() if size == 0]
  if empty:
    raise contract.RecordsError(
        f'the records at {manifest["directory"]} have no {" or ".join(empty)} examples; '
        'convert more images with `python -m agegender.make_records`')
  return sizes


# What a resumed run must share with the run whose state it loads: the weights' shapes.
ARCHITECTURE = ('model', 'image_size', 'filters', 'dense_units', 'width', 'depth', 'weights',
                'batch_norm', 'age_head')
# What a run saved before a field existed had: its config.json lacks the field.
_BEFORE_FIELD = {'age_head': 'regression', 'augment_policy': 'flip_shift',
                 'flip_average': False, 'progressive_size': 1.0, 'width': 1.0, 'depth': 1}


def _check_same_model(config: config_lib.Config, model_dir: str) -> None:
  """A run with saved state resumes only with the architecture that state came from; other
  changes (dropout, learning rate, epochs) are allowed and logged."""
  if not os.path.exists(os.path.join(model_dir, contract.CHECKPOINT_DIR)):
    return
  try:
    with open(os.path.join(model_dir, contract.CONFIG_FILE)) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return
  current = json.loads(json.dumps(config_lib.as_dict(config)))  # Tuples as JSON lists.
  changed = [(name, saved.get(section, {}).get(name, _BEFORE_FIELD.get(name)), value)
             for section, values in current.items() for name, value in values.items()
             if saved.get(section, {}).get(name, _BEFORE_FIELD.get(name)) != value]
  architecture = [name for name, _, _ in changed if name in ARCHITECTURE]
  if architecture:
    raise contract.ArgumentError(
        'model_dir', f'model_dir {model_dir} holds a run of another model '
        f'({", ".join(architecture)} differ); choose another --model_dir, or delete it to '
        'start over')
  for name, before, now in changed:
    logging.info('resuming %s with %s=%r (was %r)', model_dir, name, now, before)


def build_task(config: config_lib.Config, statistics: dict[str, Any], steps_per_epoch: int,
               global_batch_size: int):
  """The model, optimizer and metrics of a run (call under the strategy's scope)."""
  age_unit = statistics['age_std'] if config.optim.age_unit == 'std' else 1.0
  # The regression head predicts in loss units; the distribution head starts at the ages' spread.
  spread = age_unit if config.model.age_head == 'regression' else statistics['age_std']
  model = model_lib.build_model(config.model, config.data.image_size,
                                mean_age=statistics['mean_age'], age_std=spread)
  optimizer = trainer.make_optimizer(config.optim, config.optim.epochs * steps_per_epoch,
                                     config.model.mixed_precision)
  optimizer.build(model.trainable_variables)
  sizes = ()
  if config.data.progressive_size < 1.0:
    sizes = tuple(config_lib.epoch_image_size(config, epoch)
                  for epoch in range(config.optim.epochs))
    # The smaller sides pass the network's global pooling; its saved input stays image_size.
    model.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: 3})
  return trainer.Task(model=model, optimizer=optimizer, optim=config.optim,
                      age_unit=float(age_unit), global_batch_size=global_batch_size,
                      age_weight=config_lib.age_loss_weight(config),
                      metrics=trainer.make_metrics(config.model.age_head == 'distribution'),
                      augment=config.data.augment, augment_policy=config.data.augment_policy,
                      seed=config.data.seed, image_sizes=sizes)


def fit(config: config_lib.Config, manifest: dict[str, Any], strategy, model_dir: str, *,
        is_chief: bool, callbacks: Sequence = ()):
  """Trains (or resumes) under `strategy`, writing to model_dir; returns (task, state, epochs
  trained by this call)."""
  sizes = split_sizes(manifest)
  if config.data.batch_size % strategy.num_replicas_in_sync:
    raise contract.ArgumentError('batch_size', f'batch_size={config.data.batch_size} must '
                                 'divide evenly '
                                 f'over {strategy.num_replicas_in_sync} replicas')
  keras.utils.set_random_seed(config.data.seed)
  if config.data.deterministic:
    tf.config.experimental.enable_op_determinism()
  steps_per_epoch = math.ceil(sizes['train'] / config.data.batch_size)
  with strategy.scope():
    task = build_task(config, contract.label_statistics(manifest, 'train'), steps_per_epoch,
                      config.data.batch_size)
  state = run_state.RunState(model_dir, task, write_outputs=is_chief,
                             tensorboard=config.run.tensorboard,
                             restore_from=None if is_chief else config.model_dir)
  first_epoch = state.restore()
  train_data = pipeline.distribute_dataset(
      lambda context: pipeline.make_dataset(config.data, 'train', training=True,
                                            input_context=context, manifest=manifest), strategy)
  validation_data = pipeline.distribute_dataset(
      lambda context: pipeline.make_dataset(config.data, 'validation', input_context=context,
                                            manifest=manifest), strategy)

  def end_of_epoch(epoch: int, logs: dict, examples: int) -> bool:
    if examples < sizes['train']:
      logging.warning('epoch %d trained on %d of the %d training records: %d lost (with a '
                      'tf.data service worker that stopped, or skipped as corrupt)', epoch + 1,
                      examples, sizes['train'], sizes['train'] - examples)
    return state.end_of_epoch(epoch, logs, patience=config.optim.early_stopping_patience,
                              reduce_lr_patience=config.optim.reduce_lr_patience,
                              reduce_lr_factor=config.optim.reduce_lr_factor)

  try:
    trained = trainer.fit(
        task, strategy, train_data, validation_data, first_epoch=first_epoch,
        epochs=config.optim.epochs, steps_per_epoch=steps_per_epoch, end_of_epoch=end_of_epoch,
        steps_per_execution=config.run.steps_per_execution, jit_compile=config.run.jit_compile,
        verbose=config.run.verbose, callbacks=callbacks)
  except tf.errors.OpError:
    damaged = shard_reader.find_damaged(manifest, ('train', 'validation'))
    if damaged is None:
      raise
    raise damaged from None
  return task, state, trained


def train_and_evaluate(config: config_lib.Config, callbacks: Sequence = ()) -> dict[str, Any]:
  """Trains, keeps the best model, evaluates it on the test split and exports it.

  Returns {'model_dir', 'epochs_trained' (this call), 'history' (all epochs'
  rows), 'metrics' (the test evaluation), 'export_dir' (or None)}. Under
  multi_worker, a worker other than the chief trains its part and returns
  model_dir, metrics and export_dir None and no history: the chief writes them.
  """
  config_lib.check(config)
  model_dir = config.model_dir
  strategy = make_strategy(config.run.distribution_strategy)
  manifest = contract.read_manifest(config.data.records_dir)  # Once: every stage gets it.
  if not strategy.extended.should_checkpoint:  # Another worker than the chief.
    with tempfile.TemporaryDirectory(prefix='agegender-worker-') as temporary:
      _, _, trained = fit(config, manifest, strategy, config.run.worker_dir or temporary,
                          is_chief=False, callbacks=callbacks)
    return {'model_dir': None, 'epochs_trained': trained, 'history': [], 'metrics': None,
            'export_dir': None}
  _check_same_model(config, model_dir)
  os.makedirs(model_dir, exist_ok=True)
  files.write_text(os.path.join(model_dir, contract.CONFIG_FILE),
                    json.dumps(config_lib.as_dict(config), indent=2))
  task, state, trained = fit(config, manifest, strategy, model_dir, is_chief=True,
                             callbacks=callbacks)
  rows = state.history
  run_state.plot_learning_curves(rows, os.path.join(model_dir, contract.CURVES_FILE))
  best_path = os.path.join(model_dir, contract.MODEL_FILE)
  if not os.path.exists(best_path):
    task.model.save(best_path)  # No epoch had a finite validation MAE.
  best = export.load_keras_model(best_path)
  changed = False
  if config.model.flip_average and not model_lib.is_flip_averaged(best):
    best, changed = model_lib.flip_averaged(best), True
  if config.model.age_head == 'distribution' and config.model.interval_coverage:
    # On the model that is served: averaging over the mirror image widens the distributions.
    quantiles = evaluate.calibrate_interval(best, config.data.records_dir,
                                            config.model.interval_coverage, manifest=manifest)
    logging.info('age interval: percentiles %.4f and %.4f hold %g of the validation ages',
                 *quantiles, config.model.interval_coverage)
    changed = True
  if changed:
    with files.atomic_path(best_path) as partial:
      best.save(partial)
    best = export.load_keras_model(best_path)  # Traced anew, with the calibrated pair.
  metrics = evaluate.evaluate_model(best, config.data.records_dir, split='test',
                                    output_dir=model_dir, manifest=manifest)
  export_dir = None
  if config.run.export:
    export_dir = export.export_saved_model(best, os.path.join(model_dir, contract.EXPORT_DIR))
  return {'model_dir': model_dir, 'epochs_trained': trained, 'history': rows,
          'metrics': metrics, 'export_dir': export_dir}
