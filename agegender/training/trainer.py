"""The training step, written out, and one loop for every strategy.

A step is `strategy.run` of `train_step` on each replica: a GradientTape over
the two heads' losses, each example's loss summed and divided by the global
batch (so the replicas' gradients add up to the batch mean), scaled for
mixed precision by the optimizer. The same loop runs on one device,
MirroredStrategy and MultiWorkerMirroredStrategy (where Keras 3's `fit`
fails). Every metric counts examples, so the logged loss is the weighted sum
of the head losses on any strategy, a short last batch included.

An example without a gender (labels.UNKNOWN_GENDER, -1) trains the age head
only: its gender loss is 0 and the gender metrics skip it. The sum is still
divided by the global batch, so a batch's gender term is (its examples with
a gender / its examples) times their mean gender loss, on any number of
replicas; the logged gender loss and accuracy are over the examples with a
gender, and the logged loss is the mean over all examples of each one's
weighted sum.

The age loss: for the regression head, --age_loss of the error in
--age_unit units; for the distribution head, the KL divergence of its
distribution from a Gaussian of --age_sigma years around the true age (over
whole years, renormalized), plus the absolute error of its expected age in
--age_unit units (DLDL-v2's label distribution and expectation losses).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

from absl import logging
import keras
import tensorflow as tf

from agegender import contract
from agegender.data import preprocess
from agegender.records import labels as labels_lib
from agegender.training import config as config_lib
from agegender.training import model as model_lib

G, A = contract.GENDER_OUTPUT, contract.AGE_OUTPUT
# The quantity that picks the best model, reduces the learning rate and stops early.
MONITOR = 'val_age_output_mae'
# The distribution head's interval metrics: coverage of the true age, and width in years.
COVERAGE = f'{A}_coverage'
WIDTH = f'{A}_width'


@dataclasses.dataclass
class Task:
  """What a step needs: the model, its optimizer, the loss settings and the metrics."""
  model: keras.Model
  optimizer: keras.optimizers.Optimizer
  optim: config_lib.OptimConfig
  age_unit: float  # Years per unit of the age error the loss sees.
  global_batch_size: int
  metrics: dict[str, keras.metrics.Metric]
  age_weight: float = 1.0  # Of the age loss in the total (config_lib.age_loss_weight).
  augment: bool = False  # Vary each training batch (training_images) by augment_policy.
  augment_policy: str = 'colour'  # A preprocess.POLICIES name (config's default).
  seed: int = 0  # Of the augmentation.
  image_sizes: tuple[int, ...] = ()  # The side trained at in each epoch (empty: as read).


def make_metrics(interval: bool = False) -> dict[str, keras.metrics.Metric]:
  """The logged metrics; with `interval` (the distribution head) also the share of true ages
  inside [age_low, age_high] (coverage) and its mean width in years."""
  metrics = {'loss': keras.metrics.Mean(name='loss'),
             f'{G}_loss': keras.metrics.Mean(name=f'{G}_loss'),
             f'{A}_loss': keras.metrics.Mean(name=f'{A}_loss'),
             f'{G}_accuracy': keras.metrics.BinaryAccuracy(name=f'{G}_accuracy'),
             f'{A}_mae': keras.metrics.MeanAbsoluteError(name=f'{A}_mae')}
  if interval:
    metrics[COVERAGE] = keras.metrics.Mean(name=COVERAGE)
    metrics[WIDTH] = keras.metrics.Mean(name=WIDTH)
  return metrics


def learning_rate(optim: config_lib.OptimConfig, total_steps: int):
  """The learning rate: constant, or a linear warm-up then a cosine decay to 0."""
  if optim.schedule == 'constant':
    return optim.learning_rate
  warmup = min(optim.warmup_steps, total_steps // 5)
  return keras.optimizers.schedules.CosineDecay(
      0.0 if warmup else optim.learning_rate, decay_steps=max(1, total_steps - warmup),
      warmup_target=optim.learning_rate if warmup else None, warmup_steps=warmup)


def make_optimizer(optim: config_lib.OptimConfig, total_steps: int,
                   mixed_precision: bool) -> keras.optimizers.Optimizer:
  rate = learning_rate(optim, total_steps)
  if optim.weight_decay:
    optimizer = keras.optimizers.AdamW(rate, weight_decay=optim.weight_decay)
  else:
    optimizer = keras.optimizers.Adam(rate)
  return keras.optimizers.LossScaleOptimizer(optimizer) if mixed_precision else optimizer


def _age_loss(error: tf.Tensor, kind: str) -> tf.Tensor:
  if kind == 'mse':
    return tf.square(error)
  if kind == 'mae':
    return tf.abs(error)
  absolute = tf.abs(error)  # Huber with delta 1.
  return tf.where(absolute <= 1.0, 0.5 * tf.square(error), absolute - 0.5)


def gender_known(targets) -> tf.Tensor:
  """1.0 for each example with a gender, 0.0 for UNKNOWN_GENDER: [B] float32."""
  return tf.cast(tf.reshape(targets[G], [-1]) != labels_lib.UNKNOWN_GENDER, tf.float32)


def log_gaussian_labels(age: tf.Tensor, sigma: float) -> tf.Tensor:
  """Ages [B, 1] in years -> the log of [B, AGES]: a Gaussian of `sigma` years around each,
  over the whole years, renormalized."""
  years = tf.range(model_lib.AGES, dtype=tf.float32)
  return tf.nn.log_softmax(-tf.square(years - age) / (2.0 * sigma * sigma), axis=-1)


def distribution_loss(probabilities: tf.Tensor, age: tf.Tensor, sigma: float) -> tf.Tensor:
  """KL(Gaussian label || predicted distribution) per example: [B, AGES], [B, 1] -> [B]."""
  log_target = log_gaussian_labels(age, sigma)
  log_predicted = tf.math.log(tf.maximum(probabilities, 1e-12))
  return tf.reduce_sum(tf.exp(log_target) * (log_target - log_predicted), axis=-1)


def per_example_losses(task: Task, outputs, targets) -> tuple[tf.Tensor, tf.Tensor]:
  """Each example's gender loss (0 without a gender) and age loss, [B] each, float32."""
  probability = tf.cast(outputs[G], tf.float32)
  # Unknown genders get a valid stand-in target, then a weight of 0.
  gender = keras.losses.binary_crossentropy(tf.maximum(targets[G], 0.0), probability)
  gender = gender * gender_known(targets)
  error = (tf.cast(outputs[A], tf.float32) - targets[A]) / task.age_unit
  if model_lib.AGE_DISTRIBUTION in outputs:
    kl = distribution_loss(tf.cast(outputs[model_lib.AGE_DISTRIBUTION], tf.float32),
                           targets[A], task.optim.age_sigma)
    return gender, kl + tf.reduce_mean(tf.abs(error), axis=-1)
  age = tf.reduce_mean(_age_loss(error, task.optim.age_loss), axis=-1)
  return gender, age


