"""The serving SavedModel: encoded image bytes in, age and gender probability out.

The signature `serving_default` takes a batch of JPEG or PNG bytes of any size
(`image_bytes`, tf.string [None]) and runs the pipeline's own
`preprocess.preprocess_encoded_image` before the model, so serving cannot drift from
training. It returns `age` (float32 [None], years), `age_low` and `age_high`
(float32 [None], years: the distribution head's 80% interval, its 10th and
90th percentiles; a regression head has no interval and returns low = high =
age, so one client serves both), `gender_probability` (float32 [None], the
probability of female, UTKFace's gender 1) and `gender` (tf.string [None],
'male' or 'female').

Bad bytes: a batch is served whole or not at all. When any of its images
cannot be decoded (not an image, empty, truncated), the call fails with
`tf.errors.InvalidArgumentError` whose message names the positions of every
such image in the batch, for example
``image_bytes[1, 3]: not a readable image (JPEG, PNG, BMP or GIF); the batch
was not served``, and returns nothing for the others: a client drops those
and sends the rest again. No image gets a made-up output (such as NaN) that
a client could average in unnoticed. (`agegender.predict` decodes each file
on its own before batching, so it reports a broken file and predicts the
others.)

  python -m agegender.export --model_dir=runs/compact_cnn   # rewrites runs/compact_cnn/export
  python -m agegender.export --model_dir=runs/compact_cnn --tflite   # and the TFLite models
  saved_model_cli show --dir runs/compact_cnn/export --tag_set serve --signature_def serving_default
"""

from __future__ import annotations

import dataclasses
import os

import keras
import tensorflow as tf

from agegender import contract
from agegender import files
from agegender import options
from agegender.records import labels as labels_lib
from agegender.training import model as model_lib  # Also registers the custom layers.
from agegender.data import preprocess



@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """What `python -m agegender.export` writes."""
  model_dir: str = options.option('', 'The training run whose model.keras to export.')
  export_dir: str = options.option('', 'Where to write the SavedModel (default: MODEL_DIR/export).')
  tflite: bool = options.option(False, 'Also write model.tflite (float32) and model_fp16.tflite '
                                '(float16 weights) to MODEL_DIR: uint8 pixels in, age and gender '
                                'out.')


SIGNATURE = 'serving_default'
INPUT_NAME = 'image_bytes'
# What a served batch's error and predict's error line say of bytes that do not decode.
UNREADABLE = 'not a readable image (JPEG, PNG, BMP or GIF)'


def keras_model_path(model_dir_or_file: str) -> str:
  path = str(model_dir_or_file)
  return os.path.join(path, contract.MODEL_FILE) if os.path.isdir(path) else path


def load_keras_model(model_dir_or_file: str) -> keras.Model:
  """Loads a run's model.keras (or a .keras file) with Keras's safe mode: no code from the file runs."""
  path = keras_model_path(model_dir_or_file)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no model at {path}; train one with `python -m agegender.train`')
  return keras.models.load_model(path, compile=False, safe_mode=True)


def image_size_of(model: keras.Model) -> int:
  return int(model.input_shape[1])


def decode_images(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
  """Encoded images [B] to uint8 [B, S, S, 3], each through
  `preprocess.preprocess_encoded_image`; fails with InvalidArgumentError naming
  the positions of all the images that do not decode.

  A graph cannot catch one op's error, but tf.data can drop the elements
  whose decoding failed (`ignore_errors`): the positions that come out tell
  which went missing, and an assertion names them (a decoder's own error
  names neither the image nor its position).
  """
  count = tf.size(image_bytes)
  decoded = (tf.data.Dataset.from_tensor_slices((tf.range(count), image_bytes))
             .map(lambda position, encoded: (
                 position, preprocess.preprocess_encoded_image(encoded, image_size)),
                  num_parallel_calls=preprocess.DECODE_PARALLELISM, deterministic=True)
             .ignore_errors()
             .batch(tf.cast(tf.maximum(count, 1), tf.int64)))
  nothing = tf.data.Dataset.from_tensors((tf.zeros([0], tf.int32),
                                          tf.zeros([0, image_size, image_size, 3], tf.uint8)))
  # The one batch of what decoded, or nothing when no image did.
  positions, images = decoded.concatenate(nothing).take(1).get_single_element()
  readable = tf.scatter_nd(positions[:, None], tf.ones_like(positions, tf.bool), [count])
  unreadable = tf.strings.as_string(tf.where(tf.logical_not(readable))[:, 0])
  message = tf.strings.join([
      INPUT_NAME, '[', tf.strings.reduce_join(unreadable, separator=', '), ']: ', UNREADABLE,
      '; the batch was not served'])
  with tf.control_dependencies([tf.debugging.Assert(tf.size(unreadable) == 0, [message])]):
    return tf.identity(images)


def serving_function(model: keras.Model):
  """Encoded bytes [None] -> {'age', 'age_low', 'age_high', 'gender_probability', 'gender'},
  each [None]."""
  image_size = image_size_of(model)
  genders = tf.constant(labels_lib.GENDERS)

  def serve(image_bytes):
    # Each image through preprocess_encoded_image, the training preprocessing.
    images = decode_images(image_bytes, image_size)
    count = tf.shape(images)[0]
    # One blank image more, its outputs dropped: oneDNN's fused convolutions mis-shape an
    # empty batch (seen on AVX-512 CPUs), and an empty request must still be served.
    blank = tf.zeros([1, image_size, image_size, 3], tf.uint8)
    outputs = model(tf.concat([images, blank], 0), training=False)
    probability = tf.reshape(tf.cast(outputs[contract.GENDER_OUTPUT], tf.float32), [-1])[:count]
    age, low, high = (tf.reshape(tf.cast(value, tf.float32), [-1])[:count] for value in (
        outputs[contract.AGE_OUTPUT], *model_lib.age_interval(outputs)))
    gender = tf.gather(genders, tf.cast(probability >= 0.5, tf.int32))
    return {'age': age, 'age_low': low, 'age_high': high, 'gender_probability': probability,
            'gender': gender}

  return serve


def export_saved_model(model: keras.Model, export_dir: str) -> str:
  """Writes the serving SavedModel to export_dir (replacing what was there); returns export_dir."""
  archive = keras.export.ExportArchive()
  archive.track(model)
  archive.add_endpoint(SIGNATURE, serving_function(model),
                       input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_NAME)])


  def write(directory):
    with files.quiet():
      archive.write_out(directory, verbose=False)
  # Written beside the target and swapped in: a reader finds the old export or the new one.
  return files.replace_folder(export_dir, write)


def load_serving_function(export_dir: str):
  """The `serving_default` signature of an export (a SavedModel: graphs only, no Python code)."""
  return tf.saved_model.load(export_dir).signatures[SIGNATURE]
