"""The per-image conversion: one source file to one record, or to the reason why not.

`convert_image(name, data, options, labels=None)` is pure: take the labels
(looked up in a table by the runner, or parsed from the name: UTKFace's form
or options.name_pattern), decode the image once to validate it, with
options.find_faces find the face and crop it aligned by the eyes
(agegender.faces), hash the bytes, pick the split from the hash and serialize
the record. Every runner (the local process pool, Apache Beam) runs exactly
this function, so they write the same bytes; it never imports TensorFlow.

Where a record lands follows from its content hash alone:

- split: the first 64 bits of sha256(bytes), read as a number in [0, 2**64),
  fall into the train / validation / test ranges of the split fractions;
- shard: the split's hash range cut into `num_shards` equal parts;
- order within a shard: by hash (ties, which are copies, by name).

So a split never changes when files are renamed, reordered or added. With
find_faces the hash is still that of the source file's bytes (the photo), not
of the crop: the crop follows from the photo, and copies of a photo are found
before any detection could differ.

Images that are not RGB JPEGs (a PNG named .jpg, grayscale or CMYK JPEGs) are
re-encoded as RGB JPEG rather than rejected: what lands always decodes with
tf.io.decode_jpeg(channels=3) or decode_raw. An image with more pixels than
`max_pixels` is downscaled to fit (a JPEG is decoded at a reduced scale, so
memory stays near the bound) or rejected, so no record decodes into more.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import warnings

import numpy as np
from PIL import Image

from agegender import contract
from agegender import faces
from agegender.records import labels as labels_lib
from agegender.records import sources

DEFAULT_SPLIT = (0.8, 0.1, 0.1)
DEFAULT_JPEG_QUALITY = 95
DEFAULT_MAX_PIXELS = 2048 * 2048  # 100 times a 200x200 UTKFace crop.
DOWNSCALE, REJECT = 'downscale', 'reject'  # What happens to an image over max_pixels.
LARGE_IMAGES = (DOWNSCALE, REJECT)
_POSITIONS = 2**64  # Hash positions: the first 8 bytes of sha256, big-endian.
# JPEG decoders reduce by at most 8 in each direction while decoding.
_MAX_DRAFT_REDUCTION = 8

# Reject kinds, counted in the summary; each reject also carries its detail.
BAD_NAME = 'bad name'
EMPTY = 'empty file'
TOO_LARGE = 'file too large'
NOT_AN_IMAGE = 'not an image'
TOO_MANY_PIXELS = 'too many pixels'
TRUNCATED = 'truncated image'
CORRUPT = 'corrupt image'
NO_LABEL_ROW = labels_lib.NO_ROW    # --labels: no row names the file.
BAD_LABEL_ROW = labels_lib.BAD_ROW  # --labels: its row has a bad value, or is duplicated.
NO_FACE = 'no face'                 # --find_faces.
TWO_FACES = 'faces of similar size'  # --find_faces: whose labels are these?


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
  split: tuple[float, float, float] = DEFAULT_SPLIT
  storage: contract.ImageStorage = contract.ImageStorage()
  jpeg_quality: int = DEFAULT_JPEG_QUALITY  # For every re-encoded image.
  max_pixels: int = DEFAULT_MAX_PIXELS
  large_images: str = DOWNSCALE
  name_pattern: str | None = None  # Labels from names by this pattern; None: UTKFace's names.
  find_faces: bool = False         # Store the aligned crop of the photo's face.


@dataclasses.dataclass(frozen=True)
class Rejected:
  name: str
  kind: str
  reason: str


@dataclasses.dataclass(frozen=True)
class Converted:
  content_hash: bytes  # sha256 of the source bytes.
  split: str
  example: bytes       # The serialized tf.train.Example.
  name: str
  labels: labels_lib.Labels
  downscaled_from: tuple[int, int] | None = None  # The source's size, when downscaled.

  @property
  def position(self) -> int:
    return hash_position(self.content_hash)


class ImageRejected(Exception):
  def __init__(self, kind: str, reason: str):
    super().__init__(reason)
    self.kind = kind


def hash_position(content_hash: bytes) -> int:
  return int.from_bytes(content_hash[:8], 'big')


def split_ranges(split: tuple[float, ...]) -> dict[str, tuple[int, int]]:
  """Each split's [start, end) range of hash positions."""
  ranges, start, total = {}, 0, 0.0
  for name, fraction in zip(contract.SPLITS, split):
    total += fraction
    end = _POSITIONS if name == contract.SPLITS[-1] else round(total * _POSITIONS)
    ranges[name] = (start, end)
    start = end
  return ranges


