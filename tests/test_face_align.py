"""agegender.faces: YuNet finds faces, align() crops them with the eyes where UTKFace's are."""

import hashlib
import importlib.resources
import subprocess
import sys

import numpy as np
import pytest

cv2 = pytest.importorskip('cv2', reason="finding faces needs OpenCV: pip install -e '.[faces]'")
skimage_data = pytest.importorskip('skimage.data', reason='the astronaut photo is scikit-image\'s')

from agegender import faces  # noqa: E402  (after the skips)
from agegender.faces.detect import MODEL_FILE  # noqa: E402

MODEL_SHA256 = '8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4'
# The astronaut's eyes (subject's right, then left) in skimage.data.astronaut(), by eye.
ASTRONAUT_EYES = ((200, 102), (247, 103))


@pytest.fixture(scope='module')
def astronaut():
  return skimage_data.astronaut()


@pytest.fixture(scope='module')
def crop(astronaut):
  """The astronaut's face as a UTKFace-like 200x200 crop: its eyes on EYE_RIGHT and EYE_LEFT."""
  return faces.subject_crop(astronaut)[1]


def canvas(height, width, seed=0):
  """A faceless background: smooth coloured noise."""
  small = np.random.default_rng(seed).uniform(60, 200, (height // 16, width // 16, 3))
  return cv2.resize(small.astype(np.uint8), (width, height), interpolation=cv2.INTER_CUBIC)


def paste(scene, image, side, angle, centre):
  """Pastes `image` at side x side, turned `angle` degrees counter-clockwise, centred at `centre`;
  returns where its EYE_RIGHT and EYE_LEFT land."""
  small = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
  matrix = cv2.getRotationMatrix2D((side / 2, side / 2), angle, 1.0)
  matrix[:, 2] += np.array(centre, float) - side / 2
  size = scene.shape[1], scene.shape[0]
  warped = cv2.warpAffine(small, matrix, size)
  mask = cv2.warpAffine(np.ones((side, side), np.float32), matrix, size)[..., None]
  scene[:] = (scene * (1 - mask) + warped * mask).round().astype(np.uint8)
  eyes = np.array([faces.EYE_RIGHT, faces.EYE_LEFT]) * side / image.shape[1]
  return eyes @ matrix[:, :2].T + matrix[:, 2]


def eyes_of(face):
  return np.array(face.landmarks[:2])


def test_the_vendored_model_loads_from_the_package():
  folder = importlib.resources.files('agegender.faces').joinpath('yunet')
  model = folder.joinpath(MODEL_FILE).read_bytes()
  assert hashlib.sha256(model).hexdigest() == MODEL_SHA256
  assert 'Apache License' in folder.joinpath('LICENSE').read_text()
  assert 'vendored here' in folder.joinpath('PROVENANCE.md').read_text().lower()
  assert faces.detect(np.zeros([1, 1, 3], np.uint8)) == []


def test_the_astronaut_has_one_face_with_her_eyes_in_place(astronaut):
  found = faces.detect(astronaut)
  assert len(found) == 1
  face = found[0]
  assert face.score > 0.9
  np.testing.assert_allclose(eyes_of(face), ASTRONAUT_EYES, atol=5)
  left, top, width, height = face.box
  assert left < 200 < 247 < left + width and top < 102 < top + height
  assert faces.subject(found) == face


def test_align_puts_the_given_points_on_the_targets():
  image = np.zeros([300, 400, 3], np.uint8)
  points = np.array([[150.0, 170.0], [230.0, 130.0]])  # Turned about 27 degrees.
  for x, y in points:
    cv2.circle(image, (int(x), int(y)), 3, (255, 255, 255), -1)
  for size in (200, 100):
    aligned = faces.align(image, points, size)
    assert aligned.shape == (size, size, 3) and aligned.dtype == np.uint8
    ys, xs = np.nonzero(aligned[..., 0] > 128)
    for target in (faces.EYE_RIGHT, faces.EYE_LEFT):
      target = np.array(target) * size / faces.CROP_SIZE
      near = np.hypot(xs - target[0], ys - target[1]) < 15 * size / faces.CROP_SIZE
      centroid = np.array([xs[near].mean(), ys[near].mean()])
      np.testing.assert_allclose(centroid, target, atol=1.0)


def test_align_repeats_the_edge_pixels_past_the_photo():
  image = np.repeat(np.arange(300, dtype=np.uint8)[None, :, None] % 251, 100, axis=0)
  image = np.repeat(image, 3, axis=2)
  shifted = [(faces.EYE_RIGHT[0] + 150, faces.EYE_RIGHT[1]), (faces.EYE_LEFT[0] + 150,
                                                              faces.EYE_LEFT[1])]
  aligned = faces.align(image, shifted)  # Crop x maps to photo x + 150: past 299 from x = 150.
  np.testing.assert_array_equal(aligned[:, 150:], np.broadcast_to(image[0, 299], (200, 50, 3)))
  inside = np.broadcast_to(image[:1, 150:299], (200, 149, 3))
  np.testing.assert_array_equal(aligned[:, :149], inside)
  halves = np.full([2000, 2000, 3], 50, np.uint8)
  halves[:, 1300:] = 200
  # Shrunk 7.6 times (blurred first): 50 to crop x 43, 200 on, past the photo from x 136.
  aligned = faces.align(halves, [(1400.0, 1000.0), (2000.0, 1000.0)])
  assert np.all(aligned[:, :38] == 50) and np.all(aligned[:, 48:] == 200)


def test_similarity_and_crop_corners_agree():
  landmarks = [(150.0, 170.0), (230.0, 130.0), (0, 0), (0, 0), (0, 0)]
  matrix = faces.similarity(landmarks)
  mapped = np.array(landmarks[:2]) @ matrix[:, :2].T + matrix[:, 2]
  np.testing.assert_allclose(mapped, [faces.EYE_RIGHT, faces.EYE_LEFT], atol=1e-9)
  corners = faces.crop_corners(landmarks)
  square = corners @ matrix[:, :2].T + matrix[:, 2]
  np.testing.assert_allclose(square, [[0, 0], [200, 0], [200, 200], [0, 200]], atol=1e-9)
  left, top, width, height = faces.crop_box(landmarks)
  assert (left, top) == pytest.approx(tuple(corners.min(axis=0)))
  assert width == pytest.approx(height)
  with pytest.raises(ValueError, match='coincide'):
    faces.similarity([(5, 5), (5, 5)])


def test_a_turned_face_is_found_and_aligned_level(crop):
  for angle in (30, 45, -50, -90):  # 45 and 50: half-turned for every right-angle search.
    scene = canvas(480, 480, seed=angle % 7)
    truth = paste(scene, crop, 200, angle, (240, 240))
    found = faces.face_crops(scene)
    assert len(found) == 1, angle
    face, aligned = found[0]
    np.testing.assert_allclose(eyes_of(face), truth, atol=6)
    padded = np.pad(aligned, ((100, 100), (100, 100), (0, 0)), mode='edge')
    again = faces.detect(padded, turns=(0,))
    assert len(again) == 1
    right, left = eyes_of(again[0]) - 100
    assert abs(right[1] - left[1]) < 4, angle
    np.testing.assert_allclose([right, left], [faces.EYE_RIGHT, faces.EYE_LEFT], atol=6)


def test_turned_detections_map_back_exactly(astronaut):
  upright = eyes_of(faces.detect(astronaut)[0])
  turned = np.ascontiguousarray(np.rot90(astronaut))  # Counter-clockwise: (x, y) -> (y, W-1-x).
  found = faces.detect(turned)
  assert len(found) == 1
  expected = np.stack([upright[:, 1], astronaut.shape[1] - 1 - upright[:, 0]], axis=1)
  np.testing.assert_allclose(eyes_of(found[0]), expected, atol=2)


@pytest.mark.parametrize('angle', [45, -45])
def test_diagonal_detections_map_back_exactly(astronaut, angle):
  upright = eyes_of(faces.detect(astronaut)[0])
  height, width = astronaut.shape[:2]
  side = int(np.ceil((width + height) / np.sqrt(2)))
  matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), angle, 1.0)
  matrix[:, 2] += (side - width) / 2, (side - height) / 2
  turned = cv2.warpAffine(astronaut, matrix, (side, side), borderMode=cv2.BORDER_REPLICATE)
  # Only the search that turns it back upright: the face must come from the diagonal path.
  found = faces.detect(turned, turns=(-angle % 360,))
  assert len(found) == 1
  # Found at TILTED_SCALE of the pixels, so its eyes are rougher (refine() redoes them upright).
  distance = np.hypot(*(upright[1] - upright[0]))
  np.testing.assert_allclose(eyes_of(found[0]), upright @ matrix[:, :2].T + matrix[:, 2],
                             atol=0.2 * distance)
  left, top, box_width, box_height = found[0].box
  assert np.hypot(*(np.array([left + box_width / 2, top + box_height / 2]) -
                    eyes_of(found[0]).mean(axis=0))) < box_width / 2  # Around the face.


