"""The training split through the tf.data service against the local pipeline,
for float32 and uint8 batches, with the service's compression on and off and
target_workers ANY and LOCAL.

  python benchmarks/service.py [--records_dir DIR | --count N] [--json PATH]

Images per second of the training split, in this process, for each image
dtype (float32 in [0, 1], today's pipeline output; uint8 pixels, what the
pipeline yields once scaling moves into the model):

1. local: the pipeline runs here;
2. service, ANY: a dispatcher and one worker process started with
   `python -m agegender.data_service` on loopback run the pipeline and send
   the batches over gRPC;
3. service, LOCAL: a worker in this process (target_workers='LOCAL'), which
   hands batches over without RPC.

Both dtypes come from one pipeline written here (the project's order: shards
shuffled, interleaved, records shuffled, batched, parsed, decoded and resized)
that differs only in the last cast, so the dtypes compare fairly. Each row
reports the bytes of one full batch as it leaves the pipeline (before any
compression) and its rate over the local pipeline of the same dtype. Each
rate is the best of --epochs passes in each of --rounds rounds; the methods
take turns, so a busy moment on a shared machine favors none. Where the
workers share the trainer's cores, the service can only add overhead: the
ratio measures that overhead.
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
flags.DEFINE_string('records_dir', None, 'Records to read; unset: --count synthetic faces.')
flags.DEFINE_integer('count', 2000, 'Synthetic images (about 80% train) without --records_dir.')
flags.DEFINE_integer('num_shards', 8, 'Shards per split of the synthetic records.')
flags.DEFINE_integer('batch_size', 128, 'Batch size.')
flags.DEFINE_integer('image_size', 128, 'Side of the model input.')
flags.DEFINE_integer('epochs', 3, 'Passes per measurement; the best counts.')
flags.DEFINE_integer('rounds', 2, 'Rounds; the best counts.')
flags.DEFINE_float('timeout', 60.0, 'distribute\'s timeout (0: none, TensorFlow\'s client alone).')
flags.DEFINE_list('dtypes', ['float32', 'uint8'], 'Image dtypes to measure.')
flags.DEFINE_string('json', os.path.join(os.path.dirname(__file__), 'results',
                                         'service.json'),
                    'Write the figures to this JSON file.')

# The pipeline's shuffle buffer and interleave width (agegender.data.pipeline).
SHUFFLE_BUFFER = 2_000
MAX_PARALLEL_SHARDS = 16


def batches(records_dir: str, dtype: str, batch_size: int, image_size: int):
  """The training split as (images [B, S, S, 3] of `dtype`, targets), uint8
  pixels or float32 in [0, 1]."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from agegender import contract  # pylint: disable=g-import-not-at-top
  paths = contract.split_shards(contract.read_manifest(records_dir), 'train')
  shards = tf.data.Dataset.from_tensor_slices(paths).shuffle(len(paths))
  records = shards.interleave(tf.data.TFRecordDataset,
                              cycle_length=min(len(paths), MAX_PARALLEL_SHARDS),
                              num_parallel_calls=tf.data.AUTOTUNE)
  records = records.shuffle(SHUFFLE_BUFFER).batch(batch_size)

  def decode(encoded):
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image = tf.image.resize(image, (image_size, image_size))
    if dtype == 'uint8':
      return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return tf.clip_by_value(image * (1.0 / 255.0), 0.0, 1.0)

  def parse(serialized):
    features = tf.io.parse_example(serialized, contract.feature_spec())
    images = tf.map_fn(decode, features[contract.IMAGE], parallel_iterations=16,
                       fn_output_signature=tf.TensorSpec([image_size, image_size, 3], dtype))
    targets = {contract.GENDER_OUTPUT: tf.cast(features[contract.GENDER], tf.float32)[:, None],
               contract.AGE_OUTPUT: tf.cast(features[contract.AGE], tf.float32)[:, None]}
    return images, targets

  return records.map(parse, num_parallel_calls=tf.data.AUTOTUNE)


def _batch_bytes(dataset) -> int:
  """Bytes of the first batch's tensors: what one batch costs to send uncompressed."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  element = next(iter(dataset))
  return sum(int(tf.size(t)) * t.dtype.size for t in tf.nest.flatten(element))


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
  """A data_service server process and the address it prints it serves at."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  process = subprocess.Popen([sys.executable, '-m', 'agegender.data_service', *args],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env=env)
  return process, process.stdout.readline().split('serving at ', 1)[1].split()[0]


