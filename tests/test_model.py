"""The dual-output models: uint8 input scaled inside, shapes, heads, dtypes, the age
scale, the distribution head's expectation, percentiles and loss, the weights error,
configuration errors, and the training step's losses."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from agegender.training import config as config_lib
from agegender import contract
from agegender.serving import export
from agegender.training import model as model_lib
from agegender.training import trainer


def build(name='tiny', image_size=32, *, mean_age=0.0, age_std=1.0, **fields):
  return model_lib.build_model(config_lib.ModelConfig(model=name, **fields), image_size,
                               mean_age=mean_age, age_std=age_std)


def pixels(count, image_size, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (count, image_size, image_size, 3),
                                              dtype=np.uint8)


def submodel(model, layer):
  """The model from its input to `layer`'s output."""
  return keras.Model(model.inputs, model.get_layer(layer).output)


def test_seed_cnn_of_the_reference_recipe_is_the_reference_architecture():
  model = model_lib.build_model(config_lib.make_config('reference').model, 128)
  assert model.input_shape == (None, 128, 128, 3)
  convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
  assert [conv.filters for conv in convs] == [64, 128, 256]
  assert {conv.kernel_size for conv in convs} == {(3, 3)}
  assert {conv.padding for conv in convs} == {'same'}
  assert {conv.activation.__name__ for conv in convs} == {'relu'}
  assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
  assert model.get_layer('dense').units == 256
  assert model.get_layer('dropout').rate == 0.5
  assert model.get_layer('gender_output').activation.__name__ == 'sigmoid'
  # Age: a linear unit, then a fixed affine layer to years.
  assert model.get_layer('age_units').activation.__name__ == 'linear'
  assert isinstance(model.get_layer('age_output'), keras.layers.Rescaling)


def test_default_seed_cnn_normalizes_each_convolution_in_batches():
  model = build('seed_cnn', 64)
  convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
  assert [conv.filters for conv in convs] == [64, 128, 256]
  assert not any(conv.use_bias for conv in convs)  # The normalization's offset replaces it.
  norms = [layer.name for layer in model.layers
           if isinstance(layer, keras.layers.BatchNormalization)]
  assert norms == ['conv1_bn', 'conv2_bn', 'conv3_bn']


def test_compact_cnn_is_seven_normalized_convolutions_then_global_pooling():
  small, large = build('compact_cnn', 64), build('compact_cnn', 128)
  convs = [layer for layer in small.layers if isinstance(layer, keras.layers.Conv2D)]
  # The default width, 0.75.
  assert [(conv.filters, conv.strides[0]) for conv in convs] == [
      (24, 2), (48, 2), (48, 1), (96, 2), (96, 1), (192, 2), (192, 1)]
  assert not any(conv.use_bias for conv in convs)
  norms = [layer for layer in small.layers if isinstance(layer, keras.layers.BatchNormalization)]
  assert len(norms) == len(convs)
  # Global pooling: the same weights serve any input size.
  assert small.count_params() == large.count_params()
  assert submodel(small, 'conv7_relu').output.shape[1:3] == (4, 4)
  outputs = large.predict(pixels(2, 128), verbose=0)
  assert outputs['age_output'].shape == (2, 1) and outputs['gender_output'].shape == (2, 1)


def test_compact_cnn_width_and_depth_scale_its_filters_and_stride_one_layers():
  narrow_deep = build('compact_cnn', 64, width=0.5, depth=2)
  convs = [layer for layer in narrow_deep.layers if isinstance(layer, keras.layers.Conv2D)]
  assert [(conv.filters, conv.strides[0]) for conv in convs] == [
      (16, 2), (32, 2), (32, 1), (32, 1), (64, 2), (64, 1), (64, 1), (128, 2), (128, 1), (128, 1)]
  assert submodel(narrow_deep, f'conv{len(convs)}_relu').output.shape[1:] == (4, 4, 128)
  # Rounded to multiples of 8; depth 0 leaves the four strided layers.
  assert model_lib.compact_layers(1.3, 0) == ((40, 2), (80, 2), (168, 2), (336, 2))
  assert model_lib.compact_layers(1.0, 1) == (
      (32, 2), (64, 2), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1))
  assert build('compact_cnn', 64, width=1.5).count_params() > (
      2 * build('compact_cnn', 64, width=1.0).count_params())


