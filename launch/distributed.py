"""Multi-host start-up: ``jax.distributed`` flags and the global mesh.

Importing this module defines the flags; call ``initialize()`` in ``main``
(after absl parsed them, before anything touches a jax backend)::

    # Process 0 and 1 of a two-process CPU job, 4 devices each:
    python -m launch.mesh_train --coordinator_address=localhost:12345 \
        --num_processes=2 --process_id=0 --local_device_count=4
    python -m launch.mesh_train --coordinator_address=localhost:12345 \
        --num_processes=2 --process_id=1 --local_device_count=4

On Cloud TPU no flag is needed: ``jax.distributed.initialize()`` finds the
other hosts itself. Without flags and off TPU this is a single process and
nothing is initialized. Then every process builds the same global mesh
(``global_mesh``) and loads only its rows of each batch
(``skipside.mesh.process_rows`` / ``global_batch``): ``skipside.data``
reads those rows of the one global order a single process would read, so
the job trains as one process with all the devices would, and
``launch.train`` prints one line per process naming them
(``skipside.data.describe_process``).
"""

import glob
import os

from absl import flags, logging

_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'host:port of process 0 (jax.distributed). Unset: single process, or '
    'auto-detected on Cloud TPU.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Number of processes in the job.')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process, 0 .. num_processes - 1.')
_LOCAL_DEVICE_COUNT = flags.DEFINE_integer(
    'local_device_count', None,
    'CPU only: simulated devices in this process (sets jax_num_cpu_devices, '
    'like JAX_NUM_CPU_DEVICES), for testing multi-host on one machine.')

_TPU_ENV = ('TPU_WORKER_HOSTNAMES', 'TPU_ACCELERATOR_TYPE', 'TPU_NAME',
            'CLOUD_TPU_TASK_ID')


def on_cloud_tpu() -> bool:
  """Whether this looks like a Cloud TPU VM (without starting a backend).

  TPU_* variables set by skipside's own compile-only planning
  (``skipside.tpu_plan.silence_libtpu`` marks them) do not count.
  """
  if glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'):
    return True
  if os.environ.get('SKIPSIDE_TPU_COMPILE_ONLY'):
    return False
  return any(os.environ.get(k) for k in _TPU_ENV)


def _flag(holder, value):
  if value is not None:
    return value
  return holder.value if flags.FLAGS.is_parsed() else None


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               local_device_count: int | None = None) -> bool:
  """Starts ``jax.distributed`` from the arguments or, if unset, the flags.

  Returns:
    Whether ``jax.distributed.initialize`` was called.
  """
  import jax  # noqa: PLC0415  (flags first; a backend must not start yet)

  count = _flag(_LOCAL_DEVICE_COUNT, local_device_count)
  if count:
    jax.config.update('jax_num_cpu_devices', int(count))
  address = _flag(_COORDINATOR, coordinator_address)
  num = _flag(_NUM_PROCESSES, num_processes)
  pid = _flag(_PROCESS_ID, process_id)
  if address or num is not None or pid is not None:
    if not (address and num is not None and pid is not None):
      raise ValueError(
          '--coordinator_address, --num_processes and --process_id go '
          f'together; got {address!r}, {num!r}, {pid!r}')
    jax.distributed.initialize(coordinator_address=address,
                               num_processes=int(num), process_id=int(pid))
  elif on_cloud_tpu():
    jax.distributed.initialize()  # Cloud TPU: the runtime knows the hosts.
  else:
    return False
  logging.info('jax.distributed: process %d of %d, %d of %d devices local',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def global_mesh(stage: int, data: int | None = None):
  """The ``('data', 'stage')`` mesh over every process's devices.

  ``data`` defaults to ``device_count // stage``. Devices are ordered by
  process, so on a ``data x stage`` mesh with ``stage`` equal to the local
  device count each process holds whole 'data' rows (and loads its own
  batch rows); otherwise the 'stage' axis spans processes.
  """
  import jax  # noqa: PLC0415

  from skipside import mesh as mesh_lib  # noqa: PLC0415

  total = jax.device_count()
  data = total // stage if data is None else data
  if data * stage != total:
    raise ValueError(f'mesh {data}x{stage} needs {data * stage} devices, the '
                     f'job has {total}')
  return mesh_lib.make_mesh(data, stage)
