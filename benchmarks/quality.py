"""Accuracy of a recipe on a records folder: train, evaluate on validation and test, one row.

  python benchmarks/quality.py --records_dir=records --recipe=default --epochs=10
  python benchmarks/quality.py --records_dir=records --age_head=distribution --age_sigma=2
  python benchmarks/quality.py --records_dir=records --recipe=reference --epochs=1 --image_size=128

Every field of agegender.training.config is a flag, as in agegender.train (the
same deriver, agegender.cli.define_flags), over --recipe; here --epochs
defaults to 2, --image_size to 64 and --verbose to 2, and --model_dir to
runs/quality/<label>. Each run trains with loop.train_and_evaluate (the
command line's own run), evaluates the best model on the validation split
too, then appends one JSON row to --results (the label: the recipe and the
flags given; wall time, machine, the validation and test figures, each with
gender accuracy, age MAE, CS@5, the age interval's coverage and width, and
the children (under 13) and 13+ rows, and the baselines) and prints the table
of every row there. Choose recipes by the validation columns; report the test
ones. UTKFace figures are for non-commercial research only.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # pylint: disable=g-import-not-at-top,wrong-import-position

from agegender import cli  # pylint: disable=wrong-import-position
from agegender.serving import evaluate  # pylint: disable=wrong-import-position
from agegender.serving import export  # pylint: disable=wrong-import-position
from agegender.training import config as config_lib  # pylint: disable=wrong-import-position
from agegender.training import loop  # pylint: disable=wrong-import-position

# This benchmark's defaults where they differ from training's: short runs to compare.
DEFAULTS = {'epochs': 2, 'image_size': 64, 'verbose': 2}
# Flags that say where and how loudly a run goes, not what it trains: left out of its label.
_NOT_IN_LABEL = ('records_dir', 'model_dir', 'verbose', 'epochs', 'image_size')

flags.DEFINE_enum('recipe', 'default', list(config_lib.RECIPES), 'The recipe to train.')
flags.DEFINE_string('results', 'benchmarks/results/quality.jsonl', 'The rows, one JSON a line.')
cli.define_flags(*config_lib.SECTIONS.values(), defaults=DEFAULTS)
FLAGS = flags.FLAGS

GROUPS = {'under13': 'under 13', '13up': '13+'}
COLUMNS = (('recipe', '{}'), ('image_size', '{}'), ('epochs', '{}'), ('wall_minutes', '{:.1f}'),
           ('val_gender_accuracy', '{:.3f}'), ('val_age_mae', '{:.2f}'),
           ('val_coverage', '{:.3f}'), ('val_width', '{:.1f}'),
           ('test_gender_accuracy', '{:.3f}'), ('test_age_mae', '{:.2f}'),
           ('test_cs5', '{:.3f}'), ('test_coverage', '{:.3f}'), ('test_width', '{:.1f}'),
           ('test_under13_gender_accuracy', '{:.3f}'), ('test_under13_age_mae', '{:.2f}'),
           ('test_13up_gender_accuracy', '{:.3f}'), ('test_13up_age_mae', '{:.2f}'))


def config_values(flag_values: flags.FlagValues = FLAGS) -> dict[str, Any]:
  """The configuration fields this run sets: this benchmark's defaults, then the flags given."""
  values = dict(DEFAULTS)
  for section in config_lib.SECTIONS.values():
    values.update(cli.flag_values_of(section, flag_values, present_only=True))
  return values


def figures(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
  """An evaluation's headline figures, and its age groups', as flat `prefix`_name columns."""
  keys = ('count', 'gender_accuracy', 'age_mae', 'cs5', 'coverage', 'width', 'no_gender')
  row = {f'{prefix}_{key}': metrics[key] for key in keys if key in metrics}
  for short, name in GROUPS.items():
    group = metrics['by_age_group'].get(name, {})
    row.update({f'{prefix}_{short}_{key}': value for key, value in group.items()})
  return row


def run(recipe: str, values: dict[str, Any]) -> dict[str, Any]:
  """Trains one recipe with the fields in `values` and returns its row."""
  config = config_lib.make_config(recipe, **values)
  label = recipe + ''.join(f'+{key}={value}' for key, value in values.items()
                           if key not in _NOT_IN_LABEL)
  if not config.run.model_dir:
    name = f'{label}-{config.model.model}-{config.data.image_size}px-{config.optim.epochs}ep'
    config = config_lib.replace(config, model_dir=os.path.join('runs', 'quality', name))
  start = time.perf_counter()
  result = loop.train_and_evaluate(config)
  wall = time.perf_counter() - start
  best = min(result['history'], key=lambda row: row['val_age_output_mae'])
  model = export.load_keras_model(config.model_dir)
  validation = evaluate.evaluate_model(model, config.data.records_dir, split='validation',
                                       output_dir=config.model_dir)
  metrics = result['metrics']
  return {
      'recipe': label, 'model': config.model.model, 'age_head': config.model.age_head,
      'image_size': config.data.image_size, 'epochs': config.optim.epochs,
      'seed': config.data.seed, 'wall_minutes': wall / 60, 'machine': machine.describe_cpu(),
      'best_epoch': int(best['epoch']) + 1,
      **figures(validation, 'val'), **figures(metrics, 'test'),
      'majority_accuracy': metrics['baselines']['majority_gender_accuracy'],
      'mean_age_mae': metrics['baselines']['mean_age_mae'],
      'model_dir': config.model_dir, 'config': config_lib.as_dict(config),
  }


def table(rows: list[dict[str, Any]]) -> str:
  lines = [' | '.join(name for name, _ in COLUMNS)]
  for row in rows:
    lines.append(' | '.join('-' if row.get(name) is None else form.format(row[name])
                            for name, form in COLUMNS))
  return '\n'.join(lines)


def main(argv):
  cli.no_arguments(argv)
  row = run(FLAGS.recipe, config_values())
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.results)), exist_ok=True)
  with open(FLAGS.results, 'a') as f:
    f.write(json.dumps(row) + '\n')
  with open(FLAGS.results) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  print(table(rows))
  print(f'machine: {row["machine"]}; figures on UTKFace are for non-commercial research only')
  return 0


if __name__ == '__main__':
  cli.run(main)