@pytest.mark.parametrize('name', ['tiny', 'seed_cnn'])
def test_outputs_are_two_named_heads(name):
  model = build(name, 64, filters=(4, 8, 8), dense_units=8, age_head='regression')
  outputs = model.predict(pixels(2, 64), verbose=0)
  assert set(outputs) == {'gender_output', 'age_output'}
  assert outputs['gender_output'].shape == (2, 1)
  assert outputs['age_output'].shape == (2, 1)
  assert np.all((outputs['gender_output'] >= 0) & (outputs['gender_output'] <= 1))
  assert np.all(np.isfinite(outputs['age_output']))


def test_the_model_takes_uint8_pixels_and_scales_them_as_its_first_layer(tmp_path):
  model = build('tiny', 32)
  assert model.inputs[0].dtype == 'uint8'
  images = pixels(4, 32)
  images[0] = 0
  images[1] = 255
  scaled = submodel(model, 'scale').predict_on_batch(images)
  assert scaled.dtype == np.float32
  np.testing.assert_array_equal(scaled, images.astype(np.float32) * np.float32(1 / 255))
  assert scaled[0].max() == 0.0 and scaled[1].min() == 1.0
  # The scaling is saved with the model: a loaded model gives the same outputs on uint8.
  path = str(tmp_path / 'model.keras')
  model.save(path)
  loaded = export.load_keras_model(path)
  assert loaded.inputs[0].dtype == 'uint8'
  expected, outputs = model.predict_on_batch(images), loaded.predict_on_batch(images)
  for name in expected:
    np.testing.assert_array_equal(outputs[name], expected[name])


def test_the_age_head_turns_training_split_units_into_years():
  keras.utils.set_random_seed(0)  # Some random weights put an untrained head far off.
  model = build('tiny', 32, mean_age=33.0, age_std=12.5, age_head='regression')
  images = pixels(3, 32)
  units = submodel(model, 'age_units').predict_on_batch(images)
  years = model.predict_on_batch(images)['age_output']
  np.testing.assert_allclose(years, units * 12.5 + 33.0, rtol=1e-6)
  # An untrained head predicts about the training split's mean age, not 0.
  assert np.all(np.abs(years - 33.0) < 3 * 12.5)


def _distribution(**masses):
  """A distribution over the whole years 0..AGES-1, [1, AGES], from {year: mass}."""
  probabilities = np.zeros((1, model_lib.AGES), np.float32)
  for year, mass in masses.items():
    probabilities[0, int(year[1:])] = mass
  return probabilities


@pytest.mark.parametrize('masses, expected, low, high', [
    # Ten years 20..29 alike: 10% of the mass below 20.5 and 90% below 28.5.
    ({f'y{year}': 0.1 for year in range(20, 30)}, 24.5, 20.5, 28.5),
    # Half at 10, half at 30: the 10th percentile a fifth into year 10's bin, the 90th four
    # fifths into year 30's.
    ({'y10': 0.5, 'y30': 0.5}, 20.0, 9.7, 30.3),
    # All at one year: its bin's 10th and 90th points; at 0 the low end is clipped.
    ({'y41': 1.0}, 41.0, 40.6, 41.4),
    ({'y0': 1.0}, 0.0, 0.0, 0.4),
    ({'y120': 1.0}, 120.0, 119.6, 120.0),
])
def test_expected_age_and_percentiles_of_a_known_distribution(masses, expected, low, high):
  probabilities = _distribution(**masses)
  np.testing.assert_allclose(model_lib.expected_age(probabilities), [[expected]], atol=1e-4)
  np.testing.assert_allclose(model_lib.age_quantile(probabilities, 0.1), [[low]], atol=1e-4)
  np.testing.assert_allclose(model_lib.age_quantile(probabilities, 0.9), [[high]], atol=1e-4)


def test_the_calibrated_percentile_pair_holds_the_coverage_asked_for():
  # Ten faces, each spread evenly over 20..29, their true ages 20..29: the interval
  # [19.5 + 10q, 29.5 - 10q] holds 21..28 (80%) up to q = 0.15, and all ten below 0.05.
  probabilities = np.repeat(_distribution(**{f'y{year}': 0.1 for year in range(20, 30)}), 10, 0)
  ages = np.arange(20, 30)
  assert model_lib.coverage_quantile(probabilities, ages, 0.8) == pytest.approx(0.15, abs=2e-4)
  assert model_lib.coverage_quantile(probabilities, ages, 1.0) == pytest.approx(0.05, abs=2e-4)
  assert model_lib.coverage_quantile(probabilities, ages, 0.2) == pytest.approx(0.45, abs=2e-4)


