"""The serving SavedModel (and TFLite models) of a run: `python -m agegender.export`.

  python -m agegender.export --model_dir=runs/compact_cnn   # rewrites runs/compact_cnn/export
  python -m agegender.export --model_dir=runs/compact_cnn --tflite   # and the TFLite models
  saved_model_cli show --dir runs/compact_cnn/export --tag_set serve --signature_def serving_default

See agegender.serving.export for the signature.
"""

from __future__ import annotations

import os

from agegender import contract
from agegender import cli
from agegender.serving import export
from agegender.serving import lite


def main(argv):
  cli.no_arguments(argv)
  settings = cli.from_flags(export.ExportConfig)
  if not settings.model_dir:
    raise cli.UsageError('--model_dir is required')
  model = export.load_keras_model(settings.model_dir)
  export_dir = settings.export_dir or os.path.join(settings.model_dir, contract.EXPORT_DIR)
  print(f'exported {export.export_saved_model(model, export_dir)}')
  if settings.tflite:
    run_dir = os.path.dirname(export.keras_model_path(settings.model_dir))
    for path in lite.convert_tflite(model, run_dir).values():
      print(f'exported {path}')
  return 0


def console_main():
  cli.define_flags(export.ExportConfig)
  cli.run(main)


if __name__ == '__main__':
  console_main()
