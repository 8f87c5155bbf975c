"""Training: the command line, and the run from a Config to an evaluated, exported model.

  python -m agegender.train --epochs=10
  python -m agegender.train --model=tiny --image_size=64 --model_dir=runs/demo
  python -m agegender.train --recipe=reference      # the seed notebook's recipe, exactly

Every flag is a field of agegender.training.config (its name, default and help); a
flag given on the command line overrides the --recipe's value. Everything a
run writes lands in --model_dir (default runs/<model>):

  model.keras         the best model by validation age MAE (Keras format); with
                      --flip_average (default), wrapped to average each face with
                      its mirror image; with the distribution head, its age
                      interval calibrated on the validation split (--interval_coverage)
  export/             the serving SavedModel (encoded image bytes in)
  history.csv         one row per epoch: losses and metrics, train and validation
                      (the distribution head's: also the coverage and width of
                      its 10th-90th percentile interval, before calibration)
  learning_curves.png loss, gender accuracy, age MAE (and coverage), train against
                      validation
  metrics.json/.txt   the test-split evaluation (see agegender.evaluate)
  predicted_age.png   predicted against true age on the test split
  logs/               TensorBoard logs
  checkpoints/        the resumable state (model, optimizer, epoch, history, best)
  config.json         the run's configuration

A run stopped at any point (even by kill -9) and started again with the same
flags continues from its last finished epoch. Under multi_worker only the
chief writes --model_dir; another worker keeps its state in --worker_dir (or
a temporary folder) and starts from the chief's saved state.
"""

from __future__ import annotations

from typing import Any

from absl import flags

from agegender import cli
from agegender.serving import evaluate
from agegender.training import config as config_lib
from agegender.training import loop

RECIPE_HELP = ('A named set of defaults: default (the tuned recipe) or reference (the seed '
               'notebook\'s model, losses and optimizer: no batch norm, MSE in years, Adam 1e-4, '
               'no augmentation).')


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """--recipe, and one flag per configuration field."""
  flags.DEFINE_enum('recipe', 'default', list(config_lib.RECIPES), RECIPE_HELP,
                    flag_values=flag_values)
  cli.define_flags(*config_lib.SECTIONS.values(), flag_values=flag_values)


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> config_lib.Config:
  """The one place where flags become a Config: the recipe, then the flags given."""
  values: dict[str, Any] = {}
  for section in config_lib.SECTIONS.values():
    values.update(cli.flag_values_of(section, flag_values, present_only=True))
  return config_lib.make_config(flag_values['recipe'].value, **values)


def main(argv):
  cli.no_arguments(argv)
  result = loop.train_and_evaluate(config_from_flags())
  if result['model_dir'] is None:
    print(f'trained {result["epochs_trained"]} epoch(s) as a worker; the chief writes the outputs')
    return 0
  print(evaluate.format_table(result['metrics'], 'test'))
  print(f'outputs in {result["model_dir"]}')
  return 0


def console_main():
  define_flags()
  cli.run(main)


if __name__ == '__main__':
  console_main()
