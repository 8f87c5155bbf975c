"""Evaluation on a split: the headline metrics, metrics by group, baselines, plots.

  python -m agegender.evaluate --model_dir=runs/compact_cnn [--records_dir=records] [--split=test]
  python -m agegender.evaluate --model_dir=runs/compact_cnn --records_dir=OTHER --split=all

Writes into --model_dir (for the test split; other splits get their name as a
suffix): metrics.json, metrics.txt (the table it prints) and predicted_age.png.

Every figure is overall and by group: children (under 13) and 13 and up, gender,
race, and (age only) decade. Gender figures skip the images without a gender
(labels.UNKNOWN_GENDER), counted as `no_gender`. A model with an age interval
(the distribution head) adds, in every group, its `coverage` (the share of true
ages inside [age_low, age_high]) and `width` (the mean of age_high - age_low,
in years); a regression head's low = high = age is no interval
(`has_interval` false, no such figures).
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
from agegender.training import model as model_lib



@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
  """What `python -m agegender.evaluate` evaluates, and how."""
  model_dir: str = options.option('', 'The training run to evaluate (holds model.keras).')
  records_dir: str = options.option('records', 'Records written by agegender.make_records.')
  split: str = options.option('test', 'Split to evaluate; all: every image of the records, '
                              'all splits together (a set converted only to evaluate on).',
                              contract.SPLITS + (pipeline.ALL,))
  batch_size: int = options.option(128, 'Images per prediction batch.', lower=1)


CS_YEARS = 5  # Cumulative score: the share of predictions within this many years.
_OLDEST_DECADE = 9  # Ages 90 and over share one group.
CHILD_AGE = 13  # Children: under this age (most gender errors are theirs).
AGE_GROUPS = ('under 13', '13+')


# ---- Metrics: pure functions over numpy arrays. ----

def decade_name(decade: int) -> str:
  return f'{decade * 10}+' if decade >= _OLDEST_DECADE else f'{decade * 10}-{decade * 10 + 9}'


def race_name(race: int) -> str:
  return labels_lib.RACES[race] if 0 <= race < len(labels_lib.RACES) else 'unknown'


def gender_name(gender: int) -> str:
  return labels_lib.GENDERS[gender] if 0 <= gender < len(labels_lib.GENDERS) else 'unknown'


def _mean(values) -> float | None:
  return float(np.mean(values)) if np.size(values) else None


class _Columns:
  """The per-image arrays a group's figures come from."""

  def __init__(self, true_age, predicted_age, true_gender, gender_probability, low, high):
    self.true_age = true_age
    self.age_error = np.abs(predicted_age - true_age)
    self.known = true_gender != labels_lib.UNKNOWN_GENDER
    self.gender_correct = (gender_probability >= 0.5).astype(np.int64) == true_gender
    self.has_interval = bool(np.any(high > low))
    self.inside = (low <= true_age) & (true_age <= high)
    self.width = high - low

  def group(self, chosen=None, gender: bool = True) -> dict[str, Any]:
    """count, gender_accuracy (None without a gender), age_mae, and coverage and width."""
    chosen = np.ones_like(self.known) if chosen is None else chosen
    figures = {'count': int(np.sum(chosen))}
    if gender:
      figures['gender_accuracy'] = _mean(self.gender_correct[chosen & self.known])
    figures['age_mae'] = float(np.mean(self.age_error[chosen]))
    if self.has_interval:
      figures['coverage'] = float(np.mean(self.inside[chosen]))
      figures['width'] = float(np.mean(self.width[chosen]))
    return figures

  def by(self, keys, names, gender: bool = True) -> dict[str, dict[str, Any]]:
    return {names(key): self.group(keys == key, gender) for key in sorted(set(keys.tolist()))}


