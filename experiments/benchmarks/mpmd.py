r"""Per-device programs (MPMD) against the one SPMD mesh program, measured.

  python -m experiments.benchmarks.mpmd [--out PATH] [--repeats 15] [--quick]

The mesh engine (``skipside.mesh``) runs one SPMD program on every device: a
``lax.switch`` over the device groups picks each device's stages, so every
device compiles and carries the code of every distinct group, and the
packed train state pads every device to the widest (issue 18). The
alternative measured here gives each device a program of its own stages
only: one jitted Sideways tick per device group (``tick.sideways_group``,
the same tick math the engines run), driven tick by tick from the host,
each device's outputs and messages moved to the devices that read them with
``jax.device_put`` (asynchronous; nothing blocks until the clip ends).

For the default net (5 stages, 32x32x1 frames, Skip-Sideways edges) on
1x4 and the homogeneous 8-stage conv net of ``peer.py`` on 1x8, batch 8,
sideways, a fresh clip with clip labels:

- the gradients of the per-device programs against
  ``engine.loss_and_grads`` (max relative difference: they compute the same
  thing);
- per device: convolutions and HLO lines in the program it runs, its
  params' bytes (no padding) and one tick's temporary bytes; for SPMD the
  one program every device runs and each device's row of the packed
  (padded) params;
- ticks per second of one device, the SPMD mesh and the MPMD programs,
  timed interleaved (medians).

Headline: ``mpmd_over_spmd_ticks_per_s_<net>``,
``spmd_over_mpmd_convs_per_device_<net>`` (code: the convolutions the most
loaded device's program holds, SPMD over MPMD),
``spmd_over_mpmd_param_bytes_per_device_<net>`` (the most loaded device)
and ``spmd_over_mpmd_param_bytes_all_devices_<net>`` (padding), also
``spmd_over_single_ticks_per_s_<net>`` / ``mpmd_over_single_...``.

Measured (2026-12-06, 2-core CPU, 8 simulated devices, two runs of 15
repeats each, ``experiments/results/mpmd.json`` the second):

- Same numbers: the per-device programs' gradients and loss equal
  ``engine.loss_and_grads``'s bit for bit on both nets (max relative
  difference 0.0).
- Code per device: default net on 1x4, the SPMD program every device runs
  holds 20 convolutions (3,472 HLO lines); the per-device programs 3-6
  (302-807 lines): 3.3x fewer on the most loaded device. Homogeneous net on
  1x8 (equal branches already merged by ``mesh._switch``): 8 against 2-3
  (2,111 against 186-503 lines), 2.7x.
- Params: every SPMD device holds the widest group's row of the packed
  state (stage 4 of the default net, 321,296 bytes), so the devices hold
  2.55x the bytes the per-device programs hold together; the most loaded
  device holds the same in both (1.0). Homogeneous: 1.03x.
- Speed: default net 1x4, MPMD runs 1.14-1.19x the SPMD mesh's ticks/s
  (0.84-0.86x one device; SPMD 0.73-0.74x): no padded packing per tick, no
  switch. Homogeneous 1x8: 0.92x the SPMD mesh (1.11x one device; SPMD
  1.20-1.25x): 8 dispatches and up to 14 transfers per tick from one Python
  thread cost more than the SPMD program's overhead when stages are equal.
- What MPMD costs, and why the mesh engine stays one SPMD program: a clip
  is a host loop of per-tick programs, not one jitted program, so the
  training step, ``tpu_plan``'s lowering and the ahead-of-time tables would
  see no whole step; every tick pays a dispatch per device; across hosts
  ``jax.device_put`` does not move arrays between processes (a multi-host
  MPMD runtime needs its own send/recv, e.g. JaxPP); the exact modes need
  each device to keep its residuals across the host loop. Only Sideways is
  written per device here.
"""

import os

_FLAG = '--xla_force_host_platform_device_count=8'
if _FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' +
                             _FLAG).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from experiments.benchmarks import common  # noqa: E402
from experiments.benchmarks import mesh as mesh_bench  # noqa: E402
from experiments.benchmarks import peer  # noqa: E402
from skipside import engine, mesh, models, network  # noqa: E402
from skipside import tick as tick_lib  # noqa: E402

