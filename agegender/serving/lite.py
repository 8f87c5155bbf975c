"""TFLite models for phones: conversion from a run's Keras model, and running them with LiteRT.

`python -m agegender.export --model_dir=RUN --tflite` writes, beside the run's
model.keras (in RUN itself, so rewriting the SavedModel in RUN/export never
removes them):

  model.tflite        float32 weights and arithmetic
  model_fp16.tflite   float16 weights (half the size), dequantized to float32 to run

Each has one signature, `serving_default`, with one input and four outputs:

  image               uint8 [N, S, S, 3]: RGB pixels at the model's input size S
                      (decoded and resized outside TFLite, by agegender.data.preprocess;
                      the model's first layer scales them to [0, 1])
  age                 float32 [N]: years
  age_low, age_high   float32 [N]: years, the distribution head's 80% interval (its
                      10th and 90th percentiles); a regression head has none and
                      gives age_low = age_high = age, as the SavedModel does
  gender_probability  float32 [N]: the probability of female (UTKFace's gender 1)

Ask for outputs by name through the signature runner: the flat output tensors'
names (`StatefulPartitionedCall:0`, ...) do not say which is which.
"""

from __future__ import annotations

import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from agegender import contract
from agegender import files
from agegender.training import model as model_lib

TFLITE_FILE = 'model.tflite'
TFLITE_FP16_FILE = 'model_fp16.tflite'
SIGNATURE = 'serving_default'
INPUT_NAME = 'image'
AGE_NAME = 'age'
AGE_LOW_NAME = model_lib.AGE_LOW
AGE_HIGH_NAME = model_lib.AGE_HIGH
GENDER_NAME = 'gender_probability'
MISSING_LITERT = ("running TFLite models needs LiteRT (ai-edge-litert): "
                  "pip install -e '.[tflite]'")


def tflite_paths(model_dir: str) -> dict[str, str]:
  """Where export writes the float32 and float16 models of a run."""
  return {'float32': os.path.join(model_dir, TFLITE_FILE),
          'float16': os.path.join(model_dir, TFLITE_FP16_FILE)}


def _write_serving_saved_model(model: keras.Model, directory: str) -> None:
  """uint8 pixels in, named 1-D outputs: the graph both TFLite models convert from.

  Through a SavedModel because TFLiteConverter.from_concrete_functions on a
  Keras 3 model does not capture its weights (the result runs, giving NaN);
  a Keras ExportArchive tracks them.
  """
  size = int(model.input_shape[1])

  def serve(image):
    outputs = model(image, training=False)
    low, high = model_lib.age_interval(outputs)
    named = {AGE_NAME: outputs[contract.AGE_OUTPUT], AGE_LOW_NAME: low, AGE_HIGH_NAME: high,
             GENDER_NAME: outputs[contract.GENDER_OUTPUT]}
    return {name: tf.reshape(tf.cast(value, tf.float32), [-1]) for name, value in named.items()}

  archive = keras.export.ExportArchive()
  archive.track(model)
  archive.add_endpoint(SIGNATURE, serve, input_signature=[
      tf.TensorSpec([None, size, size, 3], tf.uint8, name=INPUT_NAME)])
  with files.quiet():
    archive.write_out(directory, verbose=False)


def convert_tflite(model: keras.Model, output_dir: str) -> dict[str, str]:
  """Writes model.tflite and model_fp16.tflite to output_dir; returns their paths by precision."""
  paths = tflite_paths(output_dir)
  with tempfile.TemporaryDirectory() as scratch:
    saved_model = os.path.join(scratch, 'saved_model')
    _write_serving_saved_model(model, saved_model)
    for precision, path in paths.items():
      converter = tf.lite.TFLiteConverter.from_saved_model(saved_model, signature_keys=[SIGNATURE])
      if precision == 'float16':
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
      with files.quiet():
        content = converter.convert()
      files.write_bytes(path, content)
  return paths


def _interpreter_class():
  try:
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(MISSING_LITERT) from None
  return Interpreter


class LiteModel:
  """A .tflite model behind the two calls predict and evaluate make of a Keras model:
  `input_shape` and `predict_on_batch(uint8 images)` -> {age_output, age_low, age_high,
  gender_output}. A model written before intervals (no age_low, age_high) gives the age for
  both."""

  def __init__(self, path: str, num_threads: int | None = None):
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f'no TFLite model at {path}; write one with `python -m agegender.export --tflite`')
    self.path = path
    self.interpreter = _interpreter_class()(model_path=path, num_threads=num_threads)
    signatures = self.interpreter.get_signature_list()
    found = signatures.get(SIGNATURE, {})
    self.outputs = set(found.get('outputs', []))
    if (found.get('inputs') != [INPUT_NAME] or not {AGE_NAME, GENDER_NAME} <= self.outputs
        or not self.outputs <= {AGE_NAME, AGE_LOW_NAME, AGE_HIGH_NAME, GENDER_NAME}):
      raise ValueError(f'{path} is not an agegender TFLite model: its signatures are {signatures}')
    self.runner = self.interpreter.get_signature_runner(SIGNATURE)
    shape = self.runner.get_input_details()[INPUT_NAME]['shape_signature']
    self.input_shape = (None, *(int(side) for side in shape[1:]))

  def predict_on_batch(self, images) -> dict[str, np.ndarray]:
    outputs = self.runner(**{INPUT_NAME: np.asarray(images, np.uint8)})
    age = outputs[AGE_NAME].reshape(-1, 1)
    return {contract.AGE_OUTPUT: age,
            AGE_LOW_NAME: outputs.get(AGE_LOW_NAME, age).reshape(-1, 1),
            AGE_HIGH_NAME: outputs.get(AGE_HIGH_NAME, age).reshape(-1, 1),
            contract.GENDER_OUTPUT: outputs[GENDER_NAME].reshape(-1, 1)}