def evaluation_metrics(true_age, predicted_age, true_gender, gender_probability, race, *,
                       train_mean_age: float, train_majority_gender: int, age_low=None,
                       age_high=None) -> dict[str, Any]:
  """Gender accuracy, age MAE, CS@5 and the interval's coverage and width, the same by age
  group, decade, race and gender, and the baselines. age_low, age_high: the model's
  interval (None, or equal to the age: none)."""
  true_age = np.asarray(true_age, np.float64).reshape(-1)
  predicted_age = np.asarray(predicted_age, np.float64).reshape(-1)
  true_gender = np.asarray(true_gender, np.int64).reshape(-1)
  race = np.asarray(race, np.int64).reshape(-1)
  if true_age.size == 0:
    raise contract.RecordsError('the split to evaluate has no examples')
  low = predicted_age if age_low is None else np.asarray(age_low, np.float64).reshape(-1)
  high = predicted_age if age_high is None else np.asarray(age_high, np.float64).reshape(-1)
  columns = _Columns(true_age, predicted_age, true_gender,
                     np.asarray(gender_probability).reshape(-1), low, high)
  metrics = columns.group()
  metrics['no_gender'] = int(np.sum(~columns.known))
  metrics['cs5'] = float(np.mean(columns.age_error <= CS_YEARS))
  metrics['has_interval'] = columns.has_interval
  metrics['by_age_group'] = columns.by((true_age >= CHILD_AGE).astype(np.int64),
                                       lambda adult: AGE_GROUPS[adult])
  decade = np.minimum(true_age.astype(np.int64) // 10, _OLDEST_DECADE)
  metrics['age_mae_by_decade'] = columns.by(decade, decade_name, gender=False)
  metrics['by_race'] = columns.by(race, race_name)
  metrics['by_gender'] = columns.by(np.where(columns.known, true_gender, -1), gender_name)
  metrics['baselines'] = {
      'train_mean_age': float(train_mean_age),
      'mean_age_mae': float(np.mean(np.abs(true_age - train_mean_age))),
      'majority_gender': labels_lib.GENDERS[int(train_majority_gender)],
      'majority_gender_accuracy': _mean(true_gender[columns.known] == train_majority_gender),
  }
  return metrics


def _figure(value, form: str) -> str:
  return '-' if value is None else form.format(value)


def format_table(metrics: dict[str, Any], split: str = 'test') -> str:
  """The metrics as a readable text table."""
  baselines = metrics['baselines']
  interval = metrics.get('has_interval', False)
  row = '{:<24} {:>8} {:>11} {:>9}' + (' {:>9} {:>9}' if interval else '')

  def line(name, group, gender=True):
    cells = [name, group['count'], _figure(group.get('gender_accuracy'), '{:.3f}') if gender
             else '', f'{group["age_mae"]:.2f}']
    if interval:
      cells += [f'{group["coverage"]:.3f}', f'{group["width"]:.1f}']
    return row.format(*cells)

  without = metrics.get('no_gender', 0)
  lines = [f'{split} split: {metrics["count"]} images'
           + (f' ({without} without a gender: age figures only)' if without else ''),
           row.format('', 'count', 'gender acc', 'age MAE',
                      *(('coverage', 'width') if interval else ())),
           line('all', metrics),
           row.format('baseline', '', _figure(baselines['majority_gender_accuracy'], '{:.3f}'),
                      f'{baselines["mean_age_mae"]:.2f}', *(('', '') if interval else ())),
           f'  (baseline: always {baselines["majority_gender"]}, always age '
           f'{baselines["train_mean_age"]:.1f}, {baselines.get("source", "the training split")}'
           '\'s majority and mean)',
           f'CS@{CS_YEARS} (age within {CS_YEARS} years): {metrics["cs5"]:.3f}',
           ('coverage: the share of true ages inside the model\'s 80% interval [age_low, '
            'age_high]; width: its mean, in years' if interval else
            'age interval: none (a regression head: age_low = age_high = age)')]
  for title, key in (('by age', 'by_age_group'), ('by gender', 'by_gender'),
                     ('by race', 'by_race')):
    lines.append(title)
    lines.extend(line(f'  {name}', group) for name, group in metrics[key].items())
  lines.append('age by decade')
  lines.extend(line(f'  {name}', group, gender=False)
               for name, group in metrics['age_mae_by_decade'].items())
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
                  manifest: dict[str, Any] | None = None,
                  distributions: bool = False) -> dict[str, np.ndarray]:
  """The model's predictions (age, its interval, gender probability) beside the labels, for
  every image of a split (pipeline.ALL: of every split), in record order; with
  `distributions`, also the distribution head's age_distribution [N, AGES]."""
  data = config_lib.DataConfig(records_dir=records_dir, batch_size=batch_size,
                               image_size=int(model.input_shape[1]))
  dataset = pipeline.make_dataset(data, split, include_metadata=True, manifest=manifest)
  columns = {'true_age': [], 'predicted_age': [], 'age_low': [], 'age_high': [],
             'true_gender': [], 'gender_probability': [], 'race': []}
  for images, _, metadata in dataset:
    outputs = model.predict_on_batch(images)
    low, high = model_lib.age_interval(outputs)
    columns['predicted_age'].append(np.reshape(outputs[contract.AGE_OUTPUT], -1))
    columns['age_low'].append(np.reshape(low, -1))
    columns['age_high'].append(np.reshape(high, -1))
    columns['gender_probability'].append(np.reshape(outputs[contract.GENDER_OUTPUT], -1))
    columns['true_age'].append(metadata['age'].numpy())
    columns['true_gender'].append(metadata['gender'].numpy())
    columns['race'].append(metadata['race'].numpy())
    if distributions:
      columns.setdefault(model_lib.AGE_DISTRIBUTION, []).append(
          outputs[model_lib.AGE_DISTRIBUTION])
  return {name: np.concatenate(values) if values else np.zeros([0])
          for name, values in columns.items()}


