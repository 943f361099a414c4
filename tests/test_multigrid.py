"""Multigrid: the reference schedule, shape buckets compiled ahead of time,
sampling, training integration."""

import json

import numpy as np
import pytest

from skipside import config as config_lib
from skipside import aot, multigrid
from skipside.data import multigrid_loader

# DESIGN.md §3: SlowFast's SLOWFAST_8x8_R50_stepwise_multigrid on Kinetics.
KINETICS = [
    (0, (8, 8, 158), 73), (0, (4, 16, 158), 110), (0, (2, 16, 224), 142),
    (0, (1, 32, 224), 158), (1, (8, 8, 158), 205), (1, (4, 16, 158), 228),
    (1, (2, 16, 224), 248), (1, (1, 32, 224), 259), (2, (8, 8, 158), 291),
    (2, (4, 16, 158), 308), (2, (2, 16, 224), 322), (2, (1, 32, 224), 329),
    (3, (1, 32, 224), 358)]
KINETICS_LRS = [8, 4, 2, 1, 0.8, 0.4, 0.2, 0.1, 0.08, 0.04, 0.02, 0.01, 0.01,
                0.001]


def _kinetics(**kw):
  return multigrid.long_cycle_schedule(32, 224, [0, 94, 154, 196], 239, **kw)


def _reference_lr_multipliers(schedule, gamma: float = multigrid.GAMMA
                               ) -> tuple[list[float], list[float]]:
  """LR multipliers and the epochs where each starts, as the reference's
  (SlowFast's ``get_long_cycle_schedule``): the oracle of ``Schedule``'s.

  Each long-cycle entry gets ``gamma**lr_step * batch_factor``; the
  fine-tuning phase is split at its midpoint into the previous entry's LR
  and its own.

  Returns:
    ``(multipliers, starts)``, equally long; ``starts[0] = 0``.
  """
  mults = [gamma ** i * cycle[-1][0] for i, cycle, _ in schedule]
  mults = mults[:-1] + [mults[-2], mults[-1]]
  ends = [e for _, _, e in schedule]
  starts = [0] + ends[:-1] + [(ends[-2] + ends[-1]) / 2]
  if all(isinstance(e, int) for e in ends):
    starts[-1] = (ends[-2] + ends[-1]) // 2
  return mults, starts


def test_reference_kinetics_schedule():
  sched = _kinetics()
  got = [(i, tuple(int(round(v)) for v in cycle[-1]), end)
         for i, cycle, end in sched]
  assert got == KINETICS
  mults, starts = _reference_lr_multipliers(sched)
  np.testing.assert_allclose(mults, KINETICS_LRS, rtol=1e-9)
  assert starts == [0, 73, 110, 142, 158, 205, 228, 248, 259, 291, 308, 322,
                    329, 343]
  # Short cycle crops are fractions of the default crop: 4x/2x/1x, and 2x/1x/1x
  # in stages whose own crop is already 0.7071 S (the reference's quirk).
  assert [c[0] for c in sched[3][1]] == [4, 2, 1]
  assert [c[0] for c in sched[0][1]] == [16, 8, 8]


def test_schedule_in_steps_matches_reference_and_saves_iterations():
  sched = multigrid.make_schedule(
      num_frames=32, crop_size=224, batch_size=8, num_examples=240_000,
      lr_steps=(0, 94, 154, 196), max_epoch=239)
  ends = [round(p.end_epoch) for p in sched.phases]
  assert ends == [e for _, _, e in KINETICS[:-1]] + [344, 358]
  np.testing.assert_allclose([p.lr_multiplier for p in sched.phases],
                             KINETICS_LRS, rtol=1e-9)
  assert [p.cycle[-1] for p in sched.phases[:4]] == [
      (64, 8, 158), (32, 16, 158), (16, 16, 224), (8, 32, 224)]
  assert sched.phases[3].cycle == ((32, 32, 112), (16, 32, 158), (8, 32, 224))
  baseline_steps = 239 * 240_000 / 8
  assert 3.3 < baseline_steps / sched.num_steps < 3.5  # "about 3.4x".
  # Steps walk the cycle; LR follows the phase.
  p = sched.phases[1]
  assert [sched.shape(p.start_step + k) for k in range(4)] == [
      (64, 16, 112), (32, 16, 158), (32, 16, 158), (64, 16, 112)]
  assert sched.lr_multiplier(p.start_step) == 4
  lr = sched.lr_schedule(0.1)
  assert float(lr(p.start_step)) == pytest.approx(0.4)
  assert float(lr(p.start_step - 1)) == pytest.approx(0.8)
  assert float(lr(sched.num_steps - 1)) == pytest.approx(1e-4)


