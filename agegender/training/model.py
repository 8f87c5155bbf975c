"""The dual-output Keras model: a gender (sigmoid) head and an age head of two kinds.

Every model takes uint8 pixels [B, S, S, 3] (what agegender.data.preprocess gives)
and scales them itself, on the device, as its first layer; it returns
``{'gender_output': [B, 1], 'age_output': [B, 1], ...}``: the probability of
female (UTKFace's gender 1) and the age in years. The age head is one of
(ModelConfig.age_head):

  regression    one linear unit in units of the training split's age spread
                around its mean (a fixed affine layer turns that into years),
                so its first steps learn faces, not the scale of years. No
                interval: `age_interval` gives low = high = age.
  distribution  a softmax over the whole years 0..MAX_AGE (`age_distribution`,
                [B, AGES]), started at a Gaussian of the training split's mean
                and spread; `age_output` is its expectation, and `age_low`
                and `age_high` ([B, 1]) two of its percentiles, the years read as
                bins [k - 0.5, k + 0.5] so that they fall between whole years:
                the 10th and 90th as built, then the pair that holds
                ModelConfig.interval_coverage (80%) of the validation split's
                ages, chosen after training (loop.train_and_evaluate).

The heads always compute in float32, so mixed precision never rounds the outputs.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np

from agegender import contract
from agegender.records import labels as labels_lib
from agegender.training import config as config_lib

# Conv filters and dense units when the configuration leaves them empty.
DEFAULT_FILTERS = {'tiny': (16, 32, 64)}
SEED_FILTERS = (64, 128, 256)
DEFAULT_DENSE_UNITS = {'tiny': 32}
SEED_DENSE_UNITS = 256
# compact_cnn's stages: each a stride-2 3x3 convolution (halving the side) of this many filters
# times ModelConfig.width, then, but for the first, ModelConfig.depth at stride 1.
COMPACT_STAGES = (32, 64, 128, 256)


def compact_layers(width: float, depth: int) -> tuple[tuple[int, int], ...]:
  """compact_cnn's (filters, strides), its filters times `width` (a multiple of 8, at least 8)."""
  layers = []
  for stage, count in enumerate(COMPACT_STAGES):
    count = max(8, 8 * round(count * width / 8))
    layers += [(count, 2)] + [(count, 1)] * (depth if stage else 0)
  return tuple(layers)

# Batch normalization's moving-statistics momentum: 0.9 lets them settle within a short run.
BN_MOMENTUM = 0.9
# The distribution head's outputs beside age_output, and its whole years 0..MAX_AGE.
AGE_LOW = 'age_low'
AGE_HIGH = 'age_high'
AGE_DISTRIBUTION = 'age_distribution'
AGES = labels_lib.MAX_AGE + 1
# The interval's percentiles: an 80% interval.
LOW_QUANTILE, HIGH_QUANTILE = 0.1, 0.9


class WeightsUnavailable(contract.ArgumentError):
  """Pretrained weights that could not be loaded (offline, most often)."""

  def __init__(self, message: str):
    super().__init__('weights', message, hint='check the network or set {weights} to none')


@keras.saving.register_keras_serializable(package='agegender')
class CaffePreprocess(keras.layers.Layer):
  """0..255 RGB to the BGR, mean-centred pixels ResNet50's weights expect."""

  MEAN_BGR = (103.939, 116.779, 123.68)

  def call(self, images):
    bgr = keras.ops.flip(keras.ops.cast(images, self.compute_dtype), axis=-1)
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


def expected_age(probabilities):
  """The expectation, in years, of distributions over the whole years 0..AGES-1: [..., AGES]
  -> [..., 1]."""
  probabilities = keras.ops.convert_to_tensor(probabilities, 'float32')
  years = keras.ops.arange(probabilities.shape[-1], dtype='float32')
  return keras.ops.sum(probabilities * years, axis=-1, keepdims=True)


