r"""A pod job on paper: per-chip memory, compile time, longest clip, clips/s.

  python -m experiments.benchmarks.scale            # the full plan (hours)
  python -m experiments.benchmarks.scale --quick    # a few shapes (minutes)
  python -m experiments.benchmarks.scale --config=experiments/configs/my.py

Compiles the training step of a config (default: the Kinetics-600-shaped
Skip-Sideways net of ``experiments/configs/kinetics_plan.py``: 224x224x3
frames, 16 residual conv stages to 7x7x512, ~25 M params, bf16, global
batch 16) for ``--topology`` (default ``v5e:16x16`` as a 16 x 16 ('data',
'stage') mesh) with ``skipside.tpu_plan`` -- the training loop's own step
function, XLA's TPU compiler, no TPU -- in every mode for each clip length
T, and reads per chip: argument, temporary and peak HBM, compile time, and
the step-time model's prediction (``tpu_plan.step_cost``). Then:

- the longest clip that fits a chip's HBM per mode, by bisection on
  compiled programs (T a multiple of the stage axis, so the clip is
  time-sharded; ``--quick`` skips it); the headline's ``max_frames_*`` is
  null unless a longer clip was refused (else it is only a lower bound;
  ``longest_clip_brackets`` has both ends and the probes);
- ``sideways_chunked``: Sideways clips trained in chunks of ``--chunk``
  frames (``config.train.chunk_frames``, ``skipside/streaming.py``: the
  same gradient, one program call per chunk), so only a chunk of frames is
  on the chips: per-chip memory is the chunk programs', whatever ``T``
  (what bounds ``T`` then is host memory for the clip; the tick counter is
  int32);
- data-parallel backprop on the same chips with the same global batch
  (``dp_bp``: mesh ``min(batch, chips) x 1``; the rest of the chips idle,
  a batch of 16 cannot spread further) and the predicted ratio of Sideways'
  clips/s to it;
- the model's compute term checked on this host: the same config shrunk to
  CPU size, compiled for the CPU, predicted compute time (FLOPs over a peak
  measured here with a matmul) over a measured step.

Writes ``experiments/results/scale.json`` (DESIGN.md §8: config, device,
rows, headline): ``max_frames_sideways_v5e``, ``max_frames_bp_v5e``,
``max_compile_s``, ``predicted_sideways_over_dp_bp_clips_per_s``,
``sideways_peak_T16384_over_T512`` (16,384-frame clips in chunks over
512-frame clips whole; ``sideways_whole_clip_peak_T16384_over_T512``: both
whole); a figure that was not measured is null.
"""

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import common
from skipside import programs, tpu_plan

GiB = 2 ** 30
DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), '..', 'configs',
                              'kinetics_plan.py')
MODES = ('sideways', 'pipelined_bp', 'bp')
LENGTHS = (32, 128, 512, 2048, 16384)
CHUNK, CHUNKED_LENGTHS = 512, (16384,)
QUICK_LENGTHS = {'sideways': (32, 512), 'pipelined_bp': (32,), 'bp': (32,)}


def load_config(path: str):
  """``get_config()`` of a config file, e.g. ``path/to/file.py[:variant]``."""
  path, _, variant = path.partition(':')
  spec = importlib.util.spec_from_file_location('plan_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def with_shape(config, mode: str, frames: int, data=None, stage=None,
               chunk=0):
  c = config.copy_and_resolve_references()
  c.mode, c.data.num_frames = mode, frames
  c.train.chunk_frames = chunk if chunk and frames > chunk else 0
  if data is not None:
    c.mesh.data, c.mesh.stage = data, stage
  return c


