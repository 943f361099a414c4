r"""Compile-only planning of a TPU pod job on a machine without a TPU.

Before waiting for a pod, compile the run's programs for the pod's topology
here (XLA's TPU compiler ships in ``libtpu``: ``pip install
'skipside[tpu]'``) and read what each chip would hold::

    python -m launch.train --config=experiments/configs/default.py \
        --compile_only --topology=v5e:16x16
    python -m launch.train --config=... --compile_only --topology=v4:4x4x8
    python -m launch.train --config=... --compile_only --topology=v5p:4x4x4 \
        --num_slices=2

or from Python::

    reports = tpu_plan.plan(config, 'v5e:16x16')
    print(tpu_plan.table(reports))

What is compiled: the mesh engine's training step (``skipside.train``'s step
on ``skipside.mesh``) for every batch shape the run uses -- every multigrid
bucket, the progressive (PGT) step whose one program runs all fragments of a
video -- and the evaluation forward. The mesh is ``('data', 'stage')`` with
``config.mesh.stage`` devices on 'stage' and the rest on 'data' (or
``config.mesh.data`` if it fits); several slices put 'data' across slices
(DCN) and keep each stage pipeline inside a slice (ICI). A shape whose
per-chip footprint exceeds the chip's HBM raises ``MemoryExceededError``
naming the shape.

What each number is (``jax.stages.Compiled.memory_analysis()`` of the
SPMD-partitioned program, i.e. per chip; checked in tests/test_tpu_plan.py
against programs with hand-computed footprints):

- ``args``: HBM bytes of the program's parameters on one chip: its shard of
  every argument (its own row of the stage-sharded params and optimizer
  state, the clip's 'data' shard), in TPU tiled layouts -- small arrays pad to (8, 128) tiles,
  so a tiny net's figure exceeds its logical bytes.
- ``out``: HBM bytes of the results on one chip (new params, optimizer
  state, carry, metrics).
- ``alias``: bytes shared by an argument and a result (donation); subtracted.
- ``temp``: HBM scratch of the program: every intermediate buffer live at
  the peak, including the ``lax.scan`` carry (pipeline buffers, messages,
  gradient accumulators) -- *except* buffers that XLA's memory-space
  assignment places in on-chip memory (VMEM on v5e/v6e, CMEM on v4; ``S(1)``
  / ``S(3)`` in the compiled HLO). Measured here: a 64 MiB loop carry
  reports ~0 temp on v5e, v6e and v4 (on-chip) and 64 MiB on v5p; a 128 MiB
  one reports 128 MiB everywhere. Those buffers use no HBM, so the HBM
  figure stays right; it is not a measure of total memory.
- ``code``: the program's generated code, also in HBM.
- ``peak = args + out - alias + temp + code``: the HBM one chip needs, compared
  with ``CHIPS[...].hbm_bytes``. Runtime overheads (XLA's reserved HBM,
  fragmentation, other programs' buffers) come on top: keep a margin
  (``headroom``).
- ``flops``: ``cost_analysis()['flops']`` of the per-chip program (a matmul
  of ``(n, k) @ (k, m)`` counts ``2nkm``). XLA counts a loop body once, not
  times its trip count: for the scan over ticks this is about one tick's
  flops (plus what runs outside the scan), the same for T=8 and T=32.
- ``compile_s``: lowering + XLA compile wall time here.

libtpu prints warnings about worker hostnames and accelerator type when no
TPU is present; ``silence_libtpu`` sets the variables it asks for (only
where unset and not on a TPU VM), and ``ALLOW_MULTIPLE_LIBTPU_LOAD`` so that
several planning processes can load libtpu at once.
"""

import dataclasses
import glob
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from skipside import checkpoints, engine, evaluation, multigrid, network
from skipside import config as config_lib
from skipside import data as data_lib
from skipside import mesh as mesh_lib
from skipside import placement, progressive, train