@pytest.mark.parametrize('long_cycle,short_cycle', [(True, False),
                                                    (False, True),
                                                    (False, False)])
def test_cycles_switch_independently(long_cycle, short_cycle):
  sched = multigrid.make_schedule(
      num_frames=32, crop_size=224, batch_size=8, num_examples=240_000,
      lr_steps=(0, 94, 154, 196), max_epoch=239, long_cycle=long_cycle,
      short_cycle=short_cycle)
  cycle_len = 3 if short_cycle else 1
  assert all(len(p.cycle) == cycle_len for p in sched.phases)
  epochs = 239 * (1.5 if long_cycle or short_cycle else 1.0)
  assert sched.phases[-1].end_epoch == pytest.approx(epochs)
  if long_cycle:  # The long cycle alone (a crash in the reference).
    assert sched.phases[-1].cycle == ((8, 32, 224),)
    assert [p.lr_multiplier for p in sched.phases[:4]] == [8, 4, 2, 1]
  else:  # No long cycle: base shape, baseline LR steps, no batch scaling.
    assert sched.phases[0].cycle[-1] == (8, 32, 224)
    np.testing.assert_allclose([p.lr_multiplier for p in sched.phases],
                               [1, 0.1, 0.01, 0.001])
  if short_cycle:
    assert sched.phases[-1].cycle == ((32, 32, 112), (16, 32, 158),
                                      (8, 32, 224))


# ---------------------------------------------------------------------------
# The reference's LR policy and integer epochs (SlowFast at HEAD), by hand.

def _reference_long_cycle(T, S, steps, max_epoch, factor=1.5):
  """SlowFast's MultigridSchedule.get_long_cycle_schedule and init_multigrid
  (both cycles on), written out plainly.

  Returns ``(schedule, solver_steps, lrs, max_epoch)``: ``schedule`` as
  ``[(lr_step, [b, t, s], end_epoch)]`` with end epochs rounded to integers;
  ``solver_steps`` SOLVER.STEPS (0, the ends, the last one replaced by the
  fine-tuning midpoint ``(a + b) // 2``); ``lrs`` SOLVER.LRS (relative).
  """
  size = T * S * S
  stages = []  # Per long-cycle stage, its short cycle of [b, t, s].
  for ft, fs in multigrid.LONG_CYCLE_FACTORS:
    t, s = round(T * ft), round(S * fs)
    crops = [S * 0.5, S * 0.5 ** 0.5, s]  # Short-cycle crops of the default S.
    stages.append([[round(size / (t * c * c)), t, c] for c in crops])
  mean = [np.mean([b for b, _, _ in st]) for st in stages]
  entries, iters = [], 0.0
  for i in range(len(steps) - 1):
    for st, m in zip(stages, mean):
      e = (steps[i + 1] - steps[i]) * m / sum(mean)
      iters += e / m
      entries.append((i, st[-1], e))
  ft_epochs = (max_epoch - steps[-1]) / (steps[-1] / iters) * mean[-1]
  entries.append((len(steps) - 1, stages[-1][2], ft_epochs))
  x = max_epoch * factor / sum(e for _, _, e in entries)
  sched, total = [], 0.0
  for i, shape, e in entries:
    total += e * x
    sched.append((i, shape, round(total)))
  solver_steps = [0] + [end for _, _, end in sched]
  solver_steps[-1] = (solver_steps[-2] + solver_steps[-1]) // 2
  lrs = [0.1 ** i * shape[0] for i, shape, _ in sched]
  lrs = lrs[:-1] + [lrs[-2], lrs[-1]]
  return sched, solver_steps, lrs, sched[-1][-1]


