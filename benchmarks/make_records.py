"""make_records throughput beside the decode-only rate of the same images.

  python benchmarks/make_records.py [--count 3000] [--json results.json]

Writes a synthetic set into a temporary folder, then, in one run on this
machine: decodes every file with all cores (the decoder the conversion uses,
on a process pool as the conversion runs it, and on threads for comparison)
and converts the folder with three storages (each run starts its own worker
processes, as a command-line run does). Prints images/s and each
conversion's ratio to the best decode-only rate.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import tempfile
import time

from agegender.records import convert
from agegender import records


def _decode_file(path: str) -> int:
  with open(path, 'rb') as f:
    return convert.decode_image(f.read())[0].width


def decode_rate(paths: list[str], pool: concurrent.futures.Executor) -> float:
  list(pool.map(_decode_file, paths[:50]))  # Warm up the workers.
  start = time.perf_counter()
  list(pool.map(_decode_file, paths, chunksize=16))
  return len(paths) / (time.perf_counter() - start)


def convert_rate(folder: str, count: int, **kwargs) -> float:
  with tempfile.TemporaryDirectory() as out:
    start = time.perf_counter()
    summary = records.build(folder, out, progress=False, **kwargs)
    elapsed = time.perf_counter() - start
  assert summary['accepted_total'] == count, summary
  return count / elapsed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--count', type=int, default=3000)
  parser.add_argument('--repeats', type=int, default=2,
                      help='runs of each measurement; the best is reported')
  parser.add_argument('--json', help='also write the results here')
  args = parser.parse_args()
  # Conversion workers re-import this script (as multiprocessing's forkserver
  # and spawn do), so at the top it imports only what the command line's
  # workers import; the synthetic generator (numpy) would slow their start.
  from agegender.records import synthetic  # pylint: disable=g-import-not-at-top
  cores = os.cpu_count() or 1
  with tempfile.TemporaryDirectory() as folder:
    synthetic.write_synthetic_folder(folder, args.count, seed=0)
    paths = [os.path.join(folder, name) for name in sorted(os.listdir(folder))]
    # Imports and first-use costs (TensorFlow, tfds) are not the conversion's rate.
    convert_rate(folder, args.count, num_shards=1)
    best = lambda measure: max(measure() for _ in range(args.repeats))
    with concurrent.futures.ThreadPoolExecutor(cores) as pool:
      decode_threads = best(lambda: decode_rate(paths, pool))
    context = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(cores, mp_context=context) as pool:
      decode_processes = best(lambda: decode_rate(paths, pool))
    decode_best = max(decode_threads, decode_processes)
    rows = [('decode only, threads', decode_threads),
            ('decode only, processes', decode_processes)]
    for label, kwargs in (('convert, source jpeg', {}),
                          ('convert, jpeg@128', {'image_size': 128}),
                          ('convert, raw@128', {'image_format': 'raw', 'image_size': 128})):
      rows.append((label, best(lambda: convert_rate(folder, args.count, workers=cores,
                                                    **kwargs))))

  print(f'{args.count} synthetic 200x200 JPEGs, {cores} cores ({platform.machine()}), '
        f'best of {args.repeats}')
  print(f'{"":26s} {"images/s":>9s} {"ratio":>6s}')
  for label, rate in rows:
    print(f'{label:26s} {rate:9.0f} {rate / decode_best:6.2f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'count': args.count, 'cores': cores, 'repeats': args.repeats,
                 'rates': {label: round(rate, 1) for label, rate in rows},
                 'ratio_to_decode_only': {label: round(rate / decode_best, 3)
                                          for label, rate in rows}}, f, indent=2)


if __name__ == '__main__':
  main()