PyTree = Any
GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation as ``get_topology_desc`` and this module use it.

  Attributes:
    name: the topology-name prefix (``'v5e'`` in ``'v5e:16x16'``).
    device_kind: what ``jax.Device.device_kind`` reports.
    hbm_bytes: HBM per chip.
    chip_config: ``chip_config_name`` (one device per chip: 'megacore' for
      the two-TensorCore chips).
    accelerator_type: a ``TPU_ACCELERATOR_TYPE`` of this generation (only
      to quiet libtpu off-TPU).
  """
  name: str
  device_kind: str
  hbm_bytes: int
  chip_config: str
  accelerator_type: str


# HBM per chip, from the Cloud TPU system-architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e: "HBM capacity" per chip).
CHIPS = {
    'v4': Chip('v4', 'TPU v4', 32 * GiB, 'megacore', 'v4-8'),
    'v5e': Chip('v5e', 'TPU v5 lite', 16 * GiB, 'default', 'v5litepod-4'),
    'v5p': Chip('v5p', 'TPU v5', 95 * GiB, 'megacore', 'v5p-8'),
    'v6e': Chip('v6e', 'TPU v6 lite', 32 * GiB, 'default', 'v6e-4'),
}


class MemoryExceededError(RuntimeError):
  """A compiled shape needs more HBM per chip than the chip has."""


# -- Topology and mesh. -------------------------------------------------------

def chip_of(topology: str) -> Chip:
  """The ``Chip`` of a topology name such as ``'v5e:16x16'``."""
  prefix, _, dims = topology.partition(':')
  if prefix not in CHIPS or not dims:
    raise ValueError(
        f'topology {topology!r}: expected <chip>:<AxB[xC]> with chip one of '
        f'{tuple(CHIPS)}, e.g. v5e:16x16, v4:4x4x8, v5p:4x4x4')
  return CHIPS[prefix]


COMPILE_ONLY_ENV = 'SKIPSIDE_TPU_COMPILE_ONLY'


def silence_libtpu(chip: Chip) -> None:
  """Sets the variables libtpu asks for off-TPU (if unset): no warnings; and
  lets several processes load it (pytest workers, a planner beside a
  planner: off-TPU its lockfile guards nothing). ``COMPILE_ONLY_ENV`` marks
  them as set here, so ``launch.distributed.on_cloud_tpu()`` stays false in
  this process and its children."""
  if glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'):
    return  # A TPU VM: its runtime sets these itself.
  # Says these TPU_* variables are ours, not a TPU VM's, to this process and
  # the processes it starts (launch.distributed.on_cloud_tpu reads it).
  os.environ[COMPILE_ONLY_ENV] = '1'
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', chip.accelerator_type)
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """Compile-only devices of ``num_slices`` slices of ``topology``.

  Needs ``libtpu`` (the ``tpu`` extra); no TPU.
  """
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  chip = chip_of(topology)
  silence_libtpu(chip)
  dims = [int(d) for d in topology.partition(':')[2].split('x')]
  # Hosts hold 2x2 chips on every generation here; never more than the slice.
  bounds = tuple(min(b, d) for b, d in zip((2, 2, 1), dims + [1] * 3))
  desc = topologies.get_topology_desc(
      topology_name=topology, platform='tpu', chip_config_name=chip.chip_config,
      chips_per_host_bounds=bounds, num_slices=num_slices)
  devices = list(desc.devices)
  kinds = {d.device_kind for d in devices}
  if kinds != {chip.device_kind}:
    raise ValueError(f'topology {topology!r} gave devices {kinds}, expected '
                     f'{chip.device_kind!r}')
  return devices


def mesh_shape(num_devices: int, stage: int, data: int | None = None,
               num_slices: int = 1) -> tuple[int, int]:
  """``(data, stage)`` on ``num_devices``: ``data`` defaults to the rest."""
  data = num_devices // stage if data is None else data
  if stage < 1 or data * stage != num_devices:
    raise ValueError(
        f'a {data} x {stage} (data x stage) mesh does not use the '
        f'{num_devices} devices of the topology; set config.mesh.stage to a '
        f'divisor of {num_devices} (config.mesh.data: 1 or {num_devices} / '
        'stage)')
  if data % num_slices:
    raise ValueError(f"'data'={data} does not split over {num_slices} slices")
  return data, stage


def target_mesh(devices: Sequence, data: int, stage: int,
                num_slices: int = 1) -> Mesh:
  """The ``('data', 'stage')`` mesh over ``devices``: each 'stage' row inside
  one slice, on neighbouring chips; 'data' across slices."""
  if num_slices == 1:
    return mesh_lib.make_mesh(data, stage, devices=devices)
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  grid = mesh_utils.create_hybrid_device_mesh(
      (data // num_slices, stage), (num_slices, 1), devices=devices)
  return Mesh(grid, mesh_lib.AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * 2)


# -- One compiled shape. -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ShapeReport:
  """Per-chip figures of one compiled program (see the module docstring)."""
  name: str
  shape: tuple[int, ...]
  args: int
  out: int
  alias: int
  temp: int
  code: int
  flops: float
  compile_s: float

  @property
  def peak(self) -> int:
    return self.args + self.out - self.alias + self.temp + self.code


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per program.
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', 0.0))


def report(name: str, shape: Sequence[int], lower) -> ShapeReport:
  """Compiles ``lower()`` (-> ``jax.stages.Lowered``) and reads its figures."""
  t = time.perf_counter()
  compiled = lower().compile()
  seconds = time.perf_counter() - t
  m = compiled.memory_analysis()
  return ShapeReport(
      name=name, shape=tuple(shape), args=m.argument_size_in_bytes,
      out=m.output_size_in_bytes, alias=m.alias_size_in_bytes,
      temp=m.temp_size_in_bytes, code=m.generated_code_size_in_bytes,
      flops=_flops(compiled), compile_s=seconds)


def check_memory(reports: Sequence[ShapeReport], chip: Chip,
                 headroom: float = 0.0) -> None:
  """Raises ``MemoryExceededError`` naming every shape whose per-chip peak
  exceeds ``(1 - headroom)`` of the chip's HBM (``dataclasses.replace`` the
  chip to plan for less)."""
  limit = chip.hbm_bytes * (1 - headroom)
  over = [r for r in reports if r.peak > limit]
  if over:
    lines = '; '.join(
        f'{r.name} {r.shape}: {_size(r.peak)} (args {_size(r.args)}, out '
        f'{_size(r.out)}, temp {_size(r.temp)})'
        for r in over)
    raise MemoryExceededError(
        f'per-chip HBM exceeded on {chip.name} ({_size(chip.hbm_bytes)}'
        f'{f", {headroom:.0%} headroom" if headroom else ""}) by shape(s) '
        f'{lines}')


def _size(n: float) -> str:
  for unit, scale in (('GiB', GiB), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
    if n >= scale:
      return f'{n / scale:.2f} {unit}'
  return f'{int(n)} B'


def table(reports: Sequence[ShapeReport], chip: Chip | None = None) -> str:
  """A text table, one row per shape (figures per chip)."""
  head = ('program', 'shape (global)', 'args', 'out', 'temp', 'peak HBM',
          'FLOPs/chip', 'compile s')
  rows = [head] + [
      (r.name, 'x'.join(map(str, r.shape)), _size(r.args), _size(r.out),
       _size(r.temp), _size(r.peak), f'{r.flops:.3e}', f'{r.compile_s:.1f}')
      for r in reports]
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  lines = ['  '.join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
  lines.insert(1, '  '.join('-' * w for w in widths))
  if chip is not None:
    lines.append(f'(per chip; {chip.name} HBM {_size(chip.hbm_bytes)})')
  return '\n'.join(lines)


# -- The run's programs. -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Run:
  """What the run's programs are built from, abstract where possible."""
  config: ml_collections.ConfigDict
  spec: network.NetworkSpec
  optimizer: Any
  params: PyTree  # ShapeDtypeStructs, replicated on the mesh.
  opt_state: PyTree
  mesh: Mesh
  groups: tuple
  channels: int
  compute_dtype: Any


