"""Where the face detector's box sits inside real UTKFace crops: agegender.faces' calibration.

  python benchmarks/face_crop_calibration.py --source ../shared/data/UTKFace.tar [--json out.json]

Each UTKFace crop IS the framing the model learned, so the detector's box on
a crop tells how to frame a face the detector finds in a photo: the crop's
side in box sides (scale), and the crop's centre minus the box's centre in
box sides (shift; positive is right and down). Only training-split images
(by the same content hash as agegender.convert) are read, so the test split
that benchmarks/faces.py measures on stays unseen; only crops with exactly
one detection count. Each crop is first set in a margin of half its side
(`--pad`, default: its edge pixels repeated), as a face in a photo has
surroundings: on the bare crop the cascade misses about 40% of the faces
(it needs room around the face) and shrinks the boxes it does find. Prints the medians (the constants to write into
agegender/faces.py) and the quartiles. UTKFace is for non-commercial
research only.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import time

import numpy as np
from absl import app
from absl import flags
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # pylint: disable=g-import-not-at-top,wrong-import-position

from agegender import convert  # pylint: disable=wrong-import-position
from agegender import faces  # pylint: disable=wrong-import-position

flags.DEFINE_string('source', '../shared/data/UTKFace.tar', 'UTKFace as a .tar (or .tar.gz).')
flags.DEFINE_string('split', 'train', 'Which split\'s crops to measure on.')
flags.DEFINE_integer('every', 4, 'Measure every n-th crop of the split (the archive is '
                     'sorted by age, so a share taken this way spans every age).')
flags.DEFINE_enum('pad', 'edge', ['edge', 'constant'], 'The margin around each crop: its edge '
                  'pixels repeated, or black.')
flags.DEFINE_string('json', None, 'Also write the figures here as JSON.')
FLAGS = flags.FLAGS
SPLIT = (0.8, 0.1, 0.1)


def crops(source: str, split: str):
  """(name, uint8 RGB pixels) of the archive's images in `split`, in archive order."""
  with tarfile.open(source) as archive:
    for member in archive:
      if not member.isfile() or not member.name.lower().endswith('.jpg'):
        continue
      data = archive.extractfile(member).read()
      position = convert.hash_position(hashlib.sha256(data).digest())
      if convert.split_of(position, SPLIT) != split:
        continue
      yield member.name, np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


def measure(pixels: np.ndarray, box: faces.Box) -> tuple[float, float, float]:
  """(scale, shift x, shift y) of the whole (unpadded) crop relative to the box."""
  height, width = pixels.shape[:2]
  side = max(box.width, box.height)
  return (max(width, height) / side,
          (width / 2 - (box.left + box.width / 2)) / side,
          (height / 2 - (box.top + box.height / 2)) / side)


def detect_in_margin(pixels: np.ndarray, pad: str) -> list[faces.Box]:
  """The cascade's boxes on the crop set in a margin, in the crop's own coordinates."""
  margin = max(pixels.shape[:2]) // 2
  padded = np.pad(pixels, ((margin, margin), (margin, margin), (0, 0)), mode=pad)
  return [faces.Box(box.left - margin, box.top - margin, box.width, box.height)
          for box in faces.detect(padded)]


def main(argv):
  del argv
  started = time.time()
  counts = {'none': 0, 'one': 0, 'several': 0}
  rows = []
  for index, (_, pixels) in enumerate(crops(FLAGS.source, FLAGS.split)):
    if index % FLAGS.every:
      continue
    boxes = detect_in_margin(pixels, FLAGS.pad)
    counts['none' if not boxes else 'one' if len(boxes) == 1 else 'several'] += 1
    if len(boxes) == 1:
      rows.append(measure(pixels, boxes[0]))
  values = np.array(rows)
  names = ('scale', 'shift_x', 'shift_y')
  figures = {
      'source': os.path.basename(FLAGS.source), 'split': FLAGS.split, 'every': FLAGS.every,
      'pad': FLAGS.pad, 'detections': counts,
      'measured': len(rows), 'machine': machine.describe_cpu(),
      'seconds': round(time.time() - started, 1),
      'median': {name: round(float(np.median(values[:, i])), 4) for i, name in enumerate(names)},
      'quartiles': {name: [round(float(q), 4) for q in np.percentile(values[:, i], [25, 75])]
                    for i, name in enumerate(names)},
      'note': 'UTKFace: non-commercial research use only',
  }
  total = sum(counts.values())
  print(f'{total} {FLAGS.split}-split crops of {figures["source"]} (every {FLAGS.every}, '
        f'{FLAGS.pad} margin): one face found in '
        f'{counts["one"]} ({counts["one"] / total:.1%}), none in {counts["none"]}, several in '
        f'{counts["several"]}; {figures["seconds"]} s on {figures["machine"]}')
  print(f'{"":10}{"median":>10}{"25%":>10}{"75%":>10}')
  for name in names:
    low, high = figures['quartiles'][name]
    print(f'{name:10}{figures["median"][name]:10.4f}{low:10.4f}{high:10.4f}')
  print('(UTKFace: non-commercial research use only)')
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(figures, f, indent=2)
  return 0


if __name__ == '__main__':
  app.run(main)
