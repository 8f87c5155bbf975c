"""Accuracy of a named recipe on a records folder: train, evaluate on the test split, one row.

  python benchmarks/quality.py --records_dir=records --recipe=default --epochs=10
  python benchmarks/quality.py --records_dir=records --recipe=reference --epochs=1 --image_size=128

Each run trains with agegender.loop.train_and_evaluate (the command line's
own run) into --model_dir, then appends one JSON row to --results (recipe,
model, image size, epochs, wall time, machine, the best epoch's validation
figures, the test split's gender accuracy, age MAE and CS@5, and the
mean-age and majority baselines) and prints the table of every row there.
Choose recipes by the validation columns; report the test ones.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # pylint: disable=g-import-not-at-top,wrong-import-position

from agegender.training import loop
from agegender.training import config as config_lib  # pylint: disable=wrong-import-position

flags.DEFINE_string('records_dir', 'records', 'Records written by agegender.make_records.')
flags.DEFINE_enum('recipe', 'default', list(config_lib.RECIPES), 'The recipe to train.')
flags.DEFINE_integer('epochs', 2, 'Epochs to train.')
flags.DEFINE_integer('image_size', 64, 'Input side in pixels (64 to compare, 128 to confirm).')
flags.DEFINE_string('model', None, 'Another model than the recipe\'s.')
flags.DEFINE_string('model_dir', None, 'Where the run writes (default: runs/quality/<name>).')
flags.DEFINE_string('results', 'benchmarks/results/quality.jsonl', 'The rows, one JSON a line.')
flags.DEFINE_integer('verbose', 2, 'Progress: 0 silent, 1 progress bar, 2 a line per epoch.')
flags.DEFINE_multi_string('set', [], 'Another configuration value over the recipe\'s, '
                          'field=value (repeatable), e.g. --set=age_loss=mae.')
FLAGS = flags.FLAGS

COLUMNS = (('recipe', '{}'), ('model', '{}'), ('image_size', '{}'), ('epochs', '{}'),
           ('wall_minutes', '{:.1f}'), ('val_gender_accuracy', '{:.3f}'),
           ('val_age_mae', '{:.2f}'), ('test_gender_accuracy', '{:.3f}'),
           ('test_age_mae', '{:.2f}'), ('test_cs5', '{:.3f}'), ('majority_accuracy', '{:.3f}'),
           ('mean_age_mae', '{:.2f}'))


def parse_values(settings: list[str]) -> dict:
  """{'age_loss': 'mae', 'dropout': 0.25} from ['age_loss=mae', 'dropout=0.25'], each value
  of its field's type."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  fields = config_lib.fields()
  values = {}
  for setting in settings:
    name, _, text = setting.partition('=')
    if name not in fields:
      raise app.UsageError(f'--set: unknown configuration field {name!r}')
    field = fields[name][1]
    default = field.default if field.default is not dataclasses.MISSING else ()
    if isinstance(default, bool):
      values[name] = text.lower() in ('1', 'true', 'yes', 'on')
    elif isinstance(default, tuple):
      values[name] = tuple(int(part) for part in text.split(',') if part)
    else:
      values[name] = type(default)(text)
  return values


def run(recipe: str, epochs: int, image_size: int, records_dir: str, model: str | None,
        model_dir: str | None, verbose: int, settings: dict | None = None) -> dict:
  """Trains one recipe and returns its row."""
  from agegender.training import loop  # pylint: disable=g-import-not-at-top
  values = {'epochs': epochs, 'image_size': image_size, 'records_dir': records_dir,
            'verbose': verbose, **(settings or {})}
  if model:
    values['model'] = model
  config = config_lib.make_config(recipe, **values)
  label = recipe + ''.join(f'+{key}={value}' for key, value in (settings or {}).items())
  name = f'{label}-{config.model.model}-{image_size}px-{epochs}ep'
  config = config_lib.replace(config, model_dir=model_dir or os.path.join('runs', 'quality', name))
  start = time.perf_counter()
  result = loop.train_and_evaluate(config)
  wall = time.perf_counter() - start
  best = min(result['history'], key=lambda row: row['val_age_output_mae'])
  metrics = result['metrics']
  return {
      'recipe': label, 'model': config.model.model, 'image_size': image_size,
      'epochs': epochs, 'wall_minutes': wall / 60, 'machine': machine.describe_cpu(),
      'best_epoch': int(best['epoch']) + 1,
      'val_gender_accuracy': best['val_gender_output_accuracy'],
      'val_age_mae': best['val_age_output_mae'],
      'test_gender_accuracy': metrics['gender_accuracy'], 'test_age_mae': metrics['age_mae'],
      'test_cs5': metrics['cs5'],
      'majority_accuracy': metrics['baselines']['majority_gender_accuracy'],
      'mean_age_mae': metrics['baselines']['mean_age_mae'],
      'model_dir': config.model_dir, 'config': config_lib.as_dict(config),
  }


def table(rows: list[dict]) -> str:
  lines = [' | '.join(name for name, _ in COLUMNS)]
  for row in rows:
    lines.append(' | '.join(form.format(row[name]) for name, form in COLUMNS))
  return '\n'.join(lines)


def main(argv):
  del argv
  row = run(FLAGS.recipe, FLAGS.epochs, FLAGS.image_size, FLAGS.records_dir, FLAGS.model,
            FLAGS.model_dir, FLAGS.verbose, parse_values(FLAGS.set))
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.results)), exist_ok=True)
  with open(FLAGS.results, 'a') as f:
    f.write(json.dumps(row) + '\n')
  with open(FLAGS.results) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  print(table(rows))
  print(f'machine: {row["machine"]}; test figures on UTKFace are for non-commercial research')


if __name__ == '__main__':
  app.run(main)
