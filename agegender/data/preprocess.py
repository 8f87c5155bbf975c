"""Preprocessing ops: the one path from encoded bytes or pixels to the model's input.

The model's input is uint8 pixels [..., S, S, 3]: decoded and resized, not
scaled. Scaling to [0, 1] is the model's first layer, so batches cross to the
device (and over the tf.data service) at a quarter of float32's bytes, and the
CPU does no float work on images stored raw at the model's size. Training,
evaluation, export and predict all call `preprocess_encoded_image`, so
serving never drifts from training. `augment_batch` varies training batches in
the training step, on the device (a POLICIES name).
"""

from __future__ import annotations

import dataclasses
import math
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


def resize_pixels(image: Any, image_size: int = contract.DEFAULT_IMAGE_SIZE, *,
                  antialias: bool = False) -> tf.Tensor:
  """Pixels [H, W, C] or [B, H, W, C] (0..255, 1, 3 or 4 channels) to uint8 [..., S, S, 3].

  Bilinear resize (with `antialias`, filtered when shrinking), rounded to the nearest level; an
  image already at the size passes unchanged.
  """
  image = to_rgb(tf.convert_to_tensor(image))
  target = (image_size, image_size)
  if tuple(image.shape[-3:-1]) == target and image.dtype == tf.uint8:
    return image

  def resized():
    # A float result rounded back to uint8: the model sees the same levels everywhere.
    pixels = tf.image.resize(tf.cast(image, tf.float32), target, antialias=antialias)
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


@dataclasses.dataclass(frozen=True)
class Policy:
  """What augment_batch varies, each image drawn on its own; ranges are +- unless noted.

  Faces reach the model reframed by a detector (a few pixels of shift, some scale and turn)
  and from photos unlike UTKFace's crops (grey, faded, blurred): the jitter mimics both.
  """
  flip: bool = True  # Half the images mirrored left to right.
  shift: float = 1 / 16  # Of the side, each way.
  scale: float = 0.0  # The face's size, as a fraction (0.1: 0.9x to 1.1x).
  rotation: float = 0.0  # Degrees.
  brightness: float = 0.0  # Added, as a fraction of full scale.
  contrast: float = 0.0  # Of the distance from the image's mean grey (0.4: 0.6x to 1.4x).
  saturation: tuple[float, float] = (1.0, 1.0)  # Range of the colour kept (0: grey).
  grey: float = 0.0  # Share of the images made fully grey (R = G = B).
  blur: float = 0.0  # Share of the images blurred, each by a random amount, mild to coarse.

  @property
  def geometric(self) -> bool:  # Needs the affine sampler (else the integer shift's gather).
    return bool(self.scale or self.rotation)

  @property
  def photometric(self) -> bool:
    return bool(self.brightness or self.contrast or self.grey or self.blur or
                self.saturation != (1.0, 1.0))


_COLOUR = dict(brightness=0.12, contrast=0.4, saturation=(0.3, 1.3), grey=0.15, blur=0.2)
_GEOMETRY = dict(scale=0.1, rotation=12.0)
# By name (DataConfig.augment_policy): flip_shift is the flip and integer shift alone, as before
# 'photo' existed; geometric and colour are photo's two halves. colour is the default: at 10
# epochs / 128 px it brings faces found in photos 0.8-0.9 years closer (grey, faded and blurred
# ones 0.5-2.2) for 0.07-0.18 on clean test crops (two seeds); geometric helps none of what
# faces.align leaves.
POLICIES = {
    'none': None,
    'flip_shift': Policy(),
    'geometric': Policy(**_GEOMETRY),
    'colour': Policy(**_COLOUR),
    'photo': Policy(**_GEOMETRY, **_COLOUR),
}
# The blur: a box mean 2r + 1 pixels wide, r this many per 64 px of the side (at 64 px a 3x3
# mean, about a Gaussian of 0.8 px: mild, as a face scanned or photographed a little soft)...
BLUR_RADIUS = 1.0
# ... and past it, the face at 1/COARSE of the side, scaled back up: a small face in a photo, or
# one out of focus (about a Gaussian of 2.5% of the side, where old photos' soft faces lie).
COARSE = 4
# Luma weights (ITU-R BT.601), as tf.image.rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