def compile_row(config, topology, devices, mode, frames, *, label=None,
                data=None, stage=None, chunk=0, log=print) -> dict:
  """One compiled training step: its per-chip figures and prediction.

  ``chunk``: the clip trains in chunks of this many frames
  (``config.train.chunk_frames``): the row is the step's programs together
  (``streaming``): the peak of the largest, the slowest compile
  (``compile_s``; all of them: ``compile_s_total``), the step time of all
  chunks.
  """
  c = with_shape(config, mode, frames, data, stage, chunk)
  parts = tpu_plan.plan(c, topology, devices=devices, check=False,
                        only=programs.TRAIN_PARTS)
  r = max(parts, key=lambda p: p.peak)
  chip = tpu_plan.chip_of(topology)
  row = dict(mode=label or mode, T=frames, mesh=[c.mesh.data, c.mesh.stage],
             args=r.args, temp=r.temp, peak=r.peak,
             compile_s=max(p.compile_s for p in parts),
             compile_s_total=sum(p.compile_s for p in parts),
             fits=not tpu_plan.over_memory(parts, chip),
             error=next((p.error for p in parts if p.error), None))
  if len(parts) > 1:  # Chunked: the step's time over all its calls.
    row['programs'] = {p.name: dict(peak=p.peak, compile_s=p.compile_s)
                       for p in parts}
    calls = {programs.CHUNK: frames // chunk - 1}
    if all(p.cost for p in parts):
      row['step_s'] = sum(p.cost.step_s * calls.get(p.name, 1) for p in parts)
      row['clips_per_s'] = c.data.batch_size / row['step_s']
  elif r.cost:
    row.update(flops=r.cost.flops, ticks=r.cost.ticks, tick_s=r.cost.tick_s,
               step_s=r.cost.step_s, clips_per_s=r.clips_per_s,
               compute_s=r.cost.compute_s, memory_s=r.cost.memory_s,
               collective_s=r.cost.collective_s,
               wire_bytes=r.cost.wire_bytes)
  log(f'  {row["mode"]:13s} T={frames:6d}: ' + (
      f'XLA refused ({r.error[:60]})' if r.error else
      f'peak {r.peak / GiB:.2f} GiB, args {r.args / GiB:.2f}, temp '
      f'{r.temp / GiB:.2f}, compile {r.compile_s:.0f} s, '
      f'{row.get("clips_per_s", 0):.3g} clips/s predicted'))
  return row


def sub_topology(topology: str, chips: int) -> str:
  """A slice of ``chips`` chips (a power of two) of ``topology``'s
  generation and rank, e.g. ``('v5e:16x16', 16) -> 'v5e:4x4'``."""
  name, _, dims = topology.partition(':')
  rank = len(dims.split('x'))
  k = int(math.log2(chips))
  if 2 ** k != chips:
    raise ValueError(f'{chips} chips: not a power of two')
  sides = [2 ** (k // rank + (i < k % rank)) for i in range(rank)]
  return f'{name}:{"x".join(map(str, sides))}'


def longest_clip(probe, fits_at: int, fails_at: int | None, step: int,
                 limit: int = 1 << 21) -> tuple[int, list]:
  """The largest multiple of ``step`` for which ``probe(T)`` (-> bool)
  holds, by doubling from ``fits_at`` to a failure, then bisection."""
  tried = []
  hi = fails_at
  lo = fits_at
  while hi is None:
    t = lo * 2
    if t > limit:
      return lo, tried
    ok = probe(t)
    tried.append((t, ok))
    lo, hi = (t, None) if ok else (lo, t)
  while hi - lo > step:
    mid = (lo + hi) // 2 // step * step
    ok = probe(mid)
    tried.append((mid, ok))
    lo, hi = (mid, hi) if ok else (lo, mid)
  return lo, tried


# -- The model's compute term on this host. ----------------------------------

def host_peak_flops(n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of an f32 ``n x n`` matmul on this host (median of repeats)."""
  f = jax.jit(lambda a, b: a @ b)
  a = jnp.ones((n, n), jnp.float32)
  f(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / float(np.median(times))


def host_bandwidth(mib: int = 256, repeats: int = 5) -> float:
  """Bytes/s of an elementwise pass over ``mib`` MiB (read + write)."""
  f = jax.jit(lambda x: x * 2.0)
  x = jnp.ones((mib * 2 ** 18,), jnp.float32)
  f(x).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * x.nbytes / float(np.median(times))


def validate_on_host(config, repeats: int = 5) -> dict:
  """Predicted over measured step time of the config shrunk to CPU size
  (64x64 crops, 24 frames, batch 2, f32, one device), compiled by the
  planner for this host's CPU and run on zeros."""
  c = config.copy_and_resolve_references()
  c.data.crop_size, c.data.num_frames, c.data.batch_size = 64, 24, 2
  c.precision = 'float32'  # CPU matmuls in f32 (the measured peak's dtype).
  c.mesh.data = c.mesh.stage = 1
  cpu = jax.devices('cpu')[:1]
  r, = tpu_plan.plan(c, 'v5e:1x1', devices=cpu, check=False,
                     only=('train',), keep_compiled=True)
  peak, bandwidth = host_peak_flops(), host_bandwidth()
  cost = tpu_plan.step_cost(r.compiled.as_text(), peak, bandwidth, 1e30)
  args_info = r.compiled.args_info[0]

  def zeros():
    return jax.tree.map(
        lambda a: None if a is None else jax.device_put(
            jnp.zeros(a.shape, a.dtype), cpu[0]), args_info,
        is_leaf=lambda a: a is None)

  times = []
  for i in range(repeats + 1):
    args = zeros()  # Donated by each call.
    t = time.perf_counter()
    jax.block_until_ready(r.compiled(*args))
    if i:  # The first call warms up.
      times.append(time.perf_counter() - t)
  measured = float(np.median(times))
  return dict(
      shape=list(r.shape), host_peak_flops=peak, host_bytes_per_s=bandwidth,
      flops=cost.flops, hbm_bytes=cost.hbm_bytes, ticks=cost.ticks,
      measured_step_s=measured, predicted_compute_s=cost.compute_s,
      predicted_roofline_s=cost.roofline_s,
      compute_over_measured=cost.compute_s / measured,
      roofline_over_measured=cost.roofline_s / measured)


def _fmt_table(rows) -> str:
  head = ('mode', 'mesh', 'T', 'args GiB', 'temp GiB', 'peak GiB', 'fits',
          'compile s', 'tick ms', 'clips/s')
  out = [head]
  for r in rows:
    out.append((r['mode'], 'x'.join(map(str, r['mesh'])), str(r['T']),
                f'{r["args"] / GiB:.2f}', f'{r["temp"] / GiB:.2f}',
                f'{r["peak"] / GiB:.2f}' if not r['error'] else 'XLA OOM',
                'yes' if r['fits'] else 'no', f'{r["compile_s"]:.0f}',
                f'{r["tick_s"] * 1e3:.3g}' if 'tick_s' in r else '-',
                f'{r["clips_per_s"]:.3g}' if 'clips_per_s' in r else '-'))
  widths = [max(len(x[i]) for x in out) for i in range(len(head))]
  lines = ['  '.join(v.ljust(w) for v, w in zip(x, widths)) for x in out]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default=DEFAULT_CONFIG)
  parser.add_argument('--topology', default='v5e:16x16')
  parser.add_argument('--quick', action='store_true',
                      help='sideways at T=32 and 512, the others at 32, no '
                      'bisection')
  parser.add_argument('--lengths', default=None,
                      help='T values: "32,512" for every mode, or per mode '
                      '"sideways=32,512;bp=32" (default: '
                      f'{",".join(map(str, LENGTHS))})')
  parser.add_argument('--modes', default=','.join(MODES))
  parser.add_argument('--chunk', type=int, default=CHUNK,
                      help='sideways_chunked rows: clips trained in chunks '
                      'of this many frames (config.train.chunk_frames); 0: '
                      'none')
  parser.add_argument('--chunked_lengths', default=','.join(
      map(str, CHUNKED_LENGTHS)), help='T values of the chunked rows')
  parser.add_argument('--bisect', default=None,
                      help='modes to bisect (default: every mode; none with '
                      '--quick)')
  parser.add_argument('--bisect_step', type=int, default=None,
                      help='bisect to this many frames (default: the stage '
                      'axis: the finest time-sharded step)')
  parser.add_argument('--max_probes', type=int, default=64,
                      help='new compiles per bisected mode; fewer leave a '
                      'bracket (reported)')
  parser.add_argument('--resume', action='store_true',
                      help='reuse the rows of an interrupted run (OUT.partial)')
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(__file__), '..', 'results', 'scale.json'))
  args = parser.parse_args()

  config = load_config(args.config)
  chip = tpu_plan.chip_of(args.topology)
  tpu_plan.silence_libtpu(chip)
  devices = tpu_plan.topology_devices(args.topology)
  stage = config.mesh.stage
  data = len(devices) // stage
  batch = config.data.batch_size
  print(f'{args.config} on {args.topology}: {data} x {stage} mesh, global '
        f'batch {batch}, {chip.name} HBM {chip.hbm_bytes / GiB:.0f} GiB'
        f'{" (quick)" if args.quick else ""}', flush=True)
  t0 = time.perf_counter()
  rows = []

  done = []  # Rows of an earlier run: OUT.partial (interrupted) or OUT.
  if args.resume:
    for path in (args.out, args.out + '.partial'):
      if os.path.exists(path):
        with open(path) as f:
          got = json.load(f)
        done += got['rows'] if isinstance(got, dict) else got

  def run(mode, frames, on=devices, topology=args.topology, **kw):
    label = kw.get('label') or mode
    mesh = [kw.get('data'), kw.get('stage')]
    old = next((r for r in done if r['mode'] == label and r['T'] == frames
                and r['mesh'] == mesh), None)
    rows.append(old or compile_row(config, topology, on, mode, frames, **kw))
    with open(args.out + '.partial', 'w') as f:  # Hours of compiles: keep.
      json.dump(rows, f, indent=1)
    return rows[-1]

  modes = args.modes.split(',')
  lengths = {m: QUICK_LENGTHS[m] if args.quick else LENGTHS for m in modes}
  for part in (args.lengths or '').split(';'):  # [mode=]T,T,...
    if part:
      mode, _, ts = part.rpartition('=')
      for m in ([mode] if mode else modes):
        lengths[m] = tuple(int(t) for t in ts.split(','))
  for mode in modes:
    for frames in lengths[mode]:
      run(mode, frames, data=data, stage=stage)
  if 'sideways' in modes and args.chunk:  # Only a chunk reaches the chips.
    for frames in (int(t) for t in args.chunked_lengths.split(',') if t):
      run('sideways', frames, data=data, stage=stage, chunk=args.chunk,
          label='sideways_chunked')
  # Data-parallel backprop on the same chips and global batch.
  dp = min(batch, len(devices))
  # On a slice of its own size: XLA's TPU compiler wants every device of a
  # slice in the device assignment (a v5e:16x16 program cannot use 16).
  dp_topology = sub_topology(args.topology, dp)
  run('bp', QUICK_LENGTHS['bp'][0], on=tpu_plan.topology_devices(dp_topology),
      topology=dp_topology, label='dp_bp', data=dp, stage=1)
  rows[-1]['topology'] = dp_topology

  longest, brackets = {}, {}
  bisect = ([] if args.quick and args.bisect is None else
            (args.bisect or args.modes).split(','))
  for mode in (m for m in bisect if m):
    mine = [r for r in rows if r['mode'] == mode]
    fit = max((r['T'] for r in mine if r['fits']), default=None)
    fail = min((r['T'] for r in mine if not r['fits'] and fit and
                r['T'] > fit), default=None)
    if fit is None:
      continue
    probes = []

    def probe(t, m=mode, probes=probes):
      resumed = any(r['mode'] == m and r['T'] == t and r['mesh'] == [
          data, stage] for r in done)
      if not resumed:  # Only new compiles count.
        if len(probes) >= args.max_probes:
          raise StopIteration
        probes.append(t)
      return run(m, t, data=data, stage=stage)['fits']

    try:
      longest_clip(probe, fit, fail, step=args.bisect_step or stage)
    except StopIteration:  # Out of probes: the bracket so far.
      pass
    brackets[mode] = dict(probes=len(probes))
  # Every mode's bracket from every compiled row (this run's and resumed).
  for mode in modes:
    mine = [r for r in rows if r['mode'] == mode]
    lo = max((r['T'] for r in mine if r['fits']), default=None)
    hi = min((r['T'] for r in mine if not r['fits'] and r['T'] > (lo or 0)),
             default=None)
    longest[mode] = lo
    brackets[mode] = dict(brackets.get(mode, {}), fits=lo, fails=hi)
    print(f'longest {mode} clip on {chip.name}: {lo} frames fit, '
          f'{hi} do not', flush=True)

  host = validate_on_host(config)
  print(f'model vs this host ({host["shape"]}, f32, CPU peak '
        f'{host["host_peak_flops"]:.3g} FLOP/s by matmul, '
        f'{host["host_bytes_per_s"]:.3g} B/s): predicted compute / measured '
        f'= {host["compute_over_measured"]:.2f}, roofline / measured = '
        f'{host["roofline_over_measured"]:.2f} (step '
        f'{host["measured_step_s"]:.3f} s)', flush=True)

  def row(mode, frames):
    return next((r for r in rows if r['mode'] == mode and r['T'] == frames),
                None)

  side, dpbp = row('sideways', 32), row('dp_bp', QUICK_LENGTHS['bp'][0])
  long, short = row('sideways', 16384), row('sideways', 512)
  chunked = row('sideways_chunked', 16384)
  def closed(mode):  # The longest clip, once a longer one was refused.
    b = brackets.get(mode, {})
    return b.get('fits') if b.get('fails') else None

  headline = dict(
      max_frames_sideways_v5e=closed('sideways'),
      max_frames_bp_v5e=closed('bp'),
      max_frames_pipelined_bp_v5e=closed('pipelined_bp'),
      max_compile_s=max(r['compile_s'] for r in rows),
      predicted_sideways_over_dp_bp_clips_per_s=(
          side['clips_per_s'] / dpbp['clips_per_s']
          if side and dpbp and dpbp.get('clips_per_s') else None),
      predicted_sideways_over_pipelined_bp_clips_per_s=(
          side['clips_per_s'] / row('pipelined_bp', 32)['clips_per_s']
          if side and row('pipelined_bp', 32) else None),
      # Training 16,384-frame clips (in chunks) over 512-frame ones (whole).
      sideways_peak_T16384_over_T512=(
          chunked['peak'] / short['peak'] if chunked and short and not
          chunked['error'] else None),
      sideways_whole_clip_peak_T16384_over_T512=(
          long['peak'] / short['peak'] if long and short and not long['error']
          else None),
      host_compute_predicted_over_measured=host['compute_over_measured'],
      longest_clip_brackets=brackets)
  print(_fmt_table(rows))
  print('headline:', headline)
  print(f'total {time.perf_counter() - t0:.0f} s')
  if os.path.exists(args.out + '.partial'):
    os.remove(args.out + '.partial')
  common.write_result(args.out, dict(
      config=dict(config=os.path.relpath(args.config), topology=args.topology,
                  mesh=[data, stage], global_batch=batch, quick=args.quick,
                  chip=dataclasses.asdict(chip), modes=modes,
                  lengths=lengths, bisect=bisect, chunk=args.chunk,
                  chunked_lengths=args.chunked_lengths,
                  bisect_step=args.bisect_step or stage,
                  max_probes=args.max_probes),
      device=common.device_info(
          compiled_for=args.topology, load_average=os.getloadavg()),
      rows=rows, host_check=host, headline=headline))


if __name__ == '__main__':
  main()
