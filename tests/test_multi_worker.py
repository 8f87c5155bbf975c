"""Multi-worker training: two worker processes on loopback (TF_CONFIG with 127.0.0.1 ports)
train one model; only the chief writes --model_dir; each worker reads its own shards."""

import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from agegender import contract
from agegender import pipeline
from agegender import records

SIZE = 32
SHARDS = 4
COUNT = 300
WORKERS = 2


@pytest.fixture(scope='module')
def cluster_records(tmp_path_factory):
  root = tmp_path_factory.mktemp('cluster_records')
  records.convert('synthetic', str(root), image_size=SIZE, num_shards=SHARDS,
                  synthetic_count=COUNT, seed=2, progress=False)
  return str(root)


def _free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(('127.0.0.1', 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def _weights(path):
  import h5py  # pylint: disable=g-import-not-at-top
  arrays = {}
  with h5py.File(path, 'r') as f:
    f.visititems(lambda name, item: arrays.__setitem__(name, item[()])
                 if isinstance(item, h5py.Dataset) else None)
  return arrays


@pytest.fixture(scope='module')
def cluster_run(cluster_records, tmp_path_factory):
  """Two workers' train runs to the end: (model_dir, worker_dirs, completed processes)."""
  work = tmp_path_factory.mktemp('cluster')
  model_dir = work / 'run'
  worker_dirs = [work / f'worker{index}' for index in range(WORKERS)]
  cluster = {'worker': [f'127.0.0.1:{port}' for port in _free_ports(WORKERS)]}
  processes = []
  for index in range(WORKERS):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS='0', TF_CPP_MIN_LOG_LEVEL='2',
               TF_CONFIG=json.dumps({'cluster': cluster, 'task': {'type': 'worker',
                                                                  'index': index}}))
    command = [sys.executable, '-m', 'agegender.train', f'--records_dir={cluster_records}',
               f'--model_dir={model_dir}', f'--worker_dir={worker_dirs[index]}',
               '--distribution_strategy=multi_worker', '--model=tiny', f'--image_size={SIZE}',
               '--epochs=2', '--batch_size=32', '--learning_rate=1e-3', '--age_loss=mae',
               '--shuffle_buffer=300', '--verbose=0', '--notensorboard']
    processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env))
  completed = []
  try:
    for process in processes:
      out, err = process.communicate(timeout=240)
      completed.append((process.returncode, out, err))
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.communicate()
  return model_dir, worker_dirs, completed


def test_both_workers_finish_and_only_the_chief_writes_the_outputs(cluster_run):
  model_dir, worker_dirs, completed = cluster_run
  for status, _, err in completed:
    assert status == 0, err[-3000:]
  for name in ('model.keras', 'history.csv', 'metrics.json', 'config.json',
               'export/saved_model.pb'):
    assert os.path.isfile(os.path.join(model_dir, name)), name
  with open(os.path.join(model_dir, 'history.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  assert [int(row['epoch']) for row in rows] == [0, 1]
  for row in rows:  # The logged loss is the sum of its parts under two workers too.
    for prefix in ('', 'val_'):
      assert float(row[prefix + 'loss']) == pytest.approx(
          float(row[prefix + 'age_output_loss']) + float(row[prefix + 'gender_output_loss']),
          rel=1e-4), (prefix, row)
  assert 'the chief writes the outputs' in completed[1][1]
  # The chief's --worker_dir is not used; the other worker's holds only its training state.
  assert not os.path.exists(worker_dirs[0])
  assert not {'metrics.json', 'export'} & set(os.listdir(worker_dirs[1]))


def test_both_workers_end_with_the_same_weights(cluster_run):
  model_dir, worker_dirs, _ = cluster_run
  chief = _weights(os.path.join(model_dir, 'backup', 'latest.weights.h5'))
  other = _weights(os.path.join(worker_dirs[1], 'backup', 'latest.weights.h5'))
  assert chief.keys() == other.keys() and chief
  for name, values in chief.items():
    np.testing.assert_array_equal(values, other[name], err_msg=name)


def test_the_workers_read_disjoint_shards_that_cover_the_split(cluster_records):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  names = []
  for index in range(WORKERS):
    context = tf.distribute.InputContext(num_input_pipelines=WORKERS, input_pipeline_id=index,
                                         num_replicas_in_sync=WORKERS)
    dataset = pipeline.make_dataset(cluster_records, 'train', batch_size=32, training=True,
                                    image_size=SIZE, input_context=context,
                                    include_metadata=True)
    names.append({name for _, _, metadata in dataset
                  for name in metadata[contract.FILE_NAME].numpy()})
  manifest = contract.read_manifest(cluster_records)
  assert not names[0] & names[1]
  assert len(names[0] | names[1]) == manifest['splits']['train']['num_examples']
  assert names[0] and names[1]