def test_the_distribution_head_gives_the_expectation_and_percentiles_of_its_softmax(tmp_path):
  keras.utils.set_random_seed(0)
  model = build('tiny', 32, mean_age=33.0, age_std=12.5, age_head='distribution')
  images = pixels(4, 32)
  untrained = model.predict_on_batch(images)
  # Zero weights and the prior's biases: every face starts at the training split's ages.
  np.testing.assert_allclose(untrained['age_distribution'][0],
                             keras.ops.softmax(model_lib.prior_logits(33.0, 12.5)), atol=1e-6)
  logits = model.get_layer('age_logits')
  logits.kernel.assign(np.random.default_rng(1).normal(0, 0.3, logits.kernel.shape))
  outputs = model.predict_on_batch(images)
  assert set(outputs) == {'gender_output', 'age_output', 'age_low', 'age_high',
                          'age_distribution'}
  distribution = outputs['age_distribution']
  assert distribution.shape == (4, 121)
  np.testing.assert_allclose(distribution.sum(axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(outputs['age_output'], model_lib.expected_age(distribution),
                             rtol=1e-5)
  np.testing.assert_allclose(outputs['age_low'], model_lib.age_quantile(distribution, 0.1),
                             rtol=1e-5)
  np.testing.assert_allclose(outputs['age_high'], model_lib.age_quantile(distribution, 0.9),
                             rtol=1e-5)
  assert np.all(outputs['age_low'] < outputs['age_output'])
  assert np.all(outputs['age_output'] < outputs['age_high'])
  assert len(set(np.round(outputs['age_output'].ravel(), 3))) == 4  # Each face its own.
  low, high = model_lib.age_interval(outputs)
  np.testing.assert_array_equal(low, outputs['age_low'])
  # Saved and loaded in safe mode: the same outputs; another percentile pair is saved too.
  path = str(tmp_path / 'model.keras')
  model.save(path)
  loaded = export.load_keras_model(path).predict_on_batch(images)
  for name, value in outputs.items():
    np.testing.assert_allclose(loaded[name], value, rtol=1e-6)
  assert model_lib.interval_quantiles(model) == (0.1, 0.9)
  model_lib.set_interval_quantiles(model, 0.2, 0.8)
  model.save(path)
  narrower = export.load_keras_model(path)
  assert model_lib.interval_quantiles(narrower) == (0.2, 0.8)
  np.testing.assert_allclose(narrower.predict_on_batch(images)['age_low'],
                             model_lib.age_quantile(distribution, 0.2), rtol=1e-5)


def test_a_regression_head_has_no_interval_low_and_high_are_the_age():
  outputs = build('tiny', 32, age_head='regression').predict_on_batch(pixels(2, 32))
  low, high = model_lib.age_interval(outputs)
  np.testing.assert_array_equal(low, outputs['age_output'])
  np.testing.assert_array_equal(high, outputs['age_output'])


def test_the_distribution_loss_on_known_cases():
  ages = np.array([[30.0], [0.0]], np.float32)
  target = np.exp(trainer.log_gaussian_labels(ages, 3.0).numpy())
  years = np.arange(model_lib.AGES)
  by_hand = np.exp(-np.square(years - ages) / 18.0)
  np.testing.assert_allclose(target, by_hand / by_hand.sum(axis=-1, keepdims=True), rtol=1e-5,
                             atol=1e-9)
  # The target itself: KL 0. A uniform guess: log(AGES) less the target's entropy.
  np.testing.assert_allclose(trainer.distribution_loss(target, ages, 3.0), [0.0, 0.0], atol=1e-5)
  uniform = np.full((2, model_lib.AGES), 1 / model_lib.AGES, np.float32)
  entropy = -np.sum(target * np.log(np.maximum(target, 1e-30)), axis=-1)
  np.testing.assert_allclose(trainer.distribution_loss(uniform, ages, 3.0),
                             np.log(model_lib.AGES) - entropy, rtol=1e-4)
  # The age loss adds the expected age's absolute error, in the loss's unit (10 years here).
  optim = config_lib.OptimConfig(age_sigma=3.0)
  task = trainer.Task(model=None, optimizer=None, optim=optim, age_unit=10.0,
                      global_batch_size=2, metrics={})
  outputs = {'gender_output': np.full((2, 1), 0.5, np.float32),
             'age_output': model_lib.expected_age(uniform),
             'age_distribution': uniform}
  targets = {'gender_output': np.array([[1.0], [-1.0]], np.float32), 'age_output': ages}
  gender, age = trainer.per_example_losses(task, outputs, targets)
  np.testing.assert_allclose(gender, [np.log(2.0), 0.0], rtol=1e-5)
  mean = model_lib.expected_age(uniform).numpy()[:, 0]  # 60 years.
  np.testing.assert_allclose(age, np.log(model_lib.AGES) - entropy + np.abs(mean - ages[:, 0]) / 10,
                             rtol=1e-4)


@pytest.mark.parametrize('name', sorted(config_lib.BACKBONES))
def test_backbones_build_with_the_same_heads(name):
  model = build(name, 32, dense_units=8)
  assert model.inputs[0].dtype == 'uint8'
  outputs = model.predict(pixels(2, 32), verbose=0)
  assert outputs['gender_output'].shape == (2, 1)
  assert outputs['age_output'].shape == (2, 1)


@pytest.mark.parametrize('age_head, heads', [
    ('regression', ('gender_output', 'age_units', 'age_output')),
    ('distribution', ('gender_output', 'age_logits', 'age_distribution', 'age_output', 'age_low',
                      'age_high'))])
def test_mixed_precision_keeps_heads_float32_and_restores_the_policy(age_head, heads):
  model = build('tiny', 32, mixed_precision=True, age_head=age_head)
  assert model.get_layer('conv1').compute_dtype == 'float16'
  for head in heads:
    assert model.get_layer(head).compute_dtype == 'float32'
  assert keras.config.dtype_policy().name == 'float32'
  outputs = model.predict_on_batch(pixels(2, 32))
  assert {output.dtype for output in outputs.values()} == {np.dtype('float32')}


def test_imagenet_weights_that_cannot_be_downloaded_raise_weights_unavailable(monkeypatch):
  def no_network(*args, **kwargs):
    raise Exception('URL fetch failure on https://storage.googleapis.com/...')
  monkeypatch.setattr(model_lib, 'load_application', no_network)
  with pytest.raises(model_lib.WeightsUnavailable,
                     match='cannot load imagenet weights for mobilenet_v3_small: URL fetch'):
    build('mobilenet_v3_small', 32, weights='imagenet')
  assert issubclass(model_lib.WeightsUnavailable, ValueError)


@pytest.mark.parametrize('fields, name, message', [
    (dict(model='vgg'), 'model', 'must be one of compact_cnn, seed_cnn, tiny'),
    (dict(model='compact_cnn', weights='imagenet'), 'weights', 'not compact_cnn'),
    (dict(model='seed_cnn', weights='imagenet'), 'weights', 'need a keras.applications model, not seed_cnn'),
    (dict(model='tiny', weights='places'), 'weights', 'must be one of none, imagenet'),
    (dict(model='tiny', image_size=16), 'image_size', 'at least 32'),
    (dict(model='tiny', dropout=1.0), 'dropout', r'in \[0, 1\)'),
    (dict(model='tiny', filters=(8, 0)), 'filters', 'must be positive'),
    (dict(model='tiny', width=2.0), 'width', 'shapes compact_cnn, not tiny'),
    (dict(model='seed_cnn', depth=2), 'depth', r'shapes compact_cnn, not seed_cnn \(it takes --filters\)'),
    (dict(model='resnet50', width=1.0), 'width', r'not resnet50 \(its layers are fixed\)'),
    (dict(model='compact_cnn', width=0.0), 'width', 'positive'),
    (dict(model='compact_cnn', depth=-1), 'depth', 'non-negative'),
])
def test_bad_model_configurations_are_argument_errors_naming_the_field(fields, name, message):
  with pytest.raises(contract.ArgumentError, match=message) as error:
    config_lib.check(config_lib.make_config(**fields))
  assert error.value.field == name and str(error.value).startswith(f'{name} ')


def test_an_unknown_age_loss_is_an_argument_error():
  with pytest.raises(contract.ArgumentError, match='age_loss must be one of huber, mae, mse') as e:
    config_lib.check(config_lib.make_config(age_loss='l3'))
  assert e.value.field == 'age_loss'


@pytest.mark.parametrize('age_head, age_loss', [('regression', loss)
                                                 for loss in config_lib.AGE_LOSSES]
                         + [('distribution', 'huber')])
def test_the_training_step_learns_a_constant_target_with_each_age_loss(age_head, age_loss):
  keras.utils.set_random_seed(0)
  # One constant image: Adam moves every weight alike, so a small rate is a steady descent.
  optim = config_lib.OptimConfig(age_loss=age_loss, learning_rate=1e-4, weight_decay=0.0,
                                 schedule='constant')
  model = build('tiny', 32, mean_age=20.0, age_std=10.0, dropout=0.0, batch_norm=False,
                age_head=age_head)
  interval = age_head == 'distribution'
  if interval:  # Its zero-initialized logits pass no gradient below at first: a larger rate.
    optim = config_lib.replace(config_lib.Config(optim=optim), learning_rate=3e-3).optim
  task = trainer.Task(model=model, optimizer=trainer.make_optimizer(optim, 10, False),
                      optim=optim, age_unit=10.0, global_batch_size=32,
                      metrics=trainer.make_metrics(interval))
  images = np.full((32, 32, 32, 3), 128, np.uint8)
  targets = {'gender_output': np.ones((32, 1), np.float32),
             'age_output': np.full((32, 1), 45.0, np.float32)}
  dataset = tf.data.Dataset.from_tensors((images, targets)).repeat(10)
  strategy = tf.distribute.get_strategy()
  run_steps = trainer.step_function(task, strategy, trainer.train_step)
  iterator = iter(dataset)
  errors = []
  for _ in range(10):
    trainer.reset(task)
    steps, examples = run_steps(iterator)
    assert (int(steps), int(examples)) == (1, 32)
    errors.append(trainer.results(task)['age_output_mae'])
  logged = trainer.results(task)
  assert set(logged) >= {'loss', 'gender_output_accuracy', 'age_output_mae'}
  assert ('age_output_coverage' in logged) == interval
  assert errors[-1] < errors[0] / 4, errors  # Years off before each step: 14 at first.
  assert int(run_steps(iterator)[0]) == 0  # The end of the data: no step.


@pytest.mark.parametrize('age_head', ['distribution', 'regression'])
def test_a_flip_averaged_model_averages_each_face_and_its_mirror(tmp_path, age_head):
  model = build('tiny', 32, mean_age=30.0, age_std=15.0, age_head=age_head)
  if age_head == 'distribution':
    logits = model.get_layer('age_logits')
    logits.kernel.assign(np.random.default_rng(1).normal(0, 0.3, logits.kernel.shape))
    model_lib.set_interval_quantiles(model, 0.15, 0.85)
    model.save(str(tmp_path / 'plain.keras'))
    model = export.load_keras_model(str(tmp_path / 'plain.keras'))  # Traced with that pair.
  images = pixels(4, 32)
  plain = model.predict_on_batch(images)
  mirrored = model.predict_on_batch(images[:, :, ::-1])
  averaged = model_lib.flip_averaged(model)
  assert model_lib.is_flip_averaged(averaged) and not model_lib.is_flip_averaged(model)
  assert model_lib.flip_averaged(averaged) is averaged
  assert model_lib.unflipped(averaged) is model and model_lib.unflipped(model) is model
  assert model_lib.interval_quantiles(averaged) == model_lib.interval_quantiles(model)
  outputs = averaged.predict_on_batch(images)
  assert set(outputs) == set(plain)
  np.testing.assert_allclose(outputs['gender_output'],
                             (plain['gender_output'] + mirrored['gender_output']) / 2, rtol=1e-5)
  if age_head == 'distribution':
    distribution = (plain['age_distribution'] + mirrored['age_distribution']) / 2
    np.testing.assert_allclose(outputs['age_distribution'], distribution, rtol=1e-5)
    np.testing.assert_allclose(outputs['age_output'], model_lib.expected_age(distribution),
                               rtol=1e-5)
    np.testing.assert_allclose(outputs['age_low'], model_lib.age_quantile(distribution, 0.15),
                               rtol=1e-5)
  else:
    np.testing.assert_allclose(outputs['age_output'],
                               (plain['age_output'] + mirrored['age_output']) / 2, rtol=1e-5)
  assert not np.allclose(plain['gender_output'], mirrored['gender_output'])  # A real mirror.
  path = str(tmp_path / 'model.keras')
  averaged.save(path)
  loaded = export.load_keras_model(path)
  assert model_lib.is_flip_averaged(loaded)
  for name, value in outputs.items():
    np.testing.assert_allclose(loaded.predict_on_batch(images)[name], value, rtol=1e-6)
