"""Shared fixtures: synthetic records converted once, and one short training run of the
default recipe (the default model included) on them."""

import pytest

from agegender.training import loop
from agegender import records

# Small images and a small set keep the whole suite fast on a 2-core CPU.
IMAGE_SIZE = 64
SYNTHETIC_COUNT = 1200


@pytest.fixture(scope='session')
def synthetic_records(tmp_path_factory):
  """A records root holding SYNTHETIC_COUNT synthetic faces stored as IMAGE_SIZE JPEGs."""
  root = tmp_path_factory.mktemp('records')
  records.build('synthetic', str(root), image_size=IMAGE_SIZE, num_shards=2,
                  synthetic_count=SYNTHETIC_COUNT, seed=0, progress=False)
  return str(root)


def _run_config(records_dir, model_dir, **overrides):
  """A Config of the default recipe and model, sized for the synthetic set."""
  from agegender.training import config as config_lib  # pylint: disable=g-import-not-at-top
  values = dict(records_dir=str(records_dir), model_dir=str(model_dir),
                image_size=IMAGE_SIZE, epochs=4, batch_size=32, shuffle_buffer=1000, verbose=0,
                # The same run whatever else loads the machine: learning thresholds
                # must not depend on which batches a busy scheduler hands out first.
                deterministic=True)
  values.update(overrides)
  return config_lib.make_config(**values)


@pytest.fixture(scope='session')
def run_config():
  """run_config(records_dir, model_dir, **overrides) -> Config of a short default run."""
  return _run_config


@pytest.fixture(scope='session')
def trained_run(synthetic_records, tmp_path_factory):
  """train_and_evaluate's result for the default model on the synthetic records (trained once)."""
  model_dir = tmp_path_factory.mktemp('runs') / 'default'
  return loop.train_and_evaluate(_run_config(synthetic_records, model_dir))
