"""Faces in whole photos through predict: the detector on a real photo (scikit-image's
astronaut), predict --find_faces / --annotate / a missing OpenCV. (The detector and the
alignment themselves: tests/test_face_align.py.)"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
from PIL import Image

from agegender.training import config as config_lib
from agegender import faces
from agegender.training import model as model_lib
from agegender.serving import predict

SIZE = 64
# Hand-marked in skimage.data.astronaut() (512x512): Eileen Collins' eyes and mouth.
ASTRONAUT_FACE_POINTS = [(203, 101), (248, 102), (223, 145)]


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  """A run folder with an untrained tiny model.keras: the tests check faces, not accuracy."""
  folder = tmp_path_factory.mktemp('faces_run')
  model = model_lib.build_model(config_lib.ModelConfig(model='tiny'), SIZE, mean_age=33.0,
                                age_std=20.0)
  model.save(str(folder / 'model.keras'))
  return str(folder)


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
  """The astronaut as a PNG, and a face-less scene (a gradient with stripes) as a JPEG."""
  folder = tmp_path_factory.mktemp('photos')
  Image.fromarray(skimage.data.astronaut()).save(folder / 'astronaut.png')
  y, x = np.mgrid[0:240, 0:320]
  stripes = (127 + 100 * np.sin(x / 7.0) * np.cos(y / 23.0))[..., None] * [1.0, 0.8, 0.6]
  Image.fromarray(stripes.astype(np.uint8)).save(folder / 'no_face.jpg', quality=90)
  return folder


def _command(*args, prelude=''):
  """python -m agegender.predict args, optionally after `prelude` in the same process."""
  code = (f'{prelude}\nimport runpy, sys\nsys.argv[0] = "agegender.predict"\n'
          'runpy.run_module("agegender.predict", run_name="__main__", alter_sys=True)')
  return subprocess.run([sys.executable, '-c', code, *args], capture_output=True, text=True,
                        timeout=300)


def test_the_astronaut_photo_yields_one_face_around_her_eyes_and_mouth():
  found = faces.detect(skimage.data.astronaut())
  assert len(found) == 1
  left, top, width, height = found[0].box
  for x, y in ASTRONAUT_FACE_POINTS:
    assert left < x < left + width and top < y < top + height
  # A face, not the whole head and shoulders.
  assert 40 <= width <= 160
  (right_eye_x, right_eye_y), (left_eye_x, left_eye_y) = found[0].landmarks[:2]
  assert abs(right_eye_x - 203) < 10 and abs(left_eye_x - 248) < 10
  assert abs(right_eye_y - 101) < 10 and abs(left_eye_y - 102) < 10


def test_a_photo_without_a_face_yields_no_face(photos):
  scene = np.asarray(Image.open(photos / 'no_face.jpg'))
  assert not faces.detect(scene)


def test_predict_faces_gives_one_prediction_per_face_with_its_boxes(model_dir):
  model = predict.load_model(model_dir, False, None)
  results = predict.predict_faces(model, skimage.data.astronaut(), 'astronaut.png')
  assert len(results) == 1
  result = results[0]
  assert result['file'] == 'astronaut.png' and result['gender'] in ('male', 'female')
  found = faces.face_crops(skimage.data.astronaut())
  assert len(found) == 1
  face, _ = found[0]
  assert result['box'] == pytest.approx(face.box, abs=0.1)
  assert result['crop'] == pytest.approx(faces.crop_box(face), abs=0.1)
  # The aligned crop holds the whole face: every landmark well inside it.
  crop_left, crop_top, crop_width, crop_height = result['crop']
  for x, y in result['landmarks']:
    assert crop_left + crop_width / 5 < x < crop_left + crop_width * 4 / 5
    assert crop_top + crop_height / 5 < y < crop_top + crop_height * 4 / 5


def test_find_faces_prints_a_line_per_face_and_annotates_the_photo(model_dir, photos, tmp_path):
  annotated = tmp_path / 'annotated'
  completed = _command(f'--model_dir={model_dir}', '--find_faces', '--json',
                       f'--annotate={annotated}', str(photos))
  assert completed.returncode == 0, completed.stderr[-2000:]
  lines = [json.loads(line) for line in completed.stdout.splitlines()]
  assert [os.path.basename(line['file']) for line in lines] == ['astronaut.png', 'no_face.jpg']
  face, no_face = lines
  assert len(face['box']) == 4 and face['age'] >= 0
  assert no_face == {'file': str(photos / 'no_face.jpg'), 'error': 'no face found'}
  assert sorted(os.listdir(annotated)) == ['astronaut.png', 'no_face.png']
  drawn = Image.open(annotated / 'astronaut.png')
  assert drawn.size == (512, 512)
  # The box is drawn: the pixels on its left edge changed to the box colour.
  left, top, _, height = (round(value) for value in face['box'])
  assert tuple(np.asarray(drawn)[top + height // 2, left]) == (0, 255, 0)


def test_find_faces_text_lines_and_a_photo_without_faces(model_dir, photos):
  completed = _command(f'--model_dir={model_dir}', '--find_faces', str(photos / 'astronaut.png'))
  assert completed.returncode == 0, completed.stderr[-2000:]
  [row] = [line.split('\t') for line in completed.stdout.splitlines()]
  assert row[0] == str(photos / 'astronaut.png') and len(row) == 5
  assert len(row[1].split(',')) == 4 and row[3] in ('male', 'female')
  completed = _command(f'--model_dir={model_dir}', '--find_faces', str(photos / 'no_face.jpg'))
  assert completed.returncode == 2 and completed.stdout == ''
  assert completed.stderr.strip().splitlines()[-2:] == [
      f'{photos / "no_face.jpg"}: error: no face found',
      'agegender.predict: error: no face found in any photo']


def test_a_missing_opencv_is_a_one_line_error_naming_the_extra(model_dir, photos):
  completed = _command(f'--model_dir={model_dir}', '--find_faces', str(photos / 'astronaut.png'),
                       prelude="import sys; sys.modules['cv2'] = None")
  assert completed.returncode == 2 and completed.stdout == ''
  assert completed.stderr.strip().splitlines() == [
      "agegender.predict: error: finding faces needs OpenCV: pip install -e '.[faces]'"]


def test_annotating_two_photos_of_one_name_keeps_both(model_dir, photos, tmp_path):
  for folder in ('a', 'b'):
    (tmp_path / folder).mkdir()
    Image.fromarray(skimage.data.astronaut()).save(tmp_path / folder / 'photo.png')
  model = predict.load_model(model_dir, False, None)
  annotated = tmp_path / 'annotated'
  annotated.mkdir()
  results = list(predict.predict_photos(model, [str(tmp_path / 'a'), str(tmp_path / 'b')],
                                        str(annotated)))
  assert len(results) == 2 and all('box' in result for result in results)
  assert sorted(os.listdir(annotated)) == ['photo-2.png', 'photo.png']
