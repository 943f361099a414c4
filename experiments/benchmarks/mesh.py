r"""The mesh engine against the single-device engine, side by side.

  python -m experiments.benchmarks.mesh [--out PATH] [--repeats 5] [--quick]

On 8 simulated CPU devices (set here, before jax is imported), the default
conv net (5 stages, 32x32x1 frames, Skip-Sideways edges), batch 8, T=16:

- ticks per second of ``mesh.loss_and_grads`` vs ``engine.loss_and_grads``
  per mode and mesh shape (warmed up, interleaved, medians over repeats);
- compile time of each program;
- per-stage flops (XLA ``cost_analysis``), the automatic grouping per mesh
  shape, flops per group and the max/mean ratio;
- the bytes of padding in the mesh layout (params, carried buffers, per-tick
  transfers);
- the share of fill/flush ticks (masked out of the loss) on a 128-frame
  stream cut into 16-frame clips: with the stream carried (fill happens
  once) vs fresh clips each flushed;
- a homogeneous net (8 stride-1 3x3 conv stages, 32 -> 32 channels, 16x16x32
  frames, 10 classes, no skips; batch 8, T=32, sideways) on a 1x8 mesh, one
  stage per device, against one device: skipside's engines and the plain
  JAX peer of ``experiments/benchmarks/peer.py`` (the praxis / MaxText
  pattern: stacked weights, no ``lax.switch``, no packing; on one device
  both vmapped and unrolled), all five programs timed interleaved, with
  counts of the HLO ops that tell the programs apart.

Headline (DESIGN.md §8): ``mesh_over_single_ticks_per_s`` (sideways, 2x4;
``mesh.loss_and_grads`` on the params pytree, which packs them and unpacks
the gradient every call) and ``mesh_sharded_over_single_ticks_per_s`` (the
same mesh engine's window on its stage-sharded state, ``'stage'``, with a
placed batch, as the loop runs it by default; the even layout is timed in
the train step),
``fill_flush_tick_share`` (carried stream) and ``padding_bytes_share``;
``homog_mesh_over_single_ticks_per_s`` (skipside, homogeneous net, 1x8),
``peer_mesh_over_single_ticks_per_s`` (the peer, same net) and
``homog_over_peer_ratio`` (the first over the second: 1 means skipside's
mesh engine costs what the peer's does, relative to one device). The peer's
one-device baseline is ``vmap`` over stacked stages, whose grouped
convolutions XLA:CPU runs several times slower than plain ones, so on CPU
two more keys compare without it: ``homog_mesh_over_peer_mesh_ticks_per_s``
(the two mesh programs head to head) and
``peer_mesh_over_single_unrolled_ticks_per_s`` (the peer's stages unrolled
on one device, as skipside's engine runs them). ``--quick`` (2 repeats) is
for smoke runs.
Also: ``mesh_train_step_even_over_single`` and
``mesh_train_step_over_single`` (the training loop's steps, sideways, Adam,
2x4: the single-device engine's against the mesh engine's on its evenly
sharded state, ``state_sharding='even'``, and on its stage-sharded one, the
config default, each batch placed as the loop's ``eng.put_batch`` places
it), the transport ablation ``mesh_no_transfers_over_single`` and
``mesh_no_transfers_no_frames_over_single`` (below) and
``state_bytes_per_device_share_1x4`` (the largest device's params + Adam
bytes over their total as one pytree, in the even layout: 0.25 up to the
rounding of the flat vector to the device count), beside
``state_bytes_per_device_share_1x4_stage_layout`` (the same in the stage
layout, which cannot go below its largest group's parameter share,
``largest_group_param_share_1x4``: on the default net stage 4 alone holds
64% of the parameters).
On CPU the 8 "devices" share 2 cores, so the mesh is expected to be slower
than one device: the figures measure the overhead of the SPMD program, not a
speed-up; single-device programs also run slower in an 8-device process.

Where the mesh's overhead went (measured on the homogeneous net, HLO read
and ablations, 2-core CPU):

- ``lax.switch`` over the stage branches costs no measurable time per tick
  (the peer wrapped in an 8-way switch of identical branches timed the
  same); its cost is compile time and code: every device's program holds
  every branch. Equal branches are now merged (``mesh._switch``, by jaxpr):
  on the homogeneous net 3 branches instead of 8 (bottom, middle, top),
  the compiled program 2,100 HLO lines instead of 2,900 and 8 convolutions
  instead of 23 (sideways; pipelined_bp 2,608 vs 3,736 lines, 11 vs 31);
  the default net has no equal branches; the Kinetics-shaped 16-stage plan
  (experiments/configs/kinetics_plan.py) 12 distinct tick branches of 16.
  Compile time did not move measurably: 1-3 s for these small programs
  (noise of a shared CPU); the Kinetics-shaped sideways train step for
  v5e:16x16 at T=32 took 127 CPU-seconds to compile merged against 131
  plain, and its planned peak per chip fell from 0.32 to 0.28 GiB
  (measured with ``scale.compile_row`` on that config, once with
  ``mesh._switch`` replaced by ``lax.switch``, 2026-12-06, loaded 2-core
  CPU). What one SPMD program cannot do is give each
  device only its own branch: that needs per-device programs (MPMD).
  ``experiments/benchmarks/mpmd.py`` measures them (one jitted Sideways tick
  per device, host-driven transfers, same gradients bit for bit): 3.3x
  fewer convolutions in the most loaded device's program and no padding
  (the SPMD devices hold 2.55x the parameter bytes) on the default net
  (1x4), 1.04-1.10x the SPMD mesh's ticks/s there but 0.87x on the
  homogeneous 1x8 net (host dispatch per device per tick); no whole-step
  program to jit, plan or run across hosts, hence not the engine.
- The per-tick transport was a gather of each round's payload on the traced
  device index before the upward ``ppermute`` and a scatter-add after the
  downward one (about 1-1.5 ms a tick, 10-15%). Each round's buffers are now
  packed inside the branch, where the device is static, and the gather and
  scatter run once per clip.
- The packed gradient used to be unpacked outside ``shard_map`` (an
  all-reduce plus collective-permutes to one device per clip) and the params
  raveled at entry: the stage-sharded train step keeps both sharded.
- Parameter unpacking is static slices, not a per-tick cost. What remains
  inherent to one SPMD program over unequal stages: packing each tick's
  outputs and messages into per-device buffers (concatenates), padding to
  the widest device, and the imbalance of the groups (max/mean flops 1.62 on
  2x4 for the default net).
- What is left is the transport, measured by ablation
  (``transport_ablation``: the same window compiled with its ``ppermute``
  rounds replaced by each device keeping its buffers, then without the
  per-tick frame ``psum`` too; timing only, the numbers it computes are
  wrong). On 2x4 (results/mesh.json, 2026-12-06, 2-core CPU): 0.67x one
  device as is, 1.07x without the rounds, 1.16x without the frame ``psum``
  too (the run before read 0.65, 0.99, 1.11). One ``ppermute`` in a chain
  costs 0.18 ms for a 2048-float-per-example buffer and 0.20 ms for 6144
  (``ppermute_ms``: mostly a fixed cost, a rendezvous of 8 device threads
  on 2 cores), and a Sideways tick on 2x4 makes four (two rounds, up and
  down) plus the frame ``psum``: roughly half of what the ablation
  removes per tick; the rest (the waiting each rendezvous adds between
  devices) is not broken down.
  Tried in throwaway code on the same window, timed against the program as
  is in the same process, and not kept (no gain beyond this machine's
  run-to-run noise): each round as an ``all_to_all``; each
  direction's rounds merged into one ``all_to_all`` (one collective where
  there were two); the frames fetched a chunk of ``T / S`` at a time (one
  ``psum`` per chunk), which also grew temporary memory with ``T`` (a
  ``tests/test_mesh.py`` bound failed). Where a collective costs
  microseconds (NVLink, ICI) this share should mostly go; no multi-device
  accelerator has been lent to measure it.
- The train step's figure used to feed the mesh an unplaced batch, resharded
  inside every step; it is now fed as the loop feeds it, which changed the
  figure by nothing measurable (0.638 before, 0.639 after). It reads below
  the bare window's ``mesh_sharded_over_single`` (0.66 against 0.71 in the
  last run), but the same window program read 0.67 in the transport
  ablation of the same run: one program's figure spans several hundredths
  within a run here, so whether the optimizer update on the packed state
  costs anything is not established.
- The evenly sharded train state (ZeRO, ``state_sharding='even'``) adds per
  window a gather of each device's rows (a ``psum`` over 'data' of a
  segment, then one ``ppermute`` shift over 'stage' per overlapped segment
  offset: two on the default net's 1x4 and 2x4 placements) and the
  transposed scatter of the gradient. Its train step read 0.69 of one
  device against the stage layout's 0.66 in the same run (2026-12-06, one
  run): no cost that run could measure next to the per-tick transport, for
  0.25 of the state's argument bytes per device on 1x4 instead of 0.64
  (the step's temporaries add the gathered row, its gradient and the
  exchange buffer).
- The peer's one-device baseline is ``vmap`` over stacked stages: XLA:CPU
  runs its grouped convolutions about 4x slower than plain ones, which
  flatters ``peer_mesh_over_single_ticks_per_s`` and sinks
  ``homog_over_peer_ratio``; ``homog_mesh_over_peer_mesh_ticks_per_s`` and
  ``peer_mesh_over_single_unrolled_ticks_per_s`` compare without it.
"""