def split_of(position: int, split: tuple[float, ...]) -> str:
  for name, (start, end) in split_ranges(split).items():
    if start <= position < end:
      return name
  raise AssertionError(f'position {position} outside every split')


def shard_of(position: int, split_range: tuple[int, int], num_shards: int) -> int:
  start, end = split_range
  return (position - start) * num_shards // (end - start)


class _Stream(io.BytesIO):
  """The image's bytes as PIL reads them, remembering how reads met the end of the data.

  A decoder that fails after asking for more bytes once it had them all (`past_end`), or a
  header parser that fails after a read came back short (`at_end`), ran out of data: the
  file is truncated. Any other failure is bad data inside the file.
  """

  at_end = past_end = False

  def read(self, size: int | None = -1) -> bytes:
    chunk = super().read(size)
    if size is not None and 0 <= size != len(chunk):
      self.past_end |= self.at_end and not chunk
      self.at_end = True
    return chunk


def _open(data: bytes) -> tuple[Image.Image, _Stream]:
  """Reads the header only; PIL's own pixel bound is ours to report, not a warning."""
  stream = _Stream(data)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      return Image.open(stream), stream
  except Image.UnidentifiedImageError:
    # PIL's message names the buffer's address, which would differ between runs.
    raise ImageRejected(NOT_AN_IMAGE, 'cannot identify image file') from None
  except Image.DecompressionBombError as e:
    raise ImageRejected(TOO_MANY_PIXELS, str(e)) from None
  except Exception as e:  # pylint: disable=broad-except
    # A header cut short or out of shape: plugins raise OSError, SyntaxError, struct.error...
    raise ImageRejected(TRUNCATED if stream.at_end else CORRUPT, _detail(e)) from None


def _detail(error: Exception) -> str:
  return str(error) if isinstance(error, OSError) else f'{type(error).__name__}: {error}'


def _fitted_size(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
  scale = math.sqrt(max_pixels / (size[0] * size[1]))
  return max(1, math.floor(size[0] * scale)), max(1, math.floor(size[1] * scale))


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 large_images: str = DOWNSCALE) -> tuple[Image.Image, tuple[int, int] | None]:
  """Decodes every pixel once; returns (image, the source's size if downscaled).

  Raises ImageRejected with the reason. An image over `max_pixels` is only
  downscaled when it is a JPEG whose decoder can reduce it (by up to 8 in each
  direction) to within the bound; it is decoded at that reduced scale, so it
  never costs much more memory than the bound. Anything else that large is
  rejected before its pixels are decoded.
  """
  if not data:
    raise ImageRejected(EMPTY, 'the file has no bytes')
  image, stream = _open(data)
  width, height = image.size
  if width < 1 or height < 1:
    raise ImageRejected(CORRUPT, f'image of size {image.size}')
  too_many = width * height > max_pixels
  if too_many:
    reduced = width * height // _MAX_DRAFT_REDUCTION**2
    if large_images == REJECT or image.format != 'JPEG' or reduced > max_pixels:
      raise ImageRejected(TOO_MANY_PIXELS, f'{width}x{height} pixels, more than the bound '
                                           f'of {max_pixels}')
    image.draft('RGB', _fitted_size(image.size, max_pixels))  # Decodes at 1/2..1/8 scale.
  try:
    image.load()
  except Exception as e:  # pylint: disable=broad-except
    # Decoders raise what they like on bad data (OSError, SyntaxError, ValueError...).
    raise ImageRejected(TRUNCATED if stream.past_end else CORRUPT, _detail(e)) from None
  if too_many:
    image = image.convert('RGB').resize(_fitted_size((width, height), max_pixels),
                                        Image.Resampling.BILINEAR)
  return image, (width, height) if too_many else None


def _encode_jpeg(image: Image.Image, quality: int) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