def test_subject_crop_frames_a_photo_as_utkface_crops_are(astronaut):
  face, crop = faces.subject_crop(astronaut)
  assert crop.shape == (200, 200, 3) and crop.dtype == np.uint8
  np.testing.assert_allclose(eyes_of(face), ASTRONAUT_EYES, atol=5)
  again = faces.detect(np.pad(crop, ((100, 100), (100, 100), (0, 0)), mode='edge'), turns=(0,))
  np.testing.assert_allclose(eyes_of(again[0]) - 100, [faces.EYE_RIGHT, faces.EYE_LEFT], atol=3)


def test_a_large_photo_is_shrunk_for_detection_and_mapped_back(astronaut):
  big = cv2.resize(astronaut, (1536, 1536), interpolation=cv2.INTER_CUBIC)
  found = faces.detect(big, max_side=512)
  assert len(found) == 1
  np.testing.assert_allclose(eyes_of(found[0]), (np.array(ASTRONAUT_EYES) + 0.5) * 3 - 0.5,
                             atol=6)


def test_a_small_face_is_found(crop):
  scene = canvas(240, 320, seed=3)
  truth = paste(scene, crop, 40, 0, (160, 120))
  found = faces.detect(scene)
  assert len(found) == 1
  np.testing.assert_allclose(eyes_of(found[0]), truth, atol=3)


