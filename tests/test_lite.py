"""TFLite: export --tflite writes both models, LiteRT's outputs match Keras's on the same uint8
images, predict --tflite prints predict's lines, and a missing LiteRT is a one-line error."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from agegender.training import config as config_lib
from agegender import contract
from agegender.serving import lite
from agegender.training import model as model_lib
from agegender.serving import predict
from agegender.records import synthetic

SIZE = 64


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """A run folder holding an untrained tiny model.keras with the distribution head (random
  weights: each face its own distribution) and, written by the export command, its two TFLite
  models; the command's result beside it."""
  model_dir = tmp_path_factory.mktemp('lite_run')
  model = model_lib.build_model(config_lib.ModelConfig(model='tiny', age_head='distribution'),
                                SIZE, mean_age=33.0, age_std=20.0)
  logits = model.get_layer('age_logits')
  logits.kernel.assign(np.random.default_rng(0).normal(0, 0.5, logits.kernel.shape))
  model.save(str(model_dir / 'model.keras'))
  completed = _command('agegender.export', f'--model_dir={model_dir}',
                       f'--export_dir={model_dir / "export"}', '--tflite')
  return str(model_dir), completed


def _command(module, *args, prelude=''):
  """python -m module args, optionally after `prelude` (Python run first, in the same process)."""
  code = f'{prelude}\nimport runpy, sys\nsys.argv[0] = {module!r}\n' \
         f'runpy.run_module({module!r}, run_name="__main__", alter_sys=True)'
  return subprocess.run([sys.executable, '-c', code, *args], capture_output=True, text=True,
                        timeout=300)


def _images(count=12, seed=0):
  """Synthetic faces and plain noise, as the model's uint8 input."""
  from agegender.data import preprocess  # pylint: disable=g-import-not-at-top
  faces = [preprocess.preprocess_encoded_image(jpeg, SIZE).numpy()
           for _, jpeg in synthetic.generate_synthetic(count // 2, seed=seed)]
  noise = np.random.default_rng(seed).integers(0, 256, (count - len(faces), SIZE, SIZE, 3),
                                               dtype=np.uint8)
  return np.concatenate([np.stack(faces), noise])


def test_export_with_tflite_writes_both_models_beside_model_keras(run_dir):
  model_dir, completed = run_dir
  assert completed.returncode == 0, completed.stderr[-2000:]
  paths = lite.tflite_paths(model_dir)
  assert completed.stdout.splitlines()[1:] == [f'exported {paths["float32"]}',
                                               f'exported {paths["float16"]}']
  sizes = {precision: os.path.getsize(path) for precision, path in paths.items()}
  # float16 weights: about half the bytes.
  assert sizes['float16'] < 0.6 * sizes['float32']
  assert not [name for name in os.listdir(model_dir) if name.endswith('.partial')]


def test_the_tflite_models_match_keras_on_the_same_uint8_images(run_dir):
  model_dir, _ = run_dir
  keras_model = predict.load_model(model_dir, False, None)
  images = _images()
  expected = keras_model.predict_on_batch(images)
  # Tolerances in years and probability: float32 to rounding, float16 weights a little looser.
  tolerances = {'float32': (1e-3, 1e-5), 'float16': (0.5, 5e-3)}
  for precision, path in lite.tflite_paths(model_dir).items():
    model = lite.LiteModel(path)
    assert model.input_shape == (None, SIZE, SIZE, 3)
    outputs = model.predict_on_batch(images)
    age_tolerance, probability_tolerance = tolerances[precision]
    for name in (contract.AGE_OUTPUT, 'age_low', 'age_high'):
      np.testing.assert_allclose(outputs[name], expected[name], atol=age_tolerance, rtol=0)
    assert np.all(outputs['age_low'] < outputs['age_high'])
    np.testing.assert_allclose(outputs[contract.GENDER_OUTPUT], expected[contract.GENDER_OUTPUT],
                               atol=probability_tolerance, rtol=0)
    # One image alone: the same as in the batch.
    np.testing.assert_allclose(model.predict_on_batch(images[:1])[contract.AGE_OUTPUT],
                               outputs[contract.AGE_OUTPUT][:1], atol=1e-4)


def test_the_tflite_signature_names_its_input_and_outputs(run_dir):
  model_dir, _ = run_dir
  interpreter = lite.LiteModel(lite.tflite_paths(model_dir)['float16']).interpreter
  assert interpreter.get_signature_list() == {
      'serving_default': {'inputs': ['image'], 'outputs': ['age', 'age_high', 'age_low',
                                                           'gender_probability']}}


def test_predict_with_tflite_prints_the_keras_lines(run_dir, tmp_path):
  model_dir, _ = run_dir
  folder = synthetic.write_synthetic_folder(str(tmp_path / 'faces'), 3, seed=7)
  completed = _command('agegender.predict', f'--model_dir={model_dir}', '--tflite',
                       '--nofind_faces', folder)
  assert completed.returncode == 0, completed.stderr[-2000:]
  rows = [line.split('\t') for line in completed.stdout.splitlines()]
  keras_model = predict.load_model(model_dir, False, None)
  expected = list(predict.predict_paths(keras_model, [folder]))
  assert [row[0] for row in rows] == [result['file'] for result in expected]
  for (_, age, gender, probability), result in zip(rows, expected, strict=True):
    # The age and its interval: those of Keras, give or take the last digit.
    age, low, high = re.fullmatch(r'(\S+) \((\d+)-(\d+)\)', age).groups()
    assert abs(float(age) - result['age']) <= 0.11
    assert abs(int(low) - result['age_low']) <= 0.51
    assert abs(int(high) - result['age_high']) <= 0.51
    assert gender == result['gender']
    assert abs(float(probability) - result['probability']) <= 0.002


def test_a_missing_litert_is_a_one_line_error_naming_the_extra(run_dir, tmp_path):
  model_dir, _ = run_dir
  folder = synthetic.write_synthetic_folder(str(tmp_path / 'faces'), 1, seed=8)
  completed = _command('agegender.predict', f'--model_dir={model_dir}', '--tflite', folder,
                       prelude="import sys; sys.modules['ai_edge_litert'] = None")
  assert completed.returncode == 2
  assert completed.stdout == ''
  assert completed.stderr.strip().splitlines() == [
      "agegender.predict: error: running TFLite models needs LiteRT (ai-edge-litert): "
      "pip install -e '.[tflite]'"]


def test_a_file_that_is_no_tflite_model_is_a_one_line_error(tmp_path):
  model_dir = tmp_path / 'run'
  model_dir.mkdir()
  (model_dir / 'model.tflite').write_bytes(b'not a flatbuffer')
  folder = synthetic.write_synthetic_folder(str(tmp_path / 'faces'), 1, seed=9)
  completed = _command('agegender.predict', f'--tflite_model={model_dir / "model.tflite"}',
                       '--nofind_faces', folder)
  assert completed.returncode == 2
  lines = completed.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('agegender.predict: error: ')
