"""The conversion side never imports TensorFlow: not on import, not in its workers.

The main process of a conversion loads TensorFlow to write TFRecords (files.tensorflow()); the
modules and the per-image work (labels, decoding, face detection) must not, so workers start
in a fraction of a second.
"""

import os
import subprocess
import sys
import textwrap

import tensorflow  # noqa: F401  As a command's main process has it.

from agegender.records import convert
from agegender.records import labels
from agegender.records import synthetic
from agegender.records.runners import local

import folders  # tests/folders.py

_FRESH_PROCESS = textwrap.dedent('''
    import sys
    import agegender.records
    from agegender.records import conversion, convert, labels, publish, shards, sources
    from agegender.records.runners import beam, local
    assert 'tensorflow' not in sys.modules, 'imported by the modules'
    assert 'apache_beam' not in sys.modules and 'kagglehub' not in sys.modules
    photo, face = open(sys.argv[1], 'rb').read(), open(sys.argv[2], 'rb').read()
    for entry, options in (
        (('40_1_0_20170101000000001.jpg', face), convert.ConvertOptions()),
        (('a/40-f.jpg', face),
         convert.ConvertOptions(name_pattern=r'(?P<age>\\d+)-(?P<gender>.)\\.jpg')),
        (('b.jpg', face, labels.Labels(40, -1, -1)), convert.ConvertOptions()),
        (('30_0_0_20170101000000002.jpg', photo), convert.ConvertOptions(find_faces=True))):
      result = convert.convert_in_worker(entry, options)
      assert isinstance(result, convert.Converted), result
    assert 'tensorflow' not in sys.modules, 'imported by the per-image work'
    print('ok')
''')


def test_the_modules_and_the_per_image_work_never_import_tensorflow(tmp_path):
  photo, face = tmp_path / 'photo.jpg', tmp_path / 'face.jpg'
  photo.write_bytes(folders.face_photo(0))
  face.write_bytes(next(synthetic.generate_synthetic(1, seed=4, image_size=48))[1])
  done = subprocess.run([sys.executable, '-c', _FRESH_PROCESS, str(photo), str(face)],
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  assert done.returncode == 0 and done.stdout.strip() == 'ok', done.stderr


# Evaluated in a pool worker (a function of this module would import it there, and with it
# TensorFlow): the conversion's result, and whether TensorFlow is loaded there.
_IN_WORKER = ("(__import__('os').getpid(), __import__('agegender.records.convert', fromlist=['_'])"
              ".convert_in_worker(entry, options), 'tensorflow' in __import__('sys').modules)")


def test_pool_workers_find_faces_and_take_table_labels_without_tensorflow():
  entry = ('photo.jpg', folders.face_photo(2), labels.Labels(30, 1, 2))
  options = convert.ConvertOptions(find_faces=True)
  with local.process_pool(2) as pool:
    pid, result, loaded = pool.submit(eval, _IN_WORKER, {'entry': entry,
                                                         'options': options}).result()
  assert pid != os.getpid() and not loaded
  assert isinstance(result, convert.Converted) and result.labels == labels.Labels(30, 1, 2)
