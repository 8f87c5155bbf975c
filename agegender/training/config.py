"""One configuration for training: four small dataclasses, each default written once.

  Config(data=DataConfig(...), model=ModelConfig(...), optim=OptimConfig(...), run=RunConfig(...))

`DataConfig` is what the input pipeline needs, `ModelConfig` what builds the
model, `OptimConfig` the losses, the optimizer and the schedule, `RunConfig`
where and how a run executes. The command line's flags are derived from these
fields (`agegender.cli.define_flags`), so a flag's name, default and help are
the field's. A recipe is a named set of values over the defaults:
`reference` is the seed notebook's model, losses and optimizer, exactly.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from agegender import contract
from agegender import options
from agegender.data import service

# keras.applications backbones (the only models with pretrained weights), by the name the
# configuration uses: the keras.applications function that builds each.
BACKBONES = {
    'resnet50': 'ResNet50',
    'efficientnet_b0': 'EfficientNetB0',
    'mobilenet_v3_small': 'MobileNetV3Small',
}
MODELS = ('compact_cnn', 'seed_cnn', 'tiny') + tuple(BACKBONES)
STRATEGIES = ('auto', 'one_device', 'mirrored', 'multi_worker')
AGE_LOSSES = ('huber', 'mae', 'mse')
AGE_HEADS = ('distribution', 'regression')
# The age loss's weight by head when age_loss_weight is unset (each chosen on validation).
AGE_LOSS_WEIGHTS = {'distribution': 0.5, 'regression': 1.0}
SCHEDULES = ('cosine', 'constant')
WEIGHTS = ('none', 'imagenet')
# preprocess.POLICIES' names but 'none' (--noaugment); named here, as config never imports TF.
AUGMENT_POLICIES = ('flip_shift', 'geometric', 'colour', 'photo')


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What the input pipeline reads and how it batches."""
  records_dir: str = options.option('records', 'Records written by agegender.make_records.')
  image_size: int = options.option(contract.DEFAULT_IMAGE_SIZE,
                           'Side of the square input images, in pixels.', above=0)
  batch_size: int = options.option(128, 'Global batch size (split over the replicas).', above=0)
  shuffle_buffer: int = options.option(2_000, 'Training shuffle buffer, in records (the pipeline\'s '
                               'main memory: about this many stored images).', above=0)
  progressive_size: float = options.option(
      1.0, 'Progressive resizing: the first half of the epochs train at this fraction of '
      '--image_size (rounded to 8 pixels), the rest ramp up linearly to --image_size, which the '
      'last epoch, validation and the exported model use (1: off; compact_cnn only).',
      above=0, upper=1)
  augment: bool = options.option(True, 'Vary each training image (in the training step, on the '
                         'device) as --augment_policy says.')
  augment_policy: str = options.option(
      'colour', 'What --augment varies: flip_shift, a flip and a shift of up to 1/16 of the '
      'side; colour, also brightness, contrast, saturation (15% of images grey) and a blur '
      '(20%, from mild to a quarter of the resolution), for photos from elsewhere; geometric, '
      'flip_shift with scale +-10% and rotation +-12 degrees; photo, geometric and colour.',
      AUGMENT_POLICIES)
  deterministic: bool = options.option(False, 'The same input order on every run (from --seed); '
                               'slower.')
  seed: int = options.option(0, 'Seed of the weights, the shuffle and the augmentation.')
  cache: bool = options.option(False, 'Keep the serialized records in memory after the first epoch.')
  skip_corrupt: bool = options.option(False, 'Skip corrupt records (counted and logged per shard) '
                              'instead of stopping with an error that names the shard.')
  data_service: str = options.option('', 'A tf.data service dispatcher, grpc://HOST:PORT, whose '
                             'workers run the training input pipeline.')
  data_service_timeout: float = options.option(60.0, 'Seconds without a batch from the service after '
                                       'which an epoch ends with what arrived (0: wait forever).', lower=0)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The network: its architecture and precision."""
  model: str = options.option('compact_cnn', 'The model to train.', MODELS)
  age_head: str = options.option(
      'distribution', 'distribution: a softmax over the whole years 0-120, whose expectation is '
      'the age and two of whose percentiles are age_low and age_high (an 80% interval: see '
      '--interval_coverage); regression: one linear unit, the age alone (age_low = age_high = '
      'age).', AGE_HEADS)
  interval_coverage: float = options.option(
      0.8, 'The distribution head\'s interval: after training, age_low and age_high become the '
      'percentiles q and 1-q that hold this share of the validation split\'s ages (0: keep '
      'the 10th and 90th).', lower=0, upper=0.999)
  flip_average: bool = options.option(
      True, 'The trained model that is evaluated, exported and served averages its outputs on '
      'each face and on its mirror image (twice the computation; on validation 0.2-0.4 points '
      'of gender and 0.05 years of age MAE better).')
  weights: str = options.option('none', 'Initial weights of a keras.applications backbone '
                        '(imagenet: downloaded).', WEIGHTS)
  filters: tuple[int, ...] = options.option((), 'Conv filters per block of seed_cnn and tiny '
                                    '(empty: 64,128,256; 16,32,64 for tiny).')
  dense_units: int = options.option(0, 'Units of the dense layer before the heads (0: 256; 32 for tiny).', lower=0)
  width: float = options.option(0.75, 'compact_cnn: its convolutions\' filters, 32 to 256 times '
                                'this, rounded to a multiple of 8 (0.75: 24 to 192).', above=0)
  depth: int = options.option(1, 'compact_cnn: 3x3 convolutions at stride 1 after each of its '
                              'last three stride-2 ones (1: seven convolutions in all).', lower=0)
  dropout: float = options.option(0.25, 'Dropout before the heads.')
  batch_norm: bool = options.option(True, 'Batch normalization after each convolution of seed_cnn '
                            'and tiny (compact_cnn always has it).')
  mixed_precision: bool = options.option(False, 'mixed_float16 compute (for GPUs); the output heads '
                                 'stay float32.')


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """The losses, the optimizer and the schedule."""
  epochs: int = options.option(10, 'Epochs to train (a resumed run ends at the same epoch).', above=0)
  learning_rate: float = options.option(6e-3, 'Peak learning rate (AdamW).', above=0)
  weight_decay: float = options.option(1e-4, 'AdamW\'s decoupled weight decay (0: Adam).', lower=0)
  schedule: str = options.option('cosine', 'cosine: warm up, then decay to 0 by the last epoch; '
                         'constant: the learning rate throughout.', SCHEDULES)
  warmup_steps: int = options.option(200, 'Steps of linear warm-up of the cosine schedule (at most a fifth of the run).', lower=0)
  age_loss: str = options.option('huber', 'Loss of the regression head on the age error in '
                                 '--age_unit units: huber (delta 1), mae or mse.', AGE_LOSSES)
  age_sigma: float = options.option(4.0, 'The distribution head\'s target: a Gaussian of this '
                                    'many years around the true age (its loss: the KL '
                                    'divergence from it plus the error of the expected age in '
                                    '--age_unit units).', above=0)
  age_unit: str = options.option('std', 'Unit of the age error the loss sees: std (the training '
                         'split\'s age standard deviation, so the two heads\' losses are of '
                         'one scale) or years.', ('std', 'years'))
  gender_loss_weight: float = options.option(1.0, 'Weight of the gender loss in the total loss.', lower=0)
  age_loss_weight: float | None = options.option(
      None, 'Weight of the age loss in the total loss (unset: the head\'s own, chosen on '
      'validation: 1 for regression, 0.5 for distribution, whose KL outweighs the gender loss '
      'at 1).', lower=0)
  early_stopping_patience: int = options.option(0, 'Stop after this many epochs without a better '
                                        'validation age MAE (0: off).', lower=0)
  reduce_lr_patience: int = options.option(0, 'Multiply the learning rate by --reduce_lr_factor after '
                                   'this many epochs without a better validation age MAE '
                                   '(0: off).', lower=0)
  reduce_lr_factor: float = options.option(0.5, 'Learning-rate reduction factor.', above=0)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Where a run writes and how it executes."""
  model_dir: str = options.option('', 'Where the run writes everything (empty: runs/<model>).')
  distribution_strategy: str = options.option(
      'auto', 'auto: MirroredStrategy over all local GPUs when there are several, else the '
      'default device; one_device: the first GPU (or the CPU); mirrored: all local GPUs; '
      'multi_worker: MultiWorkerMirroredStrategy over the cluster in TF_CONFIG.', STRATEGIES)
  worker_dir: str = options.option('', 'multi_worker: where a worker other than the chief keeps its '
                           'state (empty: a temporary folder, deleted at exit).')
  jit_compile: bool = options.option(False, 'Compile the training step with XLA.')
  steps_per_execution: int = options.option(1, 'Training steps per tf.function call.', above=0)
  tensorboard: bool = options.option(True, 'Write TensorBoard logs to MODEL_DIR/logs.')
  export: bool = options.option(True, 'Export the serving SavedModel to MODEL_DIR/export.')
  verbose: int = options.option(1, 'Progress: 0 silent, 1 progress bar, 2 a line per epoch.')


