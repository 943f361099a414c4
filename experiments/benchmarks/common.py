"""What every benchmark writes: the device it ran on and its JSON result."""

import json
import os
import platform

import jax


def device_info(**extra) -> dict:
  """The device and host a benchmark measured on (DESIGN.md §8)."""
  dev = jax.devices()[0]
  return {'platform': dev.platform, 'kind': dev.device_kind,
          'count': jax.device_count(), 'host_cpus': os.cpu_count(),
          'machine': platform.machine(), 'jax': jax.__version__, **extra}


def write_result(path: str, result: dict) -> None:
  """Writes ``result`` (config, device, rows, headline) as JSON to ``path``."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + '.tmp', 'w') as f:  # A crash leaves the old file whole.
    json.dump(result, f, indent=2)
  os.replace(path + '.tmp', path)
  print(f'wrote {path}')
