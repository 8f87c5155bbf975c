"""Faces in photos: find them (YuNet) and crop each aligned by the eyes as UTKFace's crops are.

  detect(pixels) -> [Face]                  every face: box, 5 landmarks, score
  subject(faces) -> Face                    the face a labelled photo is about
  refine(pixels, face) -> Face              its landmarks re-detected upright, at UTKFace's scale
  align(pixels, face, size=200) -> pixels   the face's crop, eyes where UTKFace's are
  subject_crop(pixels) -> (Face, pixels)    all four for a labelled photo (conversion)
  face_crops(pixels) -> [(Face, pixels)]    detect, refine, align every face (prediction)

Pixels are uint8 RGB [H, W, 3]. Errors are plain ValueError, or ImportError (MISSING_OPENCV)
when the optional `faces` extra (OpenCV) is not installed. Never imports TensorFlow.
"""

from agegender.faces.align import CROP_SIZE
from agegender.faces.align import EYE_LEFT
from agegender.faces.align import EYE_RIGHT
from agegender.faces.align import align
from agegender.faces.align import crop_box
from agegender.faces.align import crop_corners
from agegender.faces.align import draw_boxes
from agegender.faces.align import face_crops
from agegender.faces.align import refine
from agegender.faces.align import similarity
from agegender.faces.align import subject_crop
from agegender.faces.detect import MAX_SIDE
from agegender.faces.detect import MIN_FACE
from agegender.faces.detect import MISSING_OPENCV
from agegender.faces.detect import SCORE_THRESHOLD
from agegender.faces.detect import SIMILAR_SIZE
from agegender.faces.detect import TURNS
from agegender.faces.detect import Face
from agegender.faces.detect import check_pixels
from agegender.faces.detect import detect
from agegender.faces.detect import set_threads
from agegender.faces.detect import subject

__all__ = [
    'CROP_SIZE', 'EYE_LEFT', 'EYE_RIGHT', 'Face', 'MAX_SIDE', 'MIN_FACE', 'MISSING_OPENCV',
    'SCORE_THRESHOLD', 'SIMILAR_SIZE', 'TURNS', 'align', 'check_pixels', 'crop_box',
    'crop_corners', 'detect', 'draw_boxes', 'face_crops', 'refine', 'set_threads', 'similarity',
    'subject', 'subject_crop',
]
