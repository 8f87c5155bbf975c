"""Multi-worker training: two worker processes on loopback (TF_CONFIG with 127.0.0.1 ports)
train one model; only the chief writes --model_dir; each worker reads its own shards; workers
killed with SIGKILL and started again resume from the chief's last saved epoch."""

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import runs  # tests/runs.py

from agegender.training import config as config_lib
from agegender import contract
from agegender.data import pipeline
from agegender import records

SIZE = 32
SHARDS = 4
COUNT = 300
WORKERS = 2


@pytest.fixture(scope='module')
def cluster_records(tmp_path_factory):
  root = tmp_path_factory.mktemp('cluster_records')
  records.build('synthetic', str(root), image_size=SIZE, num_shards=SHARDS,
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


def _start_workers(records_dir, model_dir, worker_dirs, epochs, verbose=0):
  """One `agegender.train` process per worker on fresh loopback ports."""
  cluster = {'worker': [f'127.0.0.1:{port}' for port in _free_ports(WORKERS)]}
  processes = []
  for index in range(WORKERS):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS='0', TF_CPP_MIN_LOG_LEVEL='2',
               TF_CONFIG=json.dumps({'cluster': cluster, 'task': {'type': 'worker',
                                                                  'index': index}}))
    command = [sys.executable, '-m', 'agegender.train', f'--records_dir={records_dir}',
               f'--model_dir={model_dir}', f'--worker_dir={worker_dirs[index]}',
               '--distribution_strategy=multi_worker', '--model=tiny', f'--image_size={SIZE}',
               f'--epochs={epochs}', '--batch_size=32', '--shuffle_buffer=300',
               f'--verbose={verbose}',
               '--notensorboard']
    processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env))
  return processes


def _finish(processes, timeout=240):
  """[(exit status, stdout, stderr)] of each process; kills any still running at the end."""
  completed = []
  try:
    for process in processes:
      out, err = process.communicate(timeout=timeout)
      completed.append((process.returncode, out, err))
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.communicate()
  return completed


@pytest.fixture(scope='module')
def one_shard_records(tmp_path_factory):
  """Records whose training split is one shard: fewer shards than workers."""
  root = tmp_path_factory.mktemp('one_shard_records')
  records.build('synthetic', str(root), image_size=SIZE, num_shards=1,
                  synthetic_count=COUNT, seed=2, progress=False)
  return str(root)


@pytest.fixture(scope='module')
def cluster_run(one_shard_records, tmp_path_factory):
  """Two workers' train runs to the end on one training shard (each worker keeps every other
  record): (model_dir, worker_dirs, completed processes)."""
  work = tmp_path_factory.mktemp('cluster')
  model_dir = work / 'run'
  worker_dirs = [work / f'worker{index}' for index in range(WORKERS)]
  processes = _start_workers(one_shard_records, model_dir, worker_dirs, epochs=2)
  return model_dir, worker_dirs, _finish(processes)


def test_both_workers_finish_and_only_the_chief_writes_the_outputs(cluster_run):
  model_dir, worker_dirs, completed = cluster_run
  for status, _, err in completed:
    assert status == 0, err[-3000:]
    assert 'keeps one record in every 2' in err  # Fewer shards than workers: sharded by record.
  for name in ('model.keras', 'history.csv', 'metrics.json', 'config.json',
               'export/saved_model.pb'):
    assert os.path.isfile(os.path.join(model_dir, name)), name
  with open(os.path.join(model_dir, 'history.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  assert [int(row['epoch']) for row in rows] == [0, 1]
  with open(os.path.join(model_dir, 'config.json')) as f:
    saved = json.load(f)
  age_weight = config_lib.AGE_LOSS_WEIGHTS[saved['model']['age_head']]  # age_loss_weight unset.
  for row in rows:  # The logged loss is the weighted sum of its parts under two workers too.
    for prefix in ('', 'val_'):
      assert float(row[prefix + 'loss']) == pytest.approx(
          age_weight * float(row[prefix + 'age_output_loss'])
          + float(row[prefix + 'gender_output_loss']), rel=1e-4), (prefix, row)
  assert 'the chief writes the outputs' in completed[1][1]
  # The chief's --worker_dir is not used; the other worker's holds only its training state.
  assert not os.path.exists(worker_dirs[0])
  assert not {'metrics.json', 'export'} & set(os.listdir(worker_dirs[1]))


def test_both_workers_end_with_the_same_weights(cluster_run):
  model_dir, worker_dirs, _ = cluster_run
  chief = runs.model_weights(model_dir)
  other = runs.model_weights(worker_dirs[1])
  assert chief.keys() == other.keys() and chief
  for name, values in chief.items():
    np.testing.assert_array_equal(values, other[name], err_msg=name)


def _history(model_dir):
  with open(os.path.join(model_dir, 'history.csv'), newline='') as f:
    return list(csv.DictReader(f))


def test_workers_killed_and_restarted_resume_from_the_saved_epoch(cluster_records, tmp_path):
  epochs = 3
  model_dir = tmp_path / 'run'
  worker_dirs = [tmp_path / f'worker{index}' for index in range(WORKERS)]
  processes = _start_workers(cluster_records, model_dir, worker_dirs, epochs)
  try:
    while runs.saved_epoch(model_dir) < 1 and all(p.poll() is None for p in processes):
      time.sleep(0.02)
    for process in processes:
      os.kill(process.pid, signal.SIGKILL)
  finally:
    killed = _finish(processes, timeout=60)
  for status, _, err in killed:
    assert status == -signal.SIGKILL, err[-3000:]
  saved = runs.saved_epoch(model_dir)
  assert 1 <= saved < epochs, 'the workers should be killed before their last epoch'
  # What history.csv is written from (the kill may land before the file is).
  finished_before = [row for row in runs.saved_history(model_dir) if row['epoch'] < saved]

  # verbose=2 prints "Epoch N/3" as each epoch begins: the restart's epochs.
  restarted = _finish(_start_workers(cluster_records, model_dir, worker_dirs, epochs,
                                     verbose=2))
  for status, _, err in restarted:
    assert status == 0, err[-3000:]
  for _, out, _ in restarted:
    begun = [int(n) - 1 for n in re.findall(rf'^Epoch (\d+)/{epochs}$', out, re.MULTILINE)]
    assert begun == list(range(saved, epochs)), out[-2000:]
  rows = _history(model_dir)
  assert [int(row['epoch']) for row in rows] == list(range(epochs))
  # Those epochs' rows were not trained or written again.
  assert [{key: float(value) for key, value in row.items()} for row in rows[:saved]] == (
      finished_before)
  chief = runs.model_weights(model_dir)
  other = runs.model_weights(worker_dirs[1])
  assert chief.keys() == other.keys() and chief
  for name, values in chief.items():
    np.testing.assert_array_equal(values, other[name], err_msg=name)


def test_the_workers_read_disjoint_shards_that_cover_the_split(cluster_records):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  names = []
  for index in range(WORKERS):
    context = tf.distribute.InputContext(num_input_pipelines=WORKERS, input_pipeline_id=index,
                                         num_replicas_in_sync=WORKERS)
    data = config_lib.DataConfig(records_dir=cluster_records, batch_size=32, image_size=SIZE)
    dataset = pipeline.make_dataset(data, 'train', training=True, input_context=context,
                                    include_metadata=True)
    names.append({name for _, _, metadata in dataset
                  for name in metadata[contract.FILE_NAME].numpy()})
  manifest = contract.read_manifest(cluster_records)
  assert not names[0] & names[1]
  assert len(names[0] | names[1]) == manifest['splits']['train']['num_examples']
  assert names[0] and names[1]
