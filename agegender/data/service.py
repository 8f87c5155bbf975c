"""The tf.data service: the servers, and `distribute`, which moves a dataset's work onto the
service's workers (the command line is agegender.data_service).

  python -m agegender.data_service dispatcher --port=5050 [--work_dir=DIR]
  python -m agegender.data_service worker --dispatcher=HOST:5050 [--port=5051] [--host=HOST]
  python -m agegender.train --data_service=grpc://HOST:5050 ...

Each server runs until SIGINT or SIGTERM, then stops and says so. The
dispatcher hands the training split's shards to the workers one at a time
(dynamic sharding), so each record is read once per epoch whichever workers
are up. A worker lost mid-epoch takes the shards it was reading with it;
TensorFlow's client would wait for them forever, so a pass ends after
`timeout` seconds without a batch, with a warning, and the trainer logs how
many records the epoch missed. With --work_dir the dispatcher journals its
state: killed and restarted on the same port and work_dir, it resumes its
jobs and the trainer's pass finishes (tests/test_data_service.py states what
arrives).

The servers need the same agegender and TensorFlow as the trainer, and a
worker must read the records at the path the trainer gives (a shared
filesystem or a bucket). Trainers reach a worker at --host (the name the
worker gives the dispatcher), so on more than one machine set it to a name the
trainers can resolve.
"""

from __future__ import annotations

import queue
import signal
import socket
import threading

from absl import logging
import tensorflow as tf


COMMANDS = ('dispatcher', 'worker')
PROTOCOL = 'grpc'
# Without a heartbeat for this long, the dispatcher counts a worker as gone and
# its consumers stop waiting for it.
WORKER_TIMEOUT_MS = 10_000
# Which workers a trainer reads from: TensorFlow's values for target_workers.
TARGET_WORKERS = ('AUTO', 'ANY', 'LOCAL')


# ---------------------------------------------------------------------------
# Addresses and servers.

def parse_address(address: str) -> tuple[str, int]:
  """HOST:PORT (optionally grpc://HOST:PORT) to (host, port); ValueError when
  malformed or the host does not resolve."""
  bare = address.split('://', 1)[1] if '://' in address else address
  host, _, port = bare.rpartition(':')
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f'bad address {address!r}: expected HOST:PORT')
  try:
    socket.getaddrinfo(host.strip('[]'), int(port))
  except socket.gaierror:
    raise ValueError(f'bad address {address!r}: cannot resolve host {host!r}') from None
  return host, int(port)