def calibrate_interval(model, records_dir: str, coverage: float, *, split: str = 'validation',
                       batch_size: int = 128,
                       manifest: dict[str, Any] | None = None) -> tuple[float, float]:
  """Sets a distribution head's age_low and age_high to the percentiles q and 1 - q that hold
  `coverage` of the split's true ages; returns them. (Save the model and load it again to use
  them: see model_lib.set_interval_quantiles.)"""
  predictions = predict_split(model, records_dir, split, batch_size, manifest,
                              distributions=True)
  q = model_lib.coverage_quantile(predictions[model_lib.AGE_DISTRIBUTION],
                                  predictions['true_age'], coverage)
  model_lib.set_interval_quantiles(model, q, 1.0 - q)
  return q, 1.0 - q


def _statistics(predictions: dict[str, np.ndarray]) -> dict[str, Any]:
  """The mean age and majority gender of the evaluated labels (for records without a
  training split)."""
  genders = predictions['true_gender'][predictions['true_gender'] >= 0]
  counts = {str(gender): int(np.sum(genders == gender)) for gender in (0, 1)}
  return {'num_examples': int(predictions['true_age'].size),
          'mean_age': float(np.mean(predictions['true_age'])),
          'majority_gender': contract.majority(counts)[0]}


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
  predictions = predict_split(model, records_dir, split, batch_size, manifest)
  baseline, source = contract.label_statistics(manifest, 'train'), 'the training split'
  if not baseline['num_examples']:  # A set converted only to evaluate on.
    baseline, source = _statistics(predictions), 'the evaluated images'
  metrics = evaluation_metrics(
      predictions['true_age'], predictions['predicted_age'], predictions['true_gender'],
      predictions['gender_probability'], predictions['race'],
      train_mean_age=baseline['mean_age'], train_majority_gender=baseline['majority_gender'],
      age_low=predictions['age_low'], age_high=predictions['age_high'])
  metrics['baselines']['source'] = source
  metrics['split'] = split
  quantiles = model_lib.interval_quantiles(model) if hasattr(model, 'layers') else None
  if quantiles and metrics['has_interval']:
    metrics['interval_quantiles'] = list(quantiles)
  if output_dir:
    paths = output_paths(output_dir, split)
    with open(paths['json'], 'w') as f:
      json.dump(metrics, f, indent=2)
    with open(paths['table'], 'w') as f:
      f.write(format_table(metrics, split) + '\n')
    plot_predicted_age(predictions['true_age'], predictions['predicted_age'], paths['plot'])
  return metrics