def augment_batch(images: tf.Tensor, seed: tf.Tensor, first: Any = 0, total: Any = None,
                  policy: str | Policy = 'flip_shift') -> tf.Tensor:
  """A training-time variation of each uint8 image of a batch [B, S, S, 3], by `policy` (a
  POLICIES name or a Policy): flipped or not and shifted, for geometric policies also scaled
  and turned about the centre, in one gather of the whole batch (a per-image map costs
  several times the decode); then, for photometric ones, blurred, desaturated and jittered in
  contrast and brightness in a few elementwise passes. Stateless: the same batch and seed
  (int [2]) give the same result, on any device.

  first, total: the batch is images first..first+B-1 of a batch of `total` (one replica's
  share of the global batch), and gets their draws, so splitting a batch over replicas
  changes nothing.
  """
  policy = POLICIES[policy] if isinstance(policy, str) else policy
  if policy is None:
    return images
  batch = tf.shape(images)[0]
  total = batch if total is None else total
  # Two draws as before 'photo' existed (flip_shift's images are unchanged); the rest from a third.
  flip_seed, shift_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  jitter_seed = tf.random.experimental.stateless_fold_in(seed, 1)
  draws = tf.random.stateless_uniform([total, 8], jitter_seed)[first:first + batch]
  flip = tf.random.stateless_uniform([total], flip_seed, maxval=2, dtype=tf.int32) > 0
  flip = tf.logical_and(flip[first:first + batch], policy.flip)
  if policy.geometric:
    images = _affine(images, flip, draws[:, :4] * 2 - 1, policy)
  else:
    pad = max(1, int(images.shape[1] * policy.shift)) if policy.shift else 0
    shifts = tf.random.stateless_uniform([total, 2], shift_seed, maxval=2 * pad + 1,
                                         dtype=tf.int32) - pad
    images = _shift(images, flip, shifts[first:first + batch])
  return _photometric(images, draws[:, 4:], policy) if policy.photometric else images


def _shift(images: tf.Tensor, flip: tf.Tensor, shifts: tf.Tensor) -> tf.Tensor:
  """Each image flipped or not, then shifted by whole pixels, the edges reflected: one
  integer gather."""
  size = images.shape[1]
  span = tf.range(size)[None, :]

  def reflect(index):  # As tf.pad's REFLECT: -1 reads 1, size reads size - 2.
    index = tf.abs(index)
    return tf.where(index >= size, 2 * (size - 1) - index, index)

  rows = reflect(shifts[:, :1] + span)
  columns = reflect(shifts[:, 1:] + span)
  columns = tf.where(flip[:, None], size - 1 - columns, columns)
  pixels = (tf.range(tf.shape(images)[0])[:, None, None] * size + rows[:, :, None]) * size + (
      columns[:, None, :])
  return tf.gather(tf.reshape(images, [-1, 3]), pixels)


