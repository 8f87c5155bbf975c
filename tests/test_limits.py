"""Hostile and unlucky inputs: bounded files and pixels, a full disk, a killed run, two writers.

The big inputs are generated here (a zip member of zeros, one flat 12000x12000
JPEG) and never stored in the repository.
"""

import io
import os
import resource
import socket
import subprocess
import sys
import textwrap
import warnings
import zipfile

import pytest
import tensorflow as tf
from PIL import Image

from agegender import files
from agegender import contract
from agegender.records import convert
from agegender.records import publish
from agegender import records
from agegender.records import synthetic

import folders  # tests/folders.py

HUGE_NAME = '40_1_0_20170101000000099.jpg'
HUGE_SIDE = 12000


@pytest.fixture(scope='module')
def faces():
  return dict(synthetic.generate_synthetic(12, seed=21, image_size=64))


@pytest.fixture(scope='module')
def huge_jpeg():
  """One flat colour at 12000x12000: about 2 MB of JPEG, 432 MB of pixels."""
  buffer = io.BytesIO()
  Image.new('RGB', (HUGE_SIDE, HUGE_SIDE), (120, 130, 140)).save(buffer, format='JPEG')
  return buffer.getvalue()


def _all_names(root):
  return [name for _, folders_, files in os.walk(root) for name in folders_ + files]


def _rows(records_dir):
  manifest = contract.read_manifest(records_dir)
  return {row['file_name'].numpy().decode(): row for split in contract.SPLITS
          for row in (tf.io.parse_single_example(record, contract.feature_spec())
                      for record in tf.data.TFRecordDataset(
                          contract.split_shards(manifest, split)))}


def test_a_member_over_the_size_bound_is_rejected_unread_and_counted(tmp_path, faces):
  path = tmp_path / 'faces.zip'
  with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED) as archive:
    for name, data in faces.items():
      archive.writestr(name, data)
    with archive.open(HUGE_NAME, 'w') as member:
      for _ in range(8):
        member.write(bytes(2**20))
  out = str(tmp_path / 'out')
  summary = records.build(str(path), out, max_file_mb=1, workers=1, progress=False)
  assert summary['rejected'] == {convert.TOO_LARGE: 1}
  assert summary['accepted_total'] == len(faces)
  assert 'file too large 1' in records.format_summary(summary)
  [rejected] = contract.read_manifest(out)['rejected']
  assert rejected['file'] == HUGE_NAME and '8388608 bytes' in rejected['reason']


def test_a_huge_image_is_downscaled_within_the_pixel_bound_and_says_so(tmp_path, faces,
                                                                       huge_jpeg):
  folder = folders.write_folder(tmp_path / 'src', {**faces, HUGE_NAME: huge_jpeg})
  out = str(tmp_path / 'out')
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # PIL's DecompressionBombWarning must not escape.
    summary = records.build(folder, out, workers=1, progress=False)
  assert summary['downscaled'] == 1 and summary['accepted_total'] == len(faces) + 1
  assert 'downscaled: 1' in records.format_summary(summary)
  manifest = contract.read_manifest(out)
  assert manifest['downscaled'] == [{'file': HUGE_NAME, 'from': [HUGE_SIDE, HUGE_SIDE]}]
  image = tf.io.decode_jpeg(_rows(out)[HUGE_NAME]['image'])
  assert image.shape == (2048, 2048, 3)
  assert image.shape[0] * image.shape[1] <= records.DEFAULT_MAX_IMAGE_PIXELS


def test_downscaling_decodes_at_a_reduced_scale_so_memory_stays_near_the_bound(tmp_path,
                                                                               huge_jpeg):
  path = tmp_path / HUGE_NAME
  path.write_bytes(huge_jpeg)
  # VmHWM, this process's peak, which (unlike ru_maxrss) does not inherit pytest's own.
  script = textwrap.dedent(f'''
      from agegender.records import convert
      data = open({str(path)!r}, 'rb').read()
      result = convert.convert_image({HUGE_NAME!r}, data, convert.ConvertOptions())
      assert result.downscaled_from == ({HUGE_SIDE}, {HUGE_SIDE}), result
      print(next(line.split()[1] for line in open('/proc/self/status')
                 if line.startswith('VmHWM:')))
  ''')
  done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr
  assert done.stderr == ''  # No warning reached the terminal.
  peak_mib = int(done.stdout) / 1024
  assert peak_mib < 250  # Decoding every pixel would take 432 MiB on its own.


def test_a_huge_image_can_be_rejected_instead(tmp_path, faces, huge_jpeg):
  folder = folders.write_folder(tmp_path / 'src', {**faces, HUGE_NAME: huge_jpeg})
  out = str(tmp_path / 'out')
  summary = records.build(folder, out, large_images='reject', workers=1, progress=False)
  assert summary['rejected'] == {convert.TOO_MANY_PIXELS: 1}
  assert summary['downscaled'] == 0
  # Only JPEGs decode at a reduced scale; a large PNG is rejected in either mode.
  png = io.BytesIO()
  Image.new('RGB', (40, 40), (1, 2, 3)).save(png, format='PNG')
  result = convert.convert_image(HUGE_NAME, png.getvalue(), convert.ConvertOptions(max_pixels=100))
  assert result.kind == convert.TOO_MANY_PIXELS and '40x40' in result.reason