def _reference_lr(solver_steps, lrs, max_epoch, base_lr, epoch,
                  warmup_epochs=0.0, warmup_start_lr=0.0):
  """lr_policy.get_lr_at_epoch with 'steps_with_relative_lrs', plainly."""
  def policy(e):
    bounds = solver_steps + [max_epoch]
    ind = next(k for k, b in enumerate(bounds) if e < b or k == len(bounds) - 1)
    return lrs[ind - 1] * base_lr
  if epoch < warmup_epochs:
    end = policy(warmup_epochs)
    return warmup_start_lr + epoch * (end - warmup_start_lr) / warmup_epochs
  return policy(epoch)


def _reference_shape(sched, epoch):
  """get_current_long_cycle_shape: the base [b, t, s] of an (integer) epoch."""
  return next((shape for _, shape, end in sched if epoch < end), sched[-1][1])


# SSv2 SLOWFAST_16x8_R50_multigrid: T=64, S=224, STEPS [0, 14, 18], 22 epochs,
# batch 16. The long-cycle stage (1, [1, 64, 224]) ends at 30 like the one
# before it: 0 epochs, so the reference never trains it.
SSV2 = [(0, (8, 16, 158), 11), (0, (4, 32, 158), 16), (0, (2, 32, 224), 21),
        (0, (1, 64, 224), 24), (1, (8, 16, 158), 27), (1, (4, 32, 158), 28),
        (1, (2, 32, 224), 30), (1, (1, 64, 224), 30), (2, (1, 64, 224), 33)]
SSV2_STEPS = [0, 11, 16, 21, 24, 27, 28, 30, 30, 31]  # SOLVER.STEPS.
SSV2_EXAMPLES = 168_913  # SSv2 training videos.


def _kinetics_steps(**kw):
  return multigrid.make_schedule(
      num_frames=32, crop_size=224, batch_size=64, num_examples=240_000,
      lr_steps=(0, 94, 154, 196), max_epoch=239, **kw)


def test_plain_reference_gives_the_design_numbers():
  sched, solver_steps, lrs, max_epoch = _reference_long_cycle(
      32, 224, [0, 94, 154, 196], 239)
  assert [(i, tuple(round(v) for v in shape), end)
          for i, shape, end in sched] == KINETICS
  np.testing.assert_allclose(lrs, KINETICS_LRS, rtol=1e-9)
  assert (solver_steps[-1], max_epoch) == (343, 358)
  sched, solver_steps, lrs, max_epoch = _reference_long_cycle(
      64, 224, [0, 14, 18], 22)
  assert [(i, tuple(round(v) for v in shape), end)
          for i, shape, end in sched] == SSV2
  assert solver_steps == SSV2_STEPS
  np.testing.assert_allclose(lrs, [8, 4, 2, 1, 0.8, 0.4, 0.2, 0.1, 0.1,
                                   0.01], rtol=1e-9)


def test_warmup_follows_the_reference_lr_policy():
  """Kinetics' WARMUP_EPOCHS 34 from WARMUP_START_LR 0.01 to the policy's LR
  at epoch 34 (8 x 0.1), in steps; then the phases unchanged."""
  import jax  # pylint: disable=g-import-not-at-top
  ref = _reference_long_cycle(32, 224, [0, 94, 154, 196], 239)
  sched = _kinetics_steps(round_epochs=True)
  warmup = sched.step_at_epoch(34)
  assert warmup == round(34 / 73 * sched.phases[0].num_steps)
  lr = jax.jit(sched.lr_schedule(0.1, warmup_steps=warmup,
                                 warmup_start_lr=0.01))
  assert float(lr(0)) == pytest.approx(0.01)
  assert float(lr(warmup)) == pytest.approx(0.8)
  assert float(lr(warmup - 1)) < 0.8
  for epoch in (0.5, 5, 17, 33.5, 50, 100, 150, 200, 250, 300, 340, 350):
    want = _reference_lr(ref[1], ref[2], ref[3], 0.1, epoch, 34, 0.01)
    got = float(lr(sched.step_at_epoch(epoch)))
    assert got == pytest.approx(want, rel=2e-3), epoch
  # A warm-up ending in a later phase ramps to that phase's rate.
  p1 = sched.phases[1]
  lr = sched.lr_schedule(0.1, warmup_steps=p1.start_step + 10)
  assert float(lr(p1.start_step)) == pytest.approx(
      0.4 * p1.start_step / (p1.start_step + 10))
  assert float(lr(p1.start_step + 10)) == pytest.approx(0.4)
  # No warm-up: the phases alone.
  assert float(sched.lr_schedule(0.1)(0)) == pytest.approx(0.8)


