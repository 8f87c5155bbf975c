"""Export and prediction: the serving signature on raw bytes, its contract for bytes that
do not decode, safe loading, the predict CLI."""

import io
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from agegender.training import config as config_lib
from agegender import contract
from agegender.serving import export
from agegender.data import pipeline
from agegender.serving import predict
from agegender.data import preprocess
from agegender.records import synthetic
from agegender.training import model as model_lib

BATCH = 32


def _test_records(records_dir):
  """(file name, encoded image bytes) of the test split, straight from the shards."""
  manifest = contract.read_manifest(records_dir)
  spec = contract.feature_spec()
  pairs = []
  for serialized in tf.data.TFRecordDataset(contract.split_shards(manifest, 'test')):
    example = tf.io.parse_single_example(serialized, spec)
    pairs.append((example[contract.FILE_NAME].numpy().decode(),
                  example[contract.IMAGE].numpy()))
  return pairs


def _pipeline_test_batches(records_dir, image_size):
  """The pipeline's test batches: (uint8 images, file names) in record order."""
  data = config_lib.DataConfig(records_dir=records_dir, batch_size=BATCH, image_size=image_size)
  return [(images, [name.decode() for name in metadata['file_name']])
          for images, _, metadata in pipeline.make_dataset(data, 'test', include_metadata=True)
          .as_numpy_iterator()]


def test_serving_decodes_the_bytes_exactly_as_the_pipeline(synthetic_records):
  by_name = dict(_test_records(synthetic_records))
  decode = tf.function(lambda image_bytes: export.decode_images(image_bytes, 48),
                       input_signature=[tf.TensorSpec([None], tf.string)])
  for images, names in _pipeline_test_batches(synthetic_records, 48):
    decoded = decode(tf.constant([by_name[name] for name in names])).numpy()
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, images)


def test_the_saved_model_on_raw_bytes_matches_keras_on_the_pipeline(trained_run,
                                                                    synthetic_records):
  model = export.load_keras_model(trained_run['model_dir'])
  serve = export.load_serving_function(trained_run['export_dir'])
  by_name = dict(_test_records(synthetic_records))
  batches = _pipeline_test_batches(synthetic_records, export.image_size_of(model))
  assert sorted(name for _, names in batches for name in names) == sorted(by_name)
  for images, names in batches:
    # The same images in the same batches: the same numbers, to the bit.
    served = serve(image_bytes=tf.constant([by_name[name] for name in names]))
    expected = model.predict_on_batch(images)
    np.testing.assert_array_equal(served['age'].numpy(), expected['age_output'].reshape(-1))
    for name, value in zip(('age_low', 'age_high'), model_lib.age_interval(expected)):
      np.testing.assert_array_equal(served[name].numpy(), value.reshape(-1))
    assert np.all(served['age_low'].numpy() < served['age_high'].numpy())  # The default head's.
    np.testing.assert_array_equal(served['gender_probability'].numpy(),
                                  expected['gender_output'].reshape(-1))
    genders = [g.decode() for g in served['gender'].numpy()]
    assert genders == ['female' if p >= 0.5 else 'male'
                       for p in expected['gender_output'].reshape(-1)]


def test_the_serving_signature_takes_a_string_batch(trained_run):
  serve = export.load_serving_function(trained_run['export_dir'])
  _, inputs = serve.structured_input_signature
  assert inputs == {'image_bytes': tf.TensorSpec([None], tf.string, name='image_bytes')}
  assert set(serve.structured_outputs) == {'age', 'age_low', 'age_high', 'gender_probability',
                                            'gender'}
  for name in ('age', 'age_low', 'age_high'):
    assert serve.structured_outputs[name] == tf.TensorSpec([None], tf.float32, name=name)