def age_quantile(probabilities, quantile: float):
  """The `quantile` of distributions over whole years [..., AGES] -> [..., 1], in years.

  Year k's mass is spread evenly over [k - 0.5, k + 0.5] (so a distribution
  all on one year has its 10th percentile at k - 0.4), and the result is
  clipped to [0, AGES - 1].
  """
  probabilities = keras.ops.convert_to_tensor(probabilities, 'float32')
  after = keras.ops.cumsum(probabilities, axis=-1)  # The mass up to each year's upper edge.
  # The year whose bin holds the quantile: how many upper edges lie below it.
  year = keras.ops.sum(keras.ops.cast(after < quantile, 'int32'), axis=-1, keepdims=True)
  year = keras.ops.minimum(year, probabilities.shape[-1] - 1)
  mass = keras.ops.take_along_axis(probabilities, year, axis=-1)
  before = keras.ops.take_along_axis(after, year, axis=-1) - mass
  inside = (quantile - before) / keras.ops.maximum(mass, 1e-12)
  value = keras.ops.cast(year, 'float32') - 0.5 + keras.ops.clip(inside, 0.0, 1.0)
  return keras.ops.clip(value, 0.0, float(probabilities.shape[-1] - 1))


@keras.saving.register_keras_serializable(package='agegender')
class AgeSummary(keras.layers.Layer):
  """A distribution over whole years to its expected age (quantile None) or a quantile."""

  def __init__(self, quantile: float | None = None, **kwargs):
    super().__init__(**kwargs)
    self.quantile = quantile

  def call(self, probabilities):
    if self.quantile is None:
      return expected_age(probabilities)
    return age_quantile(probabilities, self.quantile)

  def compute_output_shape(self, input_shape):
    return (*input_shape[:-1], 1)

  def get_config(self):
    return {**super().get_config(), 'quantile': self.quantile}


def distribution_outputs(distribution, low: float, high: float) -> dict:
  """A distribution head's outputs from its distribution: the expected age and the `low` and
  `high` percentiles."""
  return {contract.AGE_OUTPUT: AgeSummary(dtype='float32', name=contract.AGE_OUTPUT)(distribution),
          AGE_LOW: AgeSummary(low, dtype='float32', name=AGE_LOW)(distribution),
          AGE_HIGH: AgeSummary(high, dtype='float32', name=AGE_HIGH)(distribution),
          AGE_DISTRIBUTION: distribution}


def prior_logits(mean_age: float, age_std: float) -> np.ndarray:
  """The distribution head's starting logits: a Gaussian of the training split's ages."""
  years = np.arange(AGES, dtype=np.float64)
  return (-np.square(years - mean_age) / (2 * max(age_std, 1.0) ** 2)).astype(np.float32)


def _heads(features, dense_units: int, dropout: float, mean_age: float, age_std: float,
           age_head: str) -> dict:
  x = keras.layers.Dense(dense_units, activation='relu', kernel_initializer='he_uniform',
                         name='dense')(features)
  x = keras.layers.Dropout(dropout, name='dropout')(x)
  # float32 heads: the sigmoid and the age scale (0..120) stay exact under mixed precision.
  gender = keras.layers.Dense(1, activation='sigmoid', dtype='float32', name=contract.GENDER_OUTPUT)(x)
  if age_head == 'distribution':
    logits = keras.layers.Dense(AGES, dtype='float32', kernel_initializer='zeros',
                                name='age_logits')(x)
    distribution = keras.layers.Softmax(dtype='float32', name=AGE_DISTRIBUTION)(logits)
    return {contract.GENDER_OUTPUT: gender,
            **distribution_outputs(distribution, LOW_QUANTILE, HIGH_QUANTILE)}
  age_units = keras.layers.Dense(1, dtype='float32', name='age_units')(x)
  age = keras.layers.Rescaling(age_std, offset=mean_age, dtype='float32',
                               name=contract.AGE_OUTPUT)(age_units)
  return {contract.GENDER_OUTPUT: gender, contract.AGE_OUTPUT: age}


