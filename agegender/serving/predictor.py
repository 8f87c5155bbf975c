"""The Python API: `Predictor().predict(photo)` -> one `FaceResult` per face.

  from agegender import Predictor
  for face in Predictor().predict('photo.jpg'):      # or a numpy array, or a PIL image
    print(face.age, face.age_low, face.age_high, face.gender, face.probability, face.box)

With no model_dir the packaged model (agegender/models/, trained on UTKFace:
non-commercial research use only) predicts; faces are found with YuNet and
aligned by the eyes as UTKFace's crops are, so a face crop gives one face and
a photo gives one result per face. The model loads on the first call, once.
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading
from typing import Any

import numpy as np
from PIL import Image

from agegender import faces
from agegender.serving import predict

PACKAGED_DIR = predict.PACKAGED_DIR


@dataclasses.dataclass(frozen=True)
class FaceResult:
  """One face: where it is and what the model says of it.

  box: (left, top, width, height) in the photo's pixels, as the detector found it.
  landmarks: five (x, y): the subject's right and left eye, nose tip, right and left mouth corner.
  age: years (the expected age); age_low, age_high: the model's 80% interval (equal to age
    for a model without one).
  gender: 'male' or 'female'; probability: the model's probability of that gender.
  """
  box: tuple[float, float, float, float]
  landmarks: tuple[tuple[float, float], ...]
  age: float
  age_low: float
  age_high: float
  gender: str
  probability: float

  @classmethod
  def from_prediction(cls, result: dict[str, Any]) -> 'FaceResult':
    return cls(box=tuple(result['box']), landmarks=tuple(map(tuple, result['landmarks'])),
               age=result['age'], age_low=result.get('age_low', result['age']),
               age_high=result.get('age_high', result['age']), gender=result['gender'],
               probability=result['probability'])


def to_pixels(image) -> np.ndarray:
  """A path, encoded bytes, a PIL image or an array to uint8 RGB pixels [H, W, 3]."""
  if isinstance(image, (str, os.PathLike)):
    pixels, reason = predict.load_pixels(os.fspath(image))
    if pixels is None:
      raise ValueError(f'{os.fspath(image)}: {reason}')
    return pixels
  if isinstance(image, (bytes, bytearray)):
    image = Image.open(io.BytesIO(image))
  if isinstance(image, Image.Image):
    return np.asarray(image.convert('RGB'))
  pixels = np.asarray(image)
  if pixels.ndim == 2:
    pixels = np.repeat(pixels[..., None], 3, axis=-1)
  if pixels.ndim == 3 and pixels.shape[-1] == 4:
    pixels = pixels[..., :3]
  if pixels.dtype != np.uint8:
    if not np.issubdtype(pixels.dtype, np.number):
      raise ValueError(f'expected an image, got an array of {pixels.dtype}')
    scale = 255.0 if pixels.size and float(np.nanmax(pixels)) <= 1.0 else 1.0
    pixels = np.clip(np.round(pixels * scale), 0, 255).astype(np.uint8)
  return faces.check_pixels(pixels)


class Predictor:
  """Age, age interval and gender for every face in a photo.

  model_dir: a training run (its model.keras); None: the packaged model.
  tflite: run the run's float16 TFLite model with LiteRT instead of Keras.
  score_threshold: the detector's confidence a face needs.
  """

  def __init__(self, model_dir: str | None = None, *, tflite: bool = False,
               score_threshold: float = faces.SCORE_THRESHOLD):
    self.model_dir = model_dir
    self.tflite = tflite
    self.score_threshold = score_threshold
    self._model = None
    self._lock = threading.Lock()

  @property
  def model(self):
    """The model, loaded on first use (once, also across threads)."""
    with self._lock:
      if self._model is None:
        self._model = predict.load_model(self.model_dir or '', self.tflite)
      return self._model

  def predict(self, image) -> list[FaceResult]:
    """One result per face found, largest first; an empty list when there is none."""
    pixels = to_pixels(image)
    found = predict.predict_faces(self.model, pixels, score_threshold=self.score_threshold)
    results = [FaceResult.from_prediction(result) for result in found]
    return sorted(results, key=lambda face: -max(face.box[2], face.box[3]))
