"""Preprocessing ops: the one path from encoded bytes or pixels to the model's input.

The model's input is uint8 pixels [..., S, S, 3]: decoded and resized, not
scaled. Scaling to [0, 1] is the model's first layer, so batches cross to the
device (and over the tf.data service) at a quarter of float32's bytes, and the
CPU does no float work on images stored raw at the model's size. Training,
evaluation, export and predict all call `preprocess_encoded_image`, so
serving never drifts from training.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from agegender import contract

# Decodes in flight within one batch.
DECODE_PARALLELISM = 16


def to_rgb(image: tf.Tensor) -> tf.Tensor:
  channels = image.shape[-1]
  if channels == 1:
    return tf.image.grayscale_to_rgb(image)
  if channels == 4:
    return image[..., :3]
  if channels != 3:
    raise ValueError(f'expected 1, 3 or 4 channels, got shape {image.shape}')
  return image


def resize_pixels(image: Any, image_size: int = contract.DEFAULT_IMAGE_SIZE) -> tf.Tensor:
  """Pixels [H, W, C] or [B, H, W, C] (0..255, 1, 3 or 4 channels) to uint8 [..., S, S, 3].

  Bilinear resize, rounded to the nearest level; an image already at the size
  passes unchanged.
  """
  image = to_rgb(tf.convert_to_tensor(image))
  target = (image_size, image_size)
  if tuple(image.shape[-3:-1]) == target and image.dtype == tf.uint8:
    return image

  def resized():
    # A float result rounded back to uint8: the model sees the same levels everywhere.
    pixels = tf.image.resize(tf.cast(image, tf.float32), target)
    return tf.cast(tf.round(tf.clip_by_value(pixels, 0.0, 255.0)), tf.uint8)

  is_target = tf.reduce_all(tf.equal(tf.shape(image)[-3:-1], target))
  same = lambda: tf.cast(tf.round(tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 255.0)), tf.uint8)
  if image.dtype == tf.uint8:
    same = lambda: image
  image = tf.cond(is_target, same, resized)
  return tf.ensure_shape(image, image.shape[:-3].concatenate([image_size, image_size, 3]))


def preprocess_encoded_image(encoded: Any,
                             image_size: int = contract.DEFAULT_IMAGE_SIZE) -> tf.Tensor:
  """Encoded bytes (JPEG, PNG, BMP or GIF; any size; gray or color) to uint8 [S, S, 3]."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  return resize_pixels(image, image_size)


def preprocess_encoded_batch(encoded: Any,
                             image_size: int = contract.DEFAULT_IMAGE_SIZE) -> tf.Tensor:
  """A batch of encoded images [B] to uint8 [B, S, S, 3], each through
  `preprocess_encoded_image` (sizes may differ within the batch)."""
  return tf.map_fn(
      lambda one: preprocess_encoded_image(one, image_size), encoded,
      fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.uint8),
      parallel_iterations=DECODE_PARALLELISM)


def augment_batch(images: tf.Tensor, seed: tf.Tensor, first: Any = 0,
                  total: Any = None) -> tf.Tensor:
  """A training-time variation of each uint8 image of a batch [B, S, S, 3]: a
  horizontal flip or not, then a shift of up to S/16 pixels each way, the
  edges reflected. One gather of the whole batch (a per-image map, or pad
  and crop, costs several times the decode); stateless: the same batch and
  seed (int [2]) give the same result, on any device.

  first, total: the batch is images first..first+B-1 of a batch of `total`
  (one replica's share of the global batch), and gets their draws, so
  splitting a batch over replicas changes nothing.
  """
  size = images.shape[1]
  pad = max(1, size // 16)
  batch = tf.shape(images)[0]
  total = batch if total is None else total
  flip_seed, shift_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  flip = tf.random.stateless_uniform([total], flip_seed, maxval=2, dtype=tf.int32) > 0
  shifts = tf.random.stateless_uniform([total, 2], shift_seed, maxval=2 * pad + 1,
                                       dtype=tf.int32) - pad
  flip, shifts = flip[first:first + batch], shifts[first:first + batch]
  span = tf.range(size)[None, :]

  def reflect(index):  # As tf.pad's REFLECT: -1 reads 1, size reads size - 2.
    index = tf.abs(index)
    return tf.where(index >= size, 2 * (size - 1) - index, index)

  rows = reflect(shifts[:, :1] + span)
  columns = reflect(shifts[:, 1:] + span)
  columns = tf.where(flip[:, None], size - 1 - columns, columns)
  pixels = (tf.range(batch)[:, None, None] * size + rows[:, :, None]) * size + columns[:, None, :]
  return tf.gather(tf.reshape(images, [-1, 3]), pixels)
