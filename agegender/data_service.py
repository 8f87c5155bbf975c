"""The tf.data service's servers: a dispatcher and CPU workers that run the
training input pipeline away from the trainer and stream it batches.

  python -m agegender.data_service dispatcher --port=5050 [--work_dir=DIR]
  python -m agegender.data_service worker --dispatcher=HOST:5050 [--port=5051]
  python -m agegender.train --data_service=grpc://HOST:5050 ...

Each server runs until SIGINT or SIGTERM, then stops and says so. The
dispatcher hands the training split's shards to the workers one at a time
(dynamic sharding), so each record is read once per epoch whichever workers
are up; a worker that stops mid-epoch loses only the shards it was reading,
and the trainer logs how many records the epoch missed. --work_dir keeps the
dispatcher's journal, so a restarted dispatcher resumes its jobs.

The servers need the same agegender and TensorFlow as the trainer, and a
worker must read --records_dir at the path the trainer gives (a shared
filesystem or a bucket).
"""

from __future__ import annotations

import signal
import socket
import threading

from absl import flags

from agegender import cli

COMMANDS = ('dispatcher', 'worker')
PROTOCOL = 'grpc'
# Without a heartbeat for this long, the dispatcher counts a worker as gone and
# its consumers stop waiting for it.
WORKER_TIMEOUT_MS = 10_000


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  own = {'flag_values': flag_values}
  flags.DEFINE_integer('port', 0, 'Port to listen on (worker default: any free port).', **own)
  flags.DEFINE_string('work_dir', None, 'Dispatcher: where to keep its fault-tolerant journal.',
                      **own)
  flags.DEFINE_string('dispatcher', None, 'Worker: the dispatcher, HOST:PORT.', **own)
  flags.DEFINE_integer('worker_timeout_ms', WORKER_TIMEOUT_MS,
                       'Dispatcher: milliseconds without a heartbeat before a worker is '
                       'counted as gone.', **own)


def parse_address(address: str) -> tuple[str, int]:
  """HOST:PORT (optionally grpc://HOST:PORT) to (host, port); UsageError when malformed."""
  bare = address.split('://', 1)[1] if '://' in address else address
  host, _, port = bare.rpartition(':')
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise cli.UsageError(f'bad address {address!r}: expected HOST:PORT')
  try:
    socket.getaddrinfo(host.strip('[]'), int(port))
  except socket.gaierror:
    raise cli.UsageError(f'bad address {address!r}: cannot resolve host {host!r}') from None
  return host, int(port)


def service_address(address: str) -> str:
  """The address as tf.data's distribute() takes it: grpc://HOST:PORT."""
  host, port = parse_address(address)
  return f'{PROTOCOL}://{host}:{port}'


def _check_port_free(port: int) -> None:
  # gRPC fails with a bare "Could not start gRPC server" and a C++ log line.
  if not port:
    return
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    try:
      probe.bind(('', port))
    except OSError as e:
      raise cli.UsageError(f'cannot listen on port {port}: {e.strerror}') from None


def start_dispatcher(port: int = 0, work_dir: str | None = None,
                     worker_timeout_ms: int = WORKER_TIMEOUT_MS):
  """A started tf.data service dispatcher; `.target` is its grpc:// address."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  _check_port_free(port)
  config = tf.data.experimental.service.DispatcherConfig(
      port=port, protocol=PROTOCOL, work_dir=work_dir, fault_tolerant_mode=bool(work_dir),
      worker_timeout_ms=worker_timeout_ms)
  return tf.data.experimental.service.DispatchServer(config)


def start_worker(dispatcher: str, port: int = 0):
  """A started tf.data service worker registered with `dispatcher` (HOST:PORT)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  host, dispatcher_port = parse_address(dispatcher)
  _check_port_free(port)
  config = tf.data.experimental.service.WorkerConfig(
      dispatcher_address=f'{host}:{dispatcher_port}', port=port, protocol=PROTOCOL)
  return tf.data.experimental.service.WorkerServer(config)


def serve_until_signalled(server, name: str) -> None:
  """Blocks until SIGINT or SIGTERM, then stops `server`."""
  stop = threading.Event()
  for signal_number in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signal_number, lambda *_: stop.set())
  while not stop.wait(1.0):
    pass
  server._stop()  # pylint: disable=protected-access  # The servers' only way to stop.
  print(f'{name} stopped', flush=True)


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise cli.UsageError(f'expected one command, {" or ".join(COMMANDS)}; '
                         f'got {" ".join(argv[1:]) or "none"}')
  values = flags.FLAGS
  if values.port < 0 or values.port > 65535:
    raise cli.UsageError(f'--port must be in 0..65535, got {values.port}')
  if argv[1] == 'dispatcher':
    if values.dispatcher:
      raise cli.UsageError('--dispatcher is a worker flag')
    server = start_dispatcher(values.port, values.work_dir, values.worker_timeout_ms)
    print(f'dispatcher serving at {server.target}', flush=True)
  else:
    if not values.dispatcher:
      raise cli.UsageError('worker needs --dispatcher=HOST:PORT')
    server = start_worker(values.dispatcher, values.port)
    address = server._address  # pylint: disable=protected-access
    print(f'worker serving at {address} for dispatcher {values.dispatcher}', flush=True)
  serve_until_signalled(server, argv[1])
  return 0


def console_main():
  define_flags()
  cli.run(main)


if __name__ == '__main__':
  console_main()
