"""Faces without a gender (labels.UNKNOWN_GENDER): the gender loss and metrics skip them, the
age head trains on them, evaluation counts them. The records are written here, directly."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from agegender import contract
from agegender.records import labels as labels_lib
from agegender.records import synthetic
from agegender.serving import evaluate
from agegender.serving import export
from agegender.training import config as config_lib
from agegender.training import loop
from agegender.training import model as model_lib
from agegender.training import trainer

SIZE = 32
SPLIT_SIZES = {'train': 96, 'validation': 32, 'test': 32}


def write_records(root) -> str:
  """Synthetic records whose every second example (in each split) has no gender."""
  directory = contract.dataset_dir(str(root))
  os.makedirs(directory)
  faces = synthetic.generate_synthetic(sum(SPLIT_SIZES.values()), seed=11, image_size=SIZE)
  splits, statistics = {}, {}
  for split, size in SPLIT_SIZES.items():
    name = contract.shard_name(split, 0, 1)
    ages, genders = [], []
    with tf.io.TFRecordWriter(os.path.join(directory, name)) as writer:
      for index in range(size):
        file_name, jpeg = next(faces)
        labels = labels_lib.parse_utkface_name(file_name)
        gender = labels_lib.UNKNOWN_GENDER if index % 2 else labels.gender
        writer.write(contract.serialize_example(jpeg, labels.age, gender, labels.race,
                                                file_name))
        ages.append(labels.age)
        genders.append(gender)
    splits[split] = {'num_examples': size, 'shards': [{'file': name, 'num_examples': size}]}
    mean_age, age_std = contract.age_statistics(size, sum(ages), sum(a * a for a in ages))
    majority, share = contract.majority({str(g): genders.count(g) for g in (0, 1)})
    statistics[split] = {'num_examples': size, 'mean_age': mean_age, 'age_std': age_std,
                         'majority_gender': majority, 'majority_share': share}
  manifest = {'manifest_format': contract.MANIFEST_FORMAT, 'dataset': contract.DATASET_NAME,
              'version': contract.VERSION, 'splits': splits, 'label_statistics': statistics,
              'image_storage': contract.ImageStorage(contract.JPEG, SIZE, 90).to_json()}
  with open(os.path.join(directory, contract.MANIFEST_NAME), 'w') as f:
    json.dump(manifest, f)
  return str(root)


def _task():
  keras.utils.set_random_seed(0)
  config = config_lib.make_config(model='tiny', image_size=SIZE, batch_size=8, dropout=0.0,
                                  age_head='distribution')
  return loop.build_task(config, {'mean_age': 40.0, 'age_std': 20.0}, steps_per_epoch=1,
                         global_batch_size=8)


def test_examples_without_a_gender_give_no_gender_loss_and_no_gender_metric():
  task = _task()
  images = np.random.default_rng(0).integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8)
  genders = np.array([[1], [-1], [0], [-1], [1], [-1], [0], [-1]], np.float32)
  ages = np.array([[5], [10], [20], [30], [45], [60], [70], [90]], np.float32)
  targets = {'gender_output': genders, 'age_output': ages}
  known = genders[:, 0] >= 0
  subset = {name: value[known] for name, value in targets.items()}
  outputs = task.model(images, training=False)
  gender, age = trainer.per_example_losses(task, outputs, targets)
  outputs_known = {name: value[known] for name, value in outputs.items()}
  gender_known, age_known = trainer.per_example_losses(task, outputs_known, subset)
  np.testing.assert_array_equal(gender.numpy()[~known], 0.0)
  np.testing.assert_allclose(gender.numpy()[known], gender_known.numpy(), rtol=1e-6)
  np.testing.assert_allclose(age.numpy()[known], age_known.numpy(), rtol=1e-6)
  assert np.all(age.numpy()[~known] > 0)  # The age head still learns from them.
  # The step divides by the global batch: the gender term is the known share times their mean.
  assert np.sum(gender.numpy()) / 8 == pytest.approx(4 / 8 * np.mean(gender_known.numpy()))
  # The logged gender loss and accuracy are those of the batch without them.
  logged = {}
  for name, batch in (('all', (images, targets)), ('known', (images[known], subset))):
    trainer.reset(task)
    trainer.eval_step(task, batch)
    logged[name] = trainer.results(task)
  for key in ('gender_output_loss', 'gender_output_accuracy'):
    assert logged['all'][key] == pytest.approx(logged['known'][key], rel=1e-6), key
  assert logged['all']['age_output_mae'] != pytest.approx(logged['known']['age_output_mae'])


def test_records_where_half_lack_a_gender_train_and_evaluate(tmp_path):
  root = write_records(tmp_path / 'records')
  config = config_lib.make_config(
      records_dir=root, model_dir=str(tmp_path / 'run'), model='tiny', image_size=SIZE,
      epochs=1, batch_size=32, verbose=0, deterministic=True, tensorboard=False, export=False)
  result = loop.train_and_evaluate(config)
  row = result['history'][-1]
  assert all(np.isfinite(value) for value in row.values()), row
  metrics = result['metrics']
  assert metrics['count'] == SPLIT_SIZES['test']
  assert metrics['no_gender'] == SPLIT_SIZES['test'] // 2
  unknown = metrics['by_gender']['unknown']
  assert (unknown['count'], unknown['gender_accuracy']) == (SPLIT_SIZES['test'] // 2, None)
  model = export.load_keras_model(result['model_dir'])
  predictions = evaluate.predict_split(model, root, 'test')
  known = predictions['true_gender'] >= 0
  correct = (predictions['gender_probability'] >= 0.5) == (predictions['true_gender'] == 1)
  assert metrics['gender_accuracy'] == pytest.approx(np.mean(correct[known]))
  assert metrics['age_mae'] == pytest.approx(
      np.mean(np.abs(predictions['predicted_age'] - predictions['true_age'])), rel=1e-5)
  # The history's validation accuracy skipped them too: it is the evaluation's, on known genders.
  # (Of the model that the saved one, flip-averaged by default, wraps: the one validated.)
  validation = evaluate.evaluate_model(model_lib.unflipped(model), root, split='validation')
  assert row['val_gender_output_accuracy'] == pytest.approx(validation['gender_accuracy'])
  assert 'without a gender' in evaluate.format_table(metrics)