def face_crop(image: Image.Image, size: int = faces.CROP_SIZE) -> np.ndarray:
  """The size x size crop of the photo's subject, aligned by the eyes as UTKFace's crops are;
  raises ImageRejected when there is no face, or two of similar size."""
  pixels = np.asarray(image.convert('RGB'))
  found = faces.detect(pixels)
  if not found:
    raise ImageRejected(NO_FACE, 'no face found')
  try:
    subject = faces.subject(found)
  except ValueError as e:  # With faces found, subject() refuses only two of similar size.
    raise ImageRejected(TWO_FACES, str(e)) from None
  try:
    # Refined as prediction refines its faces, so both frame a face alike.
    return faces.align(pixels, faces.refine(pixels, subject), size=size)
  except ValueError as e:  # Eyes found on one spot, or not at all: no face to align.
    raise ImageRejected(NO_FACE, f'the face cannot be aligned: {e}') from None


def stored_image(image: Image.Image, data: bytes, options: ConvertOptions,
                 downscaled: bool = False) -> bytes:
  """The bytes of the `image` feature under the chosen storage."""
  storage = options.storage
  if options.find_faces:
    crop = face_crop(image, storage.size or faces.CROP_SIZE)
    if storage.format == contract.RAW:
      return crop.tobytes()
    return _encode_jpeg(Image.fromarray(crop), options.jpeg_quality)
  if (storage.is_source_bytes and not downscaled and image.format == 'JPEG' and
      image.mode == 'RGB'):
    return data  # The common case: the source's bytes, unchanged.
  rgb = image.convert('RGB')
  if storage.size is not None and rgb.size != (storage.size, storage.size):
    rgb = rgb.resize((storage.size, storage.size), Image.Resampling.BILINEAR)
  if storage.format == contract.RAW:
    return rgb.tobytes()  # size x size x 3, row-major.
  return _encode_jpeg(rgb, options.jpeg_quality)


def check_faces() -> None:
  """Raises contract.ArgumentError about `find_faces` when faces cannot be found here (no
  OpenCV, or no detector model): up front, before any worker starts."""
  try:
    faces.detect(np.full((64, 64, 3), 128, np.uint8))  # Mid-grey: all zeros can give NaN rows.
  except ImportError as e:
    raise contract.ArgumentError('find_faces', str(e)) from None


def _labels_of(name: str, options: ConvertOptions) -> labels_lib.Labels:
  if options.name_pattern is not None:
    return labels_lib.parse_pattern_name(name, options.name_pattern)
  return labels_lib.parse_utkface_name(name)


def convert_image(name: str, data: bytes | sources.TooLarge, options: ConvertOptions,
                  labels: labels_lib.Labels | labels_lib.NoLabels | None = None
                  ) -> Converted | Rejected:
  """One source file to a record, or to the reason it cannot be one.

  `labels`: the file's labels from a table (or why it has none); None: from its name.
  """
  if isinstance(labels, labels_lib.NoLabels):
    return Rejected(name, labels.kind, labels.reason)
  if labels is None:
    try:
      labels = _labels_of(name, options)
    except labels_lib.LabelError as e:
      return Rejected(name, BAD_NAME, str(e))
  if isinstance(data, sources.TooLarge):
    return Rejected(name, TOO_LARGE, f'{data.size} bytes, more than the bound of '
                                     f'{data.limit} (not read)')
  try:
    image, downscaled_from = decode_image(data, options.max_pixels, options.large_images)
    stored = stored_image(image, data, options, downscaled=downscaled_from is not None)
  except ImageRejected as e:
    return Rejected(name, e.kind, str(e))
  content_hash = hashlib.sha256(data).digest()
  example = contract.serialize_example(stored, labels.age, labels.gender, labels.race, name)
  return Converted(content_hash=content_hash,
                   split=split_of(hash_position(content_hash), options.split),
                   example=example, name=name, labels=labels,
                   downscaled_from=downscaled_from)


def convert_entry(entry: tuple, options: ConvertOptions) -> Converted | Rejected:
  """convert_image of a source entry: (name, bytes) or (name, bytes, labels from a table)."""
  return convert_image(entry[0], entry[1], options, entry[2] if len(entry) > 2 else None)


_ONE_THREAD = set()  # Processes whose OpenCV was set to one thread.


def convert_in_worker(entry: tuple, options: ConvertOptions) -> Converted | Rejected:
  """convert_entry in a runner's worker process: the pool already fills every core, so face
  detection keeps to one thread (faces.set_threads)."""
  if options.find_faces and os.getpid() not in _ONE_THREAD:
    faces.set_threads(1)
    _ONE_THREAD.add(os.getpid())
  return convert_entry(entry, options)
