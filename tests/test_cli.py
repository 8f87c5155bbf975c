"""cli.run: known errors become one line and exit status 2."""

import pytest

from agegender import cli
from agegender import contract


def _run(main, capsys):
  with pytest.raises(SystemExit) as exited:
    cli.run(main)
  return exited.value.code, capsys.readouterr().err


@pytest.fixture(autouse=True)
def _no_arguments(monkeypatch):
  monkeypatch.setattr('sys.argv', ['agegender-test'])


@pytest.mark.parametrize('error', [cli.UsageError('bad flag'), contract.RecordsError('bad flag')])
def test_known_errors_are_one_line_and_exit_2(error, capsys):
  def main(argv):
    raise error
  status, err = _run(main, capsys)
  assert status == 2
  assert err.endswith('error: bad flag\n') and err.count('\n') == 1


def test_other_errors_keep_their_traceback(capsys):
  def main(argv):
    raise RuntimeError('a bug')
  with pytest.raises(RuntimeError, match='a bug'):
    cli.run(main)
