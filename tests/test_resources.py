"""A run that fails inside its loop leaves no thread running, no file open.

``train.train_and_evaluate`` opens loader threads (grain's read threads or
the multigrid loader's pools), orbax's checkpointer, the metric writers
(``metrics.jsonl``, TensorBoard's event file) and the progress bar; whatever
ends the run must close them all (its ``ExitStack``). Here the failure is
real, nothing in the trainer is mocked: a dataset registered by name
(``sources.register``) whose training records start raising after a few
steps have trained, checkpointed and logged (the grain pipeline on one
device; multigrid's loader), and a loss that becomes NaN under
``train.on_nonfinite='stop'`` (on a 1 x 2 mesh). Each failing run is
compared with the threads and file descriptors (``/proc/self/fd``) that
existed just before it; one passing run goes first, so that process-wide
pools (XLA's, orbax's, grain's) already exist and are not counted as a
run's own.

The exception is held while the run is checked (as its caller, pytest or a
notebook's ``sys.last_value`` holds it): its traceback keeps the run's
frames alive, so nothing may rely on garbage collection to be closed (the
training source's record files once did).
"""

import gc
import os
import threading
import time

import pytest

from experiments.configs import default
from experiments.configs import multigrid as mg_config
from skipside import train
from skipside.data import moving_digits
from skipside.data import sources

_FAILING = 'skipside_tests_failing_reads'
_reads = {'limit': None, 'count': 0}
_reads_lock = threading.Lock()


class InjectedReadError(RuntimeError):
  """What the failing dataset raises: any exception a reader may raise."""


def _open_failing(config, split):
  """MovingDigits whose training reads raise once ``_reads['limit']`` clips
  were read (evaluation's reads never fail)."""
  source = moving_digits.make_source(config, split)
  base = source.read

  def read(record, select):
    if split == 'train':
      with _reads_lock:
        _reads['count'] += 1
        failing = (_reads['limit'] is not None
                   and _reads['count'] > _reads['limit'])
      if failing:
        raise InjectedReadError(f'read {_reads["count"]} failed on purpose')
    return base(record, select)

  # A reader that is not read_array: clips are read in the loader's threads
  # every time (no in-memory copy), so the failure reaches the loop.
  source.read, source.key = read, None
  return source


if _FAILING not in sources.names():
  sources.register(_FAILING)(_open_failing)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _fds() -> dict[str, str]:
  """This process's open descriptors -> what they point at."""
  out = {}
  for fd in os.listdir('/proc/self/fd'):
    try:
      out[fd] = os.readlink(f'/proc/self/fd/{fd}')
    except OSError:  # The listing's own descriptor, closed already.
      pass
  return out


def _threads() -> set[threading.Thread]:
  return {t for t in threading.enumerate() if t.is_alive()}


def _left(threads_before, fds_before, timeout=10.0):
  """Threads started and descriptors opened since the ``_before``s that
  are still there after up to ``timeout`` seconds (a stopping thread may
  take a moment to exit): ``(thread names, [(fd, target)])``."""
  deadline = time.time() + timeout
  before = set(fds_before.items())
  while True:
    threads = [t for t in _threads() - threads_before if t.is_alive()]
    fds = sorted(kv for kv in _fds().items() if kv not in before)
    if (not threads and not fds) or time.time() > deadline:
      return ([f'{t.name} ({type(t).__module__}.{type(t).__name__})'
               for t in threads], fds)
    for t in threads:
      t.join(0.1)
    time.sleep(0.05)


def _tiny(data_dir, **overrides):
  c = default.get_config('tiny')
  c.data.data_dir = data_dir
  c.data.dataset = _FAILING
  c.data.prefetch = 4
  c.train.num_steps = 8
  c.update_from_flattened_dict(overrides)  # Dotted keys: 'train.num_steps'.
  return c


def _grain(data_dir):
  """The tiny run (grain pipeline, one device); reads fail in step ~5, after
  a checkpoint (step 2), logged metrics and an evaluation (step 3)."""
  c = _tiny(data_dir)
  return c, InjectedReadError, 4 * 5


def _multigrid(data_dir):
  """Multigrid's loader (its own thread pools; every shape compiled ahead),
  short cycles (batches 16, 8, 4, 16, 8, ...): reads fail in step ~5, after
  the checkpoint and metrics of steps 2 and 4."""
  c = mg_config.get_config('tiny,bp,short')
  c.data.data_dir = data_dir
  c.data.dataset = _FAILING
  c.train.log_every = c.train.checkpoint_every = 2
  return c, InjectedReadError, 16 + 8 + 4 + 16 + 8


def _mesh_nan(data_dir):
  """A ('data', 'stage') = (1, 2) mesh run whose loss turns NaN at step 2
  (sgd at rate 1e36) under on_nonfinite='stop': NonFiniteLossError after
  the checkpoint and metrics of step 1."""
  c = _tiny(data_dir, **{'mesh.stage': 2, 'train.log_every': 1,
                         'train.checkpoint_every': 1})
  c.optimizer.name = 'sgd'
  c.optimizer.learning_rate, c.optimizer.grad_clip_norm = 1e36, 0.0
  assert c.train.on_nonfinite == 'stop'
  return c, train.NonFiniteLossError, None


@pytest.fixture(scope='module')
def warmed_up(tmp_path_factory, data_dir):
  """A passing run first: the process-wide pools (XLA's, orbax's, grain's)
  it starts are there before any run is measured."""
  _reads['limit'], _reads['count'] = None, 0
  train.train_and_evaluate(_tiny(data_dir),
                           str(tmp_path_factory.mktemp('warmup')))


@pytest.fixture(scope='module', params=[_grain, _multigrid, _mesh_nan],
                ids=['grain', 'multigrid', 'mesh_nonfinite'])
def failed_run(request, tmp_path_factory, data_dir, warmed_up):
  """What a failing run left behind, with the exception still held (as a caller, pytest or a
  notebook's ``sys.last_value`` holds it) and after it was dropped."""
  del warmed_up
  config, failure, limit = request.param(data_dir)
  tmp = tmp_path_factory.mktemp(request.param.__name__.strip('_'))
  threads_before, fds_before = _threads(), _fds()
  _reads['limit'], _reads['count'] = limit, 0
  try:
    with pytest.raises(failure) as raised:
      train.train_and_evaluate(config, str(tmp / 'run'))
  finally:
    _reads['limit'] = None
  held = _left(threads_before, fds_before)
  del raised  # The frames of the traceback: the run's locals.
  gc.collect()
  dropped = _left(threads_before, fds_before)
  return {'workdir': str(tmp / 'run'),
          'held': held, 'dropped': dropped}


def test_the_failure_came_inside_the_loop(failed_run):
  """After the loop had checkpointed and logged (files opened and
  threads started that must be closed)."""
  workdir = failed_run['workdir']
  assert os.listdir(os.path.join(workdir, 'checkpoints'))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert 'train/loss' in f.read()
  assert any(name.startswith('events.out.tfevents')
             for name in os.listdir(workdir))


def test_every_thread_the_run_started_has_stopped(failed_run):
  threads, _ = failed_run['held']
  assert not threads, f'threads still running after the failed run: {threads}'


def test_every_file_the_run_opened_is_closed(failed_run):
  """The checkpointer's, the metric writers', the loaders' and the data
  sources' files, while the exception is still held, and once it is
  dropped."""
  _, fds = failed_run['held']
  assert not fds, f'descriptors still open after the failed run: {fds}'
  _, fds = failed_run['dropped']
  assert not fds, f'descriptors open after the exception was dropped: {fds}'
