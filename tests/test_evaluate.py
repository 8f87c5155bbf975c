"""Evaluation: the metrics as pure functions, the table, and the outputs of a run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from agegender import contract
from agegender.serving import evaluate

# Four faces whose errors are worked out by hand below.
TRUE_AGE = [5, 15, 25, 95]
PREDICTED_AGE = [7, 15, 35, 90]          # errors 2, 0, 10, 5
TRUE_GENDER = [0, 1, 1, 0]
GENDER_PROBABILITY = [0.2, 0.9, 0.4, 0.6]  # right, right, wrong, wrong
RACE = [0, 1, 1, -1]


def _metrics(**overrides):
  arguments = dict(true_age=TRUE_AGE, predicted_age=PREDICTED_AGE, true_gender=TRUE_GENDER,
                   gender_probability=GENDER_PROBABILITY, race=RACE,
                   train_mean_age=25.0, train_majority_gender=1)
  arguments.update(overrides)
  return evaluate.evaluation_metrics(**arguments)


def test_headline_metrics():
  metrics = _metrics()
  assert metrics['count'] == 4
  assert metrics['age_mae'] == pytest.approx((2 + 0 + 10 + 5) / 4)
  assert metrics['gender_accuracy'] == pytest.approx(0.5)
  assert metrics['cs5'] == pytest.approx(3 / 4)  # Within 5 years: 2, 0 and 5.


def test_age_mae_by_decade_groups_the_oldest_together():
  by_decade = _metrics()['age_mae_by_decade']
  assert list(by_decade) == ['0-9', '10-19', '20-29', '90+']
  assert by_decade['20-29'] == {'count': 1, 'age_mae': 10.0}
  assert _metrics(true_age=[5, 15, 25, 120])['age_mae_by_decade']['90+']['count'] == 1


def test_metrics_by_race_and_gender():
  metrics = _metrics()
  assert metrics['by_race']['Black'] == {'count': 2, 'gender_accuracy': 0.5, 'age_mae': 5.0}
  assert metrics['by_race']['unknown']['count'] == 1
  assert metrics['by_gender']['male'] == {'count': 2, 'gender_accuracy': 0.5, 'age_mae': 3.5}
  assert metrics['by_gender']['female'] == {'count': 2, 'gender_accuracy': 0.5, 'age_mae': 5.0}


def test_children_and_13_up_rows():
  by_age = _metrics()['by_age_group']
  assert list(by_age) == ['under 13', '13+']
  assert by_age['under 13'] == {'count': 1, 'gender_accuracy': 1.0, 'age_mae': 2.0}
  assert by_age['13+'] == {'count': 3, 'gender_accuracy': pytest.approx(1 / 3),
                           'age_mae': pytest.approx(15 / 3)}
  assert _metrics(true_age=[12, 13, 25, 95])['by_age_group']['under 13']['count'] == 1
  table = evaluate.format_table(_metrics())
  assert 'by age' in table and 'under 13' in table and '13+' in table


# The interval of each face, by hand: inside, inside (on its edge), outside, outside.
AGE_LOW = [4, 15, 30, 96]
AGE_HIGH = [9, 20, 40, 99]   # widths 5, 5, 10, 3


def test_coverage_and_width_of_the_interval_by_hand():
  metrics = _metrics(age_low=AGE_LOW, age_high=AGE_HIGH)
  assert metrics['has_interval']
  assert metrics['coverage'] == pytest.approx(2 / 4)
  assert metrics['width'] == pytest.approx((5 + 5 + 10 + 3) / 4)
  assert metrics['by_age_group']['under 13']['coverage'] == 1.0
  assert metrics['by_age_group']['13+']['coverage'] == pytest.approx(1 / 3)
  assert metrics['by_age_group']['13+']['width'] == pytest.approx(18 / 3)
  assert metrics['age_mae_by_decade']['20-29'] == {'count': 1, 'age_mae': 10.0,
                                                   'coverage': 0.0, 'width': 10.0}
  assert metrics['by_race']['Black']['coverage'] == pytest.approx(0.5)
  table = evaluate.format_table(metrics)
  assert 'coverage' in table and 'width' in table and '0.500' in table


def test_a_model_without_an_interval_has_no_coverage():
  for metrics in (_metrics(), _metrics(age_low=PREDICTED_AGE, age_high=PREDICTED_AGE)):
    assert not metrics['has_interval']
    assert 'coverage' not in metrics and 'coverage' not in metrics['by_age_group']['13+']
    assert 'age interval: none' in evaluate.format_table(metrics)


def test_gender_figures_skip_the_faces_without_a_gender():
  metrics = _metrics(true_gender=[0, -1, 1, -1])  # Right, -, wrong, -.
  assert metrics['no_gender'] == 2 and metrics['count'] == 4
  assert metrics['gender_accuracy'] == pytest.approx(0.5)
  assert metrics['age_mae'] == pytest.approx(17 / 4)  # Age figures keep every face.
  assert metrics['by_gender']['unknown'] == {'count': 2, 'gender_accuracy': None,
                                             'age_mae': pytest.approx(5 / 2)}
  assert metrics['by_age_group']['under 13']['gender_accuracy'] == 1.0
  assert metrics['baselines']['majority_gender_accuracy'] == pytest.approx(0.5)
  none_known = _metrics(true_gender=[-1, -1, -1, -1])
  assert none_known['gender_accuracy'] is None
  assert none_known['baselines']['majority_gender_accuracy'] is None
  table = evaluate.format_table(metrics)
  assert '(2 without a gender: age figures only)' in table
  assert json.loads(json.dumps(none_known)) == none_known
  assert ' - ' in evaluate.format_table(none_known)


def test_baselines_predict_the_training_mean_and_majority():
  baselines = _metrics()['baselines']
  assert baselines['mean_age_mae'] == pytest.approx((20 + 10 + 0 + 70) / 4)
  assert baselines['majority_gender'] == 'female'
  assert baselines['majority_gender_accuracy'] == pytest.approx(0.5)


def test_metrics_are_json_and_the_table_shows_them():
  metrics = _metrics()
  assert json.loads(json.dumps(metrics)) == metrics
  table = evaluate.format_table(metrics, 'test')
  assert 'test split: 4 images' in table
  assert 'CS@5' in table and '0.750' in table
  assert '90+' in table and 'Black' in table and 'baseline' in table


def test_an_empty_split_is_a_records_error():
  with pytest.raises(contract.RecordsError):
    _metrics(true_age=[], predicted_age=[], true_gender=[], gender_probability=[], race=[])


def test_label_statistics_are_those_of_the_training_labels(synthetic_records):
  manifest = contract.read_manifest(synthetic_records)
  statistics = contract.label_statistics(manifest, 'train')
  spec = {key: tf.io.FixedLenFeature([], tf.int64) for key in (contract.AGE, contract.GENDER)}
  labels = [tf.io.parse_single_example(record, spec) for record in
            tf.data.TFRecordDataset(contract.split_shards(manifest, 'train'))]
  ages = np.array([int(label[contract.AGE]) for label in labels])
  genders = np.array([int(label[contract.GENDER]) for label in labels])
  assert statistics['num_examples'] == len(labels) == manifest['splits']['train']['num_examples']
  assert statistics['mean_age'] == pytest.approx(ages.mean())
  assert statistics['age_std'] == pytest.approx(ages.std())
  majority = int(np.mean(genders) > 0.5)
  assert statistics['majority_gender'] == majority
  assert statistics['majority_share'] == pytest.approx(np.mean(genders == majority))


def test_a_run_s_baselines_are_the_training_split_s_mean_and_majority(trained_run,
                                                                     synthetic_records):
  statistics = contract.label_statistics(contract.read_manifest(synthetic_records), 'train')
  baselines = trained_run['metrics']['baselines']
  assert baselines['train_mean_age'] == pytest.approx(statistics['mean_age'])
  assert baselines['majority_gender'] == ('male', 'female')[statistics['majority_gender']]


def test_evaluation_of_a_run_writes_json_table_and_plot(trained_run, synthetic_records):
  model_dir = trained_run['model_dir']
  paths = evaluate.output_paths(model_dir, 'test')
  with open(paths['json']) as f:
    metrics = json.load(f)
  manifest = contract.read_manifest(synthetic_records)
  assert metrics['count'] == manifest['splits']['test']['num_examples']
  assert {'gender_accuracy', 'age_mae', 'age_mae_by_decade', 'by_race', 'by_gender', 'cs5',
          'baselines'} <= set(metrics)
  with open(paths['table']) as f:
    assert f.read().strip() == evaluate.format_table(metrics, 'test')
  with open(paths['plot'], 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_plot_predicted_age_writes_a_png(tmp_path):
  path = evaluate.plot_predicted_age(np.array([10, 50]), np.array([12, 40]),
                                     str(tmp_path / 'ages.png'))
  assert os.path.getsize(path) > 1000


def test_evaluate_command_scores_every_record_with_split_all(trained_run, synthetic_records):
  completed = subprocess.run(
      [sys.executable, '-m', 'agegender.evaluate', f'--model_dir={trained_run["model_dir"]}',
       f'--records_dir={synthetic_records}', '--split=all'],
      capture_output=True, text=True, timeout=180)
  assert completed.returncode == 0, completed.stderr[-2000:]
  with open(os.path.join(trained_run['model_dir'], 'metrics_all.json')) as f:
    metrics = json.load(f)
  manifest = contract.read_manifest(synthetic_records)
  every = sum(manifest['splits'][split]['num_examples'] for split in contract.SPLITS)
  assert metrics['count'] == every and metrics['split'] == 'all'
  assert completed.stdout.startswith(f'all split: {every} images')
  assert 0 <= metrics['gender_accuracy'] <= 1 and metrics['age_mae'] >= 0
  assert sum(group['count'] for group in metrics['by_age_group'].values()) == every
  assert 'under 13' in completed.stdout
  assert os.path.exists(os.path.join(trained_run['model_dir'], 'predicted_age_all.png'))