BATCH, FRAMES = 8, 16


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which device runs which stages and what moves between them.

  ``groups[g]``: device ``g``'s consecutive stages; ``reads[g]``: the
  stages on other devices whose outputs device ``g`` reads (last tick's);
  ``hears[g]``: ``(device, stage)`` pairs: a message for ``stage`` (on
  ``g``) that ``device`` (above) sends.
  """
  groups: tuple
  reads: tuple
  hears: tuple

  @classmethod
  def of(cls, spec: network.NetworkSpec, groups) -> 'Layout':
    device_of = {l: g for g, grp in enumerate(groups) for l in grp}
    reads, hears = [], []
    for g, grp in enumerate(groups):
      reads.append(tuple(sorted({k for l in grp if l for k in spec.in_edges[l]
                                 if device_of[k] != g})))
      hears.append(tuple(sorted({
          (device_of[l], k) for l in range(1, spec.num_stages)
          for k in spec.in_edges[l] if device_of[k] == g != device_of[l]})))
    return cls(tuple(map(tuple, groups)), tuple(reads), tuple(hears))


def device_tick(spec, layout: Layout, g: int):
  """Device ``g``'s jitted Sideways tick over its own stages only.

  ``(params, outs, remote, local, heard, states, x, target, w, grads,
  loss) -> (outs, local, sends, states, grads, loss)``: ``params`` its
  stages' (and the head's if it holds the top stage), ``outs`` its stages'
  last outputs, ``remote`` the outputs it reads from other devices,
  ``local`` the messages its stages sent each other last tick, ``heard``
  those that came from above, ``sends`` stage -> the message for a stage on
  a device below.
  """
  grp = layout.groups[g]

  def tick(params, outs, remote, local, heard, states, x, target, w, grads,
           loss):
    def msg_of(l):
      return local[l] + sum((m for (_, k), m in heard.items() if k == l),
                            jnp.zeros_like(local[l]))
    ys, states, pgrads, sent, head = tick_lib.sideways_group(
        spec, grp, lambda l: params['blocks'][l],
        lambda k: outs[k] if k in outs else remote[k], lambda l: states[l],
        msg_of, x, params.get('head'), target, w)
    if head is not None:
      pgrads['head'], losses, _ = head
      loss = loss + w * losses.mean()
    head_grads = pgrads.pop('head', None)
    pgrads = {'blocks': pgrads}
    if head_grads is not None:
      pgrads['head'] = head_grads
    grads = jax.tree.map(jnp.add, grads, pgrads)
    local = {l: sent.get(l, jnp.zeros_like(ys[l])) for l in grp}
    sends = {k: v for k, v in sent.items() if k not in grp}
    return ys, local, sends, states, grads, loss
  return jax.jit(tick, donate_argnums=(9,))


class PerDevice:
  """A clip of Sideways ticks, one program per device, driven by the host.

  Example::

      run = PerDevice(spec, params, groups, jax.devices()[:4])
      loss, grads = run(clip, labels)   # grads like params
  """

  def __init__(self, spec, params, groups, devices):
    self.spec, self.layout = spec, Layout.of(spec, groups)
    self.devices = devices
    top = spec.num_stages - 1
    self.params = []
    for g, grp in enumerate(self.layout.groups):
      p = {'blocks': {l: params['blocks'][l] for l in grp}}
      if top in grp:
        p['head'] = params['head']
      self.params.append(jax.device_put(p, devices[g]))
    self.ticks = [device_tick(spec, self.layout, g)
                  for g in range(len(groups))]

  def _fresh(self, b: int):
    """Per device: zero outputs, messages, states, gradients and loss."""
    spec, out = self.spec, []
    for g, grp in enumerate(self.layout.groups):
      zeros = {l: jnp.zeros((b, *spec.out_shapes[l])) for l in grp}
      remote = {k: jnp.zeros((b, *spec.out_shapes[k]))
                for k in self.layout.reads[g]}
      heard = {(h, k): jnp.zeros((b, *spec.out_shapes[k]))
               for h, k in self.layout.hears[g]}
      out.append(jax.device_put(dict(
          outs=zeros, remote=remote, local=zeros, heard=heard,
          grads=jax.tree.map(jnp.zeros_like, self.params[g]),
          loss=jnp.zeros(())), self.devices[g]))
    return out

  def args(self, clip, labels, states):
    """Everything one clip needs, placed: frames on device 0, labels on the
    top stage's device, per-tick weights on every device."""
    spec, t_len = self.spec, clip.shape[1]
    carry = engine.init_carry(spec, _tree(self.params), clip, labels,
                              'sideways')
    weights, _ = engine.tick_weights(carry, 0, t_len, t_len,
                                     engine.delay(spec, 'sideways'), True)
    last = len(self.layout.groups) - 1
    frames = [jax.device_put(clip[:, t], self.devices[0])
              for t in range(t_len)]
    return dict(
        frames=frames,
        labels=jax.device_put(labels, self.devices[last]),
        weights=[[jax.device_put(w, d) for w in weights]
                 for d in self.devices[:len(self.layout.groups)]],
        states=[jax.device_put({l: states[l] for l in grp}, self.devices[g])
                for g, grp in enumerate(self.layout.groups)])

  def run(self, args):
    """``(loss, grads per device)`` of one fresh clip (asynchronous)."""
    lay, devs = self.layout, self.devices
    last = len(lay.groups) - 1
    b = args['frames'][0].shape[0]
    dev = self._fresh(b)
    states = list(args['states'])
    for t, x in enumerate(args['frames']):
      results = []
      for g in range(len(lay.groups)):
        d = dev[g]
        results.append(self.ticks[g](
            self.params[g], d['outs'], d['remote'], d['local'], d['heard'],
            states[g], x if g == 0 else None,
            args['labels'] if g == last else None, args['weights'][g][t],
            d['grads'], d['loss']))
      for g, (ys, local, _, st, grads, loss) in enumerate(results):
        dev[g].update(outs=ys, local=local, grads=grads, loss=loss)
        states[g] = st
      for g in range(len(lay.groups)):  # Route last tick's values.
        dev[g]['remote'] = {
            k: jax.device_put(results[_device(lay, k)][0][k], devs[g])
            for k in lay.reads[g]}
        dev[g]['heard'] = {(h, k): jax.device_put(results[h][2][k], devs[g])
                           for h, k in lay.hears[g]}
    return dev[last]['loss'], [d['grads'] for d in dev]

  def grads_tree(self, grads):
    """Per-device gradients as one params-shaped pytree (on the host)."""
    return _tree(jax.device_get(grads))

  def programs(self, args):
    """Each device's compiled tick (lowered with its real arguments)."""
    lay = self.layout
    last = len(lay.groups) - 1
    dev = self._fresh(args['frames'][0].shape[0])
    return [self.ticks[g].lower(
        self.params[g], dev[g]['outs'], dev[g]['remote'], dev[g]['local'],
        dev[g]['heard'], args['states'][g],
        args['frames'][0] if g == 0 else None,
        args['labels'] if g == last else None, args['weights'][g][0],
        dev[g]['grads'], dev[g]['loss']).compile()
            for g in range(len(lay.groups))]


