"""The tf.data service's servers: `python -m agegender.data_service dispatcher|worker`.

  python -m agegender.data_service dispatcher --port=5050 [--work_dir=DIR]
  python -m agegender.data_service worker --dispatcher=HOST:5050 [--port=5051] [--host=HOST]
  python -m agegender.train --data_service=grpc://HOST:5050 ...

Each server runs until SIGINT or SIGTERM, then stops and says so; see
agegender.data.service for what the dispatcher and workers do.
"""

from __future__ import annotations

from absl import flags

from agegender import cli
from agegender.data import service
from agegender.data.service import free_port
from agegender.data.service import parse_address
from agegender.data.service import serve_until_signalled
from agegender.data.service import start_dispatcher
from agegender.data.service import start_worker

COMMANDS = service.COMMANDS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  own = {'flag_values': flag_values}
  flags.DEFINE_integer('port', 0, 'Port to listen on (0: a free port).', **own)
  flags.DEFINE_string('work_dir', None, 'Dispatcher: where to keep its fault-tolerant journal.',
                      **own)
  flags.DEFINE_string('dispatcher', None, 'Worker: the dispatcher, HOST:PORT.', **own)
  flags.DEFINE_string('host', 'localhost',
                      'Worker: the name trainers use to reach this worker.', **own)
  flags.DEFINE_integer('worker_timeout_ms', service.WORKER_TIMEOUT_MS,
                       'Dispatcher: milliseconds without a heartbeat before a worker is '
                       'counted as gone.', **own)


def main(argv: list[str]) -> int:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise cli.UsageError(f'expected one command, {" or ".join(COMMANDS)}; '
                         f'got {" ".join(argv[1:]) or "none"}')
  values = flags.FLAGS
  if values.port < 0 or values.port > 65535:
    raise cli.UsageError(f'--port must be in 0..65535, got {values.port}')
  if argv[1] == 'dispatcher':
    if values.dispatcher:
      raise cli.UsageError('--dispatcher is a worker flag')
    try:
      server = start_dispatcher(values.port, values.work_dir, values.worker_timeout_ms)
    except ValueError as e:
      raise cli.UsageError(str(e)) from None
    print(f'dispatcher serving at {server.target}', flush=True)
  else:
    if not values.dispatcher:
      raise cli.UsageError('worker needs --dispatcher=HOST:PORT')
    try:
      parse_address(values.dispatcher)
    except ValueError as e:
      raise cli.UsageError(f'--dispatcher: {e}') from None
    port = values.port or free_port()
    try:
      server = start_worker(values.dispatcher, port, values.host)
    except ValueError as e:
      raise cli.UsageError(str(e)) from None
    print(f'worker serving at {values.host}:{port} for dispatcher {values.dispatcher}',
          flush=True)
  serve_until_signalled(server, argv[1])
  return 0


def console_main():
  define_flags()
  cli.run(main)


if __name__ == '__main__':
  console_main()