@keras.saving.register_keras_serializable(package='agegender')
class Mirror(keras.layers.Layer):
  """Images [B, H, W, C] flipped left to right."""

  def call(self, images):
    return keras.ops.flip(images, axis=2)


FLIP_AVERAGED = 'mirror'  # The layer whose presence marks a flip-averaged model.


def is_flip_averaged(model: keras.Model) -> bool:
  return FLIP_AVERAGED in [layer.name for layer in model.layers]


def unflipped(model: keras.Model) -> keras.Model:
  """The model a flip-averaged one averages (any other model as is)."""
  if not is_flip_averaged(model):
    return model
  return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def flip_averaged(model: keras.Model) -> keras.Model:
  """A model whose outputs average `model`'s on each face and on its mirror image (the age
  distribution and the gender probability; age, age_low and age_high follow from the
  average), at twice the computation; a model already averaged is returned as is."""
  if is_flip_averaged(model):
    return model
  pixels = keras.Input(tuple(model.input.shape[1:]), dtype=model.input.dtype, name='image')
  plain, mirrored = model(pixels), model(Mirror(name=FLIP_AVERAGED)(pixels))

  def average(name):
    return keras.layers.Average(dtype='float32', name=name)([plain[name], mirrored[name]])

  outputs = {contract.GENDER_OUTPUT: average(contract.GENDER_OUTPUT)}
  quantiles = interval_quantiles(model)
  if quantiles is None:
    outputs[contract.AGE_OUTPUT] = average(contract.AGE_OUTPUT)
  else:
    outputs.update(distribution_outputs(average(AGE_DISTRIBUTION), *quantiles))
  return keras.Model(pixels, outputs, name=f'{model.name}_flip_averaged')


def coverage_quantile(probabilities, ages, coverage: float) -> float:
  """The q whose interval [quantile q, quantile 1 - q] of each distribution [N, AGES] holds
  `coverage` of the true ages [N] (the largest such q, to 1e-4): a percentile pair calibrated
  on held-out faces."""
  probabilities = np.asarray(probabilities, np.float32)
  ages = np.asarray(ages, np.float64).reshape(-1, 1)

  def covered(q: float) -> float:
    low = np.asarray(age_quantile(probabilities, q))
    high = np.asarray(age_quantile(probabilities, 1.0 - q))
    return float(np.mean((low <= ages) & (ages <= high)))

  inside, outside = 1e-4, 0.5  # Coverage falls as q grows: bisect between these.
  if covered(inside) < coverage:
    return inside
  while outside - inside > 1e-4:
    middle = (inside + outside) / 2
    inside, outside = (middle, outside) if covered(middle) >= coverage else (inside, middle)
  return inside


def interval_quantiles(model: keras.Model) -> tuple[float, float] | None:
  """The percentile pair of a distribution head's age_low and age_high; None for a regression
  head."""
  names = [layer.name for layer in model.layers]
  if AGE_LOW not in names:
    return None
  return model.get_layer(AGE_LOW).quantile, model.get_layer(AGE_HIGH).quantile


def set_interval_quantiles(model: keras.Model, low: float, high: float) -> None:
  """Makes age_low and age_high these percentiles (for a model built or loaded after this; a
  model already traced keeps the old ones: save it and load it again)."""
  model.get_layer(AGE_LOW).quantile = float(low)
  model.get_layer(AGE_HIGH).quantile = float(high)


def age_interval(outputs) -> tuple:
  """(low, high) of a model's outputs: the distribution head's percentiles, or the age twice
  (a regression head, or a model saved before intervals, has none)."""
  age = outputs[contract.AGE_OUTPUT]
  return outputs.get(AGE_LOW, age), outputs.get(AGE_HIGH, age)


