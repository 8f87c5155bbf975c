"""The dual-output Keras model: gender (sigmoid) and age (regression) heads.

Every model takes float32 images in [0, 1] (what the pipeline's preprocessing
gives) and returns ``{'gender_output': [B, 1], 'age_output': [B, 1]}``. The
heads always compute in float32, so mixed precision never rounds the outputs.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import keras

from agegender import cli
from agegender import contract

GENDER_OUTPUT = contract.GENDER_OUTPUT
AGE_OUTPUT = contract.AGE_OUTPUT

SEED_CNN = 'seed_cnn'
TINY = 'tiny'
# keras.applications backbones, by the name the --model flag uses.
BACKBONES = {
    'resnet50': 'ResNet50',
    'efficientnet_b0': 'EfficientNetB0',
    'mobilenet_v3_small': 'MobileNetV3Small',
}
MODELS = (SEED_CNN, TINY) + tuple(BACKBONES)
WEIGHTS = ('none', 'imagenet')
AGE_LOSSES = ('mse', 'mae', 'huber')

SEED_FILTERS = (64, 128, 256)
SEED_DENSE_UNITS = 256
SEED_DROPOUT = 0.5


@keras.saving.register_keras_serializable(package='agegender')
class CaffePreprocess(keras.layers.Layer):
  """[0, 1] RGB to the BGR, mean-centred 0..255 pixels ResNet50's weights expect."""

  MEAN_BGR = (103.939, 116.779, 123.68)

  def call(self, images):
    bgr = keras.ops.flip(images, axis=-1) * 255.0
    return bgr - keras.ops.convert_to_tensor(self.MEAN_BGR, dtype=bgr.dtype)


@contextlib.contextmanager
def dtype_policy(mixed_precision: bool):
  """Layers built inside use mixed_float16 when asked; the global policy is restored after."""
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy('mixed_float16' if mixed_precision else 'float32')
  try:
    yield
  finally:
    keras.config.set_dtype_policy(previous)


def _heads(features, dense_units: int, dropout: float, initial_age: float) -> dict:
  x = keras.layers.Dense(dense_units, activation='relu', kernel_initializer='he_uniform',
                         name='dense')(features)
  x = keras.layers.Dropout(dropout, name='dropout')(x)
  # float32 heads: the sigmoid and the age scale (0..120) stay exact under mixed precision.
  gender = keras.layers.Dense(1, activation='sigmoid', dtype='float32', name=GENDER_OUTPUT)(x)
  # Starting from a typical age, Adam's small steps need not first climb to the scale of years.
  age = keras.layers.Dense(1, activation='relu', dtype='float32', name=AGE_OUTPUT,
                           bias_initializer=keras.initializers.Constant(initial_age))(x)
  return {GENDER_OUTPUT: gender, AGE_OUTPUT: age}


def _conv_blocks(x, filters: Sequence[int]):
  for index, count in enumerate(filters):
    x = keras.layers.Conv2D(count, 3, padding='same', activation='relu',
                            kernel_initializer='he_uniform', name=f'conv{index + 1}')(x)
    x = keras.layers.MaxPooling2D(2, name=f'pool{index + 1}')(x)
  return x


def _conv_net(inputs, filters, dense_units, dropout, initial_age):
  # Flatten keeps where things are (a face's size is a cue to its age); global pooling would not.
  features = keras.layers.Flatten(name='flatten')(_conv_blocks(inputs, filters))
  return _heads(features, dense_units, dropout, initial_age)


def _backbone_input(name: str, inputs):
  if name == 'resnet50':
    return CaffePreprocess(name='caffe_preprocess')(inputs)
  # EfficientNet and MobileNetV3 rescale 0..255 inputs themselves.
  return keras.layers.Rescaling(255.0, name='to_0_255')(inputs)


