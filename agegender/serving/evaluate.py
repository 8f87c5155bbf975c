"""Evaluation on a split: the headline metrics, metrics by group, baselines, plots.

  python -m agegender.evaluate --model_dir=runs/compact_cnn [--records_dir=records] [--split=test]

Writes into --model_dir (for the test split; other splits get their name as a
suffix): metrics.json, metrics.txt (the table it prints) and predicted_age.png.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from matplotlib import figure as figure_lib
import numpy as np

from agegender import contract
from agegender import options
from agegender.data import pipeline
from agegender.records import labels as labels_lib
from agegender.training import config as config_lib



@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
  """What `python -m agegender.evaluate` evaluates, and how."""
  model_dir: str = options.option('', 'The training run to evaluate (holds model.keras).')
  records_dir: str = options.option('records', 'Records written by agegender.make_records.')
  split: str = options.option('test', 'Split to evaluate.', contract.SPLITS)
  batch_size: int = options.option(128, 'Images per prediction batch.', lower=1)


CS_YEARS = 5  # Cumulative score: the share of predictions within this many years.
_OLDEST_DECADE = 9  # Ages 90 and over share one group.


# ---- Metrics: pure functions over numpy arrays. ----

def decade_name(decade: int) -> str:
  return f'{decade * 10}+' if decade >= _OLDEST_DECADE else f'{decade * 10}-{decade * 10 + 9}'


def race_name(race: int) -> str:
  return labels_lib.RACES[race] if 0 <= race < len(labels_lib.RACES) else 'unknown'


def _group_metrics(age_error, gender_correct) -> dict[str, Any]:
  return {'count': int(age_error.size),
          'gender_accuracy': float(np.mean(gender_correct)),
          'age_mae': float(np.mean(age_error))}


def _by_group(keys, names, age_error, gender_correct) -> dict[str, dict[str, Any]]:
  groups = {}
  for key in sorted(set(keys.tolist())):
    chosen = keys == key
    groups[names(key)] = _group_metrics(age_error[chosen], gender_correct[chosen])
  return groups


def evaluation_metrics(true_age, predicted_age, true_gender, gender_probability, race, *,
                       train_mean_age: float, train_majority_gender: int) -> dict[str, Any]:
  """Gender accuracy, age MAE, CS@5, the same by decade, race and gender, and the baselines."""
  true_age = np.asarray(true_age, np.float64).reshape(-1)
  predicted_age = np.asarray(predicted_age, np.float64).reshape(-1)
  true_gender = np.asarray(true_gender, np.int64).reshape(-1)
  race = np.asarray(race, np.int64).reshape(-1)
  predicted_gender = (np.asarray(gender_probability).reshape(-1) >= 0.5).astype(np.int64)
  if true_age.size == 0:
    raise contract.RecordsError('the split to evaluate has no examples')
  age_error = np.abs(predicted_age - true_age)
  gender_correct = predicted_gender == true_gender
  decade = np.minimum(true_age.astype(np.int64) // 10, _OLDEST_DECADE)
  metrics = _group_metrics(age_error, gender_correct)
  metrics['cs5'] = float(np.mean(age_error <= CS_YEARS))
  metrics['age_mae_by_decade'] = {
      name: {'count': group['count'], 'age_mae': group['age_mae']}
      for name, group in _by_group(decade, decade_name, age_error, gender_correct).items()}
  metrics['by_race'] = _by_group(race, race_name, age_error, gender_correct)
  metrics['by_gender'] = _by_group(true_gender, lambda g: labels_lib.GENDERS[g],
                                   age_error, gender_correct)
  metrics['baselines'] = {
      'train_mean_age': float(train_mean_age),
      'mean_age_mae': float(np.mean(np.abs(true_age - train_mean_age))),
      'majority_gender': labels_lib.GENDERS[int(train_majority_gender)],
      'majority_gender_accuracy': float(np.mean(true_gender == train_majority_gender)),
  }
  return metrics


def format_table(metrics: dict[str, Any], split: str = 'test') -> str:
  """The metrics as a readable text table."""
  baselines = metrics['baselines']
  row = '{:<24} {:>8} {:>11} {:>9}'
  lines = [f'{split} split: {metrics["count"]} images',
           row.format('', 'count', 'gender acc', 'age MAE'),
           row.format('all', metrics['count'], f'{metrics["gender_accuracy"]:.3f}',
                      f'{metrics["age_mae"]:.2f}'),
           row.format('baseline', '', f'{baselines["majority_gender_accuracy"]:.3f}',
                      f'{baselines["mean_age_mae"]:.2f}'),
           f'  (baseline: always {baselines["majority_gender"]}, always age '
           f'{baselines["train_mean_age"]:.1f}, the training split\'s majority and mean)',
           f'CS@{CS_YEARS} (age within {CS_YEARS} years): {metrics["cs5"]:.3f}']
  for title, key in (('by gender', 'by_gender'), ('by race', 'by_race')):
    lines.append(title)
    for name, group in metrics[key].items():
      lines.append(row.format(f'  {name}', group['count'], f'{group["gender_accuracy"]:.3f}',
                              f'{group["age_mae"]:.2f}'))
  lines.append('age MAE by decade')
  for name, group in metrics['age_mae_by_decade'].items():
    lines.append(row.format(f'  {name}', group['count'], '', f'{group["age_mae"]:.2f}'))
  return '\n'.join(lines)


def plot_predicted_age(true_age, predicted_age, path: str) -> str:
  """A scatter PNG of predicted against true age, with the ideal diagonal."""
  figure = figure_lib.Figure(figsize=(5, 5))  # No pyplot: no global state, no GUI backend.
  axes = figure.subplots()
  top = float(max(np.max(true_age, initial=1), np.max(predicted_age, initial=1))) + 5
  axes.scatter(true_age, predicted_age, s=6, alpha=0.4)
  axes.plot([0, top], [0, top], color='black', linewidth=1, label='predicted = true')
  axes.set(xlabel='true age', ylabel='predicted age', xlim=(0, top), ylim=(0, top),
           title='Predicted against true age')
  axes.legend(loc='upper left')
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  return path


# ---- Reading the records and running the model. ----

def predict_split(model, records_dir: str, split: str = 'test', batch_size: int = 128,
                  manifest: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
  """The model's predictions beside the labels, for every image of a split, in record order."""
  data = config_lib.DataConfig(records_dir=records_dir, batch_size=batch_size,
                               image_size=int(model.input_shape[1]))
  dataset = pipeline.make_dataset(data, split, include_metadata=True, manifest=manifest)
  columns = {'true_age': [], 'predicted_age': [], 'true_gender': [],
             'gender_probability': [], 'race': []}
  for images, _, metadata in dataset:
    outputs = model.predict_on_batch(images)
    columns['predicted_age'].append(np.reshape(outputs[contract.AGE_OUTPUT], -1))
    columns['gender_probability'].append(np.reshape(outputs[contract.GENDER_OUTPUT], -1))
    columns['true_age'].append(metadata['age'].numpy())
    columns['true_gender'].append(metadata['gender'].numpy())
    columns['race'].append(metadata['race'].numpy())
  return {name: np.concatenate(values) if values else np.zeros([0])
          for name, values in columns.items()}


