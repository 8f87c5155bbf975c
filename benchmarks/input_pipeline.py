"""The streaming pipeline against the notebook's in-RAM loader and the decode floor.

  python benchmarks/input_pipeline.py [--count N] [--sizes 2000,20000]
      [--source PATH] [--json PATH]

On the same images (the synthetic set, or the UTKFace JPEGs of a folder or
archive given with --source, e.g. UTKFace.tar), each measured in its own
process so peak memory does not mix:

1. in-RAM loader: the original notebook's PIL open, resize to 128x128, collect
   into a NumPy array, divide by 255;
2. decode floor: the JPEG bytes already in memory, decoded by PIL
   (libjpeg-turbo) on a process pool over every core, nothing else (no
   resize, no batching): the least work any pipeline over these JPEGs must
   do, so the one rate a pipeline cannot beat by more than its other work;
3. decode limit: the same bytes decoded and resized by tf.data
   (preprocess.preprocess_encoded_image, AUTOTUNE), batched, nothing else;
4. make_dataset over records in each image storage (source JPEG, JPEG at 128,
   raw at 128), training mode (shard shuffle, interleave, record shuffle,
   decode, resize), yielding uint8 images as training receives them (the
   training step flips and shifts them on the device, outside the pipeline).

The pipeline over source-JPEG records is reported as a ratio of the decode
floor (target: at least 0.9); every pipeline row also gives the bytes of one
batch it yields (uint8 images) beside the same batch with float32 images,
what crosses to the GPU or over the tf.data service.

Rates are the best of --epochs passes in each of --rounds rounds (the methods
take turns, so that load from elsewhere on a shared machine does not favor
one). Peak memory is VmHWM (peak resident set) of the measuring process.
Then peak memory of the pipeline and of the in-RAM loader over --sizes
images of the same data (--sizes= skips it).
"""

from __future__ import annotations

import concurrent.futures
import glob
import io
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from absl import flags

from agegender import cli

import machine  # benchmarks/machine.py, beside this script

FLAGS = flags.FLAGS
flags.DEFINE_integer('count', 4000, 'Images for the speed comparison.')
flags.DEFINE_list('sizes', ['2000', '20000'], 'Data set sizes for the memory comparison.')
flags.DEFINE_string('source', None, 'A folder or a .tar/.tar.gz/.tgz archive of UTKFace JPEGs '
                    '(extracted into --work_dir); default: the synthetic set.')
flags.DEFINE_string('json', None, 'Write the figures to this JSON file.')
flags.DEFINE_integer('batch_size', 128, 'Batch size of the tf.data measurements.')
flags.DEFINE_integer('image_size', 128, 'Side of the model input.')
flags.DEFINE_integer('epochs', 3, 'Passes per tf.data measurement; the best counts.')
flags.DEFINE_integer('rounds', 2, 'Rounds of the speed comparison; the best counts.')
flags.DEFINE_integer('num_shards', 8, 'Shards per set of records.')
# The first is pipeline.DEFAULT_SHUFFLE_BUFFER (not imported here: the in-RAM
# loader's memory is measured without TensorFlow).
flags.DEFINE_list('memory_shuffle_buffers', ['2000', '10000'],
                  'Record shuffle buffers of the pipeline in the memory comparison.')
flags.DEFINE_string('work_dir', None, 'Where images and records go; default: a temporary folder.')
# One measurement in this process (the script runs itself once per measurement).
flags.DEFINE_enum('measure', None, ['inram', 'floor', 'decode', 'pipeline'], 'Internal.')
flags.DEFINE_string('images_dir', None, 'Internal: images of one measurement.')
flags.DEFINE_string('records_dir', None, 'Internal: records of one measurement.')
flags.DEFINE_integer('shuffle_buffer', 2000, 'Internal: record shuffle buffer.')

STORAGES = (('source JPEG', 'jpeg', None), ('JPEG@128', 'jpeg', 128), ('raw@128', 'raw', 128))


