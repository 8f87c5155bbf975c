"""Training: the run's outputs, learning, resume after kill -9, flags and bad input."""

import csv
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from absl import flags
import pytest

import runs  # tests/runs.py

from agegender.training import loop
from agegender import cli
from agegender import train

OUTPUTS = ('model.keras', 'history.csv', 'metrics.json', 'metrics.txt', 'learning_curves.png',
           'predicted_age.png', 'config.json', 'export/saved_model.pb')


def _epochs_in_history(model_dir):
  with open(os.path.join(model_dir, 'history.csv'), newline='') as f:
    return [int(row['epoch']) for row in csv.DictReader(f)]


def test_a_run_writes_every_output_into_model_dir(trained_run):
  model_dir = trained_run['model_dir']
  for name in OUTPUTS:
    assert os.path.isfile(os.path.join(model_dir, name)), name
  assert _epochs_in_history(model_dir) == list(range(4))
  with open(os.path.join(model_dir, 'metrics.json')) as f:
    assert json.load(f) == trained_run['metrics']


@pytest.mark.skipif(importlib.util.find_spec('tensorboard') is None,
                    reason='TensorBoard is not installed')
def test_a_run_writes_tensorboard_logs(trained_run):
  logs = os.path.join(trained_run['model_dir'], 'logs')
  events = [name for _, _, names in os.walk(logs) for name in names if 'tfevents' in name]
  assert events


def test_the_default_model_learns_the_synthetic_faces(trained_run):
  metrics = trained_run['metrics']
  baselines = metrics['baselines']
  assert metrics['gender_accuracy'] >= max(0.85, baselines['majority_gender_accuracy'] + 0.25)
  assert metrics['age_mae'] <= 0.5 * baselines['mean_age_mae']


def test_the_saved_model_is_the_best_by_validation_age_mae(trained_run):
  from agegender.serving import evaluate, export  # pylint: disable=g-import-not-at-top
  from agegender.training import model as model_lib  # pylint: disable=g-import-not-at-top
  rows = trained_run['history']
  best = min(row['val_age_output_mae'] for row in rows)
  model = export.load_keras_model(trained_run['model_dir'])
  # Saved flip-averaged (--flip_average, the default); validation measured the model it wraps.
  assert model_lib.is_flip_averaged(model)
  saved = json.load(open(os.path.join(trained_run['model_dir'], 'config.json')))
  metrics = evaluate.evaluate_model(model_lib.unflipped(model), saved['data']['records_dir'],
                                    split='validation')
  assert metrics['age_mae'] == pytest.approx(best, rel=1e-3)


def test_the_history_holds_the_epochs_learning_rate_of_the_cosine_schedule(trained_run):
  rates = [row['learning_rate'] for row in trained_run['history']]
  assert rates[-1] == pytest.approx(0.0, abs=1e-9)
  assert max(rates) > rates[-1] and all(rate >= 0 for rate in rates)


class _EpochsSeen:
  """A callback that records the epochs the loop runs."""

  def __init__(self):
    import keras  # pylint: disable=g-import-not-at-top
    self.epochs = []
    outer = self

    class Callback(keras.callbacks.Callback):
      def on_epoch_begin(self, epoch, logs=None):
        outer.epochs.append(epoch)

    self.callback = Callback()


def test_a_run_killed_with_sigkill_resumes_without_repeating_epochs(
    synthetic_records, run_config, tmp_path):
  model_dir = tmp_path / 'killed'
  config = run_config(synthetic_records, model_dir, epochs=4, tensorboard=False, export=False)
  command = [sys.executable, '-m', 'agegender.train', f'--records_dir={synthetic_records}',
             f'--model_dir={model_dir}', f'--image_size={config.data.image_size}',
             '--epochs=4', '--batch_size=32', '--shuffle_buffer=1000', '--deterministic',
             '--verbose=0', '--notensorboard', '--noexport']
  process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    while runs.saved_epoch(model_dir) < 1 and process.poll() is None:
      time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
  finally:
    _, stderr = process.communicate(timeout=60)
  assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
  saved = runs.saved_epoch(model_dir)
  assert 1 <= saved < 4, 'the run should be killed before its last epoch'

  seen = _EpochsSeen()
  result = loop.train_and_evaluate(config, callbacks=[seen.callback])
  assert seen.epochs == list(range(saved, 4))
  assert result['epochs_trained'] == 4 - saved
  assert _epochs_in_history(model_dir) == [0, 1, 2, 3]