def test_optimizer_warmup_steps_apply_under_multigrid(data_dir):
  from skipside import optim  # pylint: disable=g-import-not-at-top
  c = _tiny_config(data_dir, 'bp')
  sched = multigrid.schedule_from_config(c, 256, 32)
  c.optimizer.learning_rate = 0.1
  c.optimizer.warmup_steps = 3
  c.optimizer.warmup_start_lr = 0.001
  lr = optim.learning_rate_schedule(c, sched)
  top = 0.1 * sched.lr_multiplier(3)
  np.testing.assert_allclose([float(lr(s)) for s in range(4)],
                             [0.001 + s * (top - 0.001) / 3 for s in range(3)]
                             + [top], rtol=1e-6)
  # At most half the run, as the cosine's: short runs still leave it.
  c.optimizer.warmup_steps = 10_000
  lr = optim.learning_rate_schedule(c, sched)
  half = sched.num_steps // 2
  assert float(lr(half)) == pytest.approx(0.1 * sched.lr_multiplier(half))
  assert float(lr(half - 1)) < float(lr(half))
  c.optimizer.warmup_start_lr = -1.0
  with pytest.raises(config_lib.ConfigError,
                     match='config.optimizer.warmup_start_lr'):
    config_lib.validate_config(c)


def test_round_epochs_reproduces_the_reference_ssv2_schedule():
  sched, solver_steps, lrs, max_epoch = _reference_long_cycle(
      64, 224, [0, 14, 18], 22)
  kw = dict(num_frames=64, crop_size=224, batch_size=16,
            num_examples=SSV2_EXAMPLES, lr_steps=(0, 14, 18), max_epoch=22)
  got = multigrid.make_schedule(round_epochs=True, **kw)
  # Phases end where the reference's LR or shape changes; its 0-epoch stage
  # has no steps, and the fine-tuning LR steps at (30 + 33) // 2 = 31.
  assert [p.end_epoch for p in got.phases] == [
      11, 16, 21, 24, 27, 28, 30, 31, 33]
  np.testing.assert_allclose([p.lr_multiplier for p in got.phases],
                             [8, 4, 2, 1, 0.8, 0.4, 0.2, 0.1, 0.01],
                             rtol=1e-9)
  prev = 0
  for p in got.phases:  # Steps: that phase's epochs at its mean batch.
    mean = np.mean([s.batch for s in p.cycle])
    assert p.num_steps == round((p.end_epoch - prev) * SSV2_EXAMPLES / mean)
    prev = p.end_epoch
  # Mid-epoch, every epoch: the reference's LR and long-cycle shape.
  for epoch in range(max_epoch):
    step = got.step_at_epoch(epoch + 0.5)
    want = _reference_lr(solver_steps, lrs, max_epoch, 1.0, epoch + 0.5)
    assert got.lr_multiplier(step) == pytest.approx(want, rel=1e-9), epoch
    b, t, s = _reference_shape(sched, epoch)
    base = got.phases[got.phase_index(step)].cycle[-1]
    assert base == (16 * b, t, round(s)), epoch
  # Fractional epochs (the default) keep the stage: 3,088 steps at LR 0.1.
  frac = multigrid.make_schedule(**kw)
  assert len(frac.phases) == len(got.phases) + 1
  assert (frac.phases[7].num_steps, frac.phases[7].lr_multiplier) == (
      3088, pytest.approx(0.1))
  # Short cycle alone: the reference truncates STEPS and MAX_EPOCH x 1.5
  # (Charades: [0, 41, 49], 57 -> [0, 61, 73], 85).
  short = multigrid.make_schedule(
      num_frames=64, crop_size=224, batch_size=16, num_examples=10_000,
      lr_steps=(0, 41, 49), max_epoch=57, long_cycle=False, round_epochs=True)
  assert [p.end_epoch for p in short.phases] == [61, 73, 85]


