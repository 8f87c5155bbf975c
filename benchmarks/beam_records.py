"""make_records on Apache Beam's DirectRunner beside the local runner.

  python benchmarks/beam_records.py [--count 3000] [--repeats 1] [--json results.json]

Writes a synthetic set into a temporary folder, then, in one run on this
machine, converts it with the local runner (threads on every core) and with
the DirectRunner in multi_processing mode on every core, from the folder
(files listed by one worker, read by all) and from --source=synthetic (the
stream staged by the launcher). Rates include each run's start-up, Beam's
worker processes included: that is what a user waits for. Prints images/s and
the ratio to the local runner on the same source.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

from agegender import records
from agegender.records import synthetic

BEAM_OPTIONS = ('--runner=DirectRunner --direct_num_workers=0 '
                '--direct_running_mode=multi_processing')


def convert_rate(convert, source: str, count: int, **kwargs) -> float:
  with tempfile.TemporaryDirectory() as out:
    start = time.perf_counter()
    summary = convert(source, out, synthetic_count=count, progress=False, **kwargs)
    elapsed = time.perf_counter() - start
  assert summary['accepted_total'] == count, summary
  return count / elapsed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--count', type=int, default=3000)
  parser.add_argument('--repeats', type=int, default=1,
                      help='runs of each measurement; the best is reported')
  parser.add_argument('--json', help='also write the results here')
  args = parser.parse_args()
  cores = os.cpu_count() or 1
  beam = lambda source, out, **kwargs: records.build(
      source, out, runner='beam', beam_pipeline_options=BEAM_OPTIONS, **kwargs)
  best = lambda measure: max(measure() for _ in range(args.repeats))
  with tempfile.TemporaryDirectory() as folder:
    synthetic.write_synthetic_folder(folder, args.count, seed=0)
    # Imports and first-use costs (TensorFlow, tfds, Beam) are not a runner's rate.
    convert_rate(records.convert, folder, args.count, num_shards=1)
    import apache_beam  # pylint: disable=g-import-not-at-top,unused-import
    rows = []  # (label, source, rate)
    for source, label in ((folder, 'folder'), ('synthetic', 'synthetic')):
      rows.append((f'local runner, {label}', label, best(lambda: convert_rate(
          records.convert, source, args.count, workers=cores))))
      rows.append((f'beam DirectRunner, {label}', label, best(lambda: convert_rate(
          beam, source, args.count))))
  local = {source: rate for label, source, rate in rows if label.startswith('local')}
  ratios = {label: rate / local[source] for label, source, rate in rows}

  print(f'{args.count} synthetic 200x200 JPEGs, {cores} cores ({platform.machine()}), '
        f'best of {args.repeats}, start-up included')
  print(f'{"":30s} {"images/s":>9s} {"ratio to local":>15s}')
  for label, _, rate in rows:
    print(f'{label:30s} {rate:9.0f} {ratios[label]:15.2f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'count': args.count, 'cores': cores, 'repeats': args.repeats,
                 'beam_pipeline_options': BEAM_OPTIONS,
                 'rates': {label: round(rate, 1) for label, _, rate in rows},
                 'ratio_to_local_same_source': {label: round(ratio, 3)
                                                for label, ratio in ratios.items()}},
                f, indent=2)


if __name__ == '__main__':
  main()
