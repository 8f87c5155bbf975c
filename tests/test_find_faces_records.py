"""make_records --find_faces: photos in, the subject's aligned face crop out, the rest rejected."""

import hashlib
import io
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from agegender import contract
from agegender import faces
from agegender import records
from agegender.records import convert

import folders  # tests/folders.py

PHOTOS = 6


@pytest.fixture(scope='module')
def photos():
  """{UTKFace name: JPEG}: PHOTOS photos with one face, one without, one with two."""
  result = {f'photos/{30 + i}_{i % 2}_0_2017010100000000{i}.jpg': folders.face_photo(i)
            for i in range(PHOTOS)}
  result['odd/40_0_1_20170101000000010.jpg'] = folders.no_face_photo()
  result['odd/50_1_2_20170101000000011.jpg'] = folders.two_faces_photo()
  return result


def test_the_face_is_kept_aligned_and_the_others_are_rejected(tmp_path, photos):
  out = str(tmp_path / 'out')
  summary = records.build(folders.write_folder(tmp_path / 'src', photos), out, find_faces=True,
                          workers=1, progress=False)
  assert summary['accepted_total'] == PHOTOS
  assert summary['rejected'] == {convert.NO_FACE: 1, convert.TWO_FACES: 1}
  manifest = contract.read_manifest(out)
  assert {r['file']: r['reason'].split(':')[0] for r in manifest['rejected']} == {
      'odd/40_0_1_20170101000000010.jpg': convert.NO_FACE,
      'odd/50_1_2_20170101000000011.jpg': convert.TWO_FACES}
  assert manifest['image_storage'] == {'format': 'jpeg', 'size': 200, 'jpeg_quality': 95}
  assert manifest['flags']['find_faces'] is True
  crops = [tf.io.parse_single_example(record, contract.feature_spec())
           for split in contract.SPLITS
           for record in tf.data.TFRecordDataset(contract.split_shards(manifest, split))]
  assert len(crops) == PHOTOS
  for crop in crops:
    pixels = tf.io.decode_jpeg(crop['image']).numpy()
    assert pixels.shape == (200, 200, 3)
    # Found again in its crop, the face has its eyes near UTKFace's (YuNet's landmarks move by
    # several pixels between detections of the same face).
    right, left = np.array(faces.subject(faces.detect(pixels)).landmarks[:2])
    target = (np.array(faces.EYE_RIGHT) + np.array(faces.EYE_LEFT)) / 2
    assert np.linalg.norm((right + left) / 2 - target) < 12
    assert 0.8 < np.linalg.norm(left - right) / np.linalg.norm(
        np.subtract(faces.EYE_LEFT, faces.EYE_RIGHT)) < 1.2


def test_the_record_holds_the_subjects_aligned_crop_at_the_image_size(photos):
  name = sorted(photos)[-1]
  options = convert.ConvertOptions(storage=contract.ImageStorage('raw', 48), find_faces=True)
  result = convert.convert_image(name, photos[name], options)
  image = tf.io.parse_single_example(result.example, contract.feature_spec())['image']
  pixels = np.asarray(Image.open(io.BytesIO(photos[name])))  # PIL decodes, as the conversion.
  face, crop = faces.subject_crop(pixels, size=48)  # What prediction's face_crops would make.
  assert image.numpy() == crop.tobytes()
  assert result.content_hash == hashlib.sha256(photos[name]).digest()  # The photo's.


def test_without_opencv_find_faces_is_one_error_up_front(tmp_path, monkeypatch, photos):
  monkeypatch.setitem(sys.modules, 'cv2', None)  # `import cv2` fails.
  folder = folders.write_folder(tmp_path / 'src', photos)
  with pytest.raises(contract.ArgumentError) as raised:
    records.build(folder, str(tmp_path / 'out'), find_faces=True, workers=1, progress=False)
  assert raised.value.field == 'find_faces' and str(raised.value) == faces.MISSING_OPENCV
  assert not (tmp_path / 'out').exists()