def test_round_epochs_is_a_config_option(data_dir):
  c = _tiny_config(data_dir, 'bp')
  assert not c.multigrid.round_epochs  # Tiny runs would lose whole phases.
  c.train.num_steps = 2400  # 37.5 baseline epochs of the 256 videos.
  frac = multigrid.schedule_from_config(c, 256, 32)
  c.multigrid.round_epochs = True
  whole = multigrid.schedule_from_config(c, 256, 32)
  assert all(float(p.end_epoch).is_integer() for p in whole.phases)
  assert not all(float(p.end_epoch).is_integer() for p in frac.phases)
  c.train.num_steps = 24  # 0.375 epochs: whole LR steps round to 0 epochs.
  with pytest.raises(ValueError, match='config.multigrid.round_epochs'):
    multigrid.schedule_from_config(c, 256, 32)


# ---------------------------------------------------------------------------
# Shape buckets.

def _tiny_net(frame=(16, 16, 1)):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from skipside import network, stages  # pylint: disable=g-import-not-at-top
  rngs = nnx.Rngs(0)
  del jnp
  return network.split(network.Network(
      [stages.Conv(1, 4, stride=2, rngs=rngs),
       stages.Conv(4, 8, stride=2, rngs=rngs),
       stages.ResidualConv(8, 8, rngs=rngs)],
      stages.ClassifierHead(8, 3, rngs=rngs), frame_shape=frame,
      skips=[(0, 2)], combine='concat', rngs=rngs))


def test_spec_per_frame_size_and_channel_error():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from skipside import engine, network  # pylint: disable=g-import-not-at-top
  spec, params = _tiny_net()
  small = network.for_frame_shape(spec, params, (8, 8, 1))
  assert small.out_shapes == ((4, 4, 4), (2, 2, 8), (2, 2, 8))
  assert network.for_frame_shape(spec, params, (8, 8, 1)) is small
  assert network.for_frame_shape(small, params, (16, 16, 1)) is spec
  labels = jnp.zeros((2,), jnp.int32)
  out = engine.init_carry(spec, params, jnp.zeros((2, 3, 8, 8, 1)), labels,
                          'sideways')
  assert [o.shape for o in out.outs] == [(2, 4, 4, 4), (2, 2, 2, 8),
                                         (2, 2, 2, 8)]
  with pytest.raises(ValueError, match=r'\(8, 8, 3\).*1 channels'):
    engine.loss_and_grads(spec, params, jnp.zeros((2, 3, 8, 8, 3)), labels,
                          mode='bp')
  with pytest.raises(ValueError, match=r'skip edge \(0, 2\)'):
    network.for_frame_shape(spec, params, (10, 10, 1))  # 5 vs 3: no pooling.


def test_shape_not_in_table_is_an_error_naming_it():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  f = jax.jit(lambda x: (x * 2).sum())
  keys = [(4, 2), (2, 4)]
  table = aot.compile_buckets(
      lambda k: f.lower(jax.ShapeDtypeStruct(k, jnp.float32)), keys,
      key_fn=lambda x: tuple(x.shape), name='toy')
  assert set(table.executables) == set(keys)
  a, b, c = np.ones((4, 2), np.float32), np.ones((2, 4)), np.ones((3, 3))
  with aot.CompileClock() as compiles:
    assert float(table(a)) == 16
    assert float(table(b.astype(np.float32))) == 16
    with pytest.raises(aot.ShapeNotCompiledError,
                       match=r'toy: shape \(3, 3\) is not in the table'):
      table(c)
  assert compiles.compilations == 0
  with aot.CompileClock() as compiles:  # The counter does count.
    f(jnp.ones((5, 5)))
  assert compiles.compilations >= 1


def test_mesh_engine_runs_every_bucket():
  import jax  # pylint: disable=g-import-not-at-top
  from skipside import engine, mesh, network  # pylint: disable=g-import-not-at-top
  spec, params = _tiny_net()
  m = mesh.make_mesh(2, 2)
  base = mesh.place(spec, m, params=params)
  for side in (8, 16):  # Every bucket on the base placement: same params.
    bucket = network.for_frame_shape(spec, params, (side, side, 1))
    mspec = mesh.place(bucket, m, groups=base.groups)
    clip = jax.random.normal(jax.random.key(side), (4, 4, side, side, 1))
    labels = jax.numpy.arange(4) % 3
    got = mesh.loss_and_grads(mspec, params, clip, labels, mode='sideways')
    want = engine.loss_and_grads(spec, params, clip, labels, mode='sideways')
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                         atol=1e-6),
                 got[1], want[1])