def _update_metrics(task: Task, outputs, targets, gender_loss, age_loss, total) -> None:
  metrics = task.metrics
  known = gender_known(targets)
  metrics['loss'].update_state(total)
  metrics[f'{G}_loss'].update_state(gender_loss, sample_weight=known)
  metrics[f'{A}_loss'].update_state(age_loss)
  metrics[f'{G}_accuracy'].update_state(targets[G], outputs[G], sample_weight=known)
  metrics[f'{A}_mae'].update_state(targets[A], outputs[A])
  if COVERAGE in metrics:
    low, high = model_lib.age_interval(outputs)
    inside = tf.logical_and(low <= targets[A], targets[A] <= high)
    metrics[COVERAGE].update_state(tf.cast(inside, tf.float32))
    metrics[WIDTH].update_state(high - low)


def _total(task: Task, gender_loss, age_loss):
  return task.optim.gender_loss_weight * gender_loss + task.age_weight * age_loss


def training_images(task: Task, images: tf.Tensor) -> tf.Tensor:
  """The batch the step trains on: varied by task.augment_policy when task.augment, on the
  batch's device, from a seed of (task.seed, step). Each replica takes its
  share of the global batch's draws, so one device and several see the same
  images."""
  if not task.augment:
    return images
  context = tf.distribute.get_replica_context()
  share = task.global_batch_size // context.num_replicas_in_sync
  seed = tf.random.experimental.stateless_fold_in(
      tf.constant([task.seed, 0], tf.int64), tf.cast(task.optimizer.iterations, tf.int64))
  return preprocess.augment_batch(images, seed, first=context.replica_id_in_sync_group * share,
                                  total=task.global_batch_size, policy=task.augment_policy)


def resized(images: tf.Tensor, size: int | None) -> tf.Tensor:
  """uint8 images [B, S, S, 3] at side `size` (None or S: unchanged), still uint8."""
  if size is None:
    return images
  return preprocess.resize_pixels(images, size, antialias=True)


def train_step(task: Task, data, size: int | None = None) -> tf.Tensor:
  """One optimizer step on this replica's batch, its images at side `size` (None: as read);
  returns its example count."""
  images, targets = data
  images = resized(training_images(task, images), size)
  with tf.GradientTape() as tape:
    outputs = task.model(images, training=True)
    gender_loss, age_loss = per_example_losses(task, outputs, targets)
    total = _total(task, gender_loss, age_loss)
    loss = tf.reduce_sum(total) / task.global_batch_size
    scaled = task.optimizer.scale_loss(loss)
  variables = task.model.trainable_variables
  gradients = tape.gradient(scaled, variables)
  task.optimizer.apply_gradients(zip(gradients, variables))
  _update_metrics(task, outputs, targets, gender_loss, age_loss, total)
  return tf.shape(images, out_type=tf.int64)[0]


