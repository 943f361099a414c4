"""Compile-only TPU planning (skipside/tpu_plan.py) on a machine without a TPU.

Needs libtpu (``pip install -e '.[tpu]'``); skipped only when it is absent.
The figures are checked against programs whose footprint is computed by hand:
a matmul, loop-carried buffers, and the mesh engine's Sideways step on a 4x4
('data', 'stage') mesh of v5e:4x4.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

pytest.importorskip('libtpu')

from experiments.configs import default  # noqa: E402
from skipside import checkpoints, engine, mesh, tpu_plan  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2 ** 20
TOPOLOGY = 'v5e:4x4'
BATCH, FRAMES, SIDE, CLASSES = 16, 8, 32, 4


@pytest.fixture(scope='module')
def devices():
  return tpu_plan.topology_devices(TOPOLOGY)


def _compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile()


def _tiled(shape, itemsize: int = 4) -> int:
  """An upper bound of an array's bytes in TPU HBM (tiled layout): the two
  minor dims padded to (8, 128) tiles, rank 1 to 1024 elements, >= 512 B
  (each bound measured on v5e for f32/int32 arrays of awkward shapes)."""
  shape = tuple(shape)
  if not shape:
    return 512
  if len(shape) == 1:
    return max(512, -(-shape[0] // 1024) * 1024 * itemsize)
  lead = math.prod(shape[:-2])
  return max(512, lead * -(-shape[-2] // 8) * 8 * -(-shape[-1] // 128) * 128
             * itemsize)


def _bounds(tree, rows: int | None = None):
  """(logical bytes, tiled upper bound) of ``tree``'s leaves; ``rows``
  replaces the leading (batch) dim (a chip's 'data' shard)."""
  low = high = 0
  for x in jax.tree.leaves(tree):
    shape = tuple(np.shape(x))
    if rows is not None:
      shape = (rows, *shape[1:])
    low += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    high += _tiled(shape, jnp.dtype(x.dtype).itemsize)
  return low, high


# -- The figures on programs of known footprint. ------------------------------

def test_figures_on_programs_of_known_footprint(devices):
  m = mesh.make_mesh(4, 4, devices=devices)
  rep = NamedSharding(m, P())
  n = 2048  # (n, n) f32 = 16 MiB.
  a = jax.ShapeDtypeStruct((4 * n, n), jnp.float32,
                           sharding=NamedSharding(m, P('data')))
  b = jax.ShapeDtypeStruct((n, n), jnp.float32, sharding=rep)
  c = _compiled(lambda a, b: a @ b, a, b)
  mem = c.memory_analysis()
  assert mem.argument_size_in_bytes == 2 * 16 * MiB  # A's shard + B.
  assert mem.output_size_in_bytes == 16 * MiB
  assert tpu_plan._flops(c) == 2 * n ** 3  # Per chip: its shard's product.

  def carried(mib):  # A loop-carried buffer of ``mib`` MiB, scalar result.
    def fn(s):
      def body(x, i):
        return jnp.sin(x) + i, None
      x, _ = lax.scan(body, jnp.full((mib * MiB // 4096, 1024), s),
                      jnp.arange(10.0))
      return x.sum()
    return _compiled(fn, jax.ShapeDtypeStruct((), jnp.float32, sharding=rep))
  temp = carried(256).memory_analysis().temp_size_in_bytes
  assert 256 * MiB <= temp <= 257 * MiB  # The carry is in temp: HBM.
  # Documented caveat: a carry that fits v5e's on-chip VMEM is placed there
  # by memory-space assignment and uses no HBM (tpu_plan's docstring).
  assert carried(64).memory_analysis().temp_size_in_bytes < MiB


# -- The mesh engine's Sideways step on a 4x4 mesh of v5e:4x4. ----------------

def _config(mode):
  c = default.get_config('tiny')
  c.mode, c.mesh.stage, c.data.batch_size = mode, 4, BATCH
  return c


def _info(frames):
  return types.SimpleNamespace(element_shape=(frames, SIDE, SIDE, 1),
                               num_classes=CLASSES, batch_size=BATCH)


@pytest.fixture(scope='module')
def reports(devices):
  """{(mode, frames): [train report, eval report]} on v5e:4x4 as 4x4."""
  return {(mode, t): tpu_plan.plan(_config(mode), TOPOLOGY, devices=devices,
                                   info=_info(t), check=False)
          for mode, t in (('sideways', FRAMES), ('sideways', 4 * FRAMES),
                          ('bp', 4 * FRAMES))}


def test_sideways_step_memory_within_hand_computed_bounds(reports):
  spec, _, state = checkpoints.init_state(_config('sideways'), _info(FRAMES))
  rows = BATCH // 4  # Each chip's 'data' shard.
  clip = np.zeros((BATCH, FRAMES, SIDE, SIDE, 1), np.float32)
  labels = np.zeros((BATCH,), np.int32)
  step = reports['sideways', FRAMES][0]
  assert step.name == 'train' and step.shape == clip.shape

  # Arguments: params and optimizer state in full, the batch's shard: its
  # rows and, T dividing by the 4 stage devices, T/4 of the frames
  # (mesh.time_sharded).
  p_low, p_high = _bounds((state.params, state.opt_state))
  b_low, b_high = _bounds((clip[:, :FRAMES // 4], labels), rows)
  assert p_low + b_low <= step.args <= p_high + b_high

  # Results: new params and optimizer state, the carry, metrics, logits.
  carry = jax.eval_shape(lambda: engine.init_carry(
      spec, state.params, clip, labels, 'sideways'))
  out_high = p_high + _bounds(carry)[1] + _bounds(
      np.zeros((BATCH, CLASSES), np.float32))[1] + 8 * 512
  assert step.out <= out_high

  # Scratch: Sideways keeps O(L) buffers -- per stage its input, output,
  # message, VJP residuals and transfers of one tick. Bound: 8 tiled copies
  # of every stage's input and output at the chip's batch, plus 4 copies of
  # the params and optimizer state (gradients, flat rows, updates).
  tick = sum(_tiled((rows, *s)) for s in spec.in_shapes + spec.out_shapes)
  temp_bound = 8 * tick + 4 * p_high
  assert step.temp <= temp_bound
  assert step.peak <= p_high + b_high + out_high + temp_bound + step.code
  # ... and it does not grow with the clip (DESIGN.md §1, oracle 6), while
  # exact backprop's stores every tick (each chip its own stages' operands,
  # rematerialized: several times Sideways' scratch at T=32).
  # (XLA's schedule may differ a little between the lengths: never larger.)
  assert reports['sideways', 4 * FRAMES][0].temp <= step.temp
  assert reports['bp', 4 * FRAMES][0].temp > 4 * reports[
      'sideways', 4 * FRAMES][0].temp
  assert step.flops > 0 and step.compile_s > 0


def test_clip_memory_per_chip_grows_by_its_share_of_frames(reports):
  """On every stage device (> 0 included) Sideways' scratch does not grow
  with T, and its arguments grow by its share of the clip: T/S frames of
  its rows (4x the frames here: 24 more, 6 per chip), nothing else."""
  short, long = reports['sideways', FRAMES][0], reports[
      'sideways', 4 * FRAMES][0]
  assert long.temp <= short.temp
  rows, share = BATCH // 4, 3 * FRAMES // 4
  low, high = _bounds(np.zeros((rows, share, SIDE, SIDE, 1), np.float32))
  assert low <= long.args - short.args <= high
  assert long.out == short.out


@pytest.mark.parametrize('sharding', ['stage', 'even'])
def test_step_model_flops_match_a_hand_count(sharding):
  """The model's FLOPs per step of the Sideways train step on a 2x2 mesh of
  an MLP net: per tick, the busiest device's stages each cost a forward
  and two backward products (input and weight gradients), 3 x 2*b*in*out,
  and its head the same; times the ticks (T). Nothing else multiplies."""
  b, t, side, classes, width = 4, 8, 8, 4, 128
  c = default.get_config('tiny')
  c.mode, c.mesh.stage, c.data.batch_size = 'sideways', 2, 2 * b
  c.model.stages = ','.join([f'mlp:{width}'] * 4)
  c.model.skips = ()
  c.mesh.state_sharding = sharding  # The even layout's moves are no flops.
  info = types.SimpleNamespace(element_shape=(t, side, side, 1),
                               num_classes=classes, batch_size=2 * b)
  # The topology's own devices: the even layout's all-reduce over every
  # chip fails to compile on 4 chips taken from a 4x4 slice.
  step, = tpu_plan.plan(c, 'v5e:2x2', info=info,
                        check=False, only=('train',))
  dense = lambda i, o: 2 * b * i * o
  # Flops-balanced groups: stages 0-1 on device 0, 2-3 and the head on 1;
  # device 0's input gradient of stage 0 is dropped (2 products there).
  dev0 = 2 * dense(side * side, width) + 3 * dense(width, width)
  dev1 = 3 * (2 * dense(width, width) + dense(width, classes))
  assert step.cost.ticks == t
  assert step.cost.flops == t * max(dev0, dev1)
  assert step.cost.step_s > 0 and step.clips_per_s > 0


def test_step_model_counts_loop_trips_and_real_conv_taps():
  """On this host's backend: a convolution in a scan of 5 counts 5 times,
  and SAME padding's missing taps do not count (XLA's own cost analysis
  counts the loop body once)."""
  cpu = jax.devices('cpu')[0]

  def fn(x, k):
    def body(h, _):
      y = lax.conv_general_dilated(h, k, (1, 1), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      return jnp.tanh(y), None
    return lax.scan(body, x, None, length=5)[0].sum()

  x = jax.ShapeDtypeStruct((8, 16, 16, 4), jnp.float32,
                           sharding=jax.sharding.SingleDeviceSharding(cpu))
  k = jax.ShapeDtypeStruct((3, 3, 4, 4), jnp.float32,
                           sharding=jax.sharding.SingleDeviceSharding(cpu))
  cost = tpu_plan.step_cost(_compiled(fn, x, k).as_text(), 1e12, 1e11, 1e10)
  taps = (16 * 3 - 2) ** 2  # Per image: 16 outputs x 3 taps less 2 edges.
  assert cost.ticks == 5
  assert cost.flops == 5 * 2 * 8 * taps * 4 * 4


def test_step_model_counts_scan_outputs_as_slices():
  """A scan that stores one tick per step into a T-long buffer moves one
  tick's bytes per step (in place), not the buffer: HBM bytes per tick do
  not grow with T (they grew 4x with 4x T before)."""
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])

  def per_tick(t):
    def fn(x):
      return lax.scan(lambda h, _: (jnp.sin(h), h * 2), x, None, length=t)
    x = jax.ShapeDtypeStruct((256, 1024), jnp.float32, sharding=cpu)
    cost = tpu_plan.step_cost(_compiled(fn, x).as_text(), 1e12, 1e11, 1e10)
    assert cost.ticks == t
    return cost.hbm_bytes / t
  assert per_tick(64) < 1.1 * per_tick(16)


def test_xla_refusal_is_one_verdict_line(devices):
  """A program XLA itself refuses (RESOURCE_EXHAUSTED at compile) is a
  report with its error, one verdict line naming it, is_oom in the JSON."""
  m = mesh.make_mesh(2, 2, devices=devices[:4])
  x = jax.ShapeDtypeStruct((1024,), jnp.float32,
                           sharding=NamedSharding(m, P()))
  big = lambda x: jnp.sin(jnp.broadcast_to(x, (5 * 2 ** 20, 1024)))  # 20 GiB.
  chip = tpu_plan.chip_of(TOPOLOGY)
  r = tpu_plan.report('big', (1024,), lambda: jax.jit(big).lower(x), chip)
  assert 'RESOURCE_EXHAUSTED' in r.error
  with pytest.raises(tpu_plan.MemoryExceededError) as e:
    tpu_plan.check_memory([r], chip)
  assert str(e.value).startswith('big (1024,): XLA refused it on v5e')
  assert '\n' not in str(e.value)
  table = tpu_plan.plan_json([r], chip)
  assert not table['fits'] and table['programs'][0]['is_oom']


def test_data_shapes_need_no_dataset(tmp_path):
  """A video-folder config plans from its own keys: no data dir needed
  (before, the planner opened the folder and failed)."""
  from experiments.configs import hmdb51
  c = hmdb51.get_config('cpu_skip_sideways')
  c.data.data_dir = str(tmp_path / 'missing')
  info, schedule = tpu_plan.data_shapes(c)
  assert info.element_shape == (8, 64, 64, 3) and info.num_classes == 51
  assert schedule is None and not os.path.exists(c.data.data_dir)


def test_over_memory_error_names_the_shape(reports):
  got = reports['sideways', FRAMES]
  chip = tpu_plan.chip_of(TOPOLOGY)
  assert chip.hbm_bytes == 16 * 2 ** 30  # v5e.
  tpu_plan.check_memory(got, chip)  # Fits.
  small = dataclasses.replace(chip, hbm_bytes=got[0].peak - 1)
  with pytest.raises(tpu_plan.MemoryExceededError,
                     match=r'train \(16, 8, 32, 32, 1\): [0-9.]+ MiB') as e:
    tpu_plan.check_memory(got, small)
  assert 'eval' not in str(e.value)  # Only the shape that does not fit.
  table = tpu_plan.table(got, chip)
  assert 'train' in table and '16x8x32x32x1' in table and 'peak HBM' in table


def test_mesh_shape_errors_name_the_fix():
  with pytest.raises(ValueError, match='config.mesh.stage to a divisor of 16'):
    tpu_plan.mesh_shape(16, 3)
  assert tpu_plan.mesh_shape(256, 8) == (32, 8)
  with pytest.raises(ValueError, match="topology 'v9:2x2'"):
    tpu_plan.chip_of('v9:2x2')


def test_launcher_compile_only_prints_the_table(tmp_path):
  """A Kinetics-style video-folder config with no dataset on disk plans:
  the table with the prediction, one 'does not fit' line per shape, exit 1,
  and the JSON verdict."""
  plan = tmp_path / 'plan.json'
  cmd = [sys.executable, '-m', 'launch.train',
         '--config=experiments/configs/hmdb51.py:cpu_skip_sideways',
         f'--config.data.data_dir={tmp_path / "no_such_dir"}',
         '--config.data.crop_size=32',
         '--config.data.batch_size=4',
         '--config.mesh.stage=2', '--compile_only', '--topology=v5e:2x2',
         f'--plan_json={plan}',
         '--hbm_gib=0.001']  # 1 MiB per chip: too small for either program.
  # As the README writes it: no JAX_PLATFORMS, so libtpu is what jax tries
  # first, and the planner must have quieted it before anything starts it.
  env = dict(os.environ, XLA_FLAGS='')
  env.pop('JAX_PLATFORMS', None)
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  header = next(l for l in lines if l.startswith('program'))
  assert all(k in header for k in ('args', 'out', 'temp', 'peak HBM',
                                   'FLOPs/chip', 'compile s', 'tick ms',
                                   'step s', 'clips/s'))
  rows = [l.split()[0] for l in lines[lines.index(header) + 2:]
          if l and not l.startswith('(')]
  assert rows == ['train', 'eval']
  verdict = [l for l in proc.stderr.splitlines() if l.startswith(
      'does not fit: ')]
  assert [l.split()[3:8] for l in verdict] == [
      ['train', '(4,', '8,', '32,', '32,'], ['eval', '(4,', '8,', '32,',
                                             '32,']], proc.stderr[-3000:]
  got = json.load(open(plan))
  assert not got['fits'] and got['topology'] == 'v5e:2x2'
  assert [(r['program'], r['is_oom']) for r in got['programs']] == [
      ('train', True), ('eval', True)]
  assert all(r['clips_per_s'] > 0 and r['peak'] > 2 ** 20
             for r in got['programs'])
  # The sharding dump: packed params split over 'stage', the clip's rows
  # over 'data' and its 8 frames over the 2 'stage' devices.
  layout = got['programs'][0]['shardings']
  assert "P('stage',)" in layout['in'].values(), layout['in']
  assert "P('data', 'stage')" in layout['in'].values(), layout['in']
  assert layout['out']
  for noise in ('TPU_WORKER_HOSTNAMES', 'Failed to find host bounds',
                'unexpected worker hostname'):  # libtpu kept quiet.
    assert noise not in proc.stderr, proc.stderr[-3000:]


def test_planning_env_does_not_look_like_a_tpu_vm(monkeypatch):
  """After compile-only planning, launchers in this process (or its children)
  must not take the machine for a Cloud TPU and start jax.distributed."""
  from launch import distributed
  for k in ('TPU_ACCELERATOR_TYPE', 'TPU_WORKER_HOSTNAMES', 'TPU_NAME',
            'CLOUD_TPU_TASK_ID', tpu_plan.COMPILE_ONLY_ENV):
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setenv('TPU_ACCELERATOR_TYPE', 'v5litepod-16')
  assert distributed.on_cloud_tpu() or not _no_tpu_devices()
  monkeypatch.delenv('TPU_ACCELERATOR_TYPE')
  tpu_plan.silence_libtpu(tpu_plan.chip_of('v5e:4x4'))
  if _no_tpu_devices():
    assert not distributed.on_cloud_tpu()


def _no_tpu_devices():
  import glob
  return not (glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def test_chunked_sideways_is_flat_in_the_clip_length(devices):
  """config.train.chunk_frames: the planner compiles the chunk programs the
  loop runs (skipside/streaming.py), and every chip's memory, stages > 0
  included, is the same for a clip 4x longer; the whole clip's grows."""
  def plan(frames, chunk):
    c = _config('sideways')
    c.data.num_frames, c.train.chunk_frames, c.train.flush = frames, chunk, 3
    return {r.name: r for r in tpu_plan.plan(c, TOPOLOGY, devices=devices,
                                            info=_info(frames), check=False)}
  short, long = plan(4 * FRAMES, FRAMES), plan(16 * FRAMES, FRAMES)
  assert list(long) == ['train first chunk', 'train chunk', 'train flush',
                        'train update', 'eval first chunk', 'eval chunk']
  for name in long:
    assert long[name].shape == (BATCH, FRAMES, SIDE, SIDE, 1)
    assert not long[name].error
    assert (long[name].args, long[name].temp, long[name].peak) == (
        short[name].args, short[name].temp, short[name].peak), name
  whole = {r.name: r for r in tpu_plan.plan(
      _config('sideways'), TOPOLOGY, devices=devices,
      info=_info(16 * FRAMES), check=False, only=('train',))}['train']
  assert whole.args > max(r.args for r in long.values())


def test_libtpu_flags_reach_the_planner(tmp_path):
  """XLA/libtpu flags for planning go in LIBTPU_INIT_ARGS, as on a TPU VM:
  the planner passes them through to the TPU compiler (an unknown flag is
  named by libtpu and stops the plan)."""
  cmd = [sys.executable, '-m', 'launch.train',
         '--config=experiments/configs/default.py:tiny',
         f'--config.data.data_dir={tmp_path / "none"}', '--compile_only',
         '--topology=v5e:2x2']
  env = dict(os.environ, XLA_FLAGS='',
             LIBTPU_INIT_ARGS='--xla_no_such_flag_for_skipside=1')
  env.pop('JAX_PLATFORMS', None)
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode != 0
  assert "Unknown command line flag 'xla_no_such_flag_for_skipside'" in (
      proc.stdout + proc.stderr), proc.stderr[-3000:]