# ---------------------------------------------------------------------------
# Measurements, one per process.

def _rss_mb() -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024
  return 0.0


def _peak_rss_mb() -> float:
  # VmHWM, not getrusage's ru_maxrss: the latter keeps the parent's peak across exec.
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) / 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _image_paths(images_dir: str) -> list[str]:
  names = sorted(n for n in os.listdir(images_dir) if n.lower().endswith('.jpg'))
  return [os.path.join(images_dir, n) for n in names]


def measure_inram(images_dir: str, image_size: int) -> dict:
  """The notebook's loader: every image resized into one array in RAM."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  start_rss = _rss_mb()
  start = time.perf_counter()
  images = []
  for path in _image_paths(images_dir):
    image = Image.open(path).convert('RGB').resize((image_size, image_size))
    images.append(np.array(image))
  array = np.array(images) / 255
  seconds = time.perf_counter() - start
  return {'images': len(array), 'seconds': seconds, 'epoch_rates': [len(array) / seconds],
          'start_rss_mb': start_rss}


def _time_epochs(dataset, epochs: int) -> tuple[int, list[float]]:
  rates, count = [], 0
  for _ in range(epochs):
    count = 0
    start = time.perf_counter()
    for batch in dataset:
      count += int(batch[0].shape[0])
    rates.append(count / (time.perf_counter() - start))
  return count, rates


def _read_all(images_dir: str) -> list[bytes]:
  encoded = []
  for path in _image_paths(images_dir):
    with open(path, 'rb') as f:
      encoded.append(f.read())
  return encoded


# The floor's bytes: set in the measuring process before its pool forks, so every worker
# holds them already and a task is two numbers, not images sent through a pipe.
_FLOOR_BYTES: list[bytes] = []
_FLOOR_CHUNK = 64


def _decode_range(bounds: tuple[int, int]) -> int:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  start, stop = bounds
  for data in _FLOOR_BYTES[start:stop]:
    Image.open(io.BytesIO(data)).load()  # Decode only: no conversion, no resize.
  return stop - start


def measure_floor(images_dir: str, epochs: int) -> dict:
  """The decode floor: JPEG bytes in memory, PIL's libjpeg-turbo decode on every core."""
  global _FLOOR_BYTES
  start_rss = _rss_mb()
  _FLOOR_BYTES = _read_all(images_dir)
  chunks = [(start, min(start + _FLOOR_CHUNK, len(_FLOOR_BYTES)))
            for start in range(0, len(_FLOOR_BYTES), _FLOOR_CHUNK)]
  workers = os.cpu_count() or 1
  # fork: the workers inherit the bytes (this process has not loaded TensorFlow).
  context = multiprocessing.get_context('fork')
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    list(pool.map(_decode_range, chunks[:workers]))  # Start every worker before timing.
    rates = []
    for _ in range(epochs):
      start = time.perf_counter()
      count = sum(pool.map(_decode_range, chunks))
      rates.append(count / (time.perf_counter() - start))
  return {'images': count, 'epoch_rates': rates, 'start_rss_mb': start_rss,
          'workers': workers}