def output_paths(output_dir: str, split: str) -> dict[str, str]:
  suffix = '' if split == 'test' else f'_{split}'
  return {'json': os.path.join(output_dir, f'metrics{suffix}.json'),
          'table': os.path.join(output_dir, f'metrics{suffix}.txt'),
          'plot': os.path.join(output_dir, f'predicted_age{suffix}.png')}


def evaluate_model(model, records_dir: str, *, split: str = 'test', output_dir: str | None = None,
                   batch_size: int = 128,
                   manifest: dict[str, Any] | None = None) -> dict[str, Any]:
  """Evaluates `model` on a split; writes metrics JSON, table and plot when output_dir is given.

  manifest: the records' manifest, when the caller has read it (read here otherwise, once).
  """
  manifest = manifest or contract.read_manifest(records_dir)
  baseline = contract.label_statistics(manifest, 'train')
  predictions = predict_split(model, records_dir, split, batch_size, manifest)
  metrics = evaluation_metrics(
      predictions['true_age'], predictions['predicted_age'], predictions['true_gender'],
      predictions['gender_probability'], predictions['race'],
      train_mean_age=baseline['mean_age'], train_majority_gender=baseline['majority_gender'])
  metrics['split'] = split
  if output_dir:
    paths = output_paths(output_dir, split)
    with open(paths['json'], 'w') as f:
      json.dump(metrics, f, indent=2)
    with open(paths['table'], 'w') as f:
      f.write(format_table(metrics, split) + '\n')
    plot_predicted_age(predictions['true_age'], predictions['predicted_age'], paths['plot'])
  return metrics
