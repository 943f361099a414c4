"""Simulated CPU devices for the mesh benchmarks (no jax import here).

XLA reads its flags when jax first starts a backend, so a benchmark calls
``simulate`` at the top of its module, before it imports jax::

    from experiments.benchmarks import host_devices
    host_devices.simulate(8)
    import jax  # noqa: E402
"""

import os

_FLAG = '--xla_force_host_platform_device_count'


def simulate(count: int = 8) -> None:
  """Asks XLA:CPU for ``count`` devices on the CPU platform, unless
  ``XLA_FLAGS`` already sets a device count (the tests' conftest does)."""
  flags = os.environ.get('XLA_FLAGS', '')
  if _FLAG not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {_FLAG}={count}'.strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
