"""Real multi-process training: 2 local processes on CPU devices (gloo).

The processes are started through the project's launchers with the flags
of ``launch/distributed.py``: ``launch/mesh_train.py`` (2 x 4 devices, a
synthetic batch; process 0 writes its final params, which must equal one
process with 8 devices) and ``launch/train.py`` (2 x 2 devices, the tiny
config end to end; its checkpoint and metrics must equal one process with
4 devices, the data read included).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from launch import mesh_train
from skipside import mesh, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, BATCH, FRAMES = 3, 8, 8  # 8 frames: split over the stage devices (mesh.time_sharded).


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _wait_all(procs, timeout: int, what: str, code: int = 0) -> list[str]:
  """Each process's output; fails the test if one times out or exits with
  another code than ``code``."""
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail(f'{what} timed out')
  for pid, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == code, (
        f'process {pid} exited with {p.returncode}, not {code}:\n'
        f'{(log or "")[-3000:]}')
  return logs


def _platform_reason() -> str | None:
  if jax.default_backend() != 'cpu':
    return 'needs the CPU backend (simulated devices)'
  if jax.device_count() < 8:
    return 'needs 8 simulated CPU devices in the test process'
  try:
    with socket.socket() as s:
      s.bind(('localhost', 0))
  except OSError as e:  # No localhost networking: no coordinator.
    return f'no localhost sockets: {e}'
  return None


@pytest.mark.skipif(_platform_reason() is not None,
                    reason=str(_platform_reason()))
@pytest.mark.parametrize('data,stage', [(2, 4), (1, 8)])
def test_two_processes_match_one(tmp_path, data, stage):
  """2x4: each process holds a 'data' row (psum crosses processes);
  1x8: the 'stage' axis spans both processes (ppermute crosses them)."""
  out = tmp_path / 'params.npz'
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)  # The test process forces 8 devices; not them.
  env.pop('JAX_NUM_CPU_DEVICES', None)
  procs = []
  for pid in range(2):
    cmd = [sys.executable, '-m', 'launch.mesh_train',
           f'--coordinator_address=localhost:{port}', '--num_processes=2',
           f'--process_id={pid}', '--local_device_count=4',
           f'--data={data}', f'--stage={stage}', f'--steps={STEPS}',
           f'--batch={BATCH}', f'--frames={FRAMES}', '--mode=sideways']
    if pid == 0:
      cmd.append(f'--out={out}')
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  logs = _wait_all(procs, 240, 'multi-process run')
  for pid, log in enumerate(logs):
    assert f'process {pid}/2' in log

  got = dict(np.load(out))
  ref = mesh_train.flatten(mesh_train.train(
      mesh.make_mesh(data, stage), steps=STEPS, mode='sideways',
      batch=BATCH, frames=FRAMES))
  assert sorted(got) == sorted(ref)
  for k in ref:
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6,
                               err_msg=k)
  init = mesh_train.flatten(mesh_train.train(
      mesh.make_mesh(data, stage), steps=0, mode='sideways', batch=BATCH,
      frames=FRAMES))
  # (Short fresh Sideways clips leave the bottom stages untouched: their
  # messages land after 2L-2 ticks. The head and top stages must move.)
  assert not np.allclose(got['head/fc/kernel'], init['head/fc/kernel'])


def _launch_train(workdir, data_dir, mesh_flags, *flags):
  return [sys.executable, '-m', 'launch.train',
          '--config=experiments/configs/default.py:tiny',
          f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
          *mesh_flags, *flags]


def _checkpoint_state(workdir, like=None):
  """(step, state) of the latest checkpoint in ``workdir``, restored onto
  this process's first device (a 2-process run saved device ids this
  process does not have: ``like`` gives the tree to restore into)."""
  import orbax.checkpoint as ocp  # noqa: PLC0415
  abstract = None if like is None else jax.tree.map(
      ocp.utils.to_shape_dtype_struct, jax.device_put(like, jax.devices()[0]))
  mngr = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  step = mngr.latest_step()
  got = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))
  mngr.close()
  return step, got.state


def _subprocess_env() -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)  # The test process forces 8 devices; not them.
  env.pop('JAX_NUM_CPU_DEVICES', None)
  return env


def _summary(log: str) -> dict:
  return json.loads(log.split('Summary: ')[-1].splitlines()[0])


def _launch_two(workdir, data_dir, mesh_flags, env) -> list[str]:
  """``launch.train`` as 2 processes x 2 CPU devices: their outputs."""
  port, procs = _free_port(), []
  for pid in range(2):
    procs.append(subprocess.Popen(
        _launch_train(workdir, data_dir, mesh_flags, '--local_device_count=2',
                      f'--coordinator_address=localhost:{port}',
                      '--num_processes=2', f'--process_id={pid}'),
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True))
  return _wait_all(procs, 300, 'multi-process launch.train')


@pytest.mark.skipif(_platform_reason() is not None,
                    reason=str(_platform_reason()))
@pytest.mark.parametrize('mesh_flags,layout,rows', [
    ((), "{'data': 4, 'stage': 1}", (2, 2)),
    # The evenly sharded state: the 'data' rows (the gather's psum) span
    # the processes.
    (('--config.mesh.data=2', '--config.mesh.stage=2',
      '--config.mesh.state_sharding=even'), "{'data': 2, 'stage': 2}",
     (2, 2)),
    (('--config.mesh.data=1', '--config.mesh.stage=4'),
     "{'data': 1, 'stage': 4}", (0, 4)),
    # Clips in chunks (skipside/streaming.py): host batches, each process's
    # rows of every chunk; evaluation scores the global rows.
    (('--config.mesh.data=4', '--config.mesh.stage=1',
      '--config.train.chunk_frames=3'), "{'data': 4, 'stage': 1}", (2, 2)),
], ids=['no_mesh_keys', 'data2_stage2_even', 'stage4', 'data4_chunked'])
def test_launch_train_two_processes_match_one(tmp_path, mesh_flags, layout,
                                              rows):
  """``python -m launch.train`` as 2 processes x 2 CPU devices ends with the
  checkpoint and metrics of 1 process x 4 devices, the same command.

  The 'data' rows span the processes (the README's command without mesh
  keys: a 4 x 1 mesh; or a 2 x 2 mesh, its state spread evenly over all
  four devices): each reads its rows of the global
  batch that one process reads (each used to read its own shard of the
  dataset and the results differed); or the 'stage' axis spans them
  (1 x 4): both read all rows. Each process prints which rows it reads.
  Two processes sharing an empty data dir both prepare it (one used to
  fail renaming its copy).
  """
  data_dir, env = str(tmp_path / 'tfds'), _subprocess_env()
  # The two processes first, on an empty data dir: both build MovingDigits
  # into it at once (the README's command on a fresh machine).
  two = str(tmp_path / 'two')
  logs = _launch_two(two, data_dir, mesh_flags, env)
  one = str(tmp_path / 'one')
  proc = subprocess.run(
      _launch_train(one, data_dir, mesh_flags, '--local_device_count=4'),
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ref_summary = _summary(proc.stdout)

  devices, (step, size) = [], rows
  for pid, log in enumerate(logs):
    start = pid * step
    # (Not anchored: C++ log lines and progress bars share the stream.)
    line = re.search(
        rf'process {pid} of 2: local devices \[(\d+), (\d+)\] \(cpu\), '
        rf'mesh {re.escape(layout)}, rows {start}:{start + size} of each '
        r'global batch of 4\b', log)
    assert line, log[-3000:]
    devices += line.groups()
    summary = _summary(log)  # Global metrics: the same in both processes.
    for key in ('step', 'train/loss', 'train/accuracy', 'eval/loss',
                'eval/accuracy', 'eval/clips'):
      assert summary[key] == ref_summary[key], (pid, key)
  assert len(set(devices)) == 4

  step_one, ref = _checkpoint_state(one)
  step_two, got = _checkpoint_state(two, like=ref)
  assert step_one == step_two == 6
  for key in ('params', 'opt_state'):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(
        np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7), got[key],
                 ref[key])


def _start_two(workdir, data_dir, env, logs_dir, *flags) -> list:
  """``launch.train`` (tiny) as 2 processes x 2 CPU devices, started; their
  output goes to ``logs_dir/<pid>.log`` (a pipe nobody reads while the test
  waits could fill and block them)."""
  port, procs = _free_port(), []
  os.makedirs(logs_dir, exist_ok=True)
  for pid in range(2):
    with open(os.path.join(logs_dir, f'{pid}.log'), 'w') as log:
      procs.append(subprocess.Popen(
          _launch_train(workdir, data_dir, (), '--local_device_count=2',
                        f'--coordinator_address=localhost:{port}',
                        '--num_processes=2', f'--process_id={pid}', *flags),
          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def _finish_two(procs, logs_dir, timeout: int, what: str,
                code: int) -> list[str]:
  """Waits for both (kills both and fails after ``timeout`` s); their
  output; each must exit with ``code``."""
  deadline = time.time() + timeout
  for p in procs:
    try:
      p.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
        q.wait()
      pytest.fail(f'{what} timed out after {timeout} s:\n' + '\n'.join(
          f'--- process {pid}:\n{_read(logs_dir, pid)[-2000:]}'
          for pid in range(2)))
  logs = [_read(logs_dir, pid) for pid in range(2)]
  for pid, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == code, (
        f'{what}: process {pid} exited with {p.returncode}, not {code}:\n'
        f'{log[-3000:]}')
  return logs


def _read(logs_dir, pid: int) -> str:
  with open(os.path.join(logs_dir, f'{pid}.log')) as f:
    return f.read()


@pytest.mark.skipif(_platform_reason() is not None,
                    reason=str(_platform_reason()))
def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path):
  """A SIGTERM to process 1 only (a scheduler signalling one host, or the
  hosts at different times): both processes stop after the same step,
  save one complete checkpoint there and exit with the preempted code; a
  rerun of both resumes from it. (Each process used to decide alone:
  process 1 saved and left while process 0 went on into the next step's
  collectives, and the job hung.)"""
  data_dir, env = str(tmp_path / 'tfds'), _subprocess_env()
  workdir, logs_dir = str(tmp_path / 'run'), str(tmp_path / 'logs')
  procs = _start_two(workdir, data_dir, env, logs_dir,
                     '--config.train.num_steps=100000',
                     '--config.train.log_every=1',
                     '--config.train.checkpoint_every=100000',
                     '--config.train.eval_every=100000')
  # Mid-run for sure: process 0 logged step 1 (metrics.jsonl), and the run
  # has 100000 steps to go.
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 300
  while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
    if time.time() > deadline or any(p.poll() is not None for p in procs):
      for p in procs:
        p.kill()
        p.wait()
      pytest.fail('the run never logged a step:\n' + '\n'.join(
          _read(logs_dir, pid)[-2000:] for pid in range(2)))
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  logs = _finish_two(procs, logs_dir, 120, 'preempted 2-process run',
                     code=train.PREEMPTED_EXIT_CODE)

  summaries = [_summary(log) for log in logs]
  assert all(s['preempted'] is True for s in summaries)
  step = summaries[0]['step']
  assert summaries[1]['step'] == step and 0 < step < 100000
  assert ('SIGTERM on process 1: saved a checkpoint at step '
          f'{step}; exiting.') in logs[0]
  # One complete checkpoint, at that step; no partial save left.
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  assert sorted(os.listdir(ckpt_dir)) == [str(step)], os.listdir(ckpt_dir)
  with open(os.path.join(ckpt_dir, str(step), 'meta', 'metadata')) as f:
    assert json.load(f)['step'] == step

  # Both again, a step further: they resume from it.
  logs = _finish_two(
      _start_two(workdir, data_dir, env, str(tmp_path / 'logs2'),
                 f'--config.train.num_steps={step + 1}'),
      str(tmp_path / 'logs2'), 300, 'resumed 2-process run', code=0)
  assert f'Resumed from {workdir} at step {step}.' in logs[0]
  for log in logs:
    summary = _summary(log)
    assert (summary['start_step'], summary['step']) == (step, step + 1)
  assert sorted(os.listdir(ckpt_dir), key=int) == [str(step), str(step + 1)]
