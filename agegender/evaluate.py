"""Evaluation of a run on a split: `python -m agegender.evaluate`.

  python -m agegender.evaluate --model_dir=runs/compact_cnn [--records_dir=records] [--split=test]

Writes into --model_dir (for the test split; other splits get their name as a
suffix): metrics.json, metrics.txt (the table it prints) and predicted_age.png.
See agegender.serving.evaluate for the metrics.
"""

from __future__ import annotations

from agegender import cli
from agegender.serving import evaluate
from agegender.serving import export


def main(argv):
  cli.no_arguments(argv)
  settings = cli.from_flags(evaluate.EvaluateConfig)
  if not settings.model_dir:
    raise cli.UsageError('--model_dir is required')
  model = export.load_keras_model(settings.model_dir)
  metrics = evaluate.evaluate_model(model, settings.records_dir, split=settings.split,
                                    output_dir=settings.model_dir,
                                    batch_size=settings.batch_size)
  print(evaluate.format_table(metrics, settings.split))
  paths = evaluate.output_paths(settings.model_dir, settings.split).values()
  print(f'written: {", ".join(paths)}')
  return 0


def console_main():
  cli.define_flags(evaluate.EvaluateConfig)
  cli.run(main)


if __name__ == '__main__':
  console_main()
