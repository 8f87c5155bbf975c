"""The packaged model (agegender/models/): loads offline, answers a real photo, agrees with its
TFLite twin, and its card's figures are what an evaluation of it gives."""

import json
import os

import numpy as np
import pytest

from agegender import contract
from agegender.serving import evaluate
from agegender.serving import export
from agegender.serving import lite
from agegender.serving import predict
from agegender.serving import predictor

CARD = os.path.join(predictor.PACKAGED_DIR, 'card.json')
data = pytest.importorskip('skimage.data')  # The `test` extra: the astronaut photo.
pytest.importorskip('cv2')  # The `faces` extra: finding the face.


@pytest.fixture(scope='module')
def astronaut():
  return data.astronaut()


def test_the_packaged_model_finds_the_astronaut_an_adult_woman(astronaut):
  faces = predictor.Predictor().predict(astronaut)
  assert len(faces) == 1
  face = faces[0]
  assert face.gender == 'female' and face.probability > 0.5
  assert 18 <= face.age <= 70
  assert face.age_low <= face.age <= face.age_high
  left, top, width, height = face.box
  assert 150 < left + width / 2 < 250 and 50 < top + height / 2 < 180  # Her face, not the flag.


def test_paths_pil_images_and_arrays_give_the_same_faces(astronaut, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'astronaut.png'
  Image.fromarray(astronaut).save(path)
  model = predictor.Predictor()
  ages = [model.predict(image)[0].age for image in (astronaut, str(path), Image.open(path))]
  assert ages[0] == ages[1] == ages[2]


def test_keras_and_tflite_agree_on_face_crops(astronaut):
  keras_model = export.load_keras_model(predictor.PACKAGED_DIR)
  tflite_model = lite.LiteModel(os.path.join(predictor.PACKAGED_DIR, lite.TFLITE_FP16_FILE))
  crops = [crop for _, crop in predict.faces.face_crops(astronaut)]
  crops += [np.flip(crop, axis=1) for crop in crops]
  size = export.image_size_of(keras_model)
  batch = np.stack([predict.preprocess.resize_pixels(crop, size).numpy() for crop in crops])
  from_keras = keras_model.predict_on_batch(batch)
  from_tflite = tflite_model.predict_on_batch(batch)
  np.testing.assert_allclose(from_tflite[contract.AGE_OUTPUT], from_keras[contract.AGE_OUTPUT],
                             atol=0.5)
  np.testing.assert_allclose(from_tflite[contract.GENDER_OUTPUT],
                             from_keras[contract.GENDER_OUTPUT], atol=0.02)


def test_the_card_says_what_ships_and_under_which_licence():
  with open(CARD) as f:
    card = json.load(f)
  assert 'non-commercial research' in card['licence']
  for name, size in card['files'].items():
    assert os.path.getsize(os.path.join(predictor.PACKAGED_DIR, name)) == size
  assert sum(card['files'].values()) < 10 * 2**20


def _records_of_the_card():
  with open(CARD) as f:
    card = json.load(f)
  records_dir = os.environ.get('AGEGENDER_UTKFACE_RECORDS', card['records_dir'])
  try:
    manifest = contract.read_manifest(records_dir)
  except contract.RecordsError:
    pytest.skip(f'the records the card was measured on are not here ({records_dir}); set '
                'AGEGENDER_UTKFACE_RECORDS to a conversion of UTKFace')
  import hashlib  # pylint: disable=g-import-not-at-top
  with open(os.path.join(manifest['directory'], contract.MANIFEST_NAME), 'rb') as f:
    if hashlib.sha256(f.read()).hexdigest() != card['manifest_sha256']:
      pytest.skip(f'the records at {records_dir} are not those the card was measured on')
  return card, records_dir


def _flat(value, prefix=''):
  if isinstance(value, dict):
    return {key: leaf for name, item in value.items()
            for key, leaf in _flat(item, f'{prefix}/{name}').items()}
  return {prefix: value}


def test_the_cards_figures_are_a_fresh_evaluation_of_the_packaged_model():
  card, records_dir = _records_of_the_card()
  model = export.load_keras_model(predictor.PACKAGED_DIR)
  fresh = _flat(json.loads(json.dumps(evaluate.evaluate_model(model, records_dir, split='test'))))
  written = _flat(card['metrics'])
  assert fresh.keys() == written.keys()
  for key, value in written.items():
    if isinstance(value, float):
      assert fresh[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    else:
      assert fresh[key] == value, key