def test_a_full_disk_removes_the_partial_shard_and_keeps_complete_records(tmp_path, faces):
  out = str(tmp_path / 'records')
  records.build(folders.write_folder(tmp_path / 'small', faces), out, workers=1,
                  progress=False)
  before = folders.read_folder(contract.dataset_dir(out))
  bigger = str(tmp_path / 'bigger')
  synthetic.write_synthetic_folder(bigger, 40, seed=3)
  limit = 64 * 2**10  # No file may grow past this: the train shard cannot be written.

  def small_disk():
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  done = subprocess.run(
      [sys.executable, '-m', 'agegender.make_records', f'--source={bigger}',
       f'--records_dir={out}', '--overwrite', '--workers=1', '--noprogress'],
      capture_output=True, text=True, timeout=180, preexec_fn=small_disk,
      env=dict(os.environ, PYTHONDONTWRITEBYTECODE='1', TF_CPP_MIN_LOG_LEVEL='3'))
  lines = done.stderr.strip().splitlines()
  assert done.returncode == 2 and len(lines) == 1, done.stderr
  assert 'could not write the records' in lines[0] and '--records_dir' in lines[0]
  assert folders.read_folder(contract.dataset_dir(out)) == before
  leftovers = [n for n in _all_names(out) if n.startswith(files.TEMP_PREFIX)]
  assert leftovers == [] and publish.LOCK_NAME not in _all_names(out)


_KILLED_RUN = '''
import os, signal, sys
from agegender import records
from agegender.records import shards

write_shard = shards.write_shard

def write_shard_and_die_in_the_second(directory, split, index, num_shards, examples):
  if index == 1:
    def examples_then_kill(examples=examples):
      for count, example in enumerate(examples):
        if count == 1:
          os.kill(os.getpid(), signal.SIGKILL)
        yield example
    examples = examples_then_kill()
  return write_shard(directory, split, index, num_shards, examples)

shards.write_shard = write_shard_and_die_in_the_second
records.build(sys.argv[1], sys.argv[2], num_shards=3, overwrite=True, workers=1,
                progress=False)
'''


def test_a_killed_run_leaves_complete_records_and_a_stale_lock_the_rerun_takes(tmp_path,
                                                                               faces):
  out, clean = str(tmp_path / 'records'), str(tmp_path / 'clean')
  records.build('synthetic', out, synthetic_count=8, workers=1, progress=False)
  before = folders.read_folder(contract.dataset_dir(out))
  folder = folders.write_folder(tmp_path / 'src', faces)

  killed = subprocess.run([sys.executable, '-c', _KILLED_RUN, folder, out],
                          capture_output=True, text=True, timeout=180)
  assert killed.returncode == -9, killed.stderr
  assert folders.read_folder(contract.dataset_dir(out)) == before  # Still complete and readable.
  contract.read_manifest(out)
  assert publish.LOCK_NAME in os.listdir(out)  # Left behind by the killed run...
  staging = publish.staging_dir(contract.dataset_dir(out))
  assert any(n.startswith(files.TEMP_PREFIX) for n in os.listdir(staging))

  # ...and recognised as stale: the rerun takes the lock and finishes.
  records.build(folder, out, num_shards=3, overwrite=True, workers=1, progress=False)
  records.build(folder, clean, num_shards=3, workers=1, progress=False)
  rerun = folders.read_folder(contract.dataset_dir(out))
  expected = folders.read_folder(contract.dataset_dir(clean))
  assert rerun.keys() == expected.keys()
  for name in expected:
    if name != contract.MANIFEST_NAME:
      assert rerun[name] == expected[name], name
  assert not os.path.exists(staging) and publish.LOCK_NAME not in os.listdir(out)


def test_a_second_writer_stops_with_an_error_naming_the_first(tmp_path):
  out = str(tmp_path / 'records')
  with publish.records_lock(out):
    with pytest.raises(contract.ArgumentError) as raised:
      records.build('synthetic', out, synthetic_count=5, workers=1, progress=False)
  message = str(raised.value)
  assert raised.value.field == 'records_dir'
  assert f'pid {os.getpid()} on host {socket.gethostname()}' in message
  assert publish.LOCK_NAME in message
  assert not os.path.exists(contract.dataset_dir(out))
  # Once the first writer is done, the second one runs.
  assert records.build('synthetic', out, synthetic_count=5, workers=1,
                         progress=False)['accepted_total'] == 5
  assert os.listdir(out) == [contract.DATASET_NAME]
