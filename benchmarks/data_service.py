"""The training split through the tf.data service against the local pipeline.

  python benchmarks/data_service.py [--count N] [--workers 1,2] [--json PATH]

On one set of synthetic records (source JPEGs, --num_shards shards), images
per second of make_dataset's training split, in this process:

1. local: the pipeline runs here;
2. service with N local workers: a dispatcher and N worker processes started
   with `python -m agegender.data_service` on loopback run the pipeline; this
   process only receives the batches.

Each rate is the best of --epochs passes, in each of --rounds rounds (the
methods take turns, so a busy moment on a shared machine favors none). On a
machine whose cores the workers share with the trainer, the service can only
add overhead; its ratio to the local pipeline measures that overhead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import flags

from agegender import cli

import machine  # benchmarks/machine.py, beside this script

FLAGS = flags.FLAGS
flags.DEFINE_integer('count', 2000, 'Synthetic images (about 80% train).')
flags.DEFINE_list('workers', ['1', '2'], 'Service worker counts to measure.')
flags.DEFINE_integer('batch_size', 128, 'Batch size.')
flags.DEFINE_integer('image_size', 128, 'Side of the model input.')
flags.DEFINE_integer('num_shards', 8, 'Shards per split.')
flags.DEFINE_integer('epochs', 3, 'Passes per measurement; the best counts.')
flags.DEFINE_integer('rounds', 2, 'Rounds; the best counts.')
flags.DEFINE_float('data_service_timeout', 60.0,
                   'make_dataset\'s data_service_timeout (0: none, TensorFlow\'s client alone).')
flags.DEFINE_string('json', None, 'Write the figures to this JSON file.')


def _best_rate(dataset, epochs: int) -> float:
  rates = []
  for _ in range(epochs):
    count = 0
    start = time.perf_counter()
    for images, _ in dataset:
      count += int(images.shape[0])
    rates.append(count / (time.perf_counter() - start))
  return max(rates)


def _server(*args: str) -> tuple[subprocess.Popen, str]:
  """A data_service server process and the first line it prints."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  process = subprocess.Popen([sys.executable, '-m', 'agegender.data_service', *args],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env=env)
  return process, process.stdout.readline().strip()


class LocalService:
  """A dispatcher and `workers` worker processes on loopback, stopped on exit."""

  def __init__(self, workers: int):
    self.workers = workers
    self.processes = []

  def __enter__(self) -> str:
    dispatcher, line = _server('dispatcher')
    self.processes.append(dispatcher)
    target = line.rsplit(' ', 1)[1]  # "dispatcher serving at grpc://HOST:PORT"
    for _ in range(self.workers):
      self.processes.append(_server('worker', f'--dispatcher={target.split("://")[1]}')[0])
    return target

  def __exit__(self, *exc):
    for process in reversed(self.processes):
      process.terminate()
      process.communicate(timeout=60)


def measure(records_dir: str) -> list[dict]:
  from agegender import pipeline  # pylint: disable=g-import-not-at-top

  def dataset(service=None):
    return pipeline.make_dataset(records_dir, 'train', batch_size=FLAGS.batch_size,
                                 training=True, image_size=FLAGS.image_size, data_service=service,
                                 data_service_timeout=FLAGS.data_service_timeout or None)

  methods = [('local pipeline', 0)] + [
      (f'service, {count} local worker{"s" if count > 1 else ""}', count)
      for count in map(int, FLAGS.workers)]
  rates = {method: [] for method, _ in methods}
  for _ in range(FLAGS.rounds):
    for method, workers in methods:
      if not workers:
        rates[method].append(_best_rate(dataset(), FLAGS.epochs))
        continue
      with LocalService(workers) as target:
        rates[method].append(_best_rate(dataset(target), FLAGS.epochs))
  local = max(rates['local pipeline'])
  return [{'method': method, 'workers': workers, 'images_per_s': max(rates[method]),
           'round_rates': rates[method], 'vs_local': max(rates[method]) / local}
          for method, workers in methods]


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  from agegender import contract  # pylint: disable=g-import-not-at-top
  from agegender import records  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory(prefix='data_service-') as work:
    records.convert('synthetic', work, synthetic_count=FLAGS.count,
                    num_shards=FLAGS.num_shards, seed=0, progress=False)
    train_records = contract.read_manifest(work)['splits']['train']['num_examples']
    rows = measure(work)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gpus = len(tf.config.list_physical_devices('GPU'))
  print(f'{train_records:,} training records (synthetic, source JPEGs, {FLAGS.num_shards} '
        f'shards); batch {FLAGS.batch_size}, image size {FLAGS.image_size}; {machine.describe_cpu()}, '
        f'{gpus or "no"} GPU')
  print(f'{"method":28} {"images/s":>9} {"x local":>8}')
  for row in rows:
    print(f'{row["method"]:28} {row["images_per_s"]:9,.0f} {row["vs_local"]:8.2f}')
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump({'machine': machine.describe_cpu(), 'gpus': gpus, 'train_records': train_records,
                 'batch_size': FLAGS.batch_size, 'image_size': FLAGS.image_size,
                 'rows': rows}, f, indent=2)


def console_main():
  cli.run(main)


if __name__ == '__main__':
  console_main()
