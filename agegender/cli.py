"""What every `python -m agegender.*` entry point shares: one-line errors.

Bad input ends with `<program>: error: <reason>` on stderr and exit status 2,
never a traceback. Library code raises ValueError or contract.RecordsError
with text that names no flag; each entry point turns what it can name into a
UsageError (naming its flag), and `run` turns those into an exit.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

from absl import app
from absl import flags

from agegender import contract


class UsageError(Exception):
  """A bad flag, path or input that the user can fix; str() says how."""


KNOWN_ERRORS = (UsageError, contract.RecordsError)


def _program() -> str:
  main_module = sys.modules.get('__main__')
  spec = getattr(main_module, '__spec__', None)
  if spec is not None and spec.name:
    return spec.name
  return os.path.basename(sys.argv[0])


def fail(message: str, status: int = 2) -> None:
  print(f'{_program()}: error: {message}', file=sys.stderr)
  sys.exit(status)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e))
  return []  # Unreachable.


def run(main: Callable[[list[str]], int | None],
        extra_errors: tuple[type[BaseException], ...] = ()) -> None:
  """absl's app.run, with known errors printed as one line and exit status 2."""
  errors = KNOWN_ERRORS + tuple(extra_errors)

  def guarded(argv):
    try:
      return main(argv)
    except errors as e:  # pylint: disable=catching-non-exception
      fail(str(e))
    except KeyboardInterrupt:
      fail('interrupted', status=130)

  app.run(guarded, flags_parser=_parse_flags)
