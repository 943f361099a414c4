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
per-chip footprint exceeds the chip's HBM -- by the sum below, or because
XLA itself refuses it (``RESOURCE_EXHAUSTED`` at compile, reported as the
shape's ``error``) -- raises ``MemoryExceededError`` with one line per
shape (``verdict_line``); ``plan_json`` is the same verdict for scripts
(``fits``, per shape ``is_oom``). Planning needs shapes, not data
(``data_shapes``).

Each compiled program also gets a predicted step time (``step_cost``: a
roofline per kernel plus collectives, read from the compiled HLO; the
section "The step-time model" below says what it assumes) and so clips per
second for the whole job. Checked here: FLOPs equal a hand count for an
MLP net on v5e:2x2 (tests/test_tpu_plan.py); the compute term against a
measured CPU step in experiments/benchmarks/scale.py.

Per-chip memory and clip length: a chip holds its group's packed params and
optimizer state, Sideways' O(stages) per-tick buffers, and -- when T
divides by the stage axis S (``mesh.time_sharded``) -- T/S frames of its
'data' rows (else the whole clip). Sideways' scratch is flat in T, so the
longest clip per chip is bounded by its share of the input:
``(HBM - the rest) / (rows * frame bytes / S)``.

What each number is (``jax.stages.Compiled.memory_analysis()`` of the
SPMD-partitioned program, i.e. per chip; checked in tests/test_tpu_plan.py
against programs with hand-computed footprints):

- ``args``: HBM bytes of the program's parameters on one chip: its shard of
  every argument (its piece of the evenly sharded params and optimizer
  state, or its row of the stage-sharded ones, the clip's 'data' shard), in TPU tiled layouts -- small arrays pad to (8, 128) tiles,
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
  flops (plus what runs outside the scan), the same for T=8 and T=32. The
  table's FLOPs/chip column is the step-time model's instead
  (``cost.flops``: dots and convolutions of the whole step, every tick).
- ``compile_s``: lowering + XLA compile wall time here.

libtpu prints warnings about worker hostnames and accelerator type when no
TPU is present; ``silence_libtpu`` sets the variables it asks for (only
where unset and not on a TPU VM), and ``ALLOW_MULTIPLE_LIBTPU_LOAD`` so that
several planning processes can load libtpu at once.
"""

import dataclasses
import glob
import math
import os
import re
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from skipside import checkpoints, engine, multigrid
from skipside import config as config_lib
from skipside import data as data_lib
from skipside.data import pipeline as data_pipeline
from skipside import mesh as mesh_lib
from skipside import programs as programs_lib

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
    peak_flops: peak bf16 FLOP/s per chip (the step-time model).
    hbm_bytes_per_s: HBM bandwidth per chip.
    ici_bytes_per_s: ICI bandwidth of one link, one direction.
  """
  name: str
  device_kind: str
  hbm_bytes: int
  chip_config: str
  accelerator_type: str
  peak_flops: float = 0.0
  hbm_bytes_per_s: float = 0.0
  ici_bytes_per_s: float = 0.0


# Sources (public):
# - HBM capacity, peak bf16 FLOP/s and HBM bandwidth per chip: the Cloud TPU
#   system-architecture pages, cloud.google.com/tpu/docs/v4 ("275 teraflops
#   (bf16)", "32 GiB, 1200 GBps"), /v5e ("197 TFLOPs", "16 GB, 819 GBps"),
#   /v5p-training ("459", "95 GiB", "2765 GBps"), /v6e ("918 TFLOPs",
#   "32 GB", "1638 GBps").
# - ICI per link, one direction: the same pages give the bidirectional ICI
#   bandwidth per chip and its ports: v5e 400 GBps over 4 ports, v6e 800
#   GBps over 4, v5p 1200 GBps over 6 (a 3D torus) -> 50, 100, 100 GB/s per
#   link and direction. The v4 page gives none; 45 GB/s per link and
#   direction is the JAX scaling book's figure (jax-ml.github.io/
#   scaling-book/tpus, "ICI BW/link (one-way)" for TPU v4p).
CHIPS = {
    'v4': Chip('v4', 'TPU v4', 32 * GiB, 'megacore', 'v4-8',
               peak_flops=275e12, hbm_bytes_per_s=1200e9,
               ici_bytes_per_s=45e9),
    'v5e': Chip('v5e', 'TPU v5 lite', 16 * GiB, 'default', 'v5litepod-4',
                peak_flops=197e12, hbm_bytes_per_s=819e9,
                ici_bytes_per_s=50e9),
    'v5p': Chip('v5p', 'TPU v5', 95 * GiB, 'megacore', 'v5p-8',
                peak_flops=459e12, hbm_bytes_per_s=2765e9,
                ici_bytes_per_s=100e9),
    'v6e': Chip('v6e', 'TPU v6 lite', 32 * GiB, 'default', 'v6e-4',
                peak_flops=918e12, hbm_bytes_per_s=1638e9,
                ici_bytes_per_s=100e9),
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
  cost: 'StepCost | None' = None
  error: str | None = None  # XLA refused to compile it (e.g. out of HBM).
  # How each argument and result is laid out over the mesh (``shardings``):
  # ``{'in': {path: spec}, 'out': {path: spec}}``.
  layout: dict | None = None
  # The executable itself (``plan(keep_compiled=True)``): to run it where
  # the devices are real, e.g. to check the model on this host.
  compiled: Any = dataclasses.field(default=None, repr=False, compare=False)

  @property
  def peak(self) -> int:
    return self.args + self.out - self.alias + self.temp + self.code

  @property
  def clips_per_s(self) -> float:
    """Predicted clips per second of the whole job (the step-time model;
    ``shape[0]`` is the global batch); 0 for a part of a chunked clip's step
    (``programs.CHUNK_PARTS``: a clip takes several calls)."""
    if not self.cost or self.name in programs_lib.CHUNK_PARTS:
      return 0.0
    return self.cost.clips_per_s(self.shape[0])


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per program.
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', 0.0))


def report(name: str, shape: Sequence[int], lower,
           chip: Chip | None = None, keep_compiled: bool = False
           ) -> ShapeReport:
  """Compiles ``lower()`` (-> ``jax.stages.Lowered``) and reads its figures;
  with ``chip``, also the step-time model's (``step_cost``). A program XLA
  refuses for lack of memory (``RESOURCE_EXHAUSTED``) is reported with its
  ``error``, not raised: the plan goes on to its other shapes."""
  t = time.perf_counter()
  try:
    compiled = lower().compile()
  except Exception as e:  # pylint: disable=broad-except  (XLA's own types)
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    line = next((l for l in str(e).splitlines() if 'RESOURCE_EXHAUSTED' in l),
                str(e))
    return ShapeReport(name=name, shape=tuple(shape), args=0, out=0, alias=0,
                       temp=0, code=0, flops=0.0,
                       compile_s=time.perf_counter() - t,
                       error=line.strip()[:300])
  seconds = time.perf_counter() - t
  m = compiled.memory_analysis()
  cost = None
  if chip is not None and chip.peak_flops:
    cost = step_cost(compiled.as_text(), chip.peak_flops,
                     chip.hbm_bytes_per_s, chip.ici_bytes_per_s)
  return ShapeReport(
      layout=shardings(compiled),
      name=name, shape=tuple(shape), args=m.argument_size_in_bytes,
      out=m.output_size_in_bytes, alias=m.alias_size_in_bytes,
      temp=m.temp_size_in_bytes, code=m.generated_code_size_in_bytes,
      flops=_flops(compiled), compile_s=seconds, cost=cost,
      compiled=compiled if keep_compiled else None)


def shardings(compiled) -> dict:
  """Each argument's and result's sharding of a compiled program as text,
  by pytree path: ``{'in': {"[0][0]": "P('stage',)", ...}, 'out': {...}}``:
  a ``PartitionSpec`` over the mesh axes, or the sharding's type off a mesh
  (``SingleDeviceSharding``). ``in`` paths count the program's array
  arguments only (static ones, such as the engine, are not arguments)."""
  def text(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): (
        str(s.spec) if hasattr(s, 'spec') else type(s).__name__)
            for path, s in leaves}
  return {'in': text(compiled.input_shardings),
          'out': text(compiled.output_shardings)}


def over_memory(reports: Sequence[ShapeReport], chip: Chip,
                headroom: float = 0.0) -> list[ShapeReport]:
  """The shapes that do not fit: XLA refused them, or their per-chip peak
  exceeds ``(1 - headroom)`` of the chip's HBM."""
  limit = chip.hbm_bytes * (1 - headroom)
  return [r for r in reports if r.error or r.peak > limit]


def verdict_line(r: ShapeReport, chip: Chip, headroom: float = 0.0) -> str:
  """One line naming the program, its global shape and the numbers."""
  limit = _size(chip.hbm_bytes * (1 - headroom)) + (
      f' ({_size(chip.hbm_bytes)} less {headroom:.0%} headroom)'
      if headroom else '')
  if r.error:
    return f'{r.name} {r.shape}: XLA refused it on {chip.name}: {r.error}'
  return (f'{r.name} {r.shape}: {_size(r.peak)} per chip > {limit} HBM on '
          f'{chip.name} (args {_size(r.args)}, out {_size(r.out)}, temp '
          f'{_size(r.temp)}, code {_size(r.code)})')


def check_memory(reports: Sequence[ShapeReport], chip: Chip,
                 headroom: float = 0.0) -> None:
  """Raises ``MemoryExceededError`` with one line per shape that does not
  fit (``over_memory``; ``dataclasses.replace`` the chip to plan for
  less)."""
  over = over_memory(reports, chip, headroom)
  if over:
    raise MemoryExceededError('\n'.join(verdict_line(r, chip, headroom)
                                        for r in over))


def plan_json(reports: Sequence[ShapeReport], chip: Chip, *,
              topology: str = '', num_slices: int = 1,
              headroom: float = 0.0) -> dict:
  """The plan as JSON for scripts: ``fits`` (the whole run), and per
  program and shape the per-chip bytes, ``is_oom``, the model's
  prediction (``step_s``, ``tick_s``, ``clips_per_s``) and the sharding of
  every argument and result (``shardings``, MaxText's sharding dump)."""
  over = {id(r) for r in over_memory(reports, chip, headroom)}
  rows = []
  for r in reports:
    row = dict(program=r.name, shape=list(r.shape), args=r.args, out=r.out,
               alias=r.alias, temp=r.temp, code=r.code, peak=r.peak,
               flops_xla=r.flops, compile_s=round(r.compile_s, 3),
               is_oom=id(r) in over, error=r.error, shardings=r.layout)
    if r.cost:
      row.update(flops=r.cost.flops, hbm_bytes=r.cost.hbm_bytes,
                 wire_bytes=r.cost.wire_bytes, ticks=r.cost.ticks,
                 compute_s=r.cost.compute_s, memory_s=r.cost.memory_s,
                 roofline_s=r.cost.roofline_s,
                 collective_s=r.cost.collective_s, step_s=r.cost.step_s,
                 tick_s=r.cost.tick_s, clips_per_s=r.clips_per_s)
    rows.append(row)
  return dict(topology=topology, num_slices=num_slices, chip=chip.name,
              hbm_bytes=chip.hbm_bytes, headroom=headroom,
              fits=not over, programs=rows,
              chip_rates=dict(peak_flops=chip.peak_flops,
                              hbm_bytes_per_s=chip.hbm_bytes_per_s,
                              ici_bytes_per_s=chip.ici_bytes_per_s))


def _size(n: float) -> str:
  for unit, scale in (('GiB', GiB), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
    if n >= scale:
      return f'{n / scale:.2f} {unit}'
  return f'{int(n)} B'


def table(reports: Sequence[ShapeReport], chip: Chip | None = None) -> str:
  """A text table, one row per shape (figures per chip; the last three
  columns are the step-time model's prediction for the whole job)."""
  head = ('program', 'shape (global)', 'args', 'out', 'temp', 'peak HBM',
          'FLOPs/chip', 'compile s', 'tick ms', 'step s', 'clips/s')
  rows = [head]
  for r in reports:
    if r.error:
      rows.append((r.name, 'x'.join(map(str, r.shape)), '-', '-', '-',
                   'XLA: out of memory', '-', f'{r.compile_s:.1f}', '-', '-',
                   '-'))
      continue
    c = r.cost
    rows.append((r.name, 'x'.join(map(str, r.shape)), _size(r.args),
                 _size(r.out), _size(r.temp), _size(r.peak),
                 f'{(c.flops if c else r.flops):.3e}', f'{r.compile_s:.1f}',
                 f'{c.tick_s * 1e3:.3g}' if c else '-',
                 f'{c.step_s:.3g}' if c else '-',
                 f'{r.clips_per_s:.4g}' if r.clips_per_s else '-'))
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  lines = ['  '.join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
  lines.insert(1, '  '.join('-' * w for w in widths))
  if chip is not None:
    lines.append(f'(per chip; {chip.name} HBM {_size(chip.hbm_bytes)}; '
                 'FLOPs/chip per step, all ticks; tick/step/clips: a '
                 'roofline per kernel plus collectives, skipside/tpu_plan.py)')
  return '\n'.join(lines)


# -- The step-time model. -----------------------------------------------------
#
# A roofline per kernel, read from the compiled program's HLO text (per chip,
# after SPMD partitioning), each loop body times its trip count:
#
# - every top-level op (a fusion, a copy, a custom call...) takes
#   ``max(flops / peak_flops, bytes / hbm_bytes_per_s)``: its FLOPs are the
#   dots' and convolutions' inside it (``2 * out * contraction``, a
#   convolution counting only taps that land on real input, as XLA's own
#   cost analysis does; elementwise work is left to the bytes term), its
#   bytes its operands and results (slices of a buffer read or updated in
#   place count as slices; an upper bound otherwise: buffers that XLA keeps
#   in on-chip memory count as HBM traffic);
# - a collective takes its bytes on the wire over one ICI link
#   (``ici_bytes_per_s``, one direction): a ``collective-permute`` its
#   operand, an ``all-reduce`` ``2 (n-1)/n`` of it (a ring), an
#   ``all-gather`` ``(n-1)`` operands, ``reduce-scatter`` / ``all-to-all``
#   ``(n-1)/n``; a skip edge of span ``d`` counts once (its hops pipeline);
# - nothing overlaps: compute, memory and collectives add (a pessimistic
#   schedule: XLA overlaps the async ``ppermute`` of one tick with compute);
# - a ``while`` body counts its trip count times (XLA's
#   ``known_trip_count``, or the constant its condition compares the counter
#   with, from 0), a ``conditional`` its slowest branch (every device of
#   the stage axis runs one branch of ``lax.switch`` per tick, and the tick
#   waits for the slowest one); its FLOPs and bytes are each the largest
#   branch's, as in XLA's cost analysis (the busiest device's work).
#
# What is left out: per-kernel launch overhead, host input (the clip's
# transfer), DCN between slices (counted as ICI), achieved-vs-peak rates.

_DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1,
                'f8e4m3fn': 1, 'f8e5m2': 1, 'bf16': 2, 'f16': 2, 's16': 2,
                'u16': 2, 'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8,
                'u64': 8, 'c64': 8, 'c128': 16}
_ARRAY = re.compile(r'\b([a-z]+\d*(?:e\dm\d\w*)?)\[([\d,]*)\]')
_HEADER = re.compile(r'^(?:ENTRY )?%?([^\s(]+) \(.*\) -> .*\{$')
_INSTR = re.compile(r'^\s*(?:ROOT )?%?([^\s=]+) = (.*)$')
_FREE = {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast',
         'after-all', 'partition-id', 'replica-id', 'iota', 'while',
         'conditional', 'call', 'collective-permute-done', 'all-reduce-done',
         'all-gather-done', 'copy-done', 'async-done', 'async-update',
         'opt-barrier', 'add-dependency'}
_COLLECTIVES = {'collective-permute', 'collective-permute-start',
                'all-reduce', 'all-reduce-start', 'all-gather',
                'all-gather-start', 'reduce-scatter', 'all-to-all',
                'collective-broadcast'}


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
  """``(dtype, dims)`` of every array in an HLO type (tuples flattened)."""
  return [(dt, tuple(int(d) for d in dims.split(',') if d))
          for dt, dims in _ARRAY.findall(type_text) if dt in _DTYPE_BYTES]


def _nbytes(type_text: str) -> float:
  return sum(_DTYPE_BYTES[dt] * math.prod(dims)
             for dt, dims in _arrays(type_text))


def _split_type(rhs: str) -> tuple[str, str, str, str]:
  """``'<type> <opcode>(<operands>)<attrs>'`` -> the four parts."""
  depth, i = 0, 0
  if rhs.startswith('('):  # A tuple type: up to its matching paren.
    for i, ch in enumerate(rhs):
      depth += (ch == '(') - (ch == ')')
      if depth == 0:
        break
  end = rhs.index(' ', i)
  type_text, rest = rhs[:end], rhs[end + 1:]
  op_end = rest.index('(')
  opcode = rest[:op_end]
  depth = 0
  for j in range(op_end, len(rest)):
    depth += (rest[j] == '(') - (rest[j] == ')')
    if depth == 0:
      break
  return type_text, opcode, rest[op_end + 1:j], rest[j + 1:]


@dataclasses.dataclass
class _Op:
  name: str
  type: str
  opcode: str
  operands: list  # Operand names.
  attrs: str
  raw: str  # The text between the opcode's parens (a constant's value).


def _parse_hlo(text: str) -> tuple[dict, str]:
  """``({computation: [_Op]}, entry name)`` of an HLO module's text."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    head = _HEADER.match(line)
    if head:
      current = comps.setdefault(head.group(1), [])
      if line.startswith('ENTRY'):
        entry = head.group(1)
      continue
    m = _INSTR.match(line) if current is not None else None
    if not m:
      continue
    try:
      type_text, opcode, operands, attrs = _split_type(m.group(2))
    except ValueError:
      continue
    names = re.findall(r'%([^\s,)]+)', operands)
    current.append(_Op(m.group(1), type_text, opcode, names, attrs,
                       operands))
  return comps, entry


def _conv_flops(op: _Op, shapes: dict) -> float:
  """FLOPs of an HLO convolution: 2 per multiply-add of a real input tap."""
  labels = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)', op.attrs)
  if not labels or len(op.operands) < 2:
    return 0.0
  lhs_l, rhs_l, _ = labels.groups()
  lhs = _arrays(shapes.get(op.operands[0], ''))
  rhs = _arrays(shapes.get(op.operands[1], ''))
  out = _arrays(op.type)
  if not (lhs and rhs and out):
    return 0.0
  lhs, rhs, out = lhs[0][1], rhs[0][1], out[0][1]
  spatial = [c for c in rhs_l if c not in 'io']
  window = _window(op.attrs, len(spatial))
  # Output positions x window taps that read a real (not padded, not
  # dilated-in) input element, per spatial dim; the product over dims.
  out_spatial = [out[labels.group(3).index(c)] for c in spatial]
  in_spatial = [lhs[lhs_l.index(c)] for c in spatial]
  taps = 1
  for d, (n_out, n_in) in enumerate(zip(out_spatial, in_spatial)):
    w = window[d]
    pos = (np.arange(n_out)[:, None] * w['stride']
           + np.arange(w['size'])[None, :] * w['rhs_dilate'] - w['lo'])
    ok = ((pos >= 0) & (pos <= (n_in - 1) * w['lhs_dilate'])
          & (pos % w['lhs_dilate'] == 0))
    taps *= int(ok.sum())
  non_spatial_out = math.prod(out) // max(1, math.prod(out_spatial))
  return 2.0 * non_spatial_out * taps * rhs[rhs_l.index('i')]


def _window(attrs: str, rank: int) -> list[dict]:
  """Per spatial dim: size, stride, low pad, lhs/rhs dilation."""
  w = [dict(size=1, stride=1, lo=0, lhs_dilate=1, rhs_dilate=1)
       for _ in range(rank)]
  m = re.search(r'window=\{([^}]*)\}', attrs)
  for key, value in re.findall(r'(\w+)=([\w_x\-]+)', m.group(1) if m else ''):
    parts = value.split('x')
    for d, part in enumerate(parts[:rank]):
      if key == 'pad':
        w[d]['lo'] = int(part.split('_')[0])
      elif key in ('size', 'stride', 'lhs_dilate', 'rhs_dilate'):
        w[d][key] = int(part)
  return w


def _dot_flops(op: _Op, shapes: dict) -> float:
  lhs = _arrays(shapes.get(op.operands[0], '')) if op.operands else []
  out = _arrays(op.type)
  m = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', op.attrs)
  if not (lhs and out):
    return 0.0
  dims = [int(d) for d in m.group(1).split(',') if d] if m else []
  return 2.0 * math.prod(out[0][1]) * math.prod(lhs[0][1][d] for d in dims)


def _group_size(attrs: str, default: int) -> int:
  iota = re.search(r'replica_groups=\[(\d+),(\d+)\]', attrs)
  if iota:
    return int(iota.group(2))
  groups = re.search(r'replica_groups=\{\{([\d,]*)\}', attrs)
  return len(groups.group(1).split(',')) if groups else default


def _wire_bytes(opcode: str, operand_bytes: float, n: int) -> float:
  """Bytes one chip sends for a collective of ``n`` chips."""
  kind = opcode.removesuffix('-start')
  if kind == 'all-reduce':
    return 2 * (n - 1) / n * operand_bytes
  if kind == 'all-gather':
    return (n - 1) * operand_bytes
  if kind in ('reduce-scatter', 'all-to-all'):
    return (n - 1) / n * operand_bytes
  return operand_bytes  # collective-permute, broadcast: one buffer out.


def _op_bytes(op: _Op, comps: dict, shapes: dict) -> float:
  """HBM bytes an op reads and writes. Slices of a loop's buffers count as
  slices: an operand read only through ``dynamic-slice`` counts the slices
  read, the buffer a ``dynamic-update-slice`` writes in place counts its
  update (read and written), not the whole buffer -- else a scan over T
  ticks that stores one tick per step would count T^2 traffic."""
  if op.opcode in ('dynamic-slice', 'dynamic-update-slice'):
    body, root, params = [op], op, {n: n for n in op.operands}
    # Unfused: the op's own operands play the fused parameters' part.
  else:
    called = re.findall(r'calls=%([^\s,}]+)', op.attrs)
    if op.opcode != 'fusion' or not called:
      return sum(_nbytes(shapes.get(n, '')) for n in op.operands) + _nbytes(
          op.type)
    body = comps.get(called[0], [])
    root = body[-1] if body else None
    by_index = {int(o.raw): o.name for o in body if o.opcode == 'parameter'
                and o.raw.isdigit()}
    params = {n: by_index.get(i) for i, n in enumerate(op.operands)}
  total = 0.0
  for outer, inner in params.items():
    users = [o for o in body if inner in o.operands]
    if users and all(u.opcode == 'dynamic-slice' and u.operands[0] == inner
                     for u in users):
      total += sum(_nbytes(u.type) for u in users)
    elif users and all(u.opcode == 'dynamic-update-slice' and
                       u.operands[0] == inner for u in users):
      total += sum(_nbytes(shapes.get(u.operands[1], '')) for u in users)
    else:
      total += _nbytes(shapes.get(outer, ''))
  if root is not None and root.opcode == 'dynamic-update-slice':
    return total + _nbytes(shapes.get(root.operands[1], ''))
  return total + _nbytes(op.type)


@dataclasses.dataclass(frozen=True)
class StepCost:
  """The model's per-chip figures of one compiled program (one step).

  Attributes:
    flops: dot and convolution FLOPs per chip per step (loop bodies times
      their trip counts, a switch's costliest branch).
    hbm_bytes: operand and result bytes of every top-level op.
    wire_bytes: bytes each chip sends through collectives, by opcode.
    compute_s, memory_s: ``flops / peak``, ``hbm_bytes / bandwidth``.
    roofline_s: the sum over ops of ``max(compute, memory)`` of each.
    collective_s: the sum of ``wire bytes / ICI link bandwidth``.
    ticks: the largest loop trip count (the clip's ticks).
  """
  flops: float
  hbm_bytes: float
  wire_bytes: dict
  compute_s: float
  memory_s: float
  roofline_s: float
  collective_s: float
  ticks: int

  @property
  def step_s(self) -> float:
    return self.roofline_s + self.collective_s

  @property
  def tick_s(self) -> float:
    return self.step_s / max(1, self.ticks)

  def clips_per_s(self, global_batch: int) -> float:
    return global_batch / self.step_s if self.step_s else 0.0


def step_cost(hlo_text: str, peak_flops: float, hbm_bytes_per_s: float,
              ici_bytes_per_s: float) -> StepCost:
  """The step-time model (see above) of one compiled program's HLO text
  (``compiled.as_text()``), for a chip of the given rates."""
  comps, entry = _parse_hlo(hlo_text)
  shapes = {o.name: o.type for ops in comps.values() for o in ops}
  constants = {}
  for ops in comps.values():
    for o in ops:
      if o.opcode == 'constant' and re.fullmatch(r'-?\d+', o.raw):
        constants[o.name] = int(o.raw)
  parts = re.search(r'num_partitions=(\d+)', hlo_text)
  devices = int(parts.group(1)) if parts else 1
  max_trip = [1]

  def trips(op: _Op) -> int:
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', op.attrs)
    if known:
      return int(known.group(1))
    # Else the condition's root compares the counter (from 0) with a
    # constant, itself or in a fusion (TPU programs print no trip count).
    cond = re.search(r'condition=%([^\s,}]+)', op.attrs).group(1)
    ops = comps.get(cond, [])
    root = ops[-1] if ops else None
    if root is None or root.opcode not in ('compare', 'fusion'):
      return 1
    text = root.attrs if root.opcode == 'compare' else ' '.join(
        o.attrs for c in re.findall(r'calls=%([^\s,}]+)', root.attrs)
        for o in comps.get(c, []) if o.opcode == 'compare')
    le = 'direction=LE' in text
    for name in root.operands:
      if name in constants:
        return max(1, constants[name] + le)
    return 1

  def fused_flops(comp: str) -> float:
    total = 0.0
    for o in comps.get(comp, []):
      if o.opcode == 'dot':
        total += _dot_flops(o, shapes)
      elif o.opcode == 'convolution':
        total += _conv_flops(o, shapes)
      for callee in re.findall(r'calls=%([^\s,}]+)', o.attrs):
        total += fused_flops(callee)
    return total

  zero = dict(flops=0.0, bytes=0.0, wire={}, compute=0.0, memory=0.0,
              roofline=0.0, coll=0.0)

  def add(a, b, k=1.0):
    out = {key: a[key] + k * b[key] for key in a if key != 'wire'}
    out['wire'] = dict(a['wire'])
    for key, v in b['wire'].items():
      out['wire'][key] = out['wire'].get(key, 0.0) + k * v
    return out

  memo = {}

  def cost(comp: str) -> dict:
    if comp in memo:
      return memo[comp]
    total = dict(zero)
    for o in comps.get(comp, []):
      if o.opcode == 'while':
        body = re.search(r'body=%([^\s,}]+)', o.attrs).group(1)
        n = trips(o)
        max_trip[0] = max(max_trip[0], n)
        total = add(total, cost(body), n)
        continue
      if o.opcode == 'conditional':
        branches = re.findall(r'%([^\s,}]+)', re.search(
            r'(?:branch_computations=\{[^}]*\}|true_computation=[^,]*,'
            r' false_computation=[^,]*)', o.attrs).group(0))
        costs = [cost(b) for b in branches]
        slowest = dict(max(costs, key=lambda c: c['roofline'] + c['coll']))
        for key in ('flops', 'bytes', 'compute', 'memory'):  # As XLA's.
          slowest[key] = max(c[key] for c in costs)
        total = add(total, slowest)
        continue
      if o.opcode in ('call', 'async-start'):
        for callee in re.findall(r'(?:to_apply|calls)=%([^\s,}]+)', o.attrs):
          total = add(total, cost(callee))
        continue
      if o.opcode in _FREE:
        continue
      operand_bytes = sum(_nbytes(shapes.get(n, '')) for n in o.operands)
      if o.opcode in _COLLECTIVES:
        wire = _wire_bytes(o.opcode, operand_bytes,
                           _group_size(o.attrs, devices))
        key = o.opcode.removesuffix('-start')
        total = add(total, dict(zero, wire={key: wire},
                                coll=wire / ici_bytes_per_s))
        continue
      if o.opcode == 'fusion':
        flops = sum(fused_flops(c) for c in
                    re.findall(r'calls=%([^\s,}]+)', o.attrs))
      elif o.opcode == 'dot':
        flops = _dot_flops(o, shapes)
      elif o.opcode == 'convolution':
        flops = _conv_flops(o, shapes)
      else:
        flops = 0.0
      nbytes = _op_bytes(o, comps, shapes)
      compute, memory = flops / peak_flops, nbytes / hbm_bytes_per_s
      total = add(total, dict(zero, flops=flops, bytes=nbytes,
                              compute=compute, memory=memory,
                              roofline=max(compute, memory)))
    memo[comp] = total
    return total

  c = cost(entry)
  return StepCost(flops=c['flops'], hbm_bytes=c['bytes'], wire_bytes=c['wire'],
                  compute_s=c['compute'], memory_s=c['memory'],
                  roofline_s=c['roofline'], collective_s=c['coll'],
                  ticks=max_trip[0])


# -- The run's programs. -------------------------------------------------------

def _abstract(tree: PyTree, sharding) -> PyTree:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding),
      tree)


def programs(config: ml_collections.ConfigDict, info, schedule=None
             ) -> list[tuple[str, tuple[int, ...]]]:
  """Every ``(program, global clip shape)`` the run compiles and the
  planner compiles: ``programs.listing``'s train steps and evaluation."""
  return programs_lib.listing(config, info, schedule)


def data_shapes(config: ml_collections.ConfigDict):
  """``(info, schedule)`` of the run's data -- shapes only, no video read.

  Planning needs the clip shape and the number of classes, not the data:
  when the config states them -- ``config.num_classes_hint`` (the real-video
  configs set it) and a fixed frame size (``data.crop_size``) -- nothing on
  disk is opened, so a pod job over a dataset that lives elsewhere (e.g.
  Kinetics in a bucket) plans anywhere. Frames then have ``data.channels``
  channels if that key exists, else 3 (RGB: what the video-folder and UCF101
  readers decode). Otherwise (MovingDigits, generated locally; a config
  without the hint) the data source's metadata is read (``make_source``:
  the TFDS builder's features, a video folder's class listing), never a
  video. A multigrid schedule's shapes do not depend on the number of
  training clips (it scales epochs only): without a source one epoch of
  ``train.num_steps`` batches stands in.
  """
  data_config = config_lib.data_config(config)
  data_config.shard_index, data_config.shard_count = 0, 1
  params = data_pipeline.clip_params(data_config, train=True)
  num_classes = config.get('num_classes_hint')
  source = None
  if num_classes and data_config.crop_size:
    channels = data_config.get('channels', 3)
    frame_shape = (data_config.crop_size, data_config.crop_size, channels)
  else:
    source = data_lib.make_source(data_config, data_config.split)
    num_classes, frame_shape = source.num_classes, source.frame_shape
  # The pipeline's own rule (crop, else native size) on the shapes above.
  element = data_pipeline.clip_shape(frame_shape, params)
  if element is None:
    raise ValueError('planning needs a fixed clip shape: set '
                     'config.data.crop_size (frames of varying size)')
  info = data_pipeline.DataInfo(
      num_examples=len(source.data) if source else 0,
      num_classes=int(num_classes), batch_size=data_config.batch_size,
      element_shape=tuple(element), class_names=None, shard_index=0,
      shard_count=1, steps_per_epoch=0)
  schedule = None
  if multigrid.enabled(config):
    schedule = multigrid.schedule_from_config(
        config, info.num_examples or config.train.num_steps *
        data_config.batch_size, (frame_shape or (None,))[0])
  return info, schedule


def plan(config: ml_collections.ConfigDict, topology: str, *,
         num_slices: int = 1, headroom: float = 0.0, check: bool = True,
         hbm_bytes: int | None = None,
         devices: Sequence | None = None, info=None, schedule=None,
         only: Sequence[str] | None = None, keep_compiled: bool = False,
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
      ``data_shapes``: from the config, no dataset needed when it states
      the shapes).
    only: compile only these programs (``programs`` names, e.g.
      ``('train',)``); default all.
    keep_compiled: keep each executable in its report (``compiled``).
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
    info, schedule = data_shapes(config)
  spec, optimizer, state = checkpoints.init_state(config, info, schedule)
  # The loop's engine and train-state layout on the target mesh (stages
  # placed as training places them: the per-stage flops are compiled on
  # this host); each program is lowered by ``programs.lower``, as training
  # lowers it.
  eng = config_lib.make_engine(config, spec, state.params, target)
  replicated = NamedSharding(target, P())
  params = _abstract(state.params, replicated)
  compute_dtype = config_lib.PRECISIONS[config.precision]

  memo = {}  # Chunked clips: layouts shared by the parts (programs.lower).

  def lower(name, shape):
    carry = None
    if config.train.stream:  # The engine-layout carry, replicated (as in train).
      clip, targets = programs_lib.batch_like(eng, config, shape)
      carry = _abstract(jax.eval_shape(
          lambda: engine.init_carry(spec, params, clip, targets, config.mode,
                                    compute_dtype)), replicated)
    return programs_lib.lower(
        name, shape, config, eng, optimizer, eng.state_like(params),
        eng.state_like(_abstract(state.opt_state, replicated)),
        tree_params=params, carry=carry, memo=memo)

  reports = []
  for name, shape in programs(config, info, schedule):
    if only is not None and name not in only:
      continue
    chunked = name in programs_lib.CHUNK_PARTS
    r = report(name, shape, lambda n=name, s=shape: lower(n, s), chip,
               keep_compiled or chunked)
    if chunked and r.compiled is not None:  # The next part's input layout.
      memo[programs_lib.layout_key(name, shape)] = (
          r.compiled.output_shardings)
      if not keep_compiled:
        r = dataclasses.replace(r, compiled=None)
    reports.append(r)
    if log:
      r = reports[-1]
      log(f'compiled {name} {shape}: ' + (
          f'XLA refused it ({r.error})' if r.error else
          f'peak {_size(r.peak)} per chip') + f' in {r.compile_s:.1f}s')
  if check:
    check_memory(reports, chip, headroom)
  return reports