def test_subject_picks_the_largest_face_and_rejects_doubt(crop):
  scene = canvas(320, 480, seed=5)
  paste(scene, crop, 180, 0, (120, 160))
  paste(scene, crop, 70, 0, (380, 160))
  found = faces.detect(scene)
  assert len(found) == 2
  assert faces.subject(found) == max(found, key=lambda face: face.side)
  similar = canvas(320, 480, seed=6)
  paste(similar, crop, 180, 0, (120, 160))
  paste(similar, crop, 170, 0, (360, 160))
  with pytest.raises(ValueError, match='similar size'):
    faces.subject(faces.detect(similar))
  with pytest.raises(ValueError, match='no face'):
    faces.subject(faces.detect(canvas(240, 320)))


@pytest.mark.parametrize('pixels', [
    np.zeros([50, 50, 3], np.float32), np.zeros([50, 50], np.uint8),
    np.zeros([50, 50, 4], np.uint8), np.zeros([0, 50, 3], np.uint8)])
def test_bad_pixels_raise_value_error(pixels):
  with pytest.raises(ValueError):
    faces.detect(pixels)
  with pytest.raises(ValueError):
    faces.align(pixels, [(10, 10), (30, 10)])
  with pytest.raises(ValueError):
    faces.face_crops(pixels)


def test_bad_settings_raise_value_error():
  pixels = np.zeros([50, 50, 3], np.uint8)
  for settings in ({'score_threshold': 1.5}, {'min_face': -1}, {'max_side': 8}, {'turns': (30,)}):
    with pytest.raises(ValueError):
      faces.detect(pixels, **settings)
  with pytest.raises(ValueError):
    faces.align(pixels, [(10, 10)])


def test_draw_boxes_draws_boxes_and_turned_crops(astronaut):
  face = faces.detect(astronaut)[0]
  image = faces.draw_boxes(astronaut, [(face, '31 female 0.98'),
                                       (faces.crop_corners(face), 'crop')])
  assert image.size == (512, 512)
  drawn = np.asarray(image)
  assert np.any(np.all(drawn == (0, 255, 0), axis=-1))
  assert np.array_equal(drawn[500:, :10], astronaut[500:, :10])


def test_importing_faces_loads_neither_tensorflow_nor_opencv():
  code = ('import sys, agegender.faces; '
          "others = [m for m in sys.modules if m.startswith('agegender.') and "
          "not m.startswith('agegender.faces')]; "
          "print('tensorflow' in sys.modules, 'cv2' in sys.modules, others)")
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert result.stdout.split() == ['False', 'False', '[]']


def test_missing_opencv_says_how_to_install_it():
  code = ("import sys; sys.modules['cv2'] = None; import numpy, agegender.faces as f; "
          'f.detect(numpy.zeros([4, 4, 3], numpy.uint8))')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
  assert result.returncode != 0
  assert "ImportError: finding faces needs OpenCV: pip install -e '.[faces]'" in result.stderr