def _saved_config(model_dir, **overrides):
  from agegender.training import config as config_lib  # pylint: disable=g-import-not-at-top
  saved = json.load(open(os.path.join(model_dir, 'config.json')))
  values = {name: value for section in saved.values() for name, value in section.items()}
  values['filters'] = tuple(values['filters'])
  values.update(overrides)
  return config_lib.make_config(**values)


def test_a_finished_run_started_again_trains_no_more(trained_run):
  config = _saved_config(trained_run['model_dir'], tensorboard=False, export=False)
  result = loop.train_and_evaluate(config)
  assert result['epochs_trained'] == 0
  assert _epochs_in_history(trained_run['model_dir']) == list(range(4))


@pytest.mark.parametrize('change', [{'filters': (8, 8, 8)}, {'age_head': 'other'},
                                    {'width': 1.5}, {'depth': 2}])
def test_resuming_with_another_model_is_a_configuration_error(trained_run, change):
  from agegender import contract  # pylint: disable=g-import-not-at-top
  from agegender.training import config as config_lib  # pylint: disable=g-import-not-at-top
  if 'age_head' in change:  # The head the shared run did not train.
    saved = _saved_config(trained_run['model_dir']).model.age_head
    change = {'age_head': next(h for h in config_lib.AGE_HEADS if h != saved)}
  other = _saved_config(trained_run['model_dir'], export=False, **change)
  with pytest.raises(contract.ArgumentError, match=f'{next(iter(change))} differ'):
    loop.train_and_evaluate(other)


def test_the_interval_is_calibrated_on_validation_and_logged_per_epoch(trained_run):
  from agegender.serving import evaluate, export  # pylint: disable=g-import-not-at-top
  rows = trained_run['history']
  assert all(0 < row['val_age_output_coverage'] <= 1 for row in rows)
  assert all(row['val_age_output_width'] > 0 for row in rows)
  model = export.load_keras_model(trained_run['model_dir'])
  saved = json.load(open(os.path.join(trained_run['model_dir'], 'config.json')))
  validation = evaluate.evaluate_model(model, saved['data']['records_dir'], split='validation')
  # The largest symmetric percentile pair that holds 80% of the validation ages (about 120).
  assert 0.8 <= validation['coverage'] < 0.85
  low, high = validation['interval_quantiles']
  assert low == pytest.approx(1 - high) and low != 0.1
  assert trained_run['metrics']['interval_quantiles'] == [low, high]


# ---- Flags. ----

@pytest.fixture
def train_flags():
  """train's flags in a FlagValues of their own (make_records may own the global ones here)."""
  flag_values = flags.FlagValues()
  train.define_flags(flag_values)
  return flag_values


def test_every_config_field_is_a_flag_and_the_flags_default_to_the_fields(train_flags):
  from agegender.training import config as config_lib  # pylint: disable=g-import-not-at-top
  own = {flag.name for flag in train_flags.get_flags_for_module(train.__name__)}
  assert own == set(config_lib.fields()) | {'recipe'}
  train_flags(['train'])
  assert train.config_from_flags(train_flags) == config_lib.Config()


