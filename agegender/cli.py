"""What every `python -m agegender.*` entry point shares: flags derived from settings, one-line
errors.

Flags: `define_flags(Settings)` defines one absl flag per dataclass field
(agegender.options: its name, default, help, choices and bounds), and
`from_flags(Settings)` builds the dataclass from them. Library code never
sees a flag.

Errors: bad input ends with `<program>: error: <reason>` on stderr and exit
status 2, never a traceback. The stages raise contract.ArgumentError (a field,
a message, an optional hint) or contract.RecordsError; `run` turns them into
that line, writing the field as its flag through the entry point's table of
fields that are spelt otherwise (most flags are their field's name).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable, Mapping, Sequence

from absl import app
from absl import flags

from agegender import contract
from agegender import options


# Flags defined through define_flags belong to the entry point that calls it (its --helpfull).
flags.disclaim_key_flags()


class UsageError(Exception):
  """A bad flag, path or input that the user can fix; str() says how."""


# ImportError: an optional extra that is not installed; its message says how to install it.
KNOWN_ERRORS = (UsageError, FileNotFoundError, ImportError)


# ---- Flags from settings dataclasses. ----

def define_flags(*settings: type, flag_values: flags.FlagValues = flags.FLAGS,
                 defaults: Mapping[str, Any] | None = None) -> None:
  """One flag per field of each dataclass; `defaults` overrides the field's default as the
  flag's (for a script whose default differs, said in its help)."""
  defaults = defaults or {}
  for cls in settings:
    for field in dataclasses.fields(cls):
      _define(field, defaults.get(field.name, options.default_of(field)), flag_values)


def _define(field: dataclasses.Field, default: Any, flag_values: flags.FlagValues) -> None:
  meta = field.metadata
  own = {'flag_values': flag_values}
  bounds = {key: meta[name] for key, name in (('lower_bound', 'lower'), ('upper_bound', 'upper'))
            if name in meta}
  kind = field.type if isinstance(field.type, str) else getattr(field.type, '__name__', '')
  if 'choices' in meta and all(isinstance(choice, str) for choice in meta['choices']):
    flags.DEFINE_enum(field.name, default, list(meta['choices']), meta['help'], **own)
  elif kind.startswith('bool'):
    flags.DEFINE_bool(field.name, default, meta['help'], **own)
  elif kind.startswith('int'):
    flags.DEFINE_integer(field.name, default, meta['help'], **bounds, **own)
  elif kind.startswith('float'):
    flags.DEFINE_float(field.name, default, meta['help'], **bounds, **own)
  elif kind.startswith('tuple'):
    flags.DEFINE_list(field.name, [str(value) for value in default or ()], meta['help'], **own)
  else:
    flags.DEFINE_string(field.name, default, meta['help'], **own)


def flag_values_of(cls: type, flag_values: flags.FlagValues = flags.FLAGS,
                   present_only: bool = False) -> dict[str, Any]:
  """The fields' values from the flags (only those given on the command line, with
  present_only), list flags as tuples of the field's item type."""
  values = {}
  for field in dataclasses.fields(cls):
    if field.name not in flag_values or (present_only and not flag_values[field.name].present):
      continue
    value = flag_values[field.name].value
    if isinstance(value, list):
      item = float if 'float' in str(field.type) else int
      try:
        value = tuple(item(part) for part in value)
      except ValueError:
        raise UsageError(f'--{field.name} needs numbers separated by commas, '
                         f'got {",".join(value)}') from None
    values[field.name] = value
  return values


def from_flags(cls: type, flag_values: flags.FlagValues = flags.FLAGS):
  """The dataclass from its flags."""
  return cls(**flag_values_of(cls, flag_values))


# ---- Errors. ----

def usage_error(error: contract.ArgumentError,
                spelling: Mapping[str, str] | None = None) -> UsageError:
  """The error in the command line's words: its field (and the hint's) as flags."""
  spelling = spelling or {}

  def spell(field: str) -> str:
    return spelling.get(field, f'--{field}')

  message, fix = str(error), error.fix(spell)
  if message.startswith((f'{error.field} ', f'{error.field}=')):  # Names the field: say the flag.
    message = spell(error.field) + message[len(error.field):]
  elif fix is None and not isinstance(error, contract.RecordsError):
    fix = f'check {spell(error.field)}'
  return UsageError(f'{message} ({fix})' if fix else message)


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
        spelling: Mapping[str, str] | None = None) -> None:
  """absl's app.run, with known errors printed as one line and exit status 2.

  spelling: the entry point's table of fields whose flag is not `--<field>`.
  """

  def guarded(argv):
    try:
      return main(argv)
    except contract.ArgumentError as e:
      fail(str(usage_error(e, spelling)))
    except KNOWN_ERRORS as e:
      fail(str(e))
    except KeyboardInterrupt:
      fail('interrupted', status=130)

  app.run(guarded, flags_parser=_parse_flags)


def no_arguments(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