def _device(layout: Layout, stage: int) -> int:
  return next(g for g, grp in enumerate(layout.groups) if stage in grp)


def _tree(per_device_params):
  """A params-like pytree with every stage (for shape-only engine calls)."""
  blocks, head = {}, None
  for p in per_device_params:
    blocks.update(p['blocks'])
    head = p.get('head', head)
  return {'blocks': [blocks[l] for l in range(len(blocks))], 'head': head}


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def check(spec, params, groups, clip, labels) -> float:
  """Max relative difference, over gradient leaves, of the per-device
  programs against ``engine.loss_and_grads`` (sideways)."""
  run = PerDevice(spec, params, groups, jax.devices()[:len(groups)])
  states = spec.init_states(params, clip.shape[0], jnp.float32)
  loss, grads = run.run(run.args(clip, labels, states))
  want_loss, want, _ = engine.loss_and_grads(spec, params, clip, labels,
                                             mode='sideways')
  errors = jax.tree.leaves(jax.tree.map(_rel, run.grads_tree(grads), want))
  return max(errors + [_rel(loss, want_loss)])


def _lines(compiled) -> int:
  return compiled.as_text().count('\n')


def compare(name, spec, params, groups, clip, labels, repeats) -> dict:
  """Gradients, code, bytes and ticks/s: one device, SPMD, MPMD."""
  devices = jax.devices()[:len(groups)]
  run = PerDevice(spec, params, groups, devices)
  states = spec.init_states(params, clip.shape[0], jnp.float32)
  args = run.args(clip, labels, states)
  m = mesh.make_mesh(1, len(groups), devices=devices)
  mspec = mesh.place(spec, m, groups=groups, params=params)
  pstack = mesh.shard_tree(mspec, params)

  spmd, spmd_compile = mesh_bench._compile(mesh.loss_and_grads, mspec,
                                           params, clip, labels,
                                           mode='sideways')
  single, _ = mesh_bench._compile(engine.loss_and_grads, spec, params, clip,
                                  labels, mode='sideways')
  start = time.perf_counter()
  per_device = run.programs(args)
  mpmd_compile = time.perf_counter() - start

  spmd_ops = mesh_bench.hlo_counts(spmd)
  rows = []
  for g, c in enumerate(per_device):
    rows.append({
        'device': g, 'stages': list(groups[g]),
        'convolutions': mesh_bench.hlo_counts(c)['convolution'],
        'hlo_lines': _lines(c),
        'param_bytes': sum(x.nbytes for x in jax.tree.leaves(run.params[g])),
        'tick_temp_bytes': c.memory_analysis().temp_size_in_bytes})
  spmd_row = {
      'convolutions': spmd_ops['convolution'], 'hlo_lines': _lines(spmd),
      'param_bytes': pstack.addressable_shards[0].data.nbytes,
      'compile_s': spmd_compile}

  def mpmd_step():
    return run.run(args)

  def timed(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start
  progs = {'single': lambda: single(params, clip, labels),
           'spmd': lambda: spmd(params, clip, labels),
           'mpmd': mpmd_step}
  for fn in progs.values():
    timed(fn)
  times = {k: [] for k in progs}
  for _ in range(repeats):
    for k, fn in progs.items():
      times[k].append(timed(fn))
  t = {k: statistics.median(v) for k, v in times.items()}
  ticks = clip.shape[1]
  tps = {k: ticks / v for k, v in t.items()}
  heaviest = max(rows, key=lambda r: r['param_bytes'])
  return {
      'net': name, 'mesh': f'1x{len(groups)}',
      'groups': [list(g) for g in groups],
      'grad_max_rel_diff_vs_engine': check(spec, params, groups, clip,
                                           labels),
      'spmd': spmd_row, 'mpmd_per_device': rows,
      'mpmd_compile_s_all_devices': mpmd_compile,
      'ticks_per_s': tps,
      'mpmd_over_spmd_ticks_per_s': tps['mpmd'] / tps['spmd'],
      'spmd_over_single_ticks_per_s': tps['spmd'] / tps['single'],
      'mpmd_over_single_ticks_per_s': tps['mpmd'] / tps['single'],
      'spmd_over_mpmd_convs_per_device':
          spmd_row['convolutions'] / max(r['convolutions'] for r in rows),
      'spmd_over_mpmd_param_bytes_per_device':
          spmd_row['param_bytes'] / heaviest['param_bytes'],
      'spmd_over_mpmd_param_bytes_all_devices':
          len(groups) * spmd_row['param_bytes'] /
          sum(r['param_bytes'] for r in rows),
  }


def nets(key):
  """``name -> (spec, params, groups, clip, labels)``."""
  out = {}
  spec, params = network.split(models.default_net(
      (32, 32, 1), num_classes=4, rngs=nnx.Rngs(0)))
  k1, k2, k3, k4 = jax.random.split(key, 4)
  groups = mesh.place(spec, mesh.make_mesh(1, 4, devices=jax.devices()[:4]),
                      params=params).groups
  out['default_1x4'] = (
      spec, params, groups,
      jax.random.normal(k1, (BATCH, FRAMES, *spec.frame_shape)),
      jax.random.randint(k2, (BATCH,), 0, 4))
  spec, params = peer.build(num_stages=8)
  out['homogeneous_1x8'] = (
      spec, params, tuple((i,) for i in range(8)),
      jax.random.normal(k3, (BATCH, 2 * FRAMES, *spec.frame_shape)),
      jax.random.randint(k4, (BATCH,), 0, spec.prediction_shape[0]))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(__file__), '..', 'results', 'mpmd.json'))
  parser.add_argument('--repeats', type=int, default=None)
  parser.add_argument('--quick', action='store_true')
  args = parser.parse_args()
  repeats = args.repeats or (2 if args.quick else 15)
  rows, headline = [], {}
  for name, (spec, params, groups, clip, labels) in nets(
      jax.random.key(0)).items():
    row = compare(name, spec, params, groups, clip, labels, repeats)
    rows.append(row)
    for k in ('mpmd_over_spmd_ticks_per_s', 'spmd_over_single_ticks_per_s',
              'mpmd_over_single_ticks_per_s',
              'spmd_over_mpmd_convs_per_device',
              'spmd_over_mpmd_param_bytes_per_device',
              'spmd_over_mpmd_param_bytes_all_devices',
              'grad_max_rel_diff_vs_engine'):
      headline[f'{k}_{name}'] = row[k]
    print(name, {k: v for k, v in row.items()
                 if k not in ('mpmd_per_device', 'spmd')})
    print('  spmd', row['spmd'])
    for r in row['mpmd_per_device']:
      print('  mpmd', r)
  print('headline:', headline)
  common.write_result(args.out, dict(
      config=dict(batch=BATCH, frames=FRAMES, repeats=repeats,
                  mode='sideways', quick=args.quick),
      device=common.device_info(), rows=rows, headline=headline))


if __name__ == '__main__':
  main()