def test_flags_become_one_config(train_flags):
  train_flags(['train', '--model=tiny', '--filters=4,8', '--epochs=3', '--mixed_precision'])
  config = train.config_from_flags(train_flags)
  assert config.model.model == 'tiny'
  assert config.model.filters == (4, 8)
  assert config.optim.epochs == 3
  assert config.model.mixed_precision
  assert config.data.batch_size == 128
  assert config.data.image_size == 128
  assert config.data.records_dir == 'records'
  assert config.model_dir == os.path.join('runs', 'tiny')


def test_the_reference_recipe_is_the_seed_notebooks_and_flags_override_it(train_flags):
  train_flags(['train', '--recipe=reference', '--epochs=1'])
  config = train.config_from_flags(train_flags)
  assert (config.model.model, config.model.age_head, config.model.batch_norm,
          config.data.augment) == ('seed_cnn', 'regression', False, False)
  assert (config.model.dropout, config.model.flip_average) == (0.5, False)
  assert (config.optim.age_loss, config.optim.age_unit, config.optim.learning_rate,
          config.optim.weight_decay, config.optim.schedule) == ('mse', 'years', 1e-4, 0.0,
                                                               'constant')
  assert (config.optim.gender_loss_weight, config.optim.age_loss_weight) == (1.0, 1.0)
  assert config.optim.epochs == 1


def test_filters_that_are_not_integers_are_a_usage_error(train_flags):
  train_flags(['train', '--filters=4,eight'])
  with pytest.raises(cli.UsageError, match='--filters'):
    train.config_from_flags(train_flags)


def test_auto_strategy_on_one_device_is_the_default_strategy():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if len(tf.config.list_logical_devices('GPU')) > 1:
    pytest.skip('several GPUs: auto is MirroredStrategy')
  assert loop.make_strategy('auto') is tf.distribute.get_strategy()
  one = loop.make_strategy('one_device')
  assert isinstance(one, tf.distribute.OneDeviceStrategy)
  assert one.num_replicas_in_sync == 1


def _empty_records(tmp_path, synthetic_records):
  from agegender import contract  # pylint: disable=g-import-not-at-top
  manifest = contract.read_manifest(synthetic_records)
  manifest.pop('directory')
  manifest['splits']['train'] = {'num_examples': 0, 'shards': []}
  directory = tmp_path / 'empty'
  directory.mkdir()
  (directory / contract.MANIFEST_NAME).write_text(json.dumps(manifest))
  return directory


# Runs train's command line once per case, in one process of its own (one TensorFlow start-up):
# the real define_flags, flag parsing and cli.run. Downloads fail as they do offline.
_COMMAND_LINE_CASES = """
import contextlib, io, json, sys, warnings
from absl import flags
from agegender.training import model
def no_network(*args, **kwargs):
  raise Exception('URL fetch failure on https://storage.googleapis.com/: no network')
model.load_application = no_network
warnings.simplefilter('ignore')
from agegender import cli
from agegender import train
train.define_flags()
results = []
for args in json.loads(sys.argv[1]):
  flags.FLAGS.unparse_flags()
  sys.argv = ['agegender.train', *args]
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    try:
      cli.run(train.main)
      status = 0
    except SystemExit as e:
      status = e.code
  results.append([status, stderr.getvalue()])
print(json.dumps(results))
"""

BAD_FLAGS = [
    (['--epochs=0'], '--epochs must be positive'),
    (['--epochs=-2'], '--epochs must be positive'),
    (['--batch_size=0'], '--batch_size must be positive'),
    (['--batch_size=-8'], '--batch_size must be positive'),
    (['--model=vgg16'], 'flag --model=vgg16'),
    (['--records_dir={tmp}/nowhere'], 'no records at'),
    (['--records_dir={empty}'], 'no train examples'),
    (['--model=mobilenet_v3_small', '--weights=imagenet'], 'cannot load imagenet weights'),
    (['--model=tiny', '--weights=imagenet'], '--weights imagenet need a keras.applications model'),
    (['--dropout=1'], '--dropout must be in [0, 1)'),
    (['--progressive_size=0'], '--progressive_size must be positive'),
    (['--progressive_size=1.5'], 'flag --progressive_size=1.5: 1.5 is not number <= 1'),
    (['--progressive_size=0.5', '--model=tiny'], '--progressive_size needs compact_cnn'),
    (['--progressive_size=0.5'], 'trains the first epochs at 16 pixels; 32 is the least'),
    (['--reduce_lr_patience=2'], '--reduce_lr_patience needs the constant'),
    (['--distribution_strategy=multi_worker'], '--distribution_strategy=multi_worker needs'),
    (['--records_dir={damaged}'], '(--skip_corrupt skips corrupt records)'),
]