# ---------------------------------------------------------------------------
# Sampling.

def test_sampling_stride_range_and_scale_jitter_follow_the_shape():
  from skipside.data import pipeline, sources, transforms  # pylint: disable=g-import-not-at-top
  sched = multigrid.make_schedule(
      num_frames=8, crop_size=32, batch_size=4, num_examples=64,
      lr_steps=(0, 2), max_epoch=4, stride=2, scale_jitter=(32, 40))
  base = transforms.ClipParams(num_frames=8, stride=2, crop_size=32,
                               scale_jitter=(32, 40))
  small = multigrid.Shape(64, 2, 16)
  p = multigrid_loader.clip_params_for(sched, small, base)
  assert (p.num_frames, p.crop_size, p.stride, p.max_stride) == (2, 16, 2, 8)
  assert p.scale_jitter == (16, 40)  # Lower bound x 16/32.
  full = multigrid_loader.clip_params_for(sched, multigrid.Shape(4, 8, 32), base)
  assert (full.max_stride, full.scale_jitter) == (None, (32, 40))
  # Frames hold their own index: the sampled strides cover [2, 8].
  video = np.broadcast_to(np.arange(64, dtype=np.uint8)[:, None, None, None],
                          (64, 40, 48, 1))
  source = sources.Source(data=[{'video': video, 'label': 0}],
                          read=sources.read_array,
                          label=lambda r: r['label'], num_classes=1)
  strides = set()
  for seed in range(200):
    e = pipeline.load_clip(source, source.data[0],
                           np.random.default_rng(seed), p)
    assert e['video'].shape == (2, 16, 16, 1)
    frames = e['video'][:, 0, 0, 0].astype(int)
    strides.add(int(frames[1] - frames[0]))
  assert strides == set(range(2, 9))


# ---------------------------------------------------------------------------
# Training integration.

@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _tiny_config(data_dir, *variants):
  from experiments.configs import multigrid as mg_config  # pylint: disable=g-import-not-at-top
  c = mg_config.get_config(','.join(('tiny',) + variants))
  c.data.data_dir = data_dir
  return c


def test_iterator_follows_the_schedule_and_resumes_exactly(data_dir):
  c = _tiny_config(data_dir, 'bp')
  data_config = config_lib.data_config(c)
  it = multigrid_loader.MultigridIterator(
      data_config, multigrid.schedule_from_config(c, 256, 32))
  sched = it.schedule
  for step in range(5):
    batch = next(it)
    s = sched.shape(step)
    assert batch['video'].shape == (s.batch, s.frames, s.crop, s.crop, 1)
    assert batch['label'].shape == (s.batch,)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  again = multigrid_loader.MultigridIterator(data_config, sched)
  again.set_state(state)
  got = [next(again) for _ in range(2)]
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a['video'], b['video'])
    np.testing.assert_array_equal(a['label'], b['label'])
  it.close()
  again.close()


def _bad_source(num=40, bad=(3, 17)):
  """Records whose video shows its own index; records in ``bad`` raise."""
  from skipside.data import sources, video_folder  # pylint: disable=g-import-not-at-top

  def read(record, select):
    if record['index'] in bad:
      raise video_folder.DecodeError('corrupt', f'video{record["index"]}')
    return sources.read_array(record, select)
  records = [{'video': np.full((16, 24, 24, 1), i, np.uint8), 'label': i % 3,
              'index': i} for i in range(num)]
  return sources.Source(data=records, read=read,
                        label=sources.label_of('label'), num_classes=3,
                        frame_shape=(24, 24, 1), name='indexed')