class Service:
  """A dispatcher process and one worker, a process (ANY) or in this process
  (LOCAL), stopped on exit."""

  def __init__(self, target_workers: str):
    self.target_workers = target_workers
    self.processes, self.worker = [], None

  def __enter__(self) -> str:
    from agegender.data import service  # pylint: disable=g-import-not-at-top
    port = service.free_port()
    dispatcher, target = _server('dispatcher', f'--port={port}')
    self.processes.append(dispatcher)
    if self.target_workers == 'LOCAL':
      self.worker = service.start_worker(f'localhost:{port}', service.free_port())
    else:
      self.processes.append(_server('worker', f'--dispatcher=localhost:{port}')[0])
    return target

  def __exit__(self, *exc):
    if self.worker is not None:
      self.worker.stop()
    for process in reversed(self.processes):
      process.terminate()
      process.communicate(timeout=60)


def measure(records_dir: str) -> list[dict]:
  from agegender.data import service  # pylint: disable=g-import-not-at-top

  def dataset(dtype):
    return batches(records_dir, dtype, FLAGS.batch_size, FLAGS.image_size)

  # (dtype, target_workers or None for local, compression)
  methods = [(dtype, None, None) for dtype in FLAGS.dtypes] + [
      (dtype, target, compression) for target in ('ANY', 'LOCAL') for dtype in FLAGS.dtypes
      for compression in ('AUTO', None)]
  rates = {method: [] for method in methods}
  for _ in range(FLAGS.rounds):
    for dtype in FLAGS.dtypes:
      rates[(dtype, None, None)].append(_best_rate(dataset(dtype), FLAGS.epochs))
    for target_workers in ('ANY', 'LOCAL'):
      with Service(target_workers) as address:
        for method in methods:
          dtype, target, compression = method
          if target == target_workers:
            served = service.distribute(dataset(dtype), address, compression=compression,
                                             target_workers=target,
                                             timeout=FLAGS.timeout or None)
            rates[method].append(_best_rate(served, FLAGS.epochs))
  sizes = {dtype: _batch_bytes(dataset(dtype)) for dtype in FLAGS.dtypes}
  rows = []
  for method in methods:
    dtype, target, compression = method
    best = max(rates[method])
    rows.append({
        'dtype': dtype,
        'method': f'service, 1 worker, {target}' if target else 'local pipeline',
        'target_workers': target, 'compression': compression,
        'bytes_per_batch': sizes[dtype], 'images_per_s': best, 'round_rates': rates[method],
        'vs_local': best / max(rates[(dtype, None, None)])})
  return rows


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  from agegender import contract  # pylint: disable=g-import-not-at-top
  from agegender import records  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory(prefix='data_service-') as work:
    records_dir = FLAGS.records_dir
    if not records_dir:
      records.build('synthetic', work, synthetic_count=FLAGS.count,
                      num_shards=FLAGS.num_shards, seed=0, progress=False)
      records_dir = work
    manifest = contract.read_manifest(records_dir)
    rows = measure(records_dir)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gpus = len(tf.config.list_physical_devices('GPU'))
  train = manifest['splits']['train']
  header = (f'{train["num_examples"]:,} training records ({manifest["source"]["kind"]}, '
            f'{manifest["image_storage"]["format"]} storage, {len(train["shards"])} shards); '
            f'batch {FLAGS.batch_size}, image size {FLAGS.image_size}; '
            f'{machine.describe_cpu()}, {gpus or "no"} GPU')
  print(header)
  print(f'{"dtype":8} {"method":25} {"compression":11} {"MB/batch":>8} {"images/s":>9} '
        f'{"x local":>8}')
  for row in rows:
    print(f'{row["dtype"]:8} {row["method"]:25} {str(row["compression"] or "-"):11} '
          f'{row["bytes_per_batch"] / 1e6:8.2f} {row["images_per_s"]:9,.0f} '
          f'{row["vs_local"]:8.2f}')
  if FLAGS.json:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, 'w') as f:
      json.dump({'machine': machine.describe_cpu(), 'gpus': gpus, 'records': header,
                 'batch_size': FLAGS.batch_size, 'image_size': FLAGS.image_size, 'rows': rows},
                f, indent=2)


def console_main():
  cli.run(main)


if __name__ == '__main__':
  console_main()
