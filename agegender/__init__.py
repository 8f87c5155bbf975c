"""agegender: age and gender from UTKFace face crops, streamed from TFRecords."""

import os
import sys
import tempfile

__version__ = '0.1.0'


def _import_tensorflow_quietly() -> None:
  """Imports TensorFlow without its C++ start-up lines on the user's terminal.

  TF_CPP_MIN_LOG_LEVEL hides TensorFlow's own INFO logs, but lines written
  before absl::InitializeLog (the oneDNN notice among them) ignore it, a known
  abseil bug. So stderr is caught while TensorFlow loads, and anything in it
  that is not one of those INFO lines is written back.
  """
  if 'tensorflow' in sys.modules or os.environ['TF_CPP_MIN_LOG_LEVEL'] == '0':
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode='w+b') as caught:
    os.dup2(caught.fileno(), 2)
    try:
      import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      pass  # Reported by whoever imports it next, with the message shown.
    finally:
      os.dup2(saved, 2)
      os.close(saved)
    caught.seek(0)
    for line in caught.read().decode('utf-8', 'replace').splitlines(keepends=True):
      if line.startswith(('I0000 ', 'WARNING: All log messages before absl::InitializeLog')):
        continue
      sys.stderr.write(line)


os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Only for the commands (`python -m agegender.X` sets argv[0] to '-m' while it
# imports this package; console scripts are named agegender-*; runpy launchers set
# agegender.X): a library user importing agegender.records should not pay for TensorFlow.
if sys.argv and (sys.argv[0] == '-m' or
                 os.path.basename(sys.argv[0]).startswith(('agegender-', 'agegender.'))):
  _import_tensorflow_quietly()


def __getattr__(name: str):
  """`agegender.Predictor`, the Python API, loaded on first use (it imports TensorFlow)."""
  if name == 'Predictor':
    from agegender.serving.predictor import Predictor  # pylint: disable=g-import-not-at-top  # `import agegender` stays light.
    return Predictor
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
