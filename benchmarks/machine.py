"""The machine a benchmark ran on, in words, for its table and JSON."""

import os
import platform


def describe_cpu() -> str:
  """'<cores>-core CPU (<model name>)', the model from /proc/cpuinfo where there is one."""
  model = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return f'{os.cpu_count()}-core CPU ({model})'
