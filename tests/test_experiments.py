"""The experiments script's smoke version regenerates every section."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import reproduce
from skipside import models, network


def test_reproduce_quick_writes_every_section(tmp_path):
  out = str(tmp_path / 'RESULTS.md')
  reproduce.main(['--quick', '--out', out])
  text = open(out).read()
  for heading in ('## 1. Accuracy of the modes', '## 2. Next-frame prediction',
                  '## 3. Benchmarks', '## 4. Gradient fidelity'):
    assert heading in text
  assert 'python -m experiments.reproduce --quick' in text
  for png in ('training_curves.png', 'gradient_fidelity.png'):
    assert os.path.getsize(tmp_path / 'results' / 'plots' / png) > 1000
  blob = json.load(open(tmp_path / 'RESULTS.json'))
  assert len(blob['modes']) == 2 * len(reproduce.QUICK_ROWS)
  # A still video: the Sideways gradient is exact at every stage.
  still = blob['fidelity'][0]
  assert still['speed'] == 0 and min(still['cosine_per_stage']) > 0.999
  # The report can be rewritten from the JSON alone.
  reproduce.main(['--report_only', str(tmp_path / 'RESULTS.json'),
                  '--out', out])
  assert open(out).read().startswith('# Results')


def test_mesh_benchmark_peer_matches_skipside():
  """The benchmark's plain-JAX peer computes what skipside computes: its
  Sideways gradients on the mesh, on one device (vmapped and unrolled) and
  skipside's engine agree per stage (1x8 with 8 stages, 2x4 with 4)."""
  from experiments.benchmarks import peer  # pylint: disable=g-import-not-at-top
  errors = peer.check(batch=4, frames=16)
  assert errors and max(errors.values()) <= 1e-5


def test_fidelity_over_training_reads_the_loop_metrics(tmp_path):
  """The fidelity benchmark (quick) trains with the loop's fidelity logging
  and writes the per-stage curves, the staleness and the plot."""
  from experiments.benchmarks import fidelity as fidelity_benchmark
  out = tmp_path / 'fidelity.json'
  fidelity_benchmark.main(['--quick', f'--out={out}'])
  blob = json.load(open(out))
  curves = blob['curves']
  assert curves['steps'] == [0, 2, 4, 6]  # Logged at the start and every 2.
  assert all(len(v) == 5 and all(-1 <= x <= 1 for x in v)
             for v in curves['cosine_per_stage'])
  assert curves['cosine_per_stage'][0][-1] == pytest.approx(1.0)  # Top stage.
  assert blob['staleness_ticks'] == [4, 4, 2, 2, 0]  # 2 x message distance.
  assert (tmp_path / 'plots' / 'fidelity_over_training.png').exists()


def test_mpmd_benchmark_per_device_programs_match_engine():
  """The MPMD alternative of the mesh benchmark (one jitted Sideways tick
  per device group, host-driven transfers) computes the engine's loss and
  gradients, and each device's program holds only its own stages' code:
  fewer convolutions than the one SPMD program every mesh device runs."""
  from experiments.benchmarks import mpmd  # pylint: disable=g-import-not-at-top
  spec, params = network.split(models.default_net(
      (16, 16, 1), num_classes=4, rngs=nnx.Rngs(0)))
  groups = ((0, 1), (2,), (3,), (4,))
  k1, k2 = jax.random.split(jax.random.key(0))
  clip = jax.random.normal(k1, (4, 10, 16, 16, 1))
  labels = jax.random.randint(k2, (4,), 0, 4)
  assert mpmd.check(spec, params, groups, clip, labels) <= 1e-5
  row = mpmd.compare('t', spec, params, groups, clip, labels, repeats=1)
  per_device = [r['convolutions'] for r in row['mpmd_per_device']]
  assert 0 < max(per_device) and 2 * max(per_device) <= (
      row['spmd']['convolutions'])
  # Padding: every SPMD device holds the widest group's row of params.
  assert row['spmd_over_mpmd_param_bytes_all_devices'] > 1.5


def test_fidelity_mean_gradients_study(tmp_path):
  """The mean-gradient study (quick): per seed and step, the cosine of the
  mean Sideways and exact gradients, the mean per-batch cosine and the
  consistencies; the top stage's gradient is exact (cosine 1) and a
  consistency is at most 1."""
  from experiments.benchmarks import fidelity as fidelity_benchmark
  fidelity_benchmark.main(['--quick', '--mean_seeds', '0',
                           '--probe_batches', '2', '--after_steps', '0,2',
                           f'--out={tmp_path / "fidelity.json"}'])
  rows = json.load(open(tmp_path / 'fidelity_mean_gradients.json'))['rows']
  assert [(r['seed'], r['step']) for r in rows] == [(0, 0), (0, 2)]
  for r in rows:
    assert r['mean_gradient_cosine'][-1] == pytest.approx(1.0, abs=1e-5)
    assert r['per_batch_cosine_mean'][-1] == pytest.approx(1.0, abs=1e-5)
    for mode in ('sideways', 'pipelined_bp'):
      assert all(0 < c <= 1 + 1e-6 for c in r[f'consistency_{mode}'])
  assert rows[1]['train_loss_last_50'] is not None


