"""Sharding the input over several pipelines (workers), at the pipeline level.

With at least as many shards as input pipelines, each pipeline reads its own
whole shards. With fewer (make_records' synthetic default writes one training
shard; real UTKFace at 64 MB shards gives three), the pipeline warns and
shards by record, as tf.data's DATA auto-shard policy does: every pipeline
reads every shard in one order and keeps every n-th record. Either way, the
pipelines together read every record exactly once per epoch, also when
training shuffles. The two-worker training run is tests/test_multi_worker.py.
"""

import logging

import pytest
import tensorflow as tf

from agegender.training import config as config_lib
from agegender import contract
from agegender.data import pipeline
from agegender import records

SIZE = 32
COUNT = 90  # Synthetic faces: 70 train, 12 validation, 8 test with seed 0.
FALLBACK_WARNING = 'input pipelines: each pipeline reads every shard'


@pytest.fixture(scope='module')
def records_with_shards(tmp_path_factory):
  """records_with_shards(k) -> a records root whose splits have k shards (converted once)."""
  converted = {}

  def make(num_shards):
    if num_shards not in converted:
      root = str(tmp_path_factory.mktemp(f'shards{num_shards}'))
      records.build('synthetic', root, image_size=SIZE, num_shards=num_shards,
                      synthetic_count=COUNT, seed=0, progress=False)
      converted[num_shards] = root
    return converted[num_shards]

  return make


def names_in(paths):
  """File names of the records in the shards at `paths`, in order."""
  spec = {contract.FILE_NAME: tf.io.FixedLenFeature([], tf.string)}
  return [tf.io.parse_single_example(record, spec)[contract.FILE_NAME].numpy().decode()
          for record in tf.data.TFRecordDataset(list(paths))]


def pipelines(root, split, num_pipelines, *, training, batch_size=8):
  """make_dataset for each of num_pipelines input pipelines."""
  data = config_lib.DataConfig(records_dir=root, image_size=SIZE, batch_size=batch_size)
  return [pipeline.make_dataset(
      data, split, training=training, include_metadata=True,
      input_context=tf.distribute.InputContext(num_input_pipelines=num_pipelines,
                                               input_pipeline_id=index))
          for index in range(num_pipelines)]


def epoch_names(dataset):
  """The file names of one pass over a dataset, in the order they came."""
  return [name.decode() for _, _, metadata in dataset.as_numpy_iterator()
          for name in metadata[contract.FILE_NAME]]


def fallback_warnings(caplog):
  return [r.getMessage() for r in caplog.records if FALLBACK_WARNING in r.getMessage()]


@pytest.mark.parametrize('num_shards, num_pipelines', [(4, 2), (4, 3), (4, 4)])
def test_with_enough_shards_each_pipeline_reads_its_own_whole_shards(
    records_with_shards, num_shards, num_pipelines, caplog):
  root = records_with_shards(num_shards)
  shards = contract.split_shards(contract.read_manifest(root), 'train')
  assert len(shards) == num_shards
  with caplog.at_level(logging.WARNING):
    datasets = pipelines(root, 'train', num_pipelines, training=True)
    per_pipeline = [epoch_names(dataset) for dataset in datasets]
  assert not fallback_warnings(caplog)
  for index, names in enumerate(per_pipeline):
    # Whole shards: exactly the records of shards i, i+n, ..., each once.
    assert sorted(names) == sorted(names_in(shards[index::num_pipelines]))
  together = [name for names in per_pipeline for name in names]
  assert sorted(together) == sorted(names_in(shards))
  assert len(set(together)) == len(together)  # Disjoint.


@pytest.mark.parametrize('num_shards, num_pipelines', [(1, 3), (2, 3), (1, 2)])
def test_with_fewer_shards_than_pipelines_it_warns_and_shards_by_record(
    records_with_shards, num_shards, num_pipelines, caplog):
  root = records_with_shards(num_shards)
  shards = contract.split_shards(contract.read_manifest(root), 'train')
  assert len(shards) == num_shards < num_pipelines
  expected = sorted(names_in(shards))
  with caplog.at_level(logging.WARNING):
    datasets = pipelines(root, 'train', num_pipelines, training=True)
  warnings = fallback_warnings(caplog)
  assert len(warnings) == num_pipelines  # One from each pipeline.
  assert all(warning.startswith(f"split 'train' has {num_shards} shard(s) for {num_pipelines} "
                                f'{FALLBACK_WARNING}') for warning in warnings), warnings
  orders = []
  for _ in range(2):  # Two epochs; every pipeline reshuffles each.
    per_pipeline = [epoch_names(dataset) for dataset in datasets]
    together = [name for names in per_pipeline for name in names]
    # Disjoint, and together every record exactly once in the epoch.
    assert sorted(together) == expected
    # Every pipeline has its share (one record more or less).
    sizes = [len(names) for names in per_pipeline]
    assert max(sizes) - min(sizes) <= 1
    orders.append(per_pipeline)
  assert orders[0] != orders[1]  # Shuffled: the epochs differ.


def test_fewer_shards_than_pipelines_in_evaluation_reads_every_record_once(
    records_with_shards, caplog):
  root = records_with_shards(2)
  shards = contract.split_shards(contract.read_manifest(root), 'validation')
  with caplog.at_level(logging.WARNING):
    datasets = pipelines(root, 'validation', 3, training=False, batch_size=3)
  assert len(fallback_warnings(caplog)) == 3
  per_pipeline = [epoch_names(dataset) for dataset in datasets]
  together = [name for names in per_pipeline for name in names]
  assert sorted(together) == sorted(names_in(shards))
  # Evaluation's order is the same on every run, so each pipeline's share is too.
  assert [epoch_names(dataset) for dataset in datasets] == per_pipeline