def _affine(images: tf.Tensor, flip: tf.Tensor, draws: tf.Tensor, policy: Policy) -> tf.Tensor:
  """Each image flipped or not, scaled, turned and shifted about its centre (draws in [-1, 1]:
  scale, angle, shift x, shift y), sampled at the nearest pixel (as torchvision's RandomAffine
  by default; bilinear costs four gathers and float work) in one gather; the edge pixels
  repeat past the edges, as faces.align fills a crop."""
  size = images.shape[1]
  centre = (size - 1) / 2
  zoom = 1 + policy.scale * draws[:, 0]
  angle = draws[:, 1] * policy.rotation * (math.pi / 180)
  # Output pixel (u, v) from the centre reads the input at centre + shift + R(angle) (u, v) / zoom.
  cos, sin = [(f(angle) / zoom)[:, None, None] for f in (tf.cos, tf.sin)]
  u = (tf.range(size, dtype=tf.float32) - centre)[None, None, :] * (
      tf.where(flip, -1.0, 1.0)[:, None, None])
  v = (tf.range(size, dtype=tf.float32) - centre)[None, :, None]
  # + 0.5: floor below rounds to the nearest pixel.
  offset = centre + 0.5 + policy.shift * size * draws[:, 2:]
  # Small [B, 1, S] and [B, S, 1] terms, added once into [B, S, S].
  x = (offset[:, :1, None] + cos * u) - sin * v
  y = (offset[:, 1:, None] + sin * u) + cos * v
  column = tf.cast(tf.clip_by_value(tf.floor(x), 0.0, size - 1.0), tf.int32)
  row = tf.cast(tf.clip_by_value(tf.floor(y), 0.0, size - 1.0), tf.int32)
  index = (row + tf.range(tf.shape(images)[0])[:, None, None] * size) * size + column
  return tf.gather(tf.reshape(images, [-1, 3]), index)


def _photometric(images: tf.Tensor, draws: tf.Tensor, policy: Policy) -> tf.Tensor:
  """Blur, saturation (some images fully grey), contrast and brightness, per image (draws in
  [0, 1]: blur, grey-or-saturation, contrast, brightness), uint8 in and out.

  Saturation s, contrast c and brightness b are affine in the colour: c s x + c (1 - s) grey +
  (1 - c) mean + b, with grey the pixel's luma and mean the image's; applied in that one form,
  with factors per image (a grey image's channels then come out equal, bit for bit), and few
  passes over the batch: on a CPU each costs about as much as the whole flip and shift.
  """
  pixels = tf.cast(images, tf.float32)

  def per_image(column):  # A draw as [B, 1, 1, 1], to scale each image.
    return draws[:, column, None, None, None]

  if policy.blur:
    # Two blurs of the batch; an image drawn to be blurred goes by a random amount from sharp to
    # the box blur (amount 0 to 0.5), then on to the coarse copy (0.5 to 1).
    amount = tf.where(per_image(0) < policy.blur, per_image(0) / policy.blur, 0.0)
    size = images.shape[1]
    width = 2 * max(1, round(BLUR_RADIUS * size / 64)) + 1
    mild = tf.minimum(2 * amount, 1.0)
    pixels = pixels * (1 - mild) + tf.nn.avg_pool2d(pixels, width, 1, 'SAME') * mild
    coarse = tf.image.resize(tf.nn.avg_pool2d(pixels, COARSE, COARSE, 'VALID'), [size, size])
    strong = tf.maximum(2 * amount - 1, 0.0)
    pixels = pixels * (1 - strong) + coarse * strong
  low, high = policy.saturation
  # The grey share is drawn from the low end of the column; the rest spreads over the range.
  share = tf.clip_by_value((per_image(1) - policy.grey) / max(1e-6, 1 - policy.grey), 0.0, 1.0)
  saturation = tf.where(per_image(1) < policy.grey, 0.0, low + share * (high - low))
  contrast = 1 + policy.contrast * (2 * per_image(2) - 1)
  brightness = 255 * policy.brightness * (2 * per_image(3) - 1)
  # The luma in all three channels: one 1x1 convolution, no broadcast over the channels.
  grey = tf.nn.conv2d(pixels, tf.tile(tf.constant(_LUMA)[None, None, :, None], [1, 1, 1, 3]),
                      1, 'VALID')
  mean = tf.reduce_mean(grey[..., :1], axis=[1, 2], keepdims=True)
  # + 0.5, then truncation by the cast: rounded to the nearest level.
  offset = (1 - contrast) * mean + brightness + 0.5
  pixels = pixels * (contrast * saturation) + (grey * (contrast * (1 - saturation)) + offset)
  return tf.cast(tf.clip_by_value(pixels, 0.0, 255.5), tf.uint8)