def _damaged_records(tmp_path, synthetic_records):
  """A copy of the records with one training shard cut in half."""
  from agegender import contract  # pylint: disable=g-import-not-at-top
  copy = tmp_path / 'damaged'
  shutil.copytree(synthetic_records, copy)
  shard = contract.split_shards(contract.read_manifest(str(copy)), 'train')[0]
  with open(shard, 'rb') as f:
    data = f.read()
  with open(shard, 'wb') as f:
    f.write(data[:len(data) // 2])
  return copy


def test_each_bad_flag_gives_one_line_and_exit_2(tmp_path, synthetic_records):
  empty = _empty_records(tmp_path, synthetic_records)
  damaged = _damaged_records(tmp_path, synthetic_records)
  cases = []
  for args, _ in BAD_FLAGS:
    args = [arg.format(tmp=tmp_path, empty=empty, damaged=damaged) for arg in args]
    if not any(arg.startswith('--records_dir') for arg in args):
      args.append(f'--records_dir={synthetic_records}')
    cases.append([f'--model_dir={tmp_path}/run', '--image_size=32', '--verbose=0', *args])
  completed = subprocess.run([sys.executable, '-c', _COMMAND_LINE_CASES, json.dumps(cases)],
                             capture_output=True, text=True, timeout=300)
  assert completed.returncode == 0, completed.stderr[-3000:]
  results = json.loads(completed.stdout.strip().splitlines()[-1])
  for (args, message), (status, stderr) in zip(BAD_FLAGS, results, strict=True):
    lines = stderr.strip().splitlines()
    assert status == 2, (args, stderr)
    assert len(lines) == 1, (args, lines)
    assert lines[0].startswith('agegender.train: error: ') and message in lines[0], (args, lines)


# ---- The logged losses, on one device and on two replicas. ----

# 97 examples in batches of 32: a short last batch of one, which two replicas split 1 + 0.
# Every third has no gender (-1): its gender loss is 0, its age loss counts.
LOSS_EXAMPLES = 97
LOSS_BATCH = 32
KNOWN_SHARE = 64 / 97


def _loss_arrays():
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (LOSS_EXAMPLES, 32, 32, 3), dtype=np.uint8)
  genders = rng.integers(0, 2, (LOSS_EXAMPLES, 1)).astype(np.float32)
  genders[::3] = -1
  targets = {'gender_output': genders,
             'age_output': rng.integers(1, 90, (LOSS_EXAMPLES, 1)).astype(np.float32)}
  return images, targets


def _loss_data():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.data.Dataset.from_tensor_slices(_loss_arrays()).batch(LOSS_BATCH)


def _tiny_task(strategy):
  import keras  # pylint: disable=g-import-not-at-top
  from agegender.training import config as config_lib  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(0)
  config = config_lib.make_config(model='tiny', image_size=32, batch_size=LOSS_BATCH,
                                  gender_loss_weight=2.0, epochs=2,
                                  dropout=0.0)  # Random masks differ between replica layouts.
  with strategy.scope():
    return loop.build_task(config, {'mean_age': 40.0, 'age_std': 20.0}, steps_per_epoch=4,
                            global_batch_size=LOSS_BATCH)


def loop_history(strategy, epochs=2):
  """The loop's logs per epoch for the tiny model on _loss_data under `strategy`, and the task."""
  from agegender.training import trainer  # pylint: disable=g-import-not-at-top
  task = _tiny_task(strategy)
  rows = []

  def end_of_epoch(epoch, logs, examples):
    assert examples == LOSS_EXAMPLES
    rows.append(dict(logs))
    return False

  trainer.fit(task, strategy, strategy.experimental_distribute_dataset(_loss_data()),
              strategy.experimental_distribute_dataset(_loss_data()), first_epoch=0,
              epochs=epochs, steps_per_epoch=4, end_of_epoch=end_of_epoch, verbose=0)
  return rows, task


def _assert_loss_is_the_weighted_sum_of_its_parts(rows):
  from agegender.training import config as config_lib  # pylint: disable=g-import-not-at-top
  # The gender loss is logged over the examples with a gender, the loss over all of them; the
  # age loss weighs the distribution head's own weight (age_loss_weight unset).
  age_weight = config_lib.AGE_LOSS_WEIGHTS['distribution']
  for row in rows:
    for prefix in ('', 'val_'):
      total = row[prefix + 'loss']
      parts = (2.0 * KNOWN_SHARE * row[prefix + 'gender_output_loss']
               + age_weight * row[prefix + 'age_output_loss'])
      assert total == pytest.approx(parts, rel=1e-5), (prefix, row)


def test_the_logged_losses_are_the_means_over_examples_and_add_up():
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rows, task = loop_history(tf.distribute.get_strategy())
  _assert_loss_is_the_weighted_sum_of_its_parts(rows)
  # The last validation pass, recomputed by hand over all 97 examples at once: the gender
  # figures over the 64 with a gender, the default (distribution) head's KL + L1 over all.
  images, targets = _loss_arrays()
  outputs = task.model(images, training=False)
  known = targets['gender_output'][:, 0] >= 0
  probability = np.clip(outputs['gender_output'].numpy()[known], 1e-7, 1 - 1e-7)
  gender = targets['gender_output'][known]
  bce = -(gender * np.log(probability) + (1 - gender) * np.log(1 - probability))
  age = targets['age_output']
  target = np.exp(-np.square(np.arange(121) - age) / (2 * 4.0 ** 2))
  target /= target.sum(axis=-1, keepdims=True)
  predicted = outputs['age_distribution'].numpy()
  kl = np.sum(np.where(target > 0, target * (np.log(np.maximum(target, 1e-300))
                                             - np.log(predicted)), 0), axis=-1)
  error = np.abs(outputs['age_output'].numpy() - age)
  last = rows[-1]
  assert last['val_gender_output_loss'] == pytest.approx(bce.mean(), rel=1e-4)
  assert last['val_age_output_loss'] == pytest.approx(np.mean(kl + error[:, 0] / 20.0), rel=1e-4)
  assert last['val_age_output_mae'] == pytest.approx(error.mean(), rel=1e-4)
  accuracy = np.mean((probability >= 0.5) == (gender >= 0.5))
  assert last['val_gender_output_accuracy'] == pytest.approx(accuracy, rel=1e-6)
  inside = (outputs['age_low'].numpy() <= age) & (age <= outputs['age_high'].numpy())
  assert last['val_age_output_coverage'] == pytest.approx(inside.mean(), rel=1e-6)


# Two replicas on two logical CPUs, in a process of its own (devices are set before TensorFlow
# starts its runtime; oneDNN off, so the replicas' sums match the single device's).
_TWO_REPLICAS = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import tensorflow as tf
cpu = tf.config.list_physical_devices('CPU')[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import test_train
strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
print(json.dumps({'replicas': strategy.num_replicas_in_sync,
                  'history': test_train.loop_history(strategy)[0]}))
"""


def test_the_logged_loss_is_the_sum_of_the_head_losses_on_two_replicas():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS='0', TF_CPP_MIN_LOG_LEVEL='3')
  completed = subprocess.run(
      [sys.executable, '-c', _TWO_REPLICAS, os.path.dirname(os.path.abspath(__file__))],
      capture_output=True, text=True, timeout=300, env=env)
  assert completed.returncode == 0, completed.stderr[-3000:]
  result = json.loads(completed.stdout.strip().splitlines()[-1])
  assert result['replicas'] == 2
  _assert_loss_is_the_weighted_sum_of_its_parts(result['history'])
  # The first epoch's training logs are those of one device, from the same steps. (Later ones
  # differ: its last step, split 1 + 0 over the replicas, weighs the gradient differently.)
  one_device, _ = loop_history(tf.distribute.get_strategy(), epochs=1)
  for key, value in one_device[0].items():
    if not key.startswith('val_'):
      # Sums in another order differ in the last float bits, and each step carries that on.
      assert result['history'][0][key] == pytest.approx(value, rel=1e-4), key


# ---- Progressive resizing. ----

def test_progressive_resizing_ramps_from_the_smaller_side_to_image_size():
  from agegender.training import config as config_lib  # pylint: disable=g-import-not-at-top
  sizes = lambda **values: [config_lib.epoch_image_size(config_lib.make_config(**values), epoch)
                            for epoch in range(values['epochs'])]
  assert sizes(image_size=128, epochs=10, progressive_size=0.75) == [
      96, 96, 96, 96, 96, 104, 112, 112, 120, 128]
  assert sizes(image_size=64, epochs=2, progressive_size=0.75) == [48, 64]
  assert sizes(image_size=64, epochs=1, progressive_size=0.5) == [64]
  assert sizes(image_size=128, epochs=3, progressive_size=1.0) == [128, 128, 128]


def test_progressive_resizing_trains_each_epoch_at_its_side_and_keeps_the_models_input(
    monkeypatch):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from agegender.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from agegender.training import trainer  # pylint: disable=g-import-not-at-top
  config = config_lib.make_config(image_size=64, epochs=4, batch_size=16, progressive_size=0.5)
  strategy = tf.distribute.get_strategy()
  with strategy.scope():
    task = loop.build_task(config, {'mean_age': 40.0, 'age_std': 20.0}, steps_per_epoch=2,
                           global_batch_size=16)
  assert task.image_sizes == (32, 32, 48, 64)
  seen = []  # The side of each traced training step's images.
  original = trainer.resized
  monkeypatch.setattr(trainer, 'resized',
                      lambda images, size: seen.append(size) or original(images, size))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (32, 64, 64, 3), dtype=np.uint8)
  targets = {'gender_output': rng.integers(0, 2, (32, 1)).astype(np.float32),
             'age_output': rng.integers(1, 90, (32, 1)).astype(np.float32)}
  data = tf.data.Dataset.from_tensor_slices((images, targets)).batch(16)
  losses = []
  trainer.fit(task, strategy, strategy.experimental_distribute_dataset(data),
              strategy.experimental_distribute_dataset(data), first_epoch=0, epochs=4,
              steps_per_epoch=2, verbose=0,
              end_of_epoch=lambda epoch, logs, examples: losses.append(logs['loss']) and False)
  assert seen == [32, 48, 64]  # One trace per side; the epochs at 32 share one.
  assert len(losses) == 4 and all(np.isfinite(losses))
  assert tuple(task.model.input.shape) == (None, 64, 64, 3)
  shapes = {name: tuple(value.shape) for name, value in task.model(images[:2]).items()}
  assert shapes['age_output'] == (2, 1) and shapes['gender_output'] == (2, 1)
  # A smaller side reaches the same outputs' shapes through the global pooling.
  small = trainer.resized(tf.constant(images[:2]), 32)
  assert tuple(small.shape) == (2, 32, 32, 3) and small.dtype == tf.uint8