def test_motion_seed_rows_apply_their_change_and_render(tmp_path,
                                                        monkeypatch):
  """Each ablation row reaches reproduce's runner with its one change
  applied (video, flush, mode, net), its figures are computed from the
  runs, and report section 6 tabulates the JSON written."""
  from experiments.benchmarks import motion_seeds
  seen = []

  def train_run(config, args, step=None):
    assert step is None
    seen.append((config.data.dataset_config, args.flush, config.mode,
                 config.model.stages, tuple(map(tuple, config.model.skips))))
    return {'eval/accuracy': 0.96 if len(seen) % 2 else 0.5,
            'curve': list(np.linspace(2.0, 1.0, 100)), 'wall_s': 1.0}

  monkeypatch.setattr(reproduce, 'train_run', train_run)
  out = tmp_path / 'motion_seeds.json'
  motion_seeds.main(['--seeds', '2', f'--out={out}'])
  conv = 'conv:8:2,conv:16:2,res:16,conv:32:2,'
  a = tuple(map(tuple, reproduce.SKIPS_A))
  assert seen == 2 * [('smooth', 0, 'sideways', conv + 'res:32', a)] + (
      2 * [('smooth', 0, 'pipelined_bp', conv + 'res:32', a)]) + (
      2 * [('default', 4, 'sideways', conv + 'res:32', a)]) + (
      2 * [('default', 0, 'sideways', conv + 'tconv', ())])
  with open(out) as f:
    rows = json.load(f)['rows']
  for r in rows:
    assert (r['mean'], r['worst'], r['seeds_at_95']) == (
        pytest.approx(0.73), 0.5, 1)
    (run, _) = r['runs']
    # The last 50 steps of a line from 2 to 1, and its lowest 50-step mean.
    assert run['final_train_loss'] == pytest.approx(
        np.linspace(2.0, 1.0, 100)[-50:].mean())
    assert run['lowest_train_loss'] == pytest.approx(run['final_train_loss'])
  table = '\n'.join(reproduce._motion_ablations(str(out)))
  assert '| sideways + temporal stage | 73.0 +- 23.0 | 50.0 | 1 of 2 | ' \
      '96.0, 50.0 |' in table


def test_motion_hybrid_rows_reach_the_runner_and_render(tmp_path,
                                                       monkeypatch):
  """Each hybrid row trains section 1's Skip-Sideways A net with its own
  stages named in the step, and report section 6 tabulates the JSON."""
  from experiments.benchmarks import motion_hybrid
  seen = []

  def train_run(config, args, step=None):
    seen.append((config.model.skips, args.flush,
                 step.func is motion_hybrid.hybrid_train_step,
                 step.keywords['sideways_stages'],
                 step.keywords['frozen_stages']))
    return {'eval/accuracy': 0.25 * len(seen), 'wall_s': 1.0,
            'curve': list(np.linspace(2.0, 1.0, 100))}

  monkeypatch.setattr(reproduce, 'train_run', train_run)
  out = tmp_path / 'motion_hybrid.json'
  motion_hybrid.main(['--seeds', '2', '--rows', '4,2', f'--out={out}'])
  a = tuple(map(tuple, reproduce.SKIPS_A))
  assert [(tuple(map(tuple, k)), *rest) for k, *rest in seen] == [
      (a, 0, True, (2, 3, 4), (0, 1))] * 2 + [(a, 0, True, (1,), ())] * 2
  with open(out) as f:
    rows = json.load(f)['rows']
  assert [(r['sideways_stages'], r['frozen_stages']) for r in rows] == [
      ([2, 3, 4], [0, 1]), ([1], [])]
  table = '\n'.join(reproduce._motion_hybrid(str(out)))
  assert '--rows 4,2 --seeds 2' in table
  assert '| sideways on stage 1 | 87.5 +- 12.5 | 75.0 | 1 of 2 | ' \
      '75.0, 100.0 |' in table


def test_rerunning_some_rows_keeps_the_others(tmp_path, monkeypatch):
  """``--rows`` reruns only those rows: the result keeps the rows an
  earlier run with the same seeds wrote, and replaces all of them when the
  seeds differ."""
  from experiments.benchmarks import motion_hybrid
  accuracy = {'now': 0.5}

  def train_run(config, args, step=None):
    del config, args, step
    return {'eval/accuracy': accuracy['now'], 'wall_s': 1.0,
            'curve': list(np.linspace(2.0, 1.0, 100))}

  monkeypatch.setattr(reproduce, 'train_run', train_run)
  out = tmp_path / 'motion_hybrid.json'

  def rows():
    with open(out) as f:
      blob = json.load(f)
    return blob['config']['rows'], [(r['row'], r['mean'])
                                    for r in blob['rows']]
  name = [r[0] for r in motion_hybrid.ROWS]
  motion_hybrid.main(['--seeds', '2', '--rows', '4,2', f'--out={out}'])
  accuracy['now'] = 1.0
  motion_hybrid.main(['--seeds', '2', '--rows', '2,1', f'--out={out}'])
  assert rows() == ('4,2,1', [(name[4], 0.5), (name[2], 1.0),
                              (name[1], 1.0)])
  motion_hybrid.main(['--seeds', '3', '--rows', '0', f'--out={out}'])
  assert rows() == ('0', [(name[0], 1.0)])
  out.write_text('{"rows": [')  # Cut short: replaced, nothing lost.
  motion_hybrid.main(['--seeds', '3', '--rows', '1', f'--out={out}'])
  assert rows() == ('1', [(name[1], 1.0)])