def test_a_regression_head_serves_its_age_as_low_and_high(tmp_path):
  model = model_lib.build_model(config_lib.ModelConfig(model='tiny', age_head='regression'), 32,
                                mean_age=30.0, age_std=15.0)
  serve = export.load_serving_function(export.export_saved_model(model, str(tmp_path / 'e')))
  faces = [jpeg for _, jpeg in synthetic.generate_synthetic(3, seed=6)]
  served = serve(image_bytes=tf.constant(faces))
  images = np.stack([preprocess.preprocess_encoded_image(face, 32).numpy() for face in faces])
  expected = model.predict_on_batch(images)['age_output'].reshape(-1)
  np.testing.assert_allclose(served['age'].numpy(), expected, rtol=1e-5)
  np.testing.assert_array_equal(served['age_low'].numpy(), served['age'].numpy())
  np.testing.assert_array_equal(served['age_high'].numpy(), served['age'].numpy())
  # predict's lines: the age alone, and JSON's low and high equal to it.
  result = predict.prediction('face.jpg', float(expected[0]), 0.3)
  assert result['age_low'] == result['age_high'] == result['age']
  assert predict.format_line(result) == f'face.jpg\t{result["age"]:.1f}\tmale\t0.700'


def _png(width, height, seed=0):
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='PNG')
  return buffer.getvalue()


def test_the_saved_model_takes_png_of_any_size(trained_run):
  model = export.load_keras_model(trained_run['model_dir'])
  serve = export.load_serving_function(trained_run['export_dir'])
  encoded = [_png(100, 80), _png(30, 50, seed=1)]
  served = serve(image_bytes=tf.constant(encoded))
  size = export.image_size_of(model)
  images = np.stack([preprocess.preprocess_encoded_image(e, size).numpy() for e in encoded])
  np.testing.assert_allclose(served['age'].numpy(),
                             model.predict_on_batch(images)['age_output'].reshape(-1),
                             rtol=1e-4, atol=1e-3)


def test_loading_refuses_a_model_that_would_run_code(tmp_path):
  inputs = keras.Input((4,))
  unsafe = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
  path = str(tmp_path / 'unsafe.keras')
  unsafe.save(path)
  with pytest.raises(ValueError, match='(?i)unsafe|safe_mode'):
    export.load_keras_model(path)


def test_loading_a_missing_model_is_a_file_not_found_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=f'no model at {tmp_path}.*agegender.train'):
    export.load_keras_model(str(tmp_path))


def test_a_served_batch_with_unreadable_images_fails_naming_their_positions(trained_run):
  serve = export.load_serving_function(trained_run['export_dir'])
  faces = [jpeg for _, jpeg in synthetic.generate_synthetic(3, seed=4)]
  truncated = faces[0][:len(faces[0]) // 2]
  for broken in (b'plain text, not an image', b'', truncated, _png(40, 40)[:60]):
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
      serve(image_bytes=tf.constant([faces[0], broken, faces[1], broken, faces[2]]))
    assert ('image_bytes[1, 3]: not a readable image (JPEG, PNG, BMP or GIF); the batch was '
            'not served') in str(error.value)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'image_bytes\[0\]: not a readable'):
    serve(image_bytes=tf.constant([truncated]))
  # The next batch is served as if nothing had happened, and so is an empty one.
  served = serve(image_bytes=tf.constant(faces))
  alone = [serve(image_bytes=tf.constant([face]))['age'].numpy()[0] for face in faces]
  np.testing.assert_allclose(served['age'].numpy(), alone, rtol=1e-6)
  empty = serve(image_bytes=tf.constant([], tf.string))
  assert {name: output.shape for name, output in empty.items()} == {
      'age': (0,), 'age_low': (0,), 'age_high': (0,), 'gender_probability': (0,), 'gender': (0,)}


@pytest.fixture
def photos(tmp_path):
  """A folder of 3 synthetic JPEGs, a PNG in a subfolder, a broken .jpg and a text file."""
  folder = synthetic.write_synthetic_folder(str(tmp_path / 'photos'), 3, seed=5)
  os.makedirs(os.path.join(folder, 'more'))
  with open(os.path.join(folder, 'more', 'face.png'), 'wb') as f:
    f.write(_png(90, 90))
  with open(os.path.join(folder, 'broken.jpg'), 'wb') as f:
    f.write(b'\xff\xd8 this is not a JPEG')
  with open(os.path.join(folder, 'notes.txt'), 'w') as f:
    f.write('not an image, and not picked up from a folder')
  return folder


