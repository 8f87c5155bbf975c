"""make_records throughput beside the decode-only rate of the same images, and --find_faces.

  python benchmarks/make_records.py [--count 3000] [--json results.json]
      [--utkface /work/shared/data/UTKFace.tar --limit 2000]

Writes a synthetic set into a temporary folder, then, in one run on this
machine: decodes every file with all cores (the decoder the conversion uses,
on a process pool as the conversion runs it, and on threads for comparison)
and converts the folder with three storages (each run starts its own worker
processes, as a command-line run does). Prints images/s and each
conversion's ratio to the best decode-only rate.

With --utkface (the real archive; UTKFace is for non-commercial research
only), --limit of its crops (every n-th member, so all ages) are converted on
all cores plainly and with --find_faces, as they are and pasted into bigger
generated photos (--photo_size, at a random place and scale, as faces from
elsewhere are framed). Each --find_faces row says its rate against the plain
conversion of the same crops, and the share of faces kept.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

from agegender import records
from agegender.records import convert

import machine  # benchmarks/machine.py, beside this script


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


def _sample_archive(archive: str, limit: int, folder: str) -> list[str]:
  """Writes every n-th .jpg of a UTKFace tar (about `limit` of them) into `folder`."""
  with tarfile.open(archive) as tar:
    members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith('.jpg')]
    step = max(1, len(members) // limit)
    names = []
    for member in members[::step][:limit]:
      name = os.path.basename(member.name)
      with open(os.path.join(folder, name), 'wb') as f:
        f.write(tar.extractfile(member).read())
      names.append(name)
  return names


def _paste_into_photos(crops: str, names: list[str], folder: str, size: int) -> None:
  """Each crop at a random scale (0.4-0.9 of the photo's side) and place in a noisy gradient."""
  for index, name in enumerate(names):
    rng = np.random.default_rng(index)
    ramp = np.linspace(0, 1, size)[None, :, None] * rng.integers(-80, 80, size=3)
    photo = np.clip(rng.integers(40, 200, size=3) + ramp +
                    rng.normal(0, 8, size=(size, size, 3)), 0, 255).astype(np.uint8)
    photo = Image.fromarray(photo)
    with Image.open(os.path.join(crops, name)) as crop:
      side = int(size * rng.uniform(0.4, 0.9))
      crop = crop.convert('RGB').resize((side, side), Image.Resampling.BILINEAR)
      photo.paste(crop, (int(rng.integers(0, size - side + 1)),
                         int(rng.integers(0, size - side + 1))))
    photo.save(os.path.join(folder, name), format='JPEG', quality=92)


def _timed(folder: str, **kwargs) -> tuple[float, dict]:
  with tempfile.TemporaryDirectory() as out:
    start = time.perf_counter()
    summary = records.build(folder, out, progress=False, **kwargs)
    return time.perf_counter() - start, summary


def real_rows(archive: str, limit: int, photo_size: int, cores: int) -> list[dict]:
  """Plain and --find_faces conversions of UTKFace crops, bare and pasted into photos."""
  rows = []
  with tempfile.TemporaryDirectory() as crops, tempfile.TemporaryDirectory() as photos:
    names = _sample_archive(archive, limit, crops)
    _paste_into_photos(crops, names, photos, photo_size)
    plain = None
    for label, folder, kwargs in (
        ('UTKFace crops, convert', crops, {}),
        ('UTKFace crops, --find_faces', crops, {'find_faces': True}),
        (f'crops in {photo_size}px photos, --find_faces', photos, {'find_faces': True})):
      elapsed, summary = _timed(folder, workers=cores, **kwargs)
      rate = summary['files_read'] / elapsed
      plain = plain or rate
      rows.append({'label': label, 'images': summary['files_read'], 'images_per_s': rate,
                   'ratio_to_plain': rate / plain,
                   'kept': 1 - summary['rejected_total'] / summary['files_read'],
                   'rejected': summary['rejected']})
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--count', type=int, default=3000)
  parser.add_argument('--repeats', type=int, default=2,
                      help='runs of each measurement; the best is reported')
  parser.add_argument('--json', help='also write the results here')
  parser.add_argument('--utkface', help='the real UTKFace .tar: adds the --find_faces rows')
  parser.add_argument('--limit', type=int, default=2000,
                      help='crops of --utkface converted (every n-th, so all ages)')
  parser.add_argument('--photo_size', type=int, default=400,
                      help='side of the generated photos the crops are pasted into')
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

  print(f'{args.count} synthetic 200x200 JPEGs, {machine.describe_cpu()} '
        f'({platform.machine()}), best of {args.repeats}')
  print(f'{"":26s} {"images/s":>9s} {"ratio":>6s}')
  for label, rate in rows:
    print(f'{label:26s} {rate:9.0f} {rate / decode_best:6.2f}')
  real = real_rows(args.utkface, args.limit, args.photo_size, cores) if args.utkface else []
  if real:
    print(f'\n{real[0]["images"]} real UTKFace crops (non-commercial research use only), '
          f'{cores} workers, one run each')
    print(f'{"":38s} {"images/s":>9s} {"vs plain":>9s} {"kept":>6s}  rejected')
    for row in real:
      rejected = ', '.join(f'{k} {v}' for k, v in row['rejected'].items()) or 'none'
      print(f'{row["label"]:38s} {row["images_per_s"]:9.1f} {row["ratio_to_plain"]:9.3f} '
            f'{row["kept"]:6.1%}  {rejected}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'count': args.count, 'cores': cores, 'machine': machine.describe_cpu(),
                 'repeats': args.repeats,
                 'rates': {label: round(rate, 1) for label, rate in rows},
                 'ratio_to_decode_only': {label: round(rate / decode_best, 3)
                                          for label, rate in rows},
                 'utkface': real}, f, indent=2)


if __name__ == '__main__':
  main()