@dataclasses.dataclass(frozen=True)
class Config:
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  run: RunConfig = dataclasses.field(default_factory=RunConfig)

  @property
  def model_dir(self) -> str:
    return self.run.model_dir or os.path.join('runs', self.model.model)


SECTIONS = {'data': DataConfig, 'model': ModelConfig, 'optim': OptimConfig, 'run': RunConfig}

# Named sets of values over the defaults. `reference`: the seed notebook's recipe.
RECIPES: dict[str, dict[str, Any]] = {
    'default': {},
    'reference': {'model': 'seed_cnn', 'age_head': 'regression', 'augment': False,
                  'flip_average': False, 'dropout': 0.5,
                  'batch_norm': False, 'age_loss_weight': 1.0, 'learning_rate': 1e-4,
                  'weight_decay': 0.0, 'schedule': 'constant', 'age_loss': 'mse',
                  'age_unit': 'years'},
}


def fields() -> dict[str, tuple[str, dataclasses.Field]]:
  """Every field by name: (section, field). Names are unique across the sections."""
  return {field.name: (section, field)
          for section, cls in SECTIONS.items() for field in dataclasses.fields(cls)}


def make_config(recipe: str = 'default', **values) -> Config:
  """A Config from a recipe and field values by name (`image_size=64, epochs=2`)."""
  if recipe not in RECIPES:
    raise ValueError(f'unknown recipe {recipe!r}; expected one of {", ".join(RECIPES)}')
  by_name = fields()
  unknown = sorted(set(values) - set(by_name))
  if unknown:
    raise ValueError(f'unknown configuration field(s): {", ".join(unknown)}')
  sections: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
  for name, value in {**RECIPES[recipe], **values}.items():
    sections[by_name[name][0]][name] = value
  return Config(**{section: SECTIONS[section](**own) for section, own in sections.items()})


