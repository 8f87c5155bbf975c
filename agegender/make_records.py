"""Face images into sharded TFRecords: `python -m agegender.make_records`.

  python -m agegender.make_records                       # Kaggle's UTKFace
  python -m agegender.make_records --source=UTKFace.tar.gz --image_size=128
  python -m agegender.make_records --source=synthetic --synthetic_count=3000
  python -m agegender.make_records --source=photos/ --labels=labels.csv --find_faces
  python -m agegender.make_records --source=faces.zip \\
      --name_pattern='(?P<age>\\d+)_(?P<gender>[mf])_.*\\.jpg'
  python -m agegender.make_records --runner=beam --source=gs://bucket/faces \\
      --records_dir=gs://bucket/records \\
      --beam_pipeline_options="--runner=DataflowRunner --project=P --region=R"

Writes <records_dir>/utkface/<version>/ (shards, tfds metadata, manifest.json)
and prints a summary. Every flag is a field of agegender.records.build's
ConvertConfig; see agegender.records for how the records are made.
"""

from __future__ import annotations

import dataclasses

from agegender import cli
from agegender import records
from agegender.records import conversion


# At import, as absl's programs do: train defines some of the same names, in its own process.
cli.define_flags(conversion.ConvertConfig)


def main(argv: list[str]) -> int:
  cli.no_arguments(argv)
  settings = dataclasses.asdict(cli.from_flags(conversion.ConvertConfig))
  summary = records.build(settings.pop('source'), settings.pop('records_dir'), **settings)
  print(records.format_summary(summary))
  return 0


def console_main():
  cli.run(main)


if __name__ == '__main__':
  console_main()
