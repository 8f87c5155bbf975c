"""Settings as frozen dataclasses: each field's default, help and bounds written once.

A library stage takes one such dataclass (training's Config sections, the
conversion's ConvertConfig, evaluation's and prediction's settings); the
entry points derive their absl flags from the fields (`agegender.cli`), so a
flag's name, default and help are its field's. Nothing here imports absl.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from agegender import contract


def option(default: Any, help_text: str, choices: tuple[Any, ...] | None = None, *,
           lower: float | None = None, upper: float | None = None,
           above: float | None = None) -> Any:
  """A dataclass field with its flag's help, and the choices or bounds `check` enforces.

  lower/upper: inclusive bounds; above: an exclusive lower bound (0 for "positive").
  """
  metadata = {'help': help_text}
  for key, value in (('choices', choices), ('lower', lower), ('upper', upper),
                     ('above', above)):
    if value is not None:
      metadata[key] = tuple(value) if key == 'choices' else value
  if isinstance(default, (list, tuple)):
    return dataclasses.field(default_factory=lambda: tuple(default), metadata=metadata)
  return dataclasses.field(default=default, metadata=metadata)


def default_of(field: dataclasses.Field) -> Any:
  if field.default is not dataclasses.MISSING:
    return field.default
  return field.default_factory()


def check(settings: Any) -> None:
  """Raises contract.ArgumentError for a field outside its choices or bounds; the text starts
  with the field's name."""
  for field in dataclasses.fields(settings):
    value = getattr(settings, field.name)
    meta = field.metadata
    if value is None:
      continue
    if 'choices' in meta and value not in meta['choices']:
      raise contract.ArgumentError(
          field.name, f'{field.name} must be one of {", ".join(map(str, meta["choices"]))}, '
          f'got {value!r}')
    if 'above' in meta and not value > meta['above']:
      what = 'positive' if meta['above'] == 0 else f'above {meta["above"]}'
      raise contract.ArgumentError(field.name, f'{field.name} must be {what}, got {value}')
    if 'lower' in meta and value < meta['lower']:
      what = 'non-negative' if meta['lower'] == 0 else f'at least {meta["lower"]}'
      raise contract.ArgumentError(field.name, f'{field.name} must be {what}, got {value}')
    if 'upper' in meta and value > meta['upper']:
      raise contract.ArgumentError(field.name,
                                   f'{field.name} must be at most {meta["upper"]}, got {value}')