def replace(config: Config, **values) -> Config:
  """`config` with some fields changed, by name."""
  by_name = fields()
  sections = {section: dataclasses.asdict(getattr(config, section)) for section in SECTIONS}
  for name, value in values.items():
    if name not in by_name:
      raise ValueError(f'unknown configuration field {name!r}')
    sections[by_name[name][0]][name] = value
  return Config(**{section: SECTIONS[section](**own) for section, own in sections.items()})


def as_dict(config: Config) -> dict[str, dict[str, Any]]:
  return {section: dataclasses.asdict(getattr(config, section)) for section in SECTIONS}


def age_loss_weight(config: Config) -> float:
  """The age loss's weight: age_loss_weight, or when unset the head's (AGE_LOSS_WEIGHTS)."""
  weight = config.optim.age_loss_weight
  return AGE_LOSS_WEIGHTS[config.model.age_head] if weight is None else float(weight)


# Progressive resizing's sizes are multiples of this (and never above image_size).
SIZE_STEP = 8


def epoch_image_size(config: Config, epoch: int) -> int:
  """The side the training step sees in `epoch` (0-based): image_size, or with
  progressive_size < 1 the smaller side for the first half of the epochs, then a linear ramp
  that reaches image_size in the last (FFCV's ImageNet recipe ramps the resolution so)."""
  size, epochs = config.data.image_size, config.optim.epochs
  if config.data.progressive_size >= 1.0:
    return size
  low = config.data.progressive_size * size
  flat = epochs // 2
  share = 0.0 if epoch < flat else (epoch - flat + 1) / (epochs - flat)
  wanted = low + (size - low) * min(1.0, share)
  return min(size, SIZE_STEP * max(1, round(wanted / SIZE_STEP)))


def check(config: Config) -> None:
  """Raises contract.ArgumentError for values that would fail later; its text starts with the
  field's name (which is also its flag's)."""
  for section in SECTIONS:
    options.check(getattr(config, section))
  if any(count <= 0 for count in config.model.filters):
    raise contract.ArgumentError('filters', f'filters must be positive, got {config.model.filters}')
  if not 0.0 <= config.model.dropout < 1.0:
    raise contract.ArgumentError('dropout', f'dropout must be in [0, 1), got {config.model.dropout}')
  if config.data.image_size < 32:
    raise contract.ArgumentError('image_size', f'image_size must be at least 32, got {config.data.image_size}')
  if config.data.progressive_size < 1.0:
    if config.model.model != 'compact_cnn':
      raise contract.ArgumentError('progressive_size', 'progressive_size needs compact_cnn (it '
                                   f'pools over any image size), not {config.model.model}')
    if epoch_image_size(config, 0) < 32:
      raise contract.ArgumentError('progressive_size', 'progressive_size '
                                   f'{config.data.progressive_size} trains the first epochs at '
                                   f'{epoch_image_size(config, 0)} pixels; 32 is the least')
  for field in ('width', 'depth'):
    if (getattr(config.model, field) != getattr(ModelConfig(), field)
        and config.model.model != 'compact_cnn'):
      other = ('its layers are fixed' if config.model.model in BACKBONES else
               'it takes --filters')
      raise contract.ArgumentError(field, f'{field} shapes compact_cnn, not {config.model.model} '
                                   f'({other})')
  if config.model.weights != 'none' and config.model.model not in BACKBONES:
    raise contract.ArgumentError('weights', f'weights {config.model.weights} need a keras.applications '
                                 f'model, not {config.model.model}')
  if config.optim.reduce_lr_patience and config.optim.schedule != 'constant':
    raise contract.ArgumentError('reduce_lr_patience', 'reduce_lr_patience needs the constant learning-rate schedule')
  if config.data.data_service:
    try:
      service.parse_address(config.data.data_service)
    except ValueError as e:
      raise contract.ArgumentError('data_service', f'data_service: {e}') from None
  if config.data.data_service and config.data.cache:
    raise contract.ArgumentError('cache', 'cache does not go with a tf.data service (each service worker '
                               'would cache only the shards it happened to read)')
