"""Compile-only TPU planning (skipside/tpu_plan.py) on a machine without a TPU.

Needs libtpu (``pip install -e '.[tpu]'``); skipped only when it is absent.
The figures are checked against programs whose footprint is computed by hand:
a matmul, loop-carried buffers, and the mesh engine's Sideways step on a 4x4
('data', 'stage') mesh of v5e:4x4.
"""

import dataclasses
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

  # Arguments: params and optimizer state in full, the batch's shard.
  p_low, p_high = _bounds((state.params, state.opt_state))
  b_low, b_high = _bounds((clip, labels), rows)
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
  cmd = [sys.executable, '-m', 'launch.train',
         '--config=experiments/configs/default.py:tiny',
         f'--config.data.data_dir={tmp_path / "tfds"}',
         '--config.mesh.stage=2', '--compile_only', '--topology=v5e:2x2',
         '--hbm_gib=0.001']  # 1 MiB per chip: too small for the train step.
  # As the README writes it: no JAX_PLATFORMS, so libtpu is what jax tries
  # first, and the planner must have quieted it before anything starts it.
  env = dict(os.environ, XLA_FLAGS='')
  env.pop('JAX_PLATFORMS', None)
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode != 0, proc.stdout[-3000:]
  lines = proc.stdout.splitlines()
  header = next(l for l in lines if l.startswith('program'))
  assert all(k in header for k in ('args', 'out', 'temp', 'peak HBM',
                                   'FLOPs/chip', 'compile s'))
  rows = [l.split()[0] for l in lines[lines.index(header) + 2:]
          if l and not l.startswith('(')]
  assert rows == ['train', 'eval']
  assert 'does not fit' in proc.stderr and 'train (4, 6, 32, 32, 1)' in \
      proc.stderr
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
