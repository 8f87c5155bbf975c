"""Generated scenes without faces, for the face benchmarks (numpy and PIL only)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
  """A faceless width x height scene: blurred noise, a gradient, stripes or checks."""
  kind = rng.integers(4)
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  colour_a, colour_b = rng.uniform(0, 255, (2, 3))
  if kind == 0:
    small = rng.uniform(0, 255, (height // 16, width // 16, 3)).astype(np.uint8)
    return np.array(Image.fromarray(small).resize((width, height), Image.BICUBIC))
  if kind == 1:
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * x + np.sin(angle) * y
    t = (t - t.min()) / (t.max() - t.min())
  elif kind == 2:
    period, angle = rng.uniform(8, 60), rng.uniform(0, np.pi)
    t = 0.5 + 0.5 * np.sin((np.cos(angle) * x + np.sin(angle) * y) * 2 * np.pi / period)
  else:
    cell = rng.integers(10, 60)
    t = ((x // cell + y // cell) % 2).astype(np.float32)
  pixels = colour_a + t[..., None] * (colour_b - colour_a)
  pixels += rng.normal(0, 6, pixels.shape)
  return np.clip(pixels, 0, 255).astype(np.uint8)