def test_predict_paths_goes_on_after_a_broken_file(trained_run, photos):
  model = export.load_keras_model(trained_run['model_dir'])
  results = list(predict.predict_paths(model, [photos, os.path.join(photos, 'missing.jpg')],
                                       batch_size=2))
  by_file = {os.path.relpath(r['file'], photos): r for r in results}
  assert set(by_file) == {'broken.jpg', 'more/face.png', 'missing.jpg'} | {
      name for name in os.listdir(photos) if name.endswith('.chip.jpg')}
  assert 'not a readable image' in by_file['broken.jpg']['error']
  assert 'no such file' in by_file['missing.jpg']['error']
  predicted = [r for r in results if 'error' not in r]
  assert len(predicted) == 4
  for result in predicted:
    assert result['gender'] in ('male', 'female')
    assert 0.5 <= result['probability'] <= 1.0
    assert 0 <= result['age_low'] < result['age'] < result['age_high']


def test_predict_command_prints_json_lines_and_exits_0_with_a_broken_file(trained_run, photos):
  completed = subprocess.run(
      [sys.executable, '-m', 'agegender.predict', f'--model_dir={trained_run["model_dir"]}',
       '--nofind_faces', '--json', photos], capture_output=True, text=True, timeout=120)
  assert completed.returncode == 0, completed.stderr[-2000:]
  lines = [json.loads(line) for line in completed.stdout.splitlines()]
  assert len(lines) == 5
  errors = [line for line in lines if 'error' in line]
  assert [os.path.basename(line['file']) for line in errors] == ['broken.jpg']
  assert all({'file', 'age', 'age_low', 'age_high', 'gender', 'probability'} <= set(line)
             for line in lines if 'error' not in line)


def _command(module, *args):
  return subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True,
                        timeout=180)


def test_predict_command_prints_text_lines_and_fails_when_nothing_is_predicted(
    trained_run, photos, tmp_path):
  # Synthetic faces are drawn, not photographed: each file is fed whole, as a crop.
  completed = _command('agegender.predict', f'--model_dir={trained_run["model_dir"]}',
                       '--nofind_faces', photos)
  assert completed.returncode == 0, completed.stderr[-2000:]
  rows = [line.split('\t') for line in completed.stdout.splitlines()]
  assert len(rows) == 4 and all(len(row) == 4 for row in rows)
  for file, age, gender, probability in rows:
    assert os.path.exists(file)
    # The age and its 80% interval in whole years: '34.2 (27-41)'.
    match = re.fullmatch(r'(\d+\.\d) \((\d+)-(\d+)\)', age)
    assert match, age
    low, middle, high = int(match.group(2)), float(match.group(1)), int(match.group(3))
    assert low <= middle <= high
    assert gender in ('male', 'female') and 0.5 <= float(probability) <= 1
  assert [line for line in completed.stderr.splitlines() if 'error' in line] == [
      f'{os.path.join(photos, "broken.jpg")}: error: not a readable image (JPEG, PNG, BMP or GIF)']

  broken_only = tmp_path / 'broken_only'
  broken_only.mkdir()
  (broken_only / 'face.jpg').write_bytes(b'\xff\xd8 not a JPEG')
  completed = _command('agegender.predict', f'--model_dir={trained_run["model_dir"]}',
                       '--nofind_faces', str(broken_only))
  assert completed.returncode == 2
  assert completed.stdout == ''
  assert completed.stderr.strip().splitlines()[-1] == (
      'agegender.predict: error: no image could be predicted')


def test_export_command_writes_a_saved_model_that_serves_jpeg_bytes(trained_run, tmp_path):
  export_dir = str(tmp_path / 'served')
  completed = _command('agegender.export', f'--model_dir={trained_run["model_dir"]}',
                       f'--export_dir={export_dir}')
  assert completed.returncode == 0, completed.stderr[-2000:]
  assert completed.stdout.strip() == f'exported {export_dir}'
  serve = export.load_serving_function(export_dir)
  _, jpeg = next(synthetic.generate_synthetic(1, seed=9))
  outputs = serve(image_bytes=tf.constant([jpeg, jpeg]))
  assert outputs['age'].shape[0] == 2
  np.testing.assert_allclose(outputs['age'][0], outputs['age'][1])