def _backbone(name, inputs, weights, dense_units, dropout, initial_age):
  application = getattr(keras.applications, BACKBONES[name])
  try:
    base = application(include_top=False, weights=None if weights == 'none' else weights,
                       input_shape=tuple(inputs.shape[1:]), pooling='avg')
  except Exception as e:  # pylint: disable=broad-except
    # keras.applications raises a bare Exception when the download fails.
    if weights == 'none':
      raise
    raise cli.UsageError(f'cannot load {weights} weights for {name}: '
                         f'{str(e).splitlines()[0] if str(e) else type(e).__name__}; '
                         'check the network or train with --weights=none') from None
  features = base(_backbone_input(name, inputs))
  return _heads(features, dense_units, dropout, initial_age)


def default_filters(name: str) -> tuple[int, ...]:
  return (16, 32, 64) if name == TINY else SEED_FILTERS


def default_dense_units(name: str) -> int:
  return 32 if name == TINY else SEED_DENSE_UNITS


def default_dropout(name: str) -> float:
  return 0.0 if name == TINY else SEED_DROPOUT


def build_model(name: str = SEED_CNN, *, image_size: int = contract.DEFAULT_IMAGE_SIZE,
                filters: Sequence[int] | None = None, dense_units: int | None = None,
                dropout: float | None = None, weights: str = 'none', initial_age: float = 0.0,
                mixed_precision: bool = False) -> keras.Model:
  """An uncompiled dual-output model.

  None for filters, dense_units or dropout means the model's default.
  initial_age: the age head's starting bias (training passes the training split's mean age).
  """
  if name not in MODELS:
    raise cli.UsageError(f'unknown model {name!r}; expected one of {", ".join(MODELS)}')
  if weights not in WEIGHTS:
    raise cli.UsageError(f'unknown weights {weights!r}; expected one of {", ".join(WEIGHTS)}')
  if weights != 'none' and name not in BACKBONES:
    raise cli.UsageError(f'--weights={weights} needs a keras.applications model '
                         f'({", ".join(BACKBONES)}), not {name}')
  if image_size < 32:
    raise cli.UsageError(f'image size must be at least 32, got {image_size}')
  dropout = default_dropout(name) if dropout is None else dropout
  if not 0.0 <= dropout < 1.0:
    raise cli.UsageError(f'dropout must be in [0, 1), got {dropout}')
  filters = tuple(filters) if filters else default_filters(name)
  dense_units = dense_units or default_dense_units(name)
  if min(filters) <= 0 or dense_units <= 0:
    raise cli.UsageError('filters and dense units must be positive')
  with dtype_policy(mixed_precision):
    inputs = keras.Input((image_size, image_size, 3), name='image')
    if name in (SEED_CNN, TINY):
      outputs = _conv_net(inputs, filters, dense_units, dropout, initial_age)
    else:
      outputs = _backbone(name, inputs, weights, dense_units, dropout, initial_age)
    return keras.Model(inputs, outputs, name=name)


def _age_loss(name: str):
  if name not in AGE_LOSSES:
    raise cli.UsageError(f'unknown age loss {name!r}; expected one of {", ".join(AGE_LOSSES)}')
  return {'mse': 'mean_squared_error', 'mae': 'mean_absolute_error',
          'huber': keras.losses.Huber(delta=5.0)}[name]


def compile_model(model: keras.Model, *, learning_rate: float = 1e-4, age_loss: str = 'mse',
                  gender_loss_weight: float = 1.0, age_loss_weight: float = 1.0,
                  jit_compile: bool = False, steps_per_execution: int = 1) -> keras.Model:
  """Adam, binary cross-entropy for gender, the chosen age loss; accuracy and MAE metrics."""
  model.compile(
      optimizer=keras.optimizers.Adam(learning_rate),
      loss={GENDER_OUTPUT: 'binary_crossentropy', AGE_OUTPUT: _age_loss(age_loss)},
      loss_weights={GENDER_OUTPUT: gender_loss_weight, AGE_OUTPUT: age_loss_weight},
      metrics={GENDER_OUTPUT: ['accuracy'], AGE_OUTPUT: ['mae']},
      jit_compile=jit_compile,
      steps_per_execution=steps_per_execution)
  return model