def _abstract(tree: PyTree, sharding) -> PyTree:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding),
      tree)


def _engine(run: _Run, frame_shape) -> mesh_lib.MeshEngine:
  """The mesh engine of the network at this frame size, with the run's
  groups: the training loop's engine on the target mesh."""
  spec = network.for_frame_shape(run.spec, run.params, frame_shape)
  return mesh_lib.MeshEngine(mesh_lib.place(spec, run.mesh, run.groups,
                                            params=run.params))


def _batch(run: _Run, eng, clip_shape) -> tuple:
  """Abstract global ``(clip, targets)`` as the loop passes them."""
  clip = jax.ShapeDtypeStruct(tuple(clip_shape), jnp.float32)
  targets = (clip if run.spec.loss == 'mse' else  # Next frame: like the clip.
             jax.ShapeDtypeStruct(clip_shape[:1], jnp.int32))
  return eng.batch_like((clip, targets), clip_shape[0])


# Each lowers the training loop's own step function on the loop's engine and
# train-state layout (``train._train_step``, ``evaluation.eval_step``, PGT's
# ``make_train_step``), so what is planned is what training runs.

def _lower_train(run: _Run, clip_shape):
  c = run.config
  eng = _engine(run, clip_shape[2:])
  clip, targets = _batch(run, eng, clip_shape)
  carry = None
  if c.train.stream:  # The engine-layout carry, replicated (as in train).
    carry = _abstract(jax.eval_shape(
        lambda: engine.init_carry(run.spec, run.params, clip, targets, c.mode,
                                  run.compute_dtype)),
                      NamedSharding(run.mesh, P()))
  return train._train_step.lower(  # pylint: disable=protected-access
      eng, run.optimizer, eng.state_like(run.params),
      eng.state_like(run.opt_state), clip, targets, carry,
      mode=c.mode, compute_dtype=run.compute_dtype,
      update_every=c.train.update_every or None, flush=c.train.flush,
      skip_nonfinite=c.train.on_nonfinite == 'skip')