def measure_decode(images_dir: str, image_size: int, batch_size: int, epochs: int) -> dict:
  """The decode limit: bytes already in memory, decode + resize in tf.data, nothing else."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from agegender.data import preprocess  # pylint: disable=g-import-not-at-top
  start_rss = _rss_mb()
  encoded = _read_all(images_dir)
  dataset = (tf.data.Dataset.from_tensor_slices(encoded)
             .map(lambda e: (preprocess.preprocess_encoded_image(e, image_size),),
                  num_parallel_calls=tf.data.AUTOTUNE)
             .batch(batch_size).prefetch(tf.data.AUTOTUNE))
  count, rates = _time_epochs(dataset, epochs)
  return {'images': count, 'epoch_rates': rates, 'start_rss_mb': start_rss}


def measure_pipeline(records_dir: str, image_size: int, batch_size: int, epochs: int,
                     shuffle_buffer: int) -> dict:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from agegender.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from agegender.data import pipeline  # pylint: disable=g-import-not-at-top
  start_rss = _rss_mb()
  data = config_lib.DataConfig(records_dir=records_dir, image_size=image_size,
                               batch_size=batch_size, shuffle_buffer=shuffle_buffer)
  dataset = pipeline.make_dataset(data, 'train', training=True)
  images, _ = next(iter(dataset))
  count, rates = _time_epochs(dataset, epochs)
  return {'images': count, 'epoch_rates': rates, 'start_rss_mb': start_rss,
          'image_dtype': images.dtype.name,
          'bytes_per_batch': images.numpy().nbytes,
          'float32_bytes_per_batch': int(tf.size(images)) * 4,
          'gpus': len(tf.config.list_physical_devices('GPU'))}


def run_measurement() -> None:
  if FLAGS.measure == 'inram':
    result = measure_inram(FLAGS.images_dir, FLAGS.image_size)
  elif FLAGS.measure == 'floor':
    result = measure_floor(FLAGS.images_dir, FLAGS.epochs)
  elif FLAGS.measure == 'decode':
    result = measure_decode(FLAGS.images_dir, FLAGS.image_size, FLAGS.batch_size, FLAGS.epochs)
  else:
    result = measure_pipeline(FLAGS.records_dir, FLAGS.image_size, FLAGS.batch_size,
                              FLAGS.epochs, FLAGS.shuffle_buffer)
  result['images_per_s'] = max(result['epoch_rates'])
  result['peak_rss_mb'] = _peak_rss_mb()
  print(json.dumps(result))


def measure_in_child(kind: str, **paths) -> dict:
  """Runs one measurement in a fresh process; returns its figures."""
  args = [sys.executable, os.path.abspath(__file__), f'--measure={kind}',
          f'--image_size={FLAGS.image_size}', f'--batch_size={FLAGS.batch_size}',
          f'--epochs={FLAGS.epochs}']
  args += [f'--{key}={value}' for key, value in paths.items()]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  done = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
  if done.returncode != 0:
    raise cli.UsageError(f'measurement {kind} failed: {done.stderr.strip()[-2000:]}')
  return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# Images and records.

def _write_synthetic_chunk(args) -> None:
  from agegender.records import synthetic  # pylint: disable=g-import-not-at-top
  path, count, seed = args
  synthetic.write_synthetic_folder(path, count, seed)


def synthetic_images(directory: str, count: int) -> str:
  """`count` synthetic UTKFace-like 200x200 JPEGs, written in parallel."""
  if os.path.isdir(directory) and len(_image_paths(directory)) >= count:
    return directory
  chunk = 1000
  jobs = [(directory, min(chunk, count - start), start // chunk)
          for start in range(0, count, chunk)]
  with multiprocessing.Pool(os.cpu_count()) as pool:
    pool.map(_write_synthetic_chunk, jobs)
  return directory


def extracted(archive: str, directory: str) -> str:
  """The JPEGs of a .tar/.tar.gz/.tgz archive, extracted once into `directory`, flat."""
  done = os.path.join(directory, '.complete')
  if os.path.exists(done):
    return directory
  os.makedirs(directory, exist_ok=True)
  with tarfile.open(archive) as tar:
    for member in tar:
      name = os.path.basename(member.name)
      if member.isfile() and name.lower().endswith('.jpg') and not name.startswith('.'):
        with tar.extractfile(member) as source, open(os.path.join(directory, name), 'wb') as f:
          shutil.copyfileobj(source, f)
  with open(done, 'w'):
    pass
  return directory


def subset(images_dir: str, directory: str, count: int) -> str:
  """A folder of links to the first `count` images of `images_dir`."""
  paths = _image_paths(images_dir)
  if len(paths) < count:
    raise cli.UsageError(f'{images_dir} has {len(paths)} JPEGs; {count} are needed')
  wanted = {os.path.basename(p): os.path.abspath(p) for p in paths[:count]}
  if os.path.isdir(directory) and set(os.listdir(directory)) != set(wanted):
    # Left by a run over other images: it and the records made from it are stale.
    shutil.rmtree(directory)
    for stale in glob.glob(os.path.join(os.path.dirname(directory), f'records-{count}-*')):
      shutil.rmtree(stale)
  os.makedirs(directory, exist_ok=True)
  for name, target in wanted.items():
    link = os.path.join(directory, name)
    if not os.path.lexists(link):
      os.symlink(target, link)
  return directory


def make_records(images_dir: str, records_dir: str, image_format: str,
                 image_size: int | None) -> tuple[str, dict]:
  from agegender import contract  # pylint: disable=g-import-not-at-top
  from agegender import records  # pylint: disable=g-import-not-at-top
  records.build(images_dir, records_dir, split=(1.0, 0.0, 0.0), image_format=image_format,
                  image_size=image_size, num_shards=FLAGS.num_shards, skip_if_done=True,
                  progress=False)
  manifest = contract.read_manifest(records_dir)
  paths = contract.split_shards(manifest, 'train')
  examples = manifest['splits']['train']['num_examples']
  size = sum(os.path.getsize(p) for p in paths)
  return records_dir, {'bytes_per_image': size / examples, 'records': examples}


# ---------------------------------------------------------------------------
# The comparison.

def _best_of(results: list[dict]) -> dict:
  best = dict(max(results, key=lambda r: r['images_per_s']))
  best['round_rates'] = [r['images_per_s'] for r in results]
  best['peak_rss_mb'] = max(r['peak_rss_mb'] for r in results)
  return best


def speed_comparison(work: str, images_dir: str) -> list[dict]:
  """Each method once per round, the rounds one after another, so that a
  busy moment on a shared machine does not favor one method; the best round
  counts."""
  images = subset(images_dir, os.path.join(work, f'images-{FLAGS.count}'), FLAGS.count)
  methods = [('in-RAM loader (PIL + NumPy)', {}, 'inram', {'images_dir': images}),
             ('decode floor (PIL, all cores, bytes in memory)', {}, 'floor',
              {'images_dir': images}),
             ('decode limit (tf.data + resize, bytes in memory)', {}, 'decode',
              {'images_dir': images})]
  for label, image_format, size in STORAGES:
    records_dir, stored = make_records(
        images, os.path.join(work, f'records-{FLAGS.count}-{image_format}-{size}'),
        image_format, size)
    methods.append((f'pipeline, {label} records', dict(storage=label, **stored), 'pipeline',
                    {'records_dir': records_dir}))
  results = {method: [] for method, *_ in methods}
  for _ in range(FLAGS.rounds):
    for method, _, kind, paths in methods:
      results[method].append(measure_in_child(kind, **paths))
  rows = [dict(method=method, **extra, **_best_of(results[method]))
          for method, extra, *_ in methods]
  inram, floor, decode = (row['images_per_s'] for row in rows[:3])
  for row in rows:
    row['vs_decode_floor'] = row['images_per_s'] / floor
    row['vs_decode_limit'] = row['images_per_s'] / decode
    row['vs_in_ram'] = row['images_per_s'] / inram
  return rows


def memory_comparison(work: str, images_dir: str) -> list[dict]:
  rows = []
  for count in [int(s) for s in FLAGS.sizes if s]:
    images = subset(images_dir, os.path.join(work, f'images-{count}'), count)
    records_dir, _ = make_records(images, os.path.join(work, f'records-{count}-jpeg-None'),
                                  'jpeg', None)
    rows.append(dict(method='in-RAM loader (PIL + NumPy)', size=count,
                     **measure_in_child('inram', images_dir=images)))
    for buffer in FLAGS.memory_shuffle_buffers:
      rows.append(dict(method=f'pipeline, source JPEG, shuffle_buffer={int(buffer):,}',
                       size=count, **measure_in_child('pipeline', records_dir=records_dir,
                                                      shuffle_buffer=buffer)))
  return rows


def print_tables(header: str, speed: list[dict], memory: list[dict]) -> None:
  print(header)
  print(f'{"method":50} {"images/s":>9} {"x floor":>8} {"x tf.data":>9} {"x in-RAM":>9} '
        f'{"peak RSS MB":>12} {"bytes/image":>12} {"MB/batch":>9} {"f32 MB":>7}')
  for row in speed:
    stored = f'{row["bytes_per_image"]:,.0f}' if 'bytes_per_image' in row else ''
    batch = (f'{row["bytes_per_batch"] / 1e6:9.2f} {row["float32_bytes_per_batch"] / 1e6:7.2f}'
             if 'bytes_per_batch' in row else '')
    print(f'{row["method"]:50} {row["images_per_s"]:9,.0f} {row["vs_decode_floor"]:8.2f} '
          f'{row["vs_decode_limit"]:9.2f} {row["vs_in_ram"]:9.1f} {row["peak_rss_mb"]:12,.0f} '
          f'{stored:>12} {batch}')
  source = next(row for row in speed if row.get('storage') == 'source JPEG')
  print(f'pipeline over source-JPEG records / decode floor: {source["vs_decode_floor"]:.2f} '
        '(target: at least 0.9); MB/batch: uint8 images as yielded, f32 MB: the same as '
        'float32')
  sizes = sorted({row['size'] for row in memory})
  if not sizes:
    return
  print()
  print(f'{"peak RSS MB by data set size":56}' + ''.join(f'{s:>10,}' for s in sizes)
        + f'{"growth":>10}')
  for method in dict.fromkeys(row['method'] for row in memory):
    peaks = [row['peak_rss_mb'] for row in memory if row['method'] == method]
    print(f'{method:56}' + ''.join(f'{p:10,.0f}' for p in peaks) + f'{peaks[-1] - peaks[0]:10,.0f}')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.measure:
    run_measurement()
    return
  sizes = [int(s) for s in FLAGS.sizes if s]
  with tempfile.TemporaryDirectory(prefix='input_pipeline-') as temporary:
    work = FLAGS.work_dir or temporary
    os.makedirs(work, exist_ok=True)
    needed = max([FLAGS.count] + sizes)
    if FLAGS.source and os.path.isfile(FLAGS.source):
      images_dir = extracted(FLAGS.source, os.path.join(work, 'source-images'))
      data = f'UTKFace JPEGs from {FLAGS.source}'
    elif FLAGS.source:
      images_dir, data = FLAGS.source, f'UTKFace JPEGs from {FLAGS.source}'
    else:
      images_dir = synthetic_images(os.path.join(work, 'synthetic'), needed)
      data = 'synthetic UTKFace-like 200x200 JPEGs (agegender.records.synthetic)'
    speed = speed_comparison(work, images_dir)
    memory = memory_comparison(work, images_dir)
  gpus = speed[-1].get('gpus', 0)
  header = (f'{FLAGS.count:,} {data}; batch {FLAGS.batch_size}, image size '
            f'{FLAGS.image_size}; {machine.describe_cpu()}, {gpus or "no"} GPU')
  print_tables(header, speed, memory)
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump({'machine': machine.describe_cpu(), 'gpus': gpus, 'data': data, 'count': FLAGS.count,
                 'batch_size': FLAGS.batch_size, 'image_size': FLAGS.image_size,
                 'speed': speed, 'memory': memory}, f, indent=2)


def console_main():
  cli.run(main)


if __name__ == '__main__':
  console_main()