def test_motion_hybrid_step_takes_each_stage_gradient_from_its_mode():
  """The hybrid step of motion_hybrid is engine.train_step in 'sideways'
  with every stage named and in 'pipelined_bp' with none; with (0, 1)
  (SGD, so the update is the gradient) stages 0-1 move as in 'sideways' and
  stages 2-4 and the head as in 'pipelined_bp'."""
  import optax  # pylint: disable=g-import-not-at-top
  from experiments.benchmarks import motion_hybrid
  from skipside import checkpoints, data, engine  # pylint: disable=g-import-not-at-top
  from skipside import config as config_lib  # pylint: disable=g-import-not-at-top
  args = reproduce.parse_args(['--quick'])
  c = reproduce.run_config('motion', ('skip-sideways A', 'sideways',
                                      reproduce.STAGES, reproduce.SKIPS_A),
                           seed=0, args=args)
  c.data.num_frames, c.data.batch_size = 12, 2  # Every stage gets gradient.
  it = data.make_iterator(config_lib.data_config(c))
  batch = next(it)
  it.close()
  spec, _, state = checkpoints.init_state(c, it.info)
  sgd = optax.sgd(1.0)
  opt_state = sgd.init(state.params)
  clip, labels = batch['video'], batch['label']

  def moved(step):
    p, _, _ = step(spec, sgd, state.params, opt_state, clip, labels)
    return jax.tree.map(lambda a, b: np.asarray(b - a), p, state.params)

  def hybrid(stages, frozen=()):
    return moved(lambda *a: motion_hybrid.hybrid_train_step(
        *a, sideways_stages=stages, frozen_stages=frozen))

  plain = {m: moved(lambda *a, m=m: engine.train_step(*a, mode=m))
           for m in ('sideways', 'pipelined_bp')}
  close = lambda a, b: jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
      a, b)
  close(hybrid((0, 1, 2, 3, 4)), plain['sideways'])
  close(hybrid(()), plain['pipelined_bp'])
  mixed = hybrid((0, 1))
  for l in range(5):
    mode = 'sideways' if l < 2 else 'pipelined_bp'
    close(mixed['blocks'][l], plain[mode]['blocks'][l])
    assert np.abs(np.concatenate([x.ravel() for x in jax.tree.leaves(
        mixed['blocks'][l])])).max() > 0  # Every stage has gradient.
  close(mixed['head'], plain['pipelined_bp']['head'])
  frozen = hybrid((2, 3, 4), frozen=(0, 1))
  for l in range(5):
    close(frozen['blocks'][l], jax.tree.map(np.zeros_like, mixed[
        'blocks'][l]) if l < 2 else plain['sideways']['blocks'][l])
  # The library's optimizer.frozen_stages trains what the benchmark's frozen
  # row does, with the run's own Adam; a constant rate (the warm-up's first
  # rate is 0) and clipping that acts on this clip.
  c.optimizer.schedule, c.optimizer.warmup_steps = 'constant', 0
  c.optimizer.grad_clip_norm = 1e-3
  c.optimizer.frozen_stages = (1,)
  _, adam_frozen, _ = checkpoints.init_state(c, it.info)
  c.optimizer.frozen_stages = ()
  _, adam, _ = checkpoints.init_state(c, it.info)
  lib, _, _ = engine.train_step(spec, adam_frozen, state.params,
                                adam_frozen.init(state.params), clip, labels,
                                mode='sideways')
  bench, _, _ = motion_hybrid.hybrid_train_step(
      spec, adam, state.params, adam.init(state.params), clip, labels,
      sideways_stages=(0, 2, 3, 4), frozen_stages=(1,))
  close(lib, bench)
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), lib, state.params)
  assert all(jax.tree.leaves(moved['blocks'][0]) + jax.tree.leaves(
      moved['head'])) and not any(jax.tree.leaves(moved['blocks'][1]))
  # The modes differ on this clip, so the checks above tell them apart.
  assert not np.allclose(plain['sideways']['blocks'][0]['stage']['conv'][
      'kernel'], plain['pipelined_bp']['blocks'][0]['stage']['conv'][
          'kernel'], rtol=1e-3)