def eval_step(task: Task, data) -> tf.Tensor:
  images, targets = data
  outputs = task.model(images, training=False)
  gender_loss, age_loss = per_example_losses(task, outputs, targets)
  _update_metrics(task, outputs, targets, gender_loss, age_loss,
                  _total(task, gender_loss, age_loss))
  return tf.shape(images, out_type=tf.int64)[0]


def step_function(task: Task, strategy, step: Callable, steps_per_execution: int = 1,
                  jit_compile: bool = False):
  """A tf.function running up to `steps_per_execution` of `step` on every replica; returns
  (steps run, examples seen over all replicas); 0 steps at the end of the data."""
  replica_step = lambda data: step(task, data)
  if jit_compile:
    replica_step = tf.function(replica_step, jit_compile=True)

  @tf.function
  def run_steps(iterator):
    steps = tf.constant(0, tf.int64)
    examples = tf.constant(0, tf.int64)
    for _ in tf.range(steps_per_execution):
      # Under several workers, every worker runs the step until all are out of data.
      optional = iterator.get_next_as_optional()
      if not optional.has_value():
        break
      sizes = strategy.run(replica_step, args=(optional.get_value(),))
      examples += strategy.reduce('SUM', sizes, axis=None)
      steps += 1
    return steps, examples

  return run_steps


def results(task: Task) -> dict[str, float]:
  # Metric variables sum over the replicas and workers when read here.
  return {name: float(metric.result()) for name, metric in task.metrics.items()}


def reset(task: Task) -> None:
  for metric in task.metrics.values():
    metric.reset_state()


def run_pass(run_steps, dataset, task: Task, callbacks, hook: str) -> tuple[int, int]:
  """One pass over a distributed dataset; returns (steps, examples)."""
  iterator = iter(dataset)
  steps = examples = 0
  while True:
    getattr(callbacks, f'on_{hook}_batch_begin')(steps)
    ran, seen = run_steps(iterator)
    if not int(ran):
      return steps, examples
    steps += int(ran)
    examples += int(seen)
    getattr(callbacks, f'on_{hook}_batch_end')(steps - 1, results(task))


def fit(task: Task, strategy, train_data, validation_data, *, first_epoch: int, epochs: int,
        steps_per_epoch: int, end_of_epoch: Callable[[int, dict, int], bool],
        steps_per_execution: int = 1, jit_compile: bool = False, verbose: int = 1,
        callbacks: Sequence[keras.callbacks.Callback] = ()) -> int:
  """Trains epochs first_epoch .. epochs-1; returns the number trained.

  After each epoch `end_of_epoch(epoch, logs, examples trained on)` saves what
  must be saved and says whether to stop (early stopping). Keras's progress bar and any
  `callbacks` see the usual batch and epoch events.
  """
  train_steps_by_size = {}  # One traced step per side that progressive resizing trains at.

  def train_steps_for(epoch: int):
    size = task.image_sizes[epoch] if task.image_sizes else None
    if size not in train_steps_by_size:
      if size is not None:
        logging.info('epoch %d trains at %dx%d pixels', epoch + 1, size, size)
      step = lambda task, data: train_step(task, data, size)
      train_steps_by_size[size] = step_function(task, strategy, step, steps_per_execution,
                                                jit_compile)
    return train_steps_by_size[size]

  test_steps = step_function(task, strategy, eval_step, steps_per_execution)
  callbacks = keras.callbacks.CallbackList(
      list(callbacks), add_progbar=verbose != 0, verbose=verbose, epochs=epochs,
      steps=steps_per_epoch, model=task.model)
  callbacks.on_train_begin()
  logs: dict[str, float] = {}
  trained = 0
  for epoch in range(first_epoch, epochs):
    reset(task)
    callbacks.on_epoch_begin(epoch)
    _, examples = run_pass(train_steps_for(epoch), train_data, task, callbacks, 'train')
    logs = results(task)
    reset(task)
    callbacks.on_test_begin()
    run_pass(test_steps, validation_data, task, callbacks, 'test')
    validation = results(task)
    callbacks.on_test_end(validation)
    logs.update({f'val_{name}': value for name, value in validation.items()})
    trained += 1
    stop = end_of_epoch(epoch, logs, examples)
    callbacks.on_epoch_end(epoch, logs)
    if stop:
      break
  callbacks.on_train_end(logs)
  return trained


def is_better(value: float, best: float) -> bool:
  return math.isfinite(value) and value < best