def _lower_progressive(run: _Run, clip_shape):
  c = run.config
  eng = _engine(run, clip_shape[2:])
  step = progressive.make_train_step(
      eng, run.optimizer, c, compute_dtype=run.compute_dtype,
      skip_nonfinite=c.train.on_nonfinite == 'skip')
  clip, targets = _batch(run, eng, clip_shape)
  return step.lower(eng.state_like(run.params), eng.state_like(run.opt_state),
                    clip, targets)


def _lower_eval(run: _Run, clip_shape):
  eng = _engine(run, clip_shape[2:])
  clip, targets = _batch(run, eng, clip_shape)
  return evaluation.eval_step.lower(
      eng, eng.state_like(run.params), clip, targets, mode=run.config.mode,
      compute_dtype=run.compute_dtype)


def programs(config: ml_collections.ConfigDict, info, schedule=None
             ) -> list[tuple[str, tuple[int, ...]]]:
  """Every ``(program, global clip shape)`` the run compiles.

  ``info``: the training data's ``DataInfo`` (global batch); ``schedule``:
  the multigrid schedule, if any (one train shape per bucket).
  """
  element = tuple(info.element_shape)  # (T, h, w, C)
  base = (config.data.batch_size, *element)
  progressive = bool(config.get('progressive') and config.progressive.enabled)
  train_name = 'train progressive' if progressive else 'train'
  if schedule is not None:
    shapes = [(s.batch, s.frames, s.crop, s.crop, element[-1])
              for s in schedule.buckets()]
  else:
    shapes = [base]
  out = [(train_name, s) for s in dict.fromkeys(shapes)]
  return out + [('eval', base)]