from experiments.benchmarks import host_devices

host_devices.simulate(8)  # Before jax is imported.

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import functools  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from experiments.benchmarks import common  # noqa: E402
from experiments.benchmarks import peer  # noqa: E402
from skipside import engine, mesh, models, network, placement  # noqa: E402
from skipside import programs  # noqa: E402

BATCH, FRAMES = 8, 16
STREAM_FRAMES = 128
# (mode, data, stage): sideways on every shape, the exact modes on 2x4.
CONFIGS = (('sideways', 2, 4), ('sideways', 1, 8), ('sideways', 4, 2),
           ('pipelined_bp', 2, 4), ('bp', 2, 4))
HOMOG_STAGES, HOMOG_FRAMES = 8, 32
# HLO opcodes that separate a packed lax.switch program from the peer's.
HLO_OPS = ('conditional', 'dynamic-slice', 'dynamic-update-slice', 'gather',
           'scatter', 'copy', 'concatenate', 'pad', 'collective-permute',
           'all-reduce', 'convolution')


def _compile(fn, *args, **kwargs):
  jax.clear_caches()  # A cold compile every time (no cache hits across rows).
  start = time.perf_counter()
  compiled = fn.lower(*args, **kwargs).compile()
  return compiled, time.perf_counter() - start


def _time(compiled, args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  return time.perf_counter() - start


def _medians(programs: dict, repeats: int) -> dict:
  """Median seconds of each ``name: (compiled, args)``, timed interleaved
  (one round of every program per repeat) after one warm-up each."""
  for compiled, args in programs.values():
    _time(compiled, args)
  times = {name: [] for name in programs}
  for _ in range(repeats):
    for name, (compiled, args) in programs.items():
      times[name].append(_time(compiled, args))
  return {name: statistics.median(t) for name, t in times.items()}


@functools.partial(jax.jit, static_argnames=('eng', 'mode'))
def window_grads(eng, state, clip, labels, *, mode='sideways'):
  """A fresh clip's loss and gradients on any engine, params in its own
  state layout (the mesh's stage-sharded ``(S, P)``): the engine as the
  training loop runs it."""
  carry = eng.init_carry(state, clip, labels, mode)
  return eng.window_grads(state, clip, labels, carry, mode=mode, start=0,
                          length=clip.shape[1], mask_fill=True,
                          compute_dtype=jnp.float32)


def sharded_engine(spec, params, mspec, clip, labels):
  """The mesh engine of ``mspec``'s placement and its arguments as the
  training loop holds them: ``(eng, (stage-sharded params, placed clip,
  placed labels))``."""
  eng = mesh.MeshEngine(mesh.place(spec, mspec.mesh, mspec.groups,
                                   params=params))
  return eng, (eng.to_state(params),
               *eng.put_batch((clip, labels), clip.shape[0]))


def compare(spec, params, mspec, mode, clip, labels, repeats):
  """Compile and time, on the same clip, interleaved: ``engine`` and
  ``mesh.loss_and_grads`` on the params pytree (the README's calls; the
  mesh packs the params and unpacks the gradient every call), and the mesh
  engine on its stage-sharded state with a placed batch (``window_grads``,
  as the training loop runs it)."""
  single, single_compile = _compile(engine.loss_and_grads, spec, params, clip,
                                    labels, mode=mode)
  on_mesh, mesh_compile = _compile(mesh.loss_and_grads, mspec, params, clip,
                                   labels, mode=mode)
  eng, sharded_args = sharded_engine(spec, params, mspec, clip, labels)
  sharded, _ = _compile(window_grads, eng, *sharded_args, mode=mode)
  args = (params, clip, labels)
  t = _medians({'single': (single, args), 'mesh': (on_mesh, args),
                'mesh_sharded': (sharded, sharded_args)}, repeats)
  tps = {k: clip.shape[1] / v for k, v in t.items()}
  return {
      'mode': mode, 'mesh': f"{mspec.num_data}x{mspec.num_stage}",
      'groups': [list(g) for g in mspec.groups],
      'single_ticks_per_s': tps['single'], 'mesh_ticks_per_s': tps['mesh'],
      'mesh_sharded_ticks_per_s': tps['mesh_sharded'],
      'mesh_over_single': tps['mesh'] / tps['single'],
      'mesh_sharded_over_single': tps['mesh_sharded'] / tps['single'],
      'single_compile_s': single_compile, 'mesh_compile_s': mesh_compile,
      'single_step_s_median': t['single'],
      'mesh_step_s_median': t['mesh'],
      'mesh_sharded_step_s_median': t['mesh_sharded']}


def train_steps(spec, params, mspec, clip, labels, repeats):
  """The training loop's steps (``programs.train_step``: sideways, Adam, one
  step per clip, params and optimizer state donated) on one device and on
  the mesh in both train-state layouts ('mesh': 'stage', 'mesh_even':
  'even'), each state fed back, interleaved."""
  opt = optax.adam(1e-3)
  engines = {'single': engine.LocalEngine(spec)}
  for name, sharding in (('mesh', 'stage'), ('mesh_even', 'even')):
    engines[name] = mesh.MeshEngine(mesh.place(
        mspec.spec, mspec.mesh, mspec.groups, params=params,
        state_sharding=sharding))
  # Copies: the steps donate their state (the local engine's is the pytree).
  states = {k: (e.to_state(jax.tree.map(jnp.array, params)),
                e.to_state(opt.init(params))) for k, e in engines.items()}
  # Each engine gets its batch as the loop's ``eng.put_batch`` places it (an
  # unplaced batch would be resharded inside every mesh step).
  batches = {k: e.put_batch((clip, labels), clip.shape[0])
             for k, e in engines.items()}
  kw = dict(mode='sideways', compute_dtype=jnp.float32, update_every=None,
            flush=0, skip_nonfinite=False)
  steps = {k: functools.partial(programs.train_step, e, opt)
           for k, e in engines.items()}
  times = {k: [] for k in steps}
  for i in range(repeats + 1):  # The first round compiles and warms up.
    for k, step in steps.items():
      start = time.perf_counter()
      p, o, _ = jax.block_until_ready(step(*states[k], *batches[k], None,
                                           **kw))
      states[k] = (p, o)
      if i:
        times[k].append(time.perf_counter() - start)
  t = {k: statistics.median(v) for k, v in times.items()}
  return {'mode': 'sideways', 'optimizer': 'adam',
          'mesh': f'{mspec.num_data}x{mspec.num_stage}',
          'single_step_s_median': t['single'], 'mesh_step_s_median': t['mesh'],
          'mesh_even_step_s_median': t['mesh_even'],
          'mesh_over_single': t['single'] / t['mesh'],
          'mesh_even_over_single': t['single'] / t['mesh_even']}


@contextlib.contextmanager
def _transport_removed(frames: bool):
  """Inside: the mesh program without its per-tick ``ppermute`` rounds (each
  device keeps the buffers it would send) and, with ``frames``, without the
  per-tick frame ``psum`` (each device reads its own frames; per-frame
  targets too). Timing only: what it computes is wrong. Programs compiled
  inside keep the change; jit caches are cleared on the way out, so nothing
  traced inside is reused."""
  send, reader = mesh._send, mesh._frame_reader  # pylint: disable=protected-access
  mesh._send = lambda plan, bufs, down: tuple(bufs)
  if frames:
    mesh._frame_reader = lambda read, sharded: (
        lambda buf, t: read(buf, t % buf.shape[1]))
  try:
    yield
  finally:
    mesh._send, mesh._frame_reader = send, reader
    jax.clear_caches()


def ppermute_ms(m, width: int, rows: int, ticks: int = 16) -> float:
  """Milliseconds one ``ppermute`` of a ``(rows, width)`` f32 buffer per
  device costs on mesh ``m``: a scan of ``ticks`` with 8 dependent cyclic
  shifts on 'stage' per tick and no compute between them, against none (7
  repeats). The latency of one collective in a chain, not the engine's
  rounds, which use acyclic pairs and sit between computations."""
  stage = m.shape['stage']

  def program(k):
    def fn(x):
      def body(c, _):
        for _ in range(k):
          c = lax.ppermute(c, 'stage', [(s, (s + 1) % stage)
                                        for s in range(stage)])
        return c, None
      return lax.scan(body, x, jnp.arange(ticks))[0]
    return jax.jit(jax.shard_map(fn, mesh=m, in_specs=P('data', 'stage'),
                                 out_specs=P('data', 'stage')))
  x = jnp.ones((rows * m.shape['data'], width * stage))
  t = _medians({k: (program(k), (x,)) for k in (0, 8)}, 7)
  return (t[8] - t[0]) / (8 * ticks) * 1e3


def transport_ablation(spec, params, mspec, clip, labels, repeats):
  """Where the mesh's overhead goes (sideways, stage-sharded state, placed
  batch): the window timed as is, without its per-tick transfers, and
  without the per-tick frame ``psum`` too, each against one device,
  interleaved; and the cost of one ``ppermute`` of each round's buffer on
  this platform (``ppermute_ms``)."""
  eng, args = sharded_engine(spec, params, mspec, clip, labels)
  programs_ = {'single': (_compile(window_grads, engine.LocalEngine(spec),
                                   params, clip, labels)[0],
                          (params, clip, labels)),
               'mesh': (_compile(window_grads, eng, *args)[0], args)}
  for name, frames in (('mesh_no_transfers', False),
                       ('mesh_no_transfers_no_frames', True)):
    with _transport_removed(frames):
      programs_[name] = (_compile(window_grads, eng, *args)[0], args)
  t = _medians(programs_, repeats)
  plan = mesh._plan(mspec, params, jnp.float32)  # pylint: disable=protected-access
  rows = clip.shape[0] // mspec.num_data
  return {
      'mesh': f'{mspec.num_data}x{mspec.num_stage}', 'mode': 'sideways',
      'step_s_median': t,
      'over_single': {k: t['single'] / v for k, v in t.items()
                      if k != 'single'},
      'collectives_per_tick': {
          'ppermute': 2 * len(plan.rounds),
          'frame_psum': int(mesh.time_sharded(mspec.mesh, clip.shape))},
      'round_widths': [r.width for r in plan.rounds],
      'ppermute_ms': {str(r.width): ppermute_ms(mspec.mesh, r.width, rows)
                      for r in plan.rounds},
  }


def state_bytes(spec, params, data, stage, state_sharding):
  """Per-device bytes of params + Adam state in a train-state layout
  (``mesh.STATE_SHARDINGS``; the largest device's) over their bytes as one
  pytree."""
  m = mesh.make_mesh(data, stage, devices=jax.devices()[:data * stage])
  mspec = mesh.place(spec, m, params=params, state_sharding=state_sharding)
  opt = optax.adam(1e-3)
  tree = (params, opt.init(params))
  sharded = (mesh.shard_tree(mspec, params),
             mesh.shard_tree(mspec, opt.init(params)))
  per_device = {}
  for x in jax.tree.leaves(sharded):
    for shard in x.addressable_shards:
      per_device[shard.device] = (per_device.get(shard.device, 0) +
                                  shard.data.nbytes)
  whole = sum(x.nbytes for x in jax.tree.leaves(tree))
  sizes = [sum(x.size for x in jax.tree.leaves(b)) for b in params['blocks']]
  sizes[-1] += sum(x.size for x in jax.tree.leaves(params['head']))
  largest = max(sum(sizes[l] for l in g) for g in mspec.groups)
  return {'mesh': f'{data}x{stage}', 'state_sharding': state_sharding,
          'groups': [list(g) for g in mspec.groups],
          'whole_bytes': whole, 'per_device_bytes': max(per_device.values()),
          'share': max(per_device.values()) / whole,
          'largest_group_param_share': largest / sum(sizes)}


def hlo_counts(compiled) -> dict:
  """How often each of ``HLO_OPS`` occurs in a compiled program's HLO."""
  found = re.findall(r'^\s*(?:ROOT )?\S+ = (?:\([^)]*\)|\S+) ([\w-]+)\(',
                     compiled.as_text(), re.M)
  return {op: found.count(op) for op in HLO_OPS}


def homogeneous(key, repeats):
  """The homogeneous 8-stage net: skipside and the peer, mesh vs one device.

  Same weights (``peer.from_skipside``), clip, labels and dtype (float32)
  for all four programs; each compiled ahead, then timed interleaved.
  """
  spec, params = peer.build(num_stages=HOMOG_STAGES)
  stack, head = peer.from_skipside(params)
  k1, k2 = jax.random.split(key)
  clip = jax.random.normal(k1, (BATCH, HOMOG_FRAMES, *spec.frame_shape))
  labels = jax.random.randint(k2, (BATCH,), 0, spec.prediction_shape[0])
  m = mesh.make_mesh(1, HOMOG_STAGES)
  mspec = mesh.place(spec, m, groups=tuple((i,) for i in range(HOMOG_STAGES)))
  sw = {'mode': 'sideways'}
  compiled = {
      'skipside_single': _compile(engine.loss_and_grads, spec, params, clip,
                                  labels, **sw),
      'skipside_mesh': _compile(mesh.loss_and_grads, mspec, params, clip,
                                labels, **sw),
      'peer_single': _compile(peer.single, stack, head, clip, labels),
      'peer_single_unrolled': _compile(peer.single, stack, head, clip,
                                       labels, unroll=True),
      'peer_mesh': _compile(peer.on_mesh, m, stack, head, clip, labels),
  }
  skip_args, peer_args = (params, clip, labels), (stack, head, clip, labels)
  t = _medians({name: (c, peer_args if name.startswith('peer') else skip_args)
                for name, (c, _) in compiled.items()}, repeats)
  rows = {name: {'ticks_per_s': HOMOG_FRAMES / t[name],
                 'step_s_median': t[name], 'compile_s': compile_s,
                 'hlo_ops': hlo_counts(c)}
          for name, (c, compile_s) in compiled.items()}
  tps = {name: r['ticks_per_s'] for name, r in rows.items()}
  ratios = {'skipside': tps['skipside_mesh'] / tps['skipside_single'],
            'peer': tps['peer_mesh'] / tps['peer_single'],
            'peer_unrolled': tps['peer_mesh'] / tps['peer_single_unrolled'],
            'skipside_mesh_over_peer_mesh': tps['skipside_mesh'] /
                                            tps['peer_mesh'],
            'skipside_single_over_peer_single': tps['skipside_single'] /
                                                tps['peer_single']}
  return rows, ratios


def fill_flush_share(spec, params, mspec, key):
  """Masked ticks over all ticks on a 128-frame stream of 16-frame clips.

  Carried: one stream, the carry passed from clip to clip (fill once, no
  flush). Fresh: every clip starts a new stream and is flushed with ``L-1``
  ticks so its last errors land. Counted from the engine's own
  ``valid_ticks``.
  """
  clips = jax.random.normal(key, (BATCH, STREAM_FRAMES, *spec.frame_shape))
  labels = jnp.zeros((BATCH,), jnp.int32)
  flush = spec.depth
  carry = mesh.init_carry(mspec, params, clips[:, :FRAMES], labels,
                          'sideways')
  valid_carried = valid_fresh = 0
  for start in range(0, STREAM_FRAMES, FRAMES):
    clip = clips[:, start:start + FRAMES]
    _, _, out = mesh.loss_and_grads(mspec, params, clip, labels,
                                    mode='sideways', carry=carry)
    carry = out.carry
    valid_carried += int(out.metrics['valid_ticks'])
    _, _, out = mesh.loss_and_grads(mspec, params, clip, labels,
                                    mode='sideways', flush=flush)
    valid_fresh += int(out.metrics['valid_ticks'])
  n_clips = STREAM_FRAMES // FRAMES
  carried_ticks = STREAM_FRAMES
  fresh_ticks = n_clips * (FRAMES + flush)
  return {
      'stream_frames': STREAM_FRAMES, 'clip_frames': FRAMES, 'flush': flush,
      'carried_ticks': carried_ticks, 'carried_valid': valid_carried,
      'carried_share': 1 - valid_carried / carried_ticks,
      'fresh_ticks': fresh_ticks, 'fresh_valid': valid_fresh,
      'fresh_share': 1 - valid_fresh / fresh_ticks}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(__file__), '..', 'results', 'mesh.json'))
  parser.add_argument('--repeats', type=int, default=None,
                      help='timing repeats (default 5, 2 with --quick)')
  parser.add_argument('--quick', action='store_true',
                      help='fewer repeats: a smoke run')
  args = parser.parse_args()
  if args.repeats is None:
    args.repeats = 2 if args.quick else 5

  net = models.default_net((32, 32, 1), num_classes=4, rngs=nnx.Rngs(0))
  spec, params = network.split(net)
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  clip = jax.random.normal(k1, (BATCH, FRAMES, *spec.frame_shape))
  labels = jax.random.randint(k2, (BATCH,), 0, 4)

  costs = placement.stage_costs(spec, params, batch_size=BATCH)
  meshes = {}
  for _, data, stage in CONFIGS:
    if (data, stage) not in meshes:
      m = mesh.make_mesh(data, stage)
      meshes[data, stage] = mesh.place(
          spec, m, costs=placement.stage_costs(spec, params, BATCH // data))

  print('per-stage flops (fwd+bwd, batch %d): %s' % (
      BATCH, ', '.join(f'{c / 1e6:.1f}M' for c in costs)))
  balance_rows = []
  for (data, stage), mspec in meshes.items():
    per = placement.group_costs(mspec.costs, mspec.groups)
    row = {'mesh': f'{data}x{stage}',
           'groups': [list(g) for g in mspec.groups],
           'group_flops': list(per),
           'max_over_mean': placement.imbalance(mspec.costs, mspec.groups),
           'by_count_max_over_mean': placement.imbalance(
               mspec.costs, placement.balance([1.0] * spec.num_stages,
                                              stage))}
    balance_rows.append(row)
    print(f"  {row['mesh']}: groups {row['groups']} max/mean "
          f"{row['max_over_mean']:.2f} (by count "
          f"{row['by_count_max_over_mean']:.2f})")

  rows = []
  print(f'{"mode":>13} {"mesh":>5} {"single t/s":>11} {"mesh t/s":>9} '
        f'{"ratio":>6} {"sharded":>7} {"compile 1/mesh s":>17}')
  for mode, data, stage in CONFIGS:
    row = compare(spec, params, meshes[data, stage], mode, clip, labels,
                  args.repeats)
    rows.append(row)
    print(f"{mode:>13} {row['mesh']:>5} {row['single_ticks_per_s']:>11.1f} "
          f"{row['mesh_ticks_per_s']:>9.1f} {row['mesh_over_single']:>6.3f} "
          f"{row['mesh_sharded_over_single']:>7.3f} "
          f"{row['single_compile_s']:>8.1f}/{row['mesh_compile_s']:<8.1f}")

  main_mspec = meshes[2, 4]
  layout = mesh.layout_report(main_mspec, params, BATCH)
  used = sum(r['used_bytes'] for r in layout.values())
  total = sum(r['total_bytes'] for r in layout.values())
  print('padding (2x4): ' + ', '.join(
      f"{k} {v['padding_share']:.1%} of {v['total_bytes'] / 1024:.0f} KiB"
      for k, v in layout.items()))

  fill = fill_flush_share(spec, params, main_mspec, k3)
  print(f"fill/flush ticks on a {STREAM_FRAMES}-frame stream: carried "
        f"{fill['carried_share']:.1%}, fresh flushed clips "
        f"{fill['fresh_share']:.1%}")

  step_row = train_steps(spec, params, main_mspec, clip, labels,
                         args.repeats)
  print(f"train step (sideways, Adam, 2x4): mesh over single, state "
        f"sharded by stage {step_row['mesh_over_single']:.3f}, evenly "
        f"{step_row['mesh_even_over_single']:.3f}")
  ablation = transport_ablation(spec, params, main_mspec, clip, labels,
                                args.repeats)
  print('transport ablation (sideways 2x4, timing only): mesh over single ' +
        ', '.join(f'{k} {v:.2f}' for k, v in ablation['over_single'].items())
        + '; one ppermute ' + ', '.join(
            f'{w} floats/example {ms:.3f} ms'
            for w, ms in ablation['ppermute_ms'].items()))
  state_rows = {k: state_bytes(spec, params, 1, 4, k)
                for k in mesh.STATE_SHARDINGS}
  for k, r in state_rows.items():
    print(f"params + Adam state per device (1x4, {k}): "
          f"{r['per_device_bytes'] / 1024:.1f} KiB of "
          f"{r['whole_bytes'] / 1024:.1f} KiB "
          f"({r['share']:.1%}; groups {r['groups']})")

  homog_rows, homog = homogeneous(k4, args.repeats)
  print(f'homogeneous, {HOMOG_STAGES} stages, T={HOMOG_FRAMES}, 1x'
        f'{HOMOG_STAGES}:\n  {"program":>20} {"t/s":>7} {"compile s":>9}  '
        'HLO ops')
  for name, r in homog_rows.items():
    ops = ' '.join(f'{k}={v}' for k, v in r['hlo_ops'].items() if v)
    print(f"  {name:>20} {r['ticks_per_s']:>7.1f} {r['compile_s']:>9.1f}  "
          f'{ops}')

  headline_row = next(r for r in rows
                      if r['mode'] == 'sideways' and r['mesh'] == '2x4')
  headline = {
      'mesh_over_single_ticks_per_s': headline_row['mesh_over_single'],
      'mesh_sharded_over_single_ticks_per_s': headline_row[
          'mesh_sharded_over_single'],
      'fill_flush_tick_share': fill['carried_share'],
      'fill_flush_tick_share_fresh_clips': fill['fresh_share'],
      'padding_bytes_share': 1 - used / total,
      'max_over_mean_group_flops_2x4': next(
          r['max_over_mean'] for r in balance_rows if r['mesh'] == '2x4'),
      'mesh_train_step_over_single': step_row['mesh_over_single'],
      'mesh_train_step_even_over_single': step_row['mesh_even_over_single'],
      # Timing-only ablations (wrong results): the transport's share.
      'mesh_no_transfers_over_single': ablation['over_single'][
          'mesh_no_transfers'],
      'mesh_no_transfers_no_frames_over_single': ablation['over_single'][
          'mesh_no_transfers_no_frames'],
      # The even layout (config.mesh.state_sharding='even'): the state at
      # rest; the stage layout (the default) beside it.
      'state_bytes_per_device_share_1x4': state_rows['even']['share'],
      'state_bytes_per_device_share_1x4_stage_layout': state_rows['stage'][
          'share'],
      'largest_group_param_share_1x4': state_rows['stage'][
          'largest_group_param_share'],
      'homog_mesh_over_single_ticks_per_s': homog['skipside'],
      'peer_mesh_over_single_ticks_per_s': homog['peer'],
      'homog_over_peer_ratio': homog['skipside'] / homog['peer'],
      # The vmapped peer's grouped convolutions are slow on XLA:CPU, which
      # flatters its ratio; these two compare without that baseline.
      'homog_mesh_over_peer_mesh_ticks_per_s': homog[
          'skipside_mesh_over_peer_mesh'],
      'peer_mesh_over_single_unrolled_ticks_per_s': homog['peer_unrolled'],
  }
  for k, v in headline.items():
    print(f'{k}: {v:.4g}')
  result = {
      'config': {'net': 'default_net (32, 32, 1), 4 classes', 'batch': BATCH,
                 'frames': FRAMES, 'repeats': args.repeats,
                 'stream_frames': STREAM_FRAMES,
                 'headline_config': 'sideways on a 2x4 mesh',
                 'homogeneous': {
                     'net': f'{HOMOG_STAGES} x stages.Conv(32, 32) stride 1, '
                            'ClassifierHead(32, 10), frames (16, 16, 32)',
                     'batch': BATCH, 'frames': HOMOG_FRAMES, 'mesh': '1x8',
                     'mode': 'sideways', 'peer': 'experiments/benchmarks/'
                                                 'peer.py'},
                 'quick': args.quick},
      'device': common.device_info(),
      'stage_flops': list(costs),
      'balance': balance_rows,
      'rows': rows,
      'padding': layout,
      'fill_flush': fill,
      'train_step': step_row,
      'transport_ablation': ablation,
      'state_bytes': state_rows,
      'homogeneous': {'rows': homog_rows, 'ratios': homog},
      'headline': headline,
  }
  common.write_result(args.out, result)


if __name__ == '__main__':
  main()
