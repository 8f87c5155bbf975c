"""Reading a training run's saved state in tests: its last saved epoch and its weights."""

import os
import re


def saved_epoch(state_dir):
  """The epoch of the latest checkpoint under state_dir/checkpoints (0 before the first)."""
  try:
    with open(os.path.join(state_dir, 'checkpoints', 'checkpoint')) as f:
      match = re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', f.read(), re.MULTILINE)
  except OSError:
    return 0
  return int(match.group(1)) if match else 0


def model_weights(state_dir):
  """{name: array} of the model's variables in the latest checkpoint under state_dir."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  reader = tf.train.load_checkpoint(os.path.join(state_dir, 'checkpoints'))
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
          if name.startswith('model/')}


def saved_history(state_dir):
  """The history rows in the latest checkpoint under state_dir (what history.csv is written
  from)."""
  import json  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  reader = tf.train.load_checkpoint(os.path.join(state_dir, 'checkpoints'))
  return json.loads(reader.get_tensor('history/.ATTRIBUTES/VARIABLE_VALUE').decode('utf-8'))