def _data(config: ml_collections.ConfigDict):
  """``(info, schedule)`` of the run's data: the global batch as one shard."""
  data_config = config_lib.data_config(config)
  data_config.shard_index, data_config.shard_count = 0, 1
  source = data_lib.make_source(data_config, data_config.split)
  it = data_lib.make_iterator(data_config, train=True, source=source)
  info = it.info
  it.close()
  schedule = None
  if multigrid.enabled(config):
    schedule = multigrid.schedule_from_config(
        config, len(source.data), (source.frame_shape or (None,))[0])
  return info, schedule


def plan(config: ml_collections.ConfigDict, topology: str, *,
         num_slices: int = 1, headroom: float = 0.0, check: bool = True,
         hbm_bytes: int | None = None,
         devices: Sequence | None = None, info=None, schedule=None,
         log=None) -> list[ShapeReport]:
  """Compiles every program of the run for ``topology``; per-chip figures.

  Args:
    config: a training config (``experiments/configs/*.py``).
    topology: e.g. ``'v5e:16x16'``, ``'v4:4x4x8'``, ``'v5p:4x4x4'``.
    num_slices: slices of ``topology`` (multi-slice: 'data' spans them).
    headroom: fraction of HBM kept free in the memory check.
    check: raise ``MemoryExceededError`` (naming the shapes) if a program
      does not fit; every shape is compiled first.
    hbm_bytes: HBM per chip to check against (default: ``CHIPS``).
    devices: compile-only devices (default: ``topology_devices``).
    info, schedule: the data's ``DataInfo`` and multigrid schedule (default:
      read from the config's data source, as the training loop does).
    log: ``print``-like callable for progress (one line per shape).

  Returns:
    One ``ShapeReport`` per program and shape, in ``programs`` order.
  """
  chip = chip_of(topology)
  # Before anything starts a jax backend (validation counts devices): off
  # a TPU VM, libtpu would print its start-up errors.
  silence_libtpu(chip)
  single = ml_collections.ConfigDict(config.to_dict())
  single.mesh.data = single.mesh.stage = 1  # The target mesh is checked here.
  config_lib.validate_config(single)
  if hbm_bytes:
    chip = dataclasses.replace(chip, hbm_bytes=int(hbm_bytes))
  devices = devices or topology_devices(topology, num_slices)
  data, stage = mesh_shape(
      len(devices), config.mesh.stage,
      config.mesh.data if config.mesh.data * config.mesh.stage == len(
          devices) else None, num_slices)
  if config.data.batch_size % data:
    raise ValueError(
        f'config.data.batch_size={config.data.batch_size} does not split over '
        f"'data'={data} on {topology} (x{num_slices}): use a multiple of "
        f'{data}')
  target = target_mesh(devices, data, stage, num_slices)
  if info is None:
    info, schedule = _data(config)
  spec, optimizer, state = checkpoints.init_state(config, info, schedule)
  if config.mesh.get('groups'):
    groups = config_lib.parse_groups(config.mesh.groups, spec.num_stages, stage)
  else:  # Flops-balanced; the per-stage flops are compiled on this host.
    groups = placement.balance(placement.stage_costs(
        spec, state.params, config.data.batch_size // data), stage)
  replicated = NamedSharding(target, P())
  run = _Run(config=config, spec=spec, optimizer=optimizer,
             params=_abstract(state.params, replicated),
             opt_state=_abstract(state.opt_state, replicated), mesh=target,
             groups=groups, channels=info.element_shape[-1],
             compute_dtype=config_lib.PRECISIONS[config.precision])
  lowerers = {'train': _lower_train, 'train progressive': _lower_progressive,
              'eval': _lower_eval}
  reports = []
  for name, shape in programs(config, info, schedule):
    reports.append(report(name, shape,
                          lambda n=name, s=shape: lowerers[n](run, s)))
    if log:
      r = reports[-1]
      log(f'compiled {name} {shape}: peak {_size(r.peak)} per chip in '
          f'{r.compile_s:.1f}s')
  if check:
    check_memory(reports, chip, headroom)
  return reports

