"""Faults of a training run, with real processes, files and disks: a failed
checkpoint save (a full disk, an unwritable checkpoint directory), Ctrl-C,
a rerun of a finished run, and the summary's compile figures."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from skipside import aot, checkpoints, train
from test_train import _launch, _tiny  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A run saves at 20 and 40; broken, its rerun saves every 60: 60 fails,
# 120 would be next.
EVERY, FAILS = 20, 60
RUN_FLAGS = ('--config.train.keep_checkpoints=10', '--config.train.log_every=1',
             '--config.train.eval_every=100000')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _run(workdir, data_dir, num_steps, every, timeout=300):
  cmd, env = _launch(workdir, data_dir, *RUN_FLAGS,
                     f'--config.train.num_steps={num_steps}',
                     f'--config.train.checkpoint_every={every}')
  t0 = time.time()
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)
  return proc, time.time() - t0


def _logged_steps(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l)['step'] for l in f if 'train/loss' in l]


def _fails_at_the_next_save(workdir, data_dir, break_it, cause):
  """Trains to step 40 (saves 20, 40), ``break_it(checkpoint directory)``,
  resumes towards 200: the save of 60 fails. Returns the seconds the rerun
  took and the steps it trained past 60."""
  proc, _ = _run(workdir, data_dir, num_steps=2 * EVERY, every=EVERY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ckpts = os.path.join(workdir, 'checkpoints')
  break_it(ckpts)
  proc, seconds = _run(workdir, data_dir, num_steps=200, every=FAILS)
  # EX_IOERR (launch/train.py); stderr ends in one line naming the
  # checkpoint and the cause, no traceback.
  assert proc.returncode == 74, proc.stderr[-3000:]
  line = proc.stderr.strip().splitlines()[-1]
  assert line.startswith('error: checkpoint save failed'), line
  path = os.path.join(os.path.abspath(workdir), 'checkpoints', str(FAILS))
  assert path in line and cause in line, proc.stderr[-3000:]
  # At once: long before the next save (and its log line) comes around.
  last = max(_logged_steps(workdir))
  assert FAILS <= last < 2 * FAILS, proc.stderr
  # The failed save left nothing; the ones before are intact.
  assert sorted(d for d in os.listdir(ckpts) if not d.startswith('.')) == [
      str(EVERY), str(2 * EVERY)]
  ckpt = checkpoints.Checkpointer(workdir, keep=10)
  try:
    for step in (EVERY, 2 * EVERY):
      got = ckpt.manager.restore(step)
      assert int(got.state['step']) == step and got.meta['step'] == step
      assert all(np.isfinite(np.asarray(p)).all()
                 for p in jax.tree.leaves(got.state['params']))
  finally:
    ckpt.close()
  return seconds, last - FAILS


@pytest.fixture
def small_disk(tmp_path):
  """``workdir`` whose ``checkpoints/`` is a 1 MB tmpfs; skips where
  mounting is not permitted."""
  workdir = tmp_path / 'run'
  mount = workdir / 'checkpoints'
  mount.mkdir(parents=True)
  proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs',
                         str(mount)], capture_output=True, text=True)
  if proc.returncode:
    pytest.skip(f'cannot mount a tmpfs here: {proc.stderr.strip()}')
  yield str(workdir)
  subprocess.run(['umount', '-l', str(mount)], check=True)


def _fill(directory, leave=16 << 10):
  """Fills the disk of ``directory`` up to ``leave`` bytes (less than a
  tiny checkpoint's 110 KB)."""
  st = os.statvfs(directory)
  with open(os.path.join(directory, '.ballast'), 'wb') as f:
    f.write(b'\0' * (st.f_bavail * st.f_frsize - leave))


def test_full_disk_is_reported_at_the_failing_save(small_disk, data_dir):
  seconds, past = _fails_at_the_next_save(small_disk, data_dir, _fill,
                                          'No space left on device')
  print(f'full disk: stopped {past} steps after the failed save, the rerun '
        f'took {seconds:.1f}s')


def test_after_a_failed_save_the_error_line_stays_the_last():
  """The launcher's last line names the failed save: a coroutine orbax
  left un-awaited, still referenced when the process ends, reports when
  the interpreter frees it at shutdown (it once printed a RuntimeWarning
  after the error line); the launcher's exit skips that shutdown."""
  script = (
      'from launch import errors\n'
      'async def write(): pass\n'
      'pending = write()  # An abandoned write, alive to the end.\n'
      "errors.exit_now('error: checkpoint save failed', 74)\n")
  proc = subprocess.run([sys.executable, '-c', script], capture_output=True,
                        text=True, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 74, proc.stderr[-3000:]
  assert 'never awaited' not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: checkpoint save failed')


@pytest.fixture
def unwritable():
  """``make(path)`` makes a directory unwritable, even for root
  (``chattr +i``); undone at teardown."""
  made = []

  def make(path):
    if os.geteuid() == 0:
      if not shutil.which('chattr') or subprocess.run(
          ['chattr', '+i', path], capture_output=True).returncode:
        pytest.skip(f'cannot make {path} immutable (chattr +i) as root')
    else:
      os.chmod(path, 0o555)
    made.append(path)

  yield make
  for path in made:
    if os.geteuid() == 0:
      subprocess.run(['chattr', '-i', path], check=True)
    else:
      os.chmod(path, 0o755)


def test_unwritable_checkpoint_directory_is_reported_at_the_failing_save(
    tmp_path, data_dir, unwritable):
  cause = ('Operation not permitted' if os.geteuid() == 0
           else 'Permission denied')
  seconds, past = _fails_at_the_next_save(str(tmp_path / 'run'), data_dir,
                                          unwritable, cause)
  assert past == 0  # Told before orbax starts.
  print(f'unwritable: the rerun took {seconds:.1f}s')


def test_ctrl_c_twice_aborts_at_once():
  """The first Ctrl-C asks for a save at the next step boundary; a second
  one (real SIGINTs to this process) raises KeyboardInterrupt at once; the
  handler before (Python's, or SIG_IGN in a background job) is restored."""
  before = signal.getsignal(signal.SIGINT)
  with train._Preemption().installed() as preemption:  # pylint: disable=protected-access
    os.kill(os.getpid(), signal.SIGINT)
    assert preemption.requested == 'SIGINT'
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)  # Python runs the handler between bytecodes.
  assert signal.getsignal(signal.SIGINT) is before


def test_rerun_of_a_finished_run_reports_its_final_metrics(tmp_path, data_dir,
                                                           capsys):
  workdir = str(tmp_path / 'run')
  first = train.train_and_evaluate(_tiny(data_dir), workdir)
  events = sorted(f for f in os.listdir(workdir) if 'tfevents' in f)
  # What a run killed while saving leaves: removed when it runs again.
  partial = os.path.join(workdir, 'checkpoints', '8.orbax-checkpoint-tmp')
  os.makedirs(os.path.join(partial, 'state'))
  capsys.readouterr()
  again = train.train_and_evaluate(_tiny(data_dir), workdir)
  assert not os.path.exists(partial)
  out = capsys.readouterr().out
  assert again['step'] == again['start_step'] == first['step'] == 6
  for key in ('train/loss', 'eval/accuracy', 'eval/loss'):
    assert again[key] == pytest.approx(first[key]), key
  assert 'metrics.jsonl' in out  # Says where the figures come from.
  # No empty TensorBoard file added, and the metric files are unchanged.
  assert sorted(f for f in os.listdir(workdir) if 'tfevents' in f) == events
  assert all(os.path.getsize(os.path.join(workdir, f)) > 0 for f in events)


def test_summary_reports_compile_time_and_no_recompilations(tmp_path,
                                                            data_dir):
  """The loop compiles its train step and evaluation at first use: their
  compile time is ``compile_s``; nothing is compiled twice."""
  jax.clear_caches()  # Compiled afresh, whichever test ran before.
  with aot.CompileClock() as compiles:  # Every XLA compile.
    summary = train.train_and_evaluate(_tiny(data_dir), str(tmp_path / 'run'))
  assert summary['compilations_in_loop'] == 0
  assert summary['compile_s'] >= compiles.backend_seconds > 0


def test_compile_clock_counts_a_recompilation():
  f = jax.jit(lambda x: x * 2 + 1)
  with aot.CompileClock() as clock:
    f(np.zeros(3, np.float32))
    f(np.ones(3, np.float32))  # Cached: no compile.
    assert clock.recompilations == 0 and clock.seconds > 0
    f(np.zeros(4, np.float32))  # Another shape: compiled again.
  assert clock.recompilations == 1


def test_nonfinite_loss_between_boundaries_is_found_and_nothing_saved_after(
    tmp_path, data_dir):
  """The loop counts non-finite losses on the device and reads the count
  only at its boundaries (log, checkpoint, evaluation): a loss that blows up
  between them still stops the run at the next boundary, naming the first
  bad step, before anything is saved; 'skip' counts every skipped step."""
  c = _tiny(data_dir, **{'optimizer.name': 'sgd',
                         'optimizer.schedule': 'constant',
                         'optimizer.learning_rate': 1e36,
                         'optimizer.grad_clip_norm': 0.0,
                         'train.log_every': 4, 'train.checkpoint_every': 4,
                         'train.eval_every': 6, 'train.num_steps': 6})
  with pytest.raises(train.NonFiniteLossError,
                     match=r'non-finite loss at step [23]\b') as e:
    train.train_and_evaluate(c, str(tmp_path / 'stop'))
  first = int(str(e.value).split('at step ')[1].split(';')[0])
  assert not os.path.exists(tmp_path / 'stop' / 'checkpoints' / '4')
  c.train.on_nonfinite = 'skip'
  summary = train.train_and_evaluate(c, str(tmp_path / 'skip'))
  # Every update is dropped from the first bad step on (the same step: same
  # seed and data): the params stay at their exploded values, so every later
  # loss is non-finite too.
  assert summary['step'] == 6
  assert summary['skipped_steps'] == 6 - first + 1
