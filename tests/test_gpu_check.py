"""benchmarks/gpu_check.sh --quick: the GPU check's CPU twin runs end to end.

The GPU check runs rarely, on a machine lent for minutes; this test runs the same script
(the same conversion, models, variants and loop, at 32px for a few steps) so that it still
works the day a GPU is at hand. It checks the shape of the result, never a rate's size.
"""

import itertools
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'benchmarks', 'gpu_check.sh')
QUICK_SIZE, QUICK_BATCH = 32, 8
QUICK_STORAGES = ['source JPEG', f'JPEG@{QUICK_SIZE}', f'raw@{QUICK_SIZE}']
QUICK_VARIANTS = [('float32', False), ('mixed_float16', True)]
RATES = ('pipeline_images_per_s', 'in_memory_images_per_s', 'ratio', 'input_alone_images_per_s')


@pytest.mark.slow
def test_quick_gpu_check_writes_a_row_per_cell(tmp_path):
  env = dict(os.environ, PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL='3')
  done = subprocess.run(['bash', SCRIPT, '--quick', f'--out={tmp_path}'], env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

  with open(tmp_path / 'gpu_check_quick.json') as f:
    result = json.load(f)
  matrix = result['matrix']
  from agegender.training import config as config_lib  # pylint: disable=g-import-not-at-top
  assert matrix['models'] == [config_lib.ModelConfig().model]
  assert matrix['storages'] == QUICK_STORAGES
  assert result['skipped'] == []
  cells = [(row['model'], row['storage'], row['precision'], row['xla'])
           for row in result['rows']]
  expected = [(model, storage, precision, xla)
              for model, (precision, xla), storage in itertools.product(
                  matrix['models'], QUICK_VARIANTS, QUICK_STORAGES)]
  assert cells == expected

  pixels = QUICK_BATCH * QUICK_SIZE * QUICK_SIZE * 3
  targets = QUICK_BATCH * 4 * 2  # Two float32 targets an image.
  for row in result['rows']:
    assert all(row[rate] > 0 for rate in RATES), row
    assert row['device'] == result['device']
    assert row['bytes_per_batch'] == pixels + targets  # uint8 images to the device.
    assert row['float32_bytes_per_batch'] == 4 * pixels + targets

  table = (tmp_path / 'gpu_check_quick.txt').read_text()
  assert all(storage in table for storage in QUICK_STORAGES)
  assert len([line for line in table.splitlines() if 'float16' in line]) == 3 * len(
      matrix['models'])