def free_port() -> int:
  """A TCP port free on this host now, for a server whose address must be known
  before it starts (a worker) or kept across restarts (a dispatcher)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    probe.bind(('', 0))
    return probe.getsockname()[1]


def _check_port_free(port: int) -> None:
  # gRPC fails with a bare "Could not start gRPC server" and a C++ log line.
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    # As gRPC binds: the connections a killed server leaves in TIME_WAIT do not count.
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      probe.bind(('', port))
    except OSError as e:
      raise ValueError(f'cannot listen on port {port}: {e.strerror}') from None


def start_dispatcher(port: int = 0, work_dir: str | None = None,
                     worker_timeout_ms: int = WORKER_TIMEOUT_MS
                     ) -> tf.data.experimental.service.DispatchServer:
  """A started dispatcher; `.target` is its grpc:// address. With `work_dir`
  it journals its state there (fault-tolerant mode), so one restarted on the
  same port and work_dir resumes its jobs."""
  if port:
    _check_port_free(port)
  config = tf.data.experimental.service.DispatcherConfig(
      port=port, protocol=PROTOCOL, work_dir=work_dir, fault_tolerant_mode=bool(work_dir),
      worker_timeout_ms=worker_timeout_ms)
  return tf.data.experimental.service.DispatchServer(config)


def start_worker(dispatcher: str, port: int, host: str = 'localhost'
                 ) -> tf.data.experimental.service.WorkerServer:
  """A started worker serving at `host`:`port`, registered with `dispatcher`
  (HOST:PORT). The port is explicit because a worker does not tell its own."""
  dispatcher_host, dispatcher_port = parse_address(dispatcher)
  _check_port_free(port)
  config = tf.data.experimental.service.WorkerConfig(
      dispatcher_address=f'{dispatcher_host}:{dispatcher_port}', worker_address=f'{host}:{port}',
      port=port, protocol=PROTOCOL)
  return tf.data.experimental.service.WorkerServer(config)


def serve_until_signalled(server, name: str) -> None:
  """Blocks until SIGINT or SIGTERM, then stops `server`."""
  stop = threading.Event()
  for signal_number in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signal_number, lambda *_: stop.set())
  while not stop.wait(1.0):
    pass
  server.stop()
  print(f'{name} stopped', flush=True)


# ---------------------------------------------------------------------------
# The trainer's side.

def compression_for(element_spec) -> str | None:
  """The service's compression for elements of `element_spec`: 'AUTO' (snappy)
  when the largest component is floating point, None otherwise.

  Compressing costs the workers CPU and the trainer a decode per batch. For
  uint8 batches that never pays: one local worker reached 0.99x the local
  pipeline uncompressed, 0.82x compressed (benchmarks/data_service.py, 2-core
  machine). float32 batches are four times the bytes, so across a network
  TensorFlow's default, compressing, stays theirs (on loopback it cost them
  too: 0.52x against 0.64x).
  """
  def values_per_example(spec: tf.TensorSpec) -> int:
    count = 1
    for dimension in spec.shape[1:]:
      count *= dimension or 1
    return count

  largest = max(tf.nest.flatten(element_spec), key=values_per_example)
  return 'AUTO' if largest.dtype.is_floating else None


def distribute(dataset: tf.data.Dataset, address: str, *,
               timeout: float | None,
               job_name: str | None = None,
               compression: str | None = 'by_dtype',
               target_workers: str = 'AUTO') -> tf.data.Dataset:
  """The elements of `dataset`, produced by the service's workers.

  Everything in `dataset` (with its options) runs on the workers; this
  process only receives finished elements, so pass the batches, and prefetch
  after. The dispatcher at `address` (grpc://HOST:PORT) hands out the splits
  of `dataset`'s source (the shard list) one at a time to whichever worker
  asks (dynamic sharding): each element once per pass while the workers stay
  up, whatever their number.

  timeout: seconds without an element after which a pass ends with a logged
    warning (None: wait forever, TensorFlow's own behaviour, which hangs when
    a worker is lost mid-pass). Elements then pass through a thread here.
  job_name: trainers giving the same name share one job, each receiving part
    of every pass; by default each iteration is its own job.
  compression: 'AUTO', None, or 'by_dtype' for `compression_for`'s choice.
  target_workers: 'AUTO' or 'ANY' (any worker), or 'LOCAL' (only workers
    running in this process; then start one here with `start_worker`).
  """
  parse_address(address)
  if timeout is not None and timeout <= 0:
    raise ValueError(f'timeout must be positive or None, got {timeout}')
  if target_workers.upper() not in TARGET_WORKERS:
    raise ValueError(f'target_workers must be one of {", ".join(TARGET_WORKERS)}, '
                     f'got {target_workers!r}')
  if compression == 'by_dtype':
    compression = compression_for(dataset.element_spec)
  served = dataset.apply(tf.data.experimental.service.distribute(
      processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC,
      service=address, job_name=job_name, compression=compression,
      target_workers=target_workers))
  if timeout is not None:
    served = _ending_after_silence(served, timeout)
  return served.with_options(dataset.options())  # The workers' options hold here too.


def _ending_after_silence(dataset: tf.data.Dataset, timeout: float) -> tf.data.Dataset:
  """`dataset`, ended (with a warning) when no element comes for `timeout` seconds.

  The client logs "Lost worker ... due to timeout" and then waits forever for
  that worker's shards; this bounds the wait, so the pass ends with what the
  other workers delivered.
  """
  end = object()

  def elements():
    ready = queue.Queue(maxsize=2)
    stop = threading.Event()

    def receive():
      for element in dataset:
        while not stop.is_set():
          try:
            ready.put(element, timeout=1.0)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      ready.put(end)

    threading.Thread(target=receive, daemon=True, name='data_service_receive').start()
    try:
      while True:
        try:
          element = ready.get(timeout=timeout)
        except queue.Empty:
          logging.warning('no batch from the tf.data service for %.0f s: ending the pass '
                          'with what arrived (a worker lost?)', timeout)
          return
        if element is end:
          return
        yield element
    finally:
      stop.set()

  return tf.data.Dataset.from_generator(elements, output_signature=dataset.element_spec)
