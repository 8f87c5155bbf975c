"""The dual-output models: shapes, heads, dtypes, losses and the weights error."""

import keras
import numpy as np
import pytest

from agegender import cli
from agegender import model as model_lib


def _outputs(model, image_size):
  images = np.random.default_rng(0).random((2, image_size, image_size, 3), dtype=np.float32)
  return model.predict(images, verbose=0)


def test_seed_cnn_is_the_reference_architecture():
  model = model_lib.build_model('seed_cnn')
  assert model.input_shape == (None, 128, 128, 3)
  convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
  assert [conv.filters for conv in convs] == [64, 128, 256]
  assert {conv.kernel_size for conv in convs} == {(3, 3)}
  assert {conv.padding for conv in convs} == {'same'}
  assert model.get_layer('dense').units == 256
  assert model.get_layer('dropout').rate == 0.5
  assert model.get_layer('gender_output').activation.__name__ == 'sigmoid'
  assert model.get_layer('age_output').activation.__name__ == 'relu'


@pytest.mark.parametrize('name', ['tiny', 'seed_cnn'])
def test_outputs_are_two_named_heads(name):
  model = model_lib.build_model(name, image_size=64, filters=(4, 8, 8), dense_units=8)
  outputs = _outputs(model, 64)
  assert set(outputs) == {'gender_output', 'age_output'}
  assert outputs['gender_output'].shape == (2, 1)
  assert outputs['age_output'].shape == (2, 1)
  assert np.all((outputs['gender_output'] >= 0) & (outputs['gender_output'] <= 1))
  assert np.all(outputs['age_output'] >= 0)


@pytest.mark.parametrize('name', sorted(model_lib.BACKBONES))
def test_backbones_build_with_the_same_heads(name):
  model = model_lib.build_model(name, image_size=32, dense_units=8)
  outputs = _outputs(model, 32)
  assert outputs['gender_output'].shape == (2, 1)
  assert outputs['age_output'].shape == (2, 1)


def test_mixed_precision_keeps_heads_float32_and_restores_the_policy():
  model = model_lib.build_model('tiny', image_size=32, mixed_precision=True)
  assert model.get_layer('conv1').compute_dtype == 'float16'
  assert model.get_layer('gender_output').compute_dtype == 'float32'
  assert model.get_layer('age_output').compute_dtype == 'float32'
  assert keras.config.dtype_policy().name == 'float32'


def test_imagenet_weights_that_cannot_be_downloaded_are_a_usage_error(monkeypatch):
  def no_network(*args, **kwargs):
    raise Exception('URL fetch failure on https://storage.googleapis.com/...')
  monkeypatch.setattr('keras.src.utils.file_utils.get_file', no_network)
  with pytest.raises(cli.UsageError, match='cannot load imagenet weights for mobilenet_v3_small'):
    model_lib.build_model('mobilenet_v3_small', image_size=32, weights='imagenet')


@pytest.mark.parametrize('kwargs, message', [
    (dict(name='vgg'), 'unknown model'),
    (dict(name='seed_cnn', weights='imagenet'), 'needs a keras.applications model'),
    (dict(name='tiny', weights='places'), 'unknown weights'),
    (dict(name='tiny', image_size=16), 'at least 32'),
    (dict(name='tiny', dropout=1.0), 'dropout'),
])
def test_bad_model_arguments_are_usage_errors(kwargs, message):
  with pytest.raises(cli.UsageError, match=message):
    model_lib.build_model(**kwargs)


@pytest.mark.parametrize('age_loss', model_lib.AGE_LOSSES)
def test_compiled_model_learns_a_constant_target(age_loss):
  keras.utils.set_random_seed(0)
  model = model_lib.build_model('tiny', image_size=32, dropout=0.0)
  model_lib.compile_model(model, learning_rate=1e-2, age_loss=age_loss)
  images = np.full((32, 32, 32, 3), 0.5, np.float32)
  targets = {'gender_output': np.ones((32, 1), np.float32),
             'age_output': np.full((32, 1), 30.0, np.float32)}
  history = model.fit(images, targets, epochs=15, batch_size=32, verbose=0).history
  assert set(history) >= {'gender_output_accuracy', 'age_output_mae', 'loss'}
  assert history['age_output_mae'][-1] < history['age_output_mae'][0]


def test_unknown_age_loss_is_a_usage_error():
  with pytest.raises(cli.UsageError, match='unknown age loss'):
    model_lib.compile_model(model_lib.build_model('tiny', image_size=32), age_loss='l3')
