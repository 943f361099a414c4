"""The training loop and launcher: end to end, resume, preemption, bad config."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from experiments.configs import default
from skipside import checkpoints, evaluation, network, train
from skipside import metrics as metrics_lib
from skipside import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _tiny(data_dir, **overrides):
  c = default.get_config('tiny')
  c.data.data_dir = data_dir
  c.update_from_flattened_dict(overrides)  # Dotted keys: 'train.num_steps'.
  return c


def _launch(workdir, data_dir, *flags):
  cmd = [sys.executable, '-m', 'launch.train',
         '--config=experiments/configs/default.py:tiny',
         f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *flags]
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  return cmd, env


def _final_params(workdir):
  """Params of the latest checkpoint in ``workdir``, restored by orbax."""
  mngr = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  step = mngr.latest_step()
  got = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))
  mngr.close()
  return step, got.state['params']


def _assert_same(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x),
                                                          np.asarray(y)), a, b)


def test_launcher_end_to_end(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  cmd, env = _launch(workdir, data_dir)
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.split('Summary: ')[-1])
  assert summary['step'] == 6 and 'eval/accuracy' in summary
  config = json.load(open(os.path.join(workdir, 'config.json')))
  assert config['mode'] == 'sideways' and config['data']['data_dir'] == data_dir
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert any('train/loss' in l for l in lines)
  assert any('eval/accuracy' in l for l in lines)
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == [
      '2', '4', '6']
  step, params = _final_params(workdir)
  assert step == 6 and len(params['blocks']) == 3

  # launch.eval reloads the checkpoint and reproduces the final evaluation.
  proc = subprocess.run(
      [sys.executable, '-m', 'launch.eval', f'--workdir={workdir}'], cwd=REPO,
      env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = json.loads(proc.stdout.strip().splitlines()[-1])
  assert metrics['step'] == 6
  assert metrics['eval/accuracy'] == summary['eval/accuracy']
  np.testing.assert_allclose(metrics['eval/loss'], summary['eval/loss'],
                             rtol=1e-3)


def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path, data_dir):
  flags = ['--config.train.num_steps=60', '--config.train.checkpoint_every=4',
           '--config.train.eval_every=1000', '--config.train.log_every=10']
  ref_dir = str(tmp_path / 'reference')
  cmd, env = _launch(ref_dir, data_dir, *flags)
  subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True,
                 timeout=300)

  workdir = str(tmp_path / 'killed')
  cmd, env = _launch(workdir, data_dir, *flags)
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpts = os.path.join(workdir, 'checkpoints')
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpts) and any(d.isdigit() and int(d) >= 8
                                    for d in os.listdir(ckpts)):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, 'the run ended before the kill'
  done = [int(d) for d in os.listdir(ckpts) if d.isdigit()]
  assert 60 not in done, 'the run finished before the kill'

  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Resumed from' in proc.stdout
  step, resumed = _final_params(workdir)
  ref_step, reference = _final_params(ref_dir)
  assert step == ref_step == 60
  _assert_same(resumed, reference)


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_sigterm_saves_a_complete_checkpoint(tmp_path, data_dir, sig):
  """Preemption (SIGTERM) and a first Ctrl-C (SIGINT): a checkpoint at the
  next step boundary, exit code 75 (rerun to resume)."""
  workdir = str(tmp_path / 'preempted')
  cmd, env = _launch(workdir, data_dir, '--config.train.num_steps=100000',
                     '--config.train.checkpoint_every=50000',
                     '--config.train.eval_every=100000')
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 240
  while time.time() < deadline and not (os.path.exists(metrics)
                                        and os.path.getsize(metrics) > 0):
    time.sleep(0.05)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == train.PREEMPTED_EXIT_CODE == 75, err[-3000:]
  assert f'{sig.name}: saved a checkpoint' in out + err
  summary = json.loads(out.split('Summary: ')[-1])
  assert summary['preempted'] is True
  step, params = _final_params(workdir)
  assert step == summary['step'] and 0 < step < 100000
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


def test_corrupt_latest_checkpoint_falls_back(tmp_path, data_dir, capsys):
  workdir = str(tmp_path / 'corrupt')
  train.train_and_evaluate(_tiny(data_dir), workdir)  # Checkpoints 2, 4, 6.
  state_dir = os.path.join(workdir, 'checkpoints', '6', 'state')
  for root, _, files in os.walk(state_dir):
    for f in files:
      with open(os.path.join(root, f), 'wb') as fh:
        fh.write(b'garbage')
  summary = train.train_and_evaluate(
      _tiny(data_dir, **{'train.num_steps': 8}), workdir)
  out = capsys.readouterr().out
  assert 'checkpoint at step 6 is unreadable' in out
  assert summary['start_step'] == 4 and summary['step'] == 8
  # Repaired: the corrupt step kept aside, the run saved 6 and 8 again, and
  # a rerun (and evaluation) reads the newest.
  aside = os.listdir(os.path.join(workdir, 'unreadable_checkpoints'))
  assert len(aside) == 1 and aside[0].startswith('6-')
  assert {'6', '8'} <= set(os.listdir(os.path.join(workdir, 'checkpoints')))
  assert evaluation.evaluate_workdir(workdir)['step'] == 8
  summary = train.train_and_evaluate(
      _tiny(data_dir, **{'train.num_steps': 8}), workdir)
  assert summary['start_step'] == 8
  assert 'unreadable' not in capsys.readouterr().out


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path,
                                                             data_dir):
  workdir = str(tmp_path / 'nan')
  c = _tiny(data_dir, **{'optimizer.name': 'sgd',
                         'optimizer.schedule': 'constant',
                         'optimizer.learning_rate': 1e36,
                         'optimizer.grad_clip_norm': 0.0,
                         'train.checkpoint_every': 1})
  with pytest.raises(train.NonFiniteLossError, match='non-finite loss'):
    train.train_and_evaluate(c, workdir)
  step, params = _final_params(workdir)
  assert step >= 1
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))

  c.train.on_nonfinite = 'skip'
  summary = train.train_and_evaluate(c, str(tmp_path / 'skip'))
  assert summary['step'] == 6 and summary['skipped_steps'] >= 1


# Bad keys and values, in-process and through the launcher: test_config.py.


def test_used_workdir_refuses_another_config_and_restart_moves_it_aside(
    tmp_path, data_dir, capsys):
  workdir = str(tmp_path / 'run')
  c = _tiny(data_dir, **{'train.num_steps': 2, 'train.eval_every': 2})
  train.train_and_evaluate(c, workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    stored = f.read()
  ckpts = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  other = _tiny(data_dir, **{'train.num_steps': 2, 'mode': 'pipelined_bp'})
  with pytest.raises(checkpoints.WorkdirConflictError,
                     match=r"holds a run of another config: config.mode "
                     r"\('sideways' -> 'pipelined_bp'\) differ; use a new "
                     r'--workdir, or --restart'):
    train.train_and_evaluate(other, workdir)
  with open(os.path.join(workdir, 'config.json')) as f:  # Nothing written.
    assert f.read() == stored
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ckpts
  # A start-up that failed before any checkpoint holds no run: not refused.
  empty = tmp_path / 'no_run'
  empty.mkdir()
  (empty / 'config.json').write_text(stored)
  checkpoints.prepare_workdir(other, str(empty))
  # Checkpoints that all fail to restore (another state) are not buried.
  c_mlp = _tiny(data_dir, **{'train.num_steps': 2,
                             'model.stages': 'conv:4:2,conv:6:2,res:6'})
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(c_mlp.to_json_best_effort(indent=2, sort_keys=True))
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r'no checkpoint in .* restores into this run'):
    train.train_and_evaluate(c_mlp, workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(stored)
  # A harmless change resumes (and says so).
  summary = train.train_and_evaluate(
      _tiny(data_dir, **{'train.num_steps': 4, 'train.eval_every': 2}),
      workdir)
  assert summary['start_step'] == 2 and summary['step'] == 4
  assert 'with changed config.train.num_steps' in capsys.readouterr().out
  # --restart: the old run moved aside whole, a fresh one trains here.
  summary = train.train_and_evaluate(other, workdir, restart=True)
  assert summary['start_step'] == 0
  aside = [d for d in os.listdir(workdir) if d.startswith('replaced-')]
  assert len(aside) == 1
  assert '4' in os.listdir(os.path.join(workdir, aside[0], 'checkpoints'))
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['mode'] == 'pipelined_bp'


def test_a_key_newer_than_the_run_counts_only_away_from_its_default():
  """A workdir from before a key existed ran with the key's default:
  resuming it with the default is harmless, with another value refused
  (``optimizer.frozen_stages`` lives in the restored optimizer state, so a
  changed value would be silently lost)."""
  flat = checkpoints._flat  # pylint: disable=protected-access
  old = flat(json.loads(config_lib.defaults().to_json_best_effort()))
  del old['optimizer.frozen_stages']
  same = config_lib.defaults()
  frozen = config_lib.defaults()
  frozen.optimizer.frozen_stages = (1,)
  for new, harmful in ((same, []), (frozen, ['optimizer.frozen_stages'])):
    bad, fine = checkpoints.config_changes(
        old, flat(json.loads(new.to_json_best_effort())))
    assert bad == harmful
    assert ('optimizer.frozen_stages' in fine) == (not harmful)


def _bar_video(direction, frames=10, size=(72, 88)):
  v = np.zeros((frames, *size, 3), np.uint8)
  for t in range(frames):
    x = (10 + direction * 3 * t) % (size[1] - 8)
    v[t, :, x:x + 8] = (255, 160, 40)
  return v


def test_hmdb51_cpu_config_trains_on_a_real_video_folder(tmp_path):
  """The paper-shaped folder config, CPU variant, on real encoded files."""
  from experiments.configs import hmdb51
  from skipside.data import video_folder
  root = tmp_path / 'hmdb'
  for split in ('train', 'test'):
    for name, direction in (('wave', 1), ('walk', -1)):
      os.makedirs(root / split / name)
      for i in range(2):
        video_folder.write_video(str(root / split / name / f'{i}.mp4'),
                                 _bar_video(direction), codec='mpeg4')
  (root / 'train' / 'walk' / 'broken.mp4').write_bytes(b'\x00' * 500)
  c = hmdb51.get_config('cpu_skip_sideways')
  c.data.data_dir = str(root)
  c.data.batch_size = 2
  c.train.num_steps = 3
  c.train.eval_every = 3
  c.train.checkpoint_every = 3
  summary = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert summary['step'] == 3 and summary['eval/clips'] == 4
  assert summary['data/failed_videos'] >= 1  # The broken file, counted.


def test_stream_training_checkpoints_and_resumes_its_carry(tmp_path, data_dir):
  """train.stream carries the pipeline across batches, through a resume:
  the checkpoint holds the carry of the last batch, restores into the
  engine's carry leaf by leaf, and the resumed run continues exactly as one
  that never stopped. Per-frame targets (next-frame prediction) make the
  target FIFO visible: it holds the targets of the last ``delay`` frames."""
  from skipside import data as data_lib, engine  # pylint: disable=g-import-not-at-top

  def saved_state(workdir, step):  # The tree as saved, restored by orbax.
    mngr = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
    got = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))
    mngr.close()
    return got.state

  # A constant LR: 6 + 2 steps follow the schedule of one 8-step run.
  c = _tiny(data_dir, **{'train.stream': True, 'model.head': 'next_frame',
                         'data.task': 'next_frame',
                         'optimizer.schedule': 'constant'})
  c.train.num_steps = 8
  straight = str(tmp_path / 'straight')
  train.train_and_evaluate(c, straight)
  workdir = str(tmp_path / 'stream')
  c.train.num_steps = 6
  first = train.train_and_evaluate(c, workdir)
  assert first['step'] == 6
  saved = saved_state(workdir, 6)
  assert int(saved['carry']['tick']) == 6 * c.data.num_frames
  # The FIFO: batch 6's targets of its last `delay` (= depth 2) frames, the
  # ones whose outputs the next clip's first ticks produce.
  it = data_lib.make_iterator(config_lib.data_config(c), train=True)
  batches = [next(it) for _ in range(8)]
  it.close()
  np.testing.assert_array_equal(saved['carry']['targets'],
                                batches[5]['target'][:, -2:])
  # Restored as the loop does it, into a fresh stream's structure.
  spec, _, state = checkpoints.init_state(c, it.info)
  state.carry = engine.init_carry(spec, state.params, batches[0]['video'],
                                  batches[0]['target'], c.mode)
  restored = checkpoints.Checkpointer(workdir, 3).restore(state)[0].carry
  assert isinstance(restored, engine.StreamCarry)
  assert jax.tree.structure(restored) == jax.tree.structure(state.carry)
  for field in engine.StreamCarry._fields:  # Saved as lists and dicts.
    got, want = (jax.tree.leaves(t) for t in (getattr(restored, field),
                                              saved['carry'][field]))
    assert len(got) == len(want), field
    for x, y in zip(got, want):
      np.testing.assert_array_equal(x, y)
  assert any(float(np.abs(m).max()) > 0 for m in restored.msgs[:-1])
  c.train.num_steps = 8
  second = train.train_and_evaluate(c, workdir)
  assert second['start_step'] == 6 and second['step'] == 8
  # Resumed == never stopped, to the bit (same programs, same data): step
  # 8's carry (a fresh one would be 2 clips behind) and params.
  got, ref = saved_state(workdir, 8), saved_state(straight, 8)
  assert int(got['carry']['tick']) == 8 * c.data.num_frames
  np.testing.assert_array_equal(got['carry']['targets'],
                                batches[7]['target'][:, -2:])
  _assert_same(got['carry'], ref['carry'])
  _assert_same(got['params'], ref['params'])


# -- The mesh engine in the training loop (config.mesh.data x stage > 1). ----

@pytest.fixture(scope='module')
def single_device_run(tmp_path_factory, data_dir):
  """The tiny config on one device: checkpoints 2, 4, 6."""
  workdir = str(tmp_path_factory.mktemp('single_device'))
  train.train_and_evaluate(_tiny(data_dir), workdir)
  return workdir


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7), a, b)


def _resume_copy(src, dst, drop_step):
  """A copy of workdir ``src`` without its checkpoint ``drop_step``."""
  shutil.copytree(src, dst)
  shutil.rmtree(os.path.join(dst, 'checkpoints', str(drop_step)))
  return dst


@pytest.mark.parametrize('data, stage, groups, sharding', [
    # Flops-balanced groups, batch split over 'data'; the state spread over
    # all four devices.
    (2, 2, None, 'even'),
    (1, 4, '0,1-2', 'stage'),  # Explicit groups; the last device idle.
])
def test_mesh_training_matches_single_device_and_shares_checkpoints(
    tmp_path, data_dir, single_device_run, data, stage, groups, sharding):
  overrides = {'mesh.data': data, 'mesh.stage': stage,
               'mesh.state_sharding': sharding}
  if groups:
    overrides['mesh.groups'] = groups
  _, reference = _final_params(single_device_run)

  mesh_dir = str(tmp_path / 'mesh')
  summary = train.train_and_evaluate(_tiny(data_dir, **overrides), mesh_dir)
  step, params = _final_params(mesh_dir)
  assert step == summary['step'] == 6 and 'eval/accuracy' in summary
  _close(params, reference)

  # A single-device checkpoint resumes on the mesh, and the other way round.
  s2m = _resume_copy(single_device_run, str(tmp_path / 's2m'), 6)
  summary = train.train_and_evaluate(_tiny(data_dir, **overrides), s2m)
  assert summary['start_step'] == 4 and summary['step'] == 6
  _close(_final_params(s2m)[1], reference)
  m2s = _resume_copy(mesh_dir, str(tmp_path / 'm2s'), 6)
  summary = train.train_and_evaluate(_tiny(data_dir), m2s)
  assert summary['start_step'] == 4 and summary['step'] == 6
  _close(_final_params(m2s)[1], reference)


@pytest.mark.parametrize('groups, message', [
    ('0,1-5', r"config.mesh.groups: '0,1-5': groups .* must list stages 0..2"),
    ('0,x', r"config.mesh.groups: '0,x': item 'x' is not a stage"),
    ('0,1,2', r"config.mesh.groups: '0,1,2': 3 groups for 2 devices"),
])
def test_bad_mesh_groups_fail_naming_the_key(data_dir, groups, message):
  c = _tiny(data_dir, **{'mesh.stage': 2, 'mesh.groups': groups})
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate_config(c)


def test_evaluate_leaves_padded_clips_out_of_the_loss():
  """A last batch padded with a clip of another label: eval/loss is the real
  clips' mean loss, not the padded batch's."""
  from flax import nnx
  from skipside import engine, models, network
  spec, params = network.split(models.mlp_net((6,), 3, width=8, num_stages=3,
                                              rngs=nnx.Rngs(0)))
  video = jax.random.normal(jax.random.key(0), (2, 5, 6))
  batch = {'video': video, 'label': np.array([1, 2]),
           'mask': np.array([True, False])}
  got = evaluation.evaluate(spec, params, [batch], mode='sideways',
                       compute_dtype=jax.numpy.float32)
  alone, _ = engine.forward(spec, params, video[:1], np.array([1]),
                            mode='sideways')
  assert got['eval/clips'] == 1
  np.testing.assert_allclose(got['eval/loss'], float(alone.metrics['loss']),
                             rtol=1e-5)


def test_mean_average_precision_against_a_hand_count():
  """Two classes; AP = mean over positives of the precision at their rank."""
  scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.3, 0.6], [0.1, 0.2]])
  labels = np.array([[1, 0], [0, 1], [1, 0], [0, 0]])
  # Class 0 ranks 0.9 (pos), 0.8, 0.3 (pos): (1/1 + 2/3) / 2. Class 1: 0.7
  # (pos) first: 1.
  want = ((1 + 2 / 3) / 2 + 1) / 2
  assert metrics_lib.mean_average_precision(scores, labels) == pytest.approx(
      want)


def test_multi_label_task_trains_with_a_sigmoid_loss_and_reports_map(
    tmp_path, data_dir):
  """config.data.task='multi_label' (default.py:multi_label) reaches the
  sigmoid loss and the mAP evaluation."""
  c = _tiny(data_dir, **{'data.task': 'multi_label'})
  spec, _ = network.split(config_lib.build_network(c, (32, 32, 1), 14,
                                                   nnx.Rngs(0)))
  assert spec.loss == 'sigmoid_xent'
  metrics = train.train_and_evaluate(c, str(tmp_path / 'w'))
  assert 0 < metrics['eval/mAP'] <= 1
  assert 'eval/accuracy' not in metrics
  assert np.isfinite(metrics['train/loss'])


def test_fill_rule_and_gradient_fidelity_from_the_config(tmp_path, data_dir):
  """train.fill='gate_stages' trains (DESIGN.md's second fill convention)
  and train.fidelity_every logs each stage's cosine of the Sideways and the
  exact gradient of the probe batch at the start and every N steps."""
  c = _tiny(data_dir, **{'train.fill': 'gate_stages',
                         'train.fidelity_every': 3})
  summary = train.train_and_evaluate(c, str(tmp_path / 'w'))
  assert np.isfinite(summary['train/loss'])
  # The tiny net's 3 stages on a chain with a skip (0, 2): d = (1, 1, 0).
  assert [summary[f'fidelity/staleness_ticks_stage_{l}'] for l in range(3)
          ] == [2, 2, 0]
  with open(tmp_path / 'w' / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f if 'fidelity/' in line]
  assert [r['step'] for r in rows] == [0, 3, 6]
  for r in rows:
    cosines = [r[f'fidelity/cosine_stage_{l}'] for l in range(3)]
    assert all(-1 <= v <= 1 + 1e-6 for v in cosines)
    assert abs(cosines[-1] - 1) < 1e-4  # The top stage's gradient is exact.
  assert summary['compilations_in_loop'] == 0
  c = _tiny(data_dir, **{'train.fill': 'gate_stages', 'mode': 'bp'})
  with pytest.raises(config_lib.ConfigError, match='config.train.fill'):
    config_lib.validate_config(c)