@pytest.mark.parametrize('shuffle', [True, False])
def test_processes_read_their_rows_of_one_global_order(data_dir, shuffle):
  """Two shards' batches, row blocks stacked, are one process's batches,
  bad videos (replaced by another record, shuffled or not) included."""
  c = _tiny_config(data_dir, 'bp')
  c.data.shuffle = shuffle
  sched = multigrid.schedule_from_config(c, 40, 24)
  source = _bad_source()

  def batches(shard_index, shard_count, steps=6):
    data_config = config_lib.data_config(c)
    data_config.shard_index, data_config.shard_count = (shard_index,
                                                        shard_count)
    it = multigrid_loader.MultigridIterator(data_config, sched, source=source)
    out = [next(it) for _ in range(steps)]
    stats = it.stats.metrics()
    it.close()
    return out, stats

  whole, stats = batches(0, 1)
  parts = [batches(i, 2)[0] for i in range(2)]
  for step, want in enumerate(whole):
    for key in ('video', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([p[step][key] for p in parts]), want[key])
  seen = np.concatenate([b['video'][:, 0, 0, 0, 0] for b in whole])
  assert not {3, 17} & set(np.round(seen * 255).astype(int))
  assert stats['data/failed_videos'] >= 1  # Some bad record was drawn.


def test_loader_state_of_an_older_skipside_resumes_with_a_warning(
    data_dir, caplog):
  """A state saved when each process counted its own records ('position')
  resumes at that many records per process of the one order."""
  c = _tiny_config(data_dir, 'bp')
  data_config = config_lib.data_config(c)
  data_config.shard_index, data_config.shard_count = 1, 2
  it = multigrid_loader.MultigridIterator(
      data_config, multigrid.schedule_from_config(c, 256, 32))
  state = it.get_state()
  assert state['multigrid'] == {'step': 0, 'global_position': 0}
  state['multigrid'] = {'step': 3, 'position': 20}
  with caplog.at_level('WARNING'):
    it.set_state(state)
  assert (it.step, it.position) == (3, 40)
  assert 'older skipside' in caplog.text
  it.close()


def test_a_failed_run_closes_its_loader_threads(tmp_path, data_dir):
  """A run that stops on a non-finite loss (or any error) shuts the
  multigrid loader's thread pools down instead of leaking them."""
  from skipside import train  # pylint: disable=g-import-not-at-top
  c = _tiny_config(data_dir, 'bp')
  c.optimizer.name = 'sgd'
  c.optimizer.learning_rate, c.optimizer.grad_clip_norm = 1e36, 0.0
  with pytest.raises(train.NonFiniteLossError) as failure:
    train.train_and_evaluate(c, str(tmp_path))
  loaders, tb = [], failure.value.__traceback__
  while tb is not None:  # The loop's own loader, from its frame.
    found = [getattr(v, 'train_iter', v)  # Also the run's (train._Run).
             for v in tb.tb_frame.f_locals.values()]
    loaders += [v for v in found
                if isinstance(v, multigrid_loader.MultigridIterator)]
    tb = tb.tb_next
  assert loaders
  for it in loaders:  # pylint: disable=protected-access
    assert it._pool._shutdown and it._ahead._shutdown


def test_whole_schedule_trains_with_zero_compilations_after_the_start(
    tmp_path, data_dir):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from skipside import train  # pylint: disable=g-import-not-at-top
  c = _tiny_config(data_dir, 'bp')
  sched = multigrid.schedule_from_config(c, 256, 32)
  assert len(sched.buckets()) >= 6  # Long x short cycle shapes.
  summary = train.train_and_evaluate(c, str(tmp_path))
  assert summary['step'] == sched.num_steps < c.train.num_steps
  # Every train shape and the eval shape were compiled before the first
  # step: none in the loop (train steps, evaluations, checkpoints).
  assert summary['compilations_in_loop'] == 0
  assert summary['compile_s'] > 0
  assert np.isfinite(summary['train/loss'])
  # Every logged step trained at its phase's rate (after the warm-up).
  from skipside import optim  # pylint: disable=g-import-not-at-top
  lr = optim.learning_rate_schedule(c, sched)
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f if 'train/loss' in line]
  assert len({r['train/multigrid_phase'] for r in rows}) > 1
  for r in rows:
    assert r['train/multigrid_phase'] == sched.phase_index(r['step'] - 1)
    np.testing.assert_allclose(r['train/learning_rate'],
                               float(lr(r['step'] - 1)), rtol=1e-6)
  mngr = ocp.CheckpointManager(str(tmp_path / 'checkpoints'))
  meta = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
      meta=ocp.args.JsonRestore())).meta
  mngr.close()
  assert meta['multigrid'] == sched.position(sched.num_steps)


