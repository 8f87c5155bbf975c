"""preprocess.augment_batch's policies: stateless, replica-split invariant, and what each varies.

Small synthetic batches (32 px), so the whole file runs in seconds. The flip and shift alone
(flip_shift) is proven pixel-exact against every flip and shift in tests/test_pipeline.py.
"""

import dataclasses
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from agegender.data import preprocess
from agegender.training import config as config_lib
from agegender.training import trainer

SIZE = 32
POLICIES = [name for name in preprocess.POLICIES if name != 'none']


def textured(count, seed=0):
  """Colourful uint8 images: smooth gradients plus noise, different in each image."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
  base = rng.uniform(40, 200, (count, 1, 1, 3)) + 50 * np.stack([x, y, x * y], -1)[None]
  return np.clip(base + rng.normal(0, 20, (count, SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def augment(images, policy, seed=(0, 0), **kwargs):
  return preprocess.augment_batch(tf.constant(images), tf.constant(seed, tf.int64),
                                  policy=policy, **kwargs).numpy()


def test_the_config_offers_every_policy_but_none():
  assert set(config_lib.AUGMENT_POLICIES) == set(preprocess.POLICIES) - {'none'}
  assert config_lib.DataConfig().augment_policy in config_lib.AUGMENT_POLICIES


def test_none_returns_the_images_unchanged():
  images = textured(4)
  np.testing.assert_array_equal(augment(images, 'none'), images)


@pytest.mark.parametrize('policy', POLICIES)
def test_the_same_seed_gives_the_same_batch_and_another_seed_another(policy):
  images = textured(16)
  first = augment(images, policy)
  assert first.dtype == np.uint8 and first.shape == images.shape
  np.testing.assert_array_equal(augment(images, policy), first)
  assert not np.array_equal(augment(images, policy, seed=(0, 1)), first)
  assert np.mean(first != images) > 0.5  # It does vary the images.


@pytest.mark.parametrize('policy', POLICIES)
def test_two_replica_slices_get_the_images_of_the_whole_batch(policy):
  images = textured(12)
  whole = augment(images, policy)
  halves = [augment(images[first:first + 6], policy, first=first, total=12) for first in (0, 6)]
  np.testing.assert_array_equal(np.concatenate(halves), whole)


def test_the_training_step_augments_by_the_tasks_policy():
  images = textured(8)
  task = trainer.Task(model=None, optimizer=keras.optimizers.Adam(), optim=None, age_unit=1.0,
                      global_batch_size=8, metrics={}, augment=True, augment_policy='photo',
                      seed=3)
  task.optimizer.iterations.assign(5)
  seed = tf.random.experimental.stateless_fold_in(tf.constant([3, 0], tf.int64),
                                                  tf.constant(5, tf.int64))
  expected = preprocess.augment_batch(tf.constant(images), seed, policy='photo')
  np.testing.assert_array_equal(trainer.training_images(task, tf.constant(images)), expected)


def test_grey_images_come_out_with_equal_channels():
  images = textured(64)
  all_grey = dataclasses.replace(preprocess.POLICIES['photo'], grey=1.0)
  out = augment(images, all_grey).astype(int)
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  np.testing.assert_array_equal(out[..., 1], out[..., 2])
  # 'photo' makes about its share of the images grey, and keeps colour in the rest.
  out = augment(textured(400), 'photo').astype(int)
  grey = np.all(out[..., :1] == out[..., 1:], axis=(1, 2, 3))
  share = preprocess.POLICIES['photo'].grey
  assert abs(grey.mean() - share) < 0.06
  assert np.abs(out[~grey, ..., 0] - out[~grey, ..., 2]).mean() > 5


def blob_images(count, centre):
  """Black images with a white disc of radius 3 at `centre` (x, y)."""
  y, x = np.mgrid[0:SIZE, 0:SIZE]
  disc = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= 9
  return np.repeat((disc[None, ..., None] * np.full(3, 255)).astype(np.uint8)[None], count,
                   axis=0)[:, 0]


def blob_centres(images):
  """The centroid (x, y) of each image's brighter half of levels."""
  grey = images.astype(float).mean(-1)
  low, high = grey.min(axis=(1, 2), keepdims=True), grey.max(axis=(1, 2), keepdims=True)
  mask = grey > (low + high) / 2
  y, x = np.mgrid[0:SIZE, 0:SIZE]
  return np.stack([(mask * x).sum((1, 2)), (mask * y).sum((1, 2))], -1) / mask.sum((1, 2))[:, None]


@pytest.mark.parametrize('policy', ['geometric', 'photo'])
def test_geometric_jitter_keeps_the_face_roughly_in_place(policy):
  centre = np.array([10.0, 12.0])  # Off the middle, so turns and scale move it too.
  out = augment(blob_images(64, centre), policy)
  moved = blob_centres(out)
  mirrored = np.array([SIZE - 1 - centre[0], centre[1]])
  straight, flipped = np.hypot(*(moved - centre).T), np.hypot(*(moved - mirrored).T)
  distance = np.minimum(straight, flipped)
  # Within the policy's reach: the shift each way, the turn and scale at this radius, a pixel.
  rules = preprocess.POLICIES[policy]
  radius = np.hypot(*(centre - (SIZE - 1) / 2))
  reach = (math.sqrt(2) * rules.shift * SIZE +
           radius * (math.radians(rules.rotation) + rules.scale) + 1.0)
  assert distance.max() <= reach
  assert distance.mean() > 0.5  # They do move.
  assert 0.25 < np.mean(flipped < straight) < 0.75  # About half mirrored.


def test_levels_clip_at_black_and_white_never_wrap():
  white = np.full((64, SIZE, SIZE, 3), 255, np.uint8)
  black = np.zeros_like(white)
  for policy in ('colour', 'photo'):
    assert augment(white, policy).min() >= 255 * (1 - 0.4 - 0.12) - 1
    assert augment(black, policy).max() <= 255 * 0.12 + 1


def roughness(batch):
  """Each image's mean absolute difference of neighbouring pixels."""
  return np.abs(np.diff(batch, axis=2)).mean(axis=(1, 2, 3))


def test_blur_smooths_only_the_images_drawn_for_it():
  images = textured(200)
  only_blur = preprocess.Policy(flip=False, shift=0.0, blur=0.3)
  out = augment(images, only_blur).astype(int)
  before, after = roughness(images.astype(int)), roughness(out)
  changed = np.any(out != images, axis=(1, 2, 3))
  assert 0.15 < changed.mean() < 0.45
  assert np.all(after[changed] <= before[changed] + 0.05)
  assert after[changed].mean() < 0.8 * before[changed].mean()
  # From mild (a 3x3 mean) to coarse (a quarter of the side): some keep most detail, some little.
  ratio = after[changed] / before[changed]
  assert ratio.max() > 0.7 and ratio.min() < 0.3


def test_photo_compiles_with_xla():
  images = tf.constant(textured(4))
  compiled = tf.function(lambda batch: preprocess.augment_batch(
      batch, tf.constant([1, 2], tf.int64), policy='photo'), jit_compile=True)
  out = compiled(images).numpy()
  assert out.dtype == np.uint8 and out.shape == images.shape