def _conv_net(pixels, filters, batch_norm: bool):
  x = keras.layers.Rescaling(1.0 / 255.0, name='scale')(pixels)
  for index, count in enumerate(filters):
    name = f'conv{index + 1}'
    x = keras.layers.Conv2D(count, 3, padding='same', use_bias=not batch_norm,
                            activation=None if batch_norm else 'relu',
                            kernel_initializer='he_uniform', name=name)(x)
    if batch_norm:
      # Synchronized: statistics over the global batch, whatever share a replica gets (even
      # none, in a short last batch).
      x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, synchronized=True,
                                          name=f'{name}_bn')(x)
      x = keras.layers.ReLU(name=f'{name}_relu')(x)
    x = keras.layers.MaxPooling2D(2, name=f'pool{index + 1}')(x)
  # Flatten keeps where things are (a face's size is a cue to its age); global pooling would not.
  return keras.layers.Flatten(name='flatten')(x)


def _compact_net(pixels, width: float, depth: int):
  # Strided convolutions and global pooling: deeper than seed_cnn at a quarter of its work.
  x = keras.layers.Rescaling(1.0 / 255.0, name='scale')(pixels)
  for index, (count, stride) in enumerate(compact_layers(width, depth)):
    name = f'conv{index + 1}'
    x = keras.layers.Conv2D(count, 3, strides=stride, padding='same', use_bias=False,
                            kernel_initializer='he_uniform', name=name)(x)
    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, synchronized=True,
                                        name=f'{name}_bn')(x)
    x = keras.layers.ReLU(name=f'{name}_relu')(x)
  return keras.layers.GlobalAveragePooling2D(name='pool')(x)


def load_application(name: str, **kwargs) -> keras.Model:
  """A keras.applications backbone by its configuration name; the one place weights download
  (tests replace it to stand for a machine without network)."""
  return getattr(keras.applications, config_lib.BACKBONES[name])(**kwargs)


def _backbone(name: str, pixels, weights: str):
  try:
    base = load_application(name, include_top=False,
                            weights=None if weights == 'none' else weights,
                            input_shape=tuple(pixels.shape[1:]), pooling='avg')
  except Exception as e:  # pylint: disable=broad-except
    # keras.applications raises a bare Exception when the download fails.
    if weights == 'none':
      raise
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise WeightsUnavailable(f'cannot load {weights} weights for {name}: {reason}') from None
  for layer in base.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      # As in our own conv blocks: the applications' momentum (0.99-0.999) leaves short runs'
      # moving statistics far from the data, and validation outputs constant.
      layer.momentum = BN_MOMENTUM
      layer.synchronized = True
  # EfficientNet and MobileNetV3 take 0..255 pixels and scale them themselves.
  x = keras.layers.Rescaling(1.0, name='to_float')(pixels)
  if name == 'resnet50':
    x = CaffePreprocess(name='caffe_preprocess')(x)
  return base(x)


def build_model(model: config_lib.ModelConfig, image_size: int, *, mean_age: float = 0.0,
                age_std: float = 1.0) -> keras.Model:
  """An uncompiled dual-output model of `model`'s architecture for image_size pixels.

  mean_age, age_std: the training split's (from its manifest); the regression
  head predicts in those units and returns years, the distribution head starts
  at a Gaussian of them.
  """
  name = model.model
  with dtype_policy(model.mixed_precision):
    pixels = keras.Input((image_size, image_size, 3), dtype='uint8', name='image')
    if name in config_lib.BACKBONES:
      features = _backbone(name, pixels, model.weights)
    elif name == 'compact_cnn':
      features = _compact_net(pixels, model.width, model.depth)
    else:
      filters = model.filters or DEFAULT_FILTERS.get(name, SEED_FILTERS)
      features = _conv_net(pixels, filters, model.batch_norm)
    dense_units = model.dense_units or DEFAULT_DENSE_UNITS.get(name, SEED_DENSE_UNITS)
    outputs = _heads(features, dense_units, model.dropout, mean_age, age_std, model.age_head)
    built = keras.Model(pixels, outputs, name=name)
  if model.age_head == 'distribution':
    # Zero weights and these biases: every face starts at the training split's ages.
    built.get_layer('age_logits').bias.assign(prior_logits(mean_age, age_std))
  return built