def test_multigrid_config_errors_name_the_key(data_dir):
  c = _tiny_config(data_dir)
  c.optimizer.schedule = 'cosine'
  with pytest.raises(config_lib.ConfigError, match='config.optimizer.schedule'):
    config_lib.validate_config(c)


def test_depth_errors_name_min_frames_the_bucket_and_the_depth(data_dir):
  c = _tiny_config(data_dir, 'bp')  # 3 stages: pipeline depth 2.
  sched = multigrid.schedule_from_config(c, 256, 32)  # min_frames=1.
  short = [s for s in sched.buckets() if s.frames <= 2]
  assert short and multigrid.depth_errors(sched, 2, 'bp') == []
  for mode in ('sideways', 'pipelined_bp'):
    errors = multigrid.depth_errors(sched, 2, mode)
    assert len(errors) == 1
    for part in ('config.multigrid.min_frames', repr(short[0]),
                 'pipeline depth 2', 'min_frames >= 3', repr(mode)):
      assert part in errors[0]
  c.multigrid.min_frames = 3
  sched = multigrid.schedule_from_config(c, 256, 32)
  assert multigrid.depth_errors(sched, 2, 'sideways') == []


def test_norm_base_larger_than_the_device_batch_is_explained(data_dir):
  """Charades/SSv2 layout: 16 clips on 8 data-parallel devices, base 8. The
  reference switches the norm per stage (sync BN below the base); here the
  error says so and how to lay the run out instead."""
  c = _tiny_config(data_dir, 'bp')
  c.model.stages = 'convbn:4:2,convbn:8:2,res:8'
  c.model.norm_base_size = 8
  c.data.batch_size = 16
  c.mesh.data, c.mesh.stage = 8, 1
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate_config(c, num_devices=8)
  for part in ('config.model.norm_base_size: 8', '2 clips', 'config.mesh.data',
               'synchronized', 'not supported'):
    assert part in str(e.value)
  c.mesh.data, c.mesh.stage = 2, 1  # 8 clips per device: every bucket splits.
  config_lib.validate_config(c, num_devices=8)


def test_schedule_on_a_mesh_trains_with_zero_compilations(tmp_path, data_dir):
  """Multigrid + the mesh engine: every bucket placed and compiled ahead."""
  from skipside import train  # pylint: disable=g-import-not-at-top
  c = _tiny_config(data_dir)  # sideways, chain + skip
  c.mesh.data, c.mesh.stage = 2, 2
  summary = train.train_and_evaluate(c, str(tmp_path))
  sched = multigrid.schedule_from_config(c, 256, 32)
  assert summary['step'] == sched.num_steps
  assert summary['compilations_in_loop'] == 0
  assert np.isfinite(summary['train/loss'])
  assert 'eval/accuracy' in summary


def test_schedule_with_progressive_training(tmp_path, data_dir):
  """Multigrid + PGT: each bucket's frames cut into fixed-length fragments."""
  from skipside import train  # pylint: disable=g-import-not-at-top
  c = _tiny_config(data_dir, 'bp')
  c.data.num_frames = 8
  c.model.stages = 'conv:4:2,tconv,conv:8:2,tconv'
  c.model.skips = ()
  c.progressive.enabled = True
  c.progressive.fragment_frames = 2
  c.progressive.cache_policy = 'avg'
  summary = train.train_and_evaluate(c, str(tmp_path / 'run'))
  sched = multigrid.schedule_from_config(c, 256, 32)
  assert {s.frames for s in sched.buckets()} == {2, 4, 8}
  assert summary['step'] == sched.num_steps
  assert summary['compilations_in_loop'] == 0
  assert np.isfinite(summary['train/loss'])
  c.progressive.fragment_frames = 3  # A 4-frame bucket does not split.
  with pytest.raises(config_lib.ConfigError, match='bucket of clip shape'):
    train.train_and_evaluate(c, str(tmp_path / 'run2'))
