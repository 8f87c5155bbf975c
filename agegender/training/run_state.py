"""A run's state and what it leaves in --model_dir: checkpoints, history, best model, logs.

The state (model, optimizer, finished epochs, the history rows, the best
validation age MAE, the plateau counters) goes through one
`tf.train.Checkpoint` kept by a `tf.train.CheckpointManager`, saved after
every epoch. A run killed at any point (even by kill -9) starts again from
its last saved epoch; history.csv is written whole from the saved rows, so it
never holds an epoch that the state does not.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os

from absl import logging
from matplotlib import figure as figure_lib
import tensorflow as tf

from agegender import contract
from agegender import files
from agegender.training import trainer



class RunState:
  """The checkpointed state of one run, and the files that derive from it."""

  def __init__(self, model_dir: str, task: trainer.Task, *, write_outputs: bool = True,
               tensorboard: bool = True, restore_from: str | None = None):
    self.model_dir = model_dir
    self.task = task
    self.write_outputs = write_outputs
    self.tensorboard = tensorboard
    self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name='epoch')
    self.best = tf.Variable(math.inf, dtype=tf.float64, trainable=False, name='best')
    self.since_best = tf.Variable(0, dtype=tf.int64, trainable=False, name='since_best')
    self.history_json = tf.Variable('[]', dtype=tf.string, trainable=False, name='history')
    self.checkpoint = tf.train.Checkpoint(
        model=task.model, optimizer=task.optimizer, epoch=self.epoch, best=self.best,
        since_best=self.since_best, history=self.history_json)
    self.manager = tf.train.CheckpointManager(
        self.checkpoint, os.path.join(model_dir, contract.CHECKPOINT_DIR), max_to_keep=2)
    self._restore_from = restore_from
    self._summaries = None

  def restore(self) -> int:
    """Loads the latest saved state, if any (a chief's, for another worker); returns the
    epoch to start from."""
    latest = None
    if self._restore_from:
      latest = tf.train.latest_checkpoint(os.path.join(self._restore_from, contract.CHECKPOINT_DIR))
    latest = latest or self.manager.latest_checkpoint
    if latest:
      self.checkpoint.restore(latest).assert_existing_objects_matched()
      logging.info('resumed from %s at epoch %d', latest, int(self.epoch))
      if self.write_outputs:  # A kill may have come between the state and the file.
        files.write_text(os.path.join(self.model_dir, contract.HISTORY_FILE), history_csv(self.history))
    return int(self.epoch)

  @property
  def history(self) -> list[dict[str, float]]:
    return json.loads(self.history_json.numpy().decode('utf-8'))

  def end_of_epoch(self, epoch: int, logs: dict[str, float], *, patience: int = 0,
                   reduce_lr_patience: int = 0, reduce_lr_factor: float = 0.5) -> bool:
    """Keeps the best model, the plateau counters and the history; saves the state. Returns
    whether to stop early."""
    value = logs.get(trainer.MONITOR, math.nan)
    if trainer.is_better(value, float(self.best)):
      self.best.assign(value)
      self.since_best.assign(0)
      if self.write_outputs:
        self._save_best()
    else:
      self.since_best.assign_add(1)
    if reduce_lr_patience and int(self.since_best) and not int(self.since_best) % reduce_lr_patience:
      self._reduce_learning_rate(reduce_lr_factor)
    logs['learning_rate'] = float(self.task.optimizer.learning_rate)
    rows = self.history + [{'epoch': epoch, **logs}]
    self.history_json.assign(json.dumps(rows))
    self.epoch.assign(epoch + 1)
    with files.quiet():
      self.manager.save(checkpoint_number=epoch + 1)
    if self.write_outputs:
      files.write_text(os.path.join(self.model_dir, contract.HISTORY_FILE), history_csv(rows))
      if self.tensorboard:
        self._write_summaries(epoch, logs)
    stop = bool(patience) and int(self.since_best) >= patience
    if stop:
      logging.info('no better %s for %d epochs: stopping early', trainer.MONITOR, patience)
    return stop

  def _save_best(self) -> None:
    # The temporary name keeps the .keras ending, which Keras needs.
    with files.atomic_path(os.path.join(self.model_dir, contract.MODEL_FILE)) as partial:
      self.task.model.save(partial)

  def _reduce_learning_rate(self, factor: float) -> None:
    # A constant learning rate is an optimizer variable: saved with the state, so it stays reduced.
    optimizer = self.task.optimizer
    optimizer.learning_rate = float(optimizer.learning_rate) * factor
    logging.info('learning rate reduced to %g', float(optimizer.learning_rate))

  def _write_summaries(self, epoch: int, logs: dict[str, float]) -> None:
    if self._summaries is None:
      root = os.path.join(self.model_dir, contract.LOGS_DIR)
      self._summaries = {'train': tf.summary.create_file_writer(os.path.join(root, 'train')),
                         'validation': tf.summary.create_file_writer(
                             os.path.join(root, 'validation'))}
    for name, value in logs.items():
      writer, tag = ((self._summaries['validation'], name[4:]) if name.startswith('val_')
                     else (self._summaries['train'], name))
      with writer.as_default():
        tf.summary.scalar(f'epoch_{tag}', value, step=epoch)
    for writer in self._summaries.values():
      writer.flush()


def history_csv(rows: list[dict[str, float]]) -> str:
  columns = ['epoch'] + sorted({key for row in rows for key in row} - {'epoch'})
  out = io.StringIO()
  writer = csv.DictWriter(out, columns, lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  return out.getvalue()


def plot_learning_curves(rows: list[dict[str, float]], path: str) -> str:
  """Loss, gender accuracy, age MAE and (the distribution head's) the age interval's coverage
  per epoch, train against validation, as a PNG."""
  panels = (('loss', 'loss'), ('gender_output_accuracy', 'gender accuracy'),
            ('age_output_mae', 'age MAE (years)'))
  if any(trainer.COVERAGE in row for row in rows):
    panels += ((trainer.COVERAGE, 'age interval coverage'),)
  epochs = [int(row['epoch']) + 1 for row in rows]
  figure = figure_lib.Figure(figsize=(4 * len(panels), 3.5))  # No pyplot: no global state.
  axes = figure.subplots(1, len(panels))
  for axis, (key, title) in zip(axes, panels, strict=True):
    for prefix, label in (('', 'train'), ('val_', 'validation')):
      axis.plot(epochs, [row.get(prefix + key, math.nan) for row in rows], marker='o',
                markersize=3, label=label)
    axis.set(title=title, xlabel='epoch')
    axis.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  return path
