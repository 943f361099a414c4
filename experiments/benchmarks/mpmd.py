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
- per device: convolutions and HLO lines in the program it runs (one
  tick), its params' bytes (no padding) and one tick's temporary bytes; for
  SPMD the one program every device runs (the whole clip: the tick scan,
  carry set-up and metrics; convolutions sit only in the ticks) and each
  device's row of the packed (padded) params;
- ticks per second of one device, the SPMD mesh and the MPMD programs, each
  on its own layout placed before timing (the engines through
  ``window_grads``, the mesh on its stage-sharded state), timed interleaved
  (medians). The MPMD tick adds up the loss only; the engines also keep
  accuracy and per-example sums.

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
  holds 20 convolutions; the per-device programs 3-6: 3.3x fewer on the
  most loaded device. Homogeneous net on 1x8 (equal branches already merged
  by ``mesh._switch``): 8 against 2-3, 2.7x.
- Params: every SPMD device holds the widest group's row of the packed
  state (stage 4 of the default net, 321,296 bytes), so the devices hold
  2.55x the bytes the per-device programs hold together; the most loaded
  device holds the same in both (1.0). Homogeneous: 1.03x.
- Speed: default net 1x4, MPMD 1.04-1.10x the SPMD mesh's ticks/s (0.87-0.88x
  one device; SPMD 0.81-0.84x). Homogeneous 1x8: MPMD 0.87x the SPMD mesh
  (1.10-1.14x one device; SPMD 1.27-1.31x): 8 dispatches and up to 14
  transfers per tick from one Python thread cost more than the SPMD
  program's switch and packing when the stages are equal. Where the
  default net's difference comes from (padding, the switch, per-tick
  packing, dispatch) is not separated here.
- What MPMD costs, and why the mesh engine stays one SPMD program: a clip
  is a host loop of per-tick programs, not one jitted program, so the
  training step, ``tpu_plan``'s lowering and the ahead-of-time tables would
  see no whole step; every tick pays a dispatch per device; across hosts
  ``jax.device_put`` does not move arrays between processes (a multi-host
  MPMD runtime needs its own send/recv, e.g. JaxPP); the exact modes need
  each device to keep its residuals across the host loop. Only Sideways is
  written per device here.
"""

from experiments.benchmarks import host_devices

host_devices.simulate(8)  # Before jax is imported.

import argparse  # noqa: E402
import os  # noqa: E402
import dataclasses  # noqa: E402
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

  ``groups[g]``: device ``g``'s consecutive stages; ``device_of[l]``:
  stage ``l``'s device; ``reads[g]``: the stages on other devices whose
  outputs device ``g`` reads (last tick's); ``hears[g]``: ``(device,
  stage)`` pairs: a message for ``stage`` (on ``g``) that ``device``
  (above) sends.
  """
  groups: tuple
  device_of: tuple
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
    return cls(tuple(map(tuple, groups)),
               tuple(device_of[l] for l in range(spec.num_stages)),
               tuple(reads), tuple(hears))


def device_tick(spec, layout: Layout, g: int):
  """Device ``g``'s jitted Sideways tick over its own stages only.

  ``(params, outs, remote, local, heard, states, x, target, w, grads,
  loss) -> (outs, local, sends, states, grads, loss)``: ``params`` its
  stages' (``{'blocks': {l: ...}}``, and ``'head'`` if it holds the top
  stage), ``outs`` its stages' last outputs, ``remote`` the outputs it
  reads from other devices, ``local`` the messages its stages sent each
  other last tick, ``heard`` those that came from above, ``sends`` stage ->
  the message for a stage on a device below; ``x`` (bottom device) and
  ``target``, ``w`` (top device) are ``None`` where unused.
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
    pgrads = {'blocks': pgrads}
    if head is not None:
      pgrads['head'], losses, _ = head
      loss = loss + w * losses.mean()
    grads = jax.tree.map(jnp.add, grads, pgrads)
    local = {l: sent.get(l, jnp.zeros_like(ys[l])) for l in grp}
    sends = {k: v for k, v in sent.items() if k not in grp}
    return ys, local, sends, states, grads, loss
  return jax.jit(tick, donate_argnums=(9,))


class PerDevice:
  """A fresh clip of Sideways ticks with clip labels (no target FIFO, no
  per-frame targets), one program per device, driven by the host.

  Example::

      run = PerDevice(spec, params, groups, jax.devices()[:4])
      states = spec.init_states(params, clip.shape[0], jnp.float32)
      loss, grads = run.run(run.args(clip, labels, states))
      grads = run.grads_tree(grads)   # like params
  """

  def __init__(self, spec, params, groups, devices):
    self.spec, self.layout = spec, Layout.of(spec, groups)
    self.devices = devices
    self.top = len(groups) - 1  # The device of the top stage and the head.
    self.params = []
    for g, grp in enumerate(self.layout.groups):
      p = {'blocks': {l: params['blocks'][l] for l in grp}}
      if g == self.top:
        p['head'] = params['head']
      self.params.append(jax.device_put(p, devices[g]))
    self.ticks = [device_tick(spec, self.layout, g)
                  for g in range(len(groups))]

  def _fresh(self, b: int):
    """Per device: zero outputs, messages, gradients and loss."""
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
    """Everything one clip needs, placed: frames on the bottom device,
    labels and per-tick loss weights on the top one, each device's states."""
    spec, t_len = self.spec, clip.shape[1]
    carry = engine.init_carry(spec, _tree(self.params), clip, labels,
                              'sideways')
    weights, _ = engine.tick_weights(carry, 0, t_len, t_len,
                                     engine.delay(spec, 'sideways'), True)
    top = self.devices[self.top]
    return dict(
        frames=[jax.device_put(clip[:, t], self.devices[0])
                for t in range(t_len)],
        labels=jax.device_put(labels, top),
        weights=[jax.device_put(w, top) for w in weights],
        states=[jax.device_put({l: states[l] for l in grp}, self.devices[g])
                for g, grp in enumerate(self.layout.groups)])

  def _operands(self, g: int, d: dict, states, args, t: int) -> tuple:
    """Device ``g``'s tick ``t`` operands (``device_tick``)."""
    top = g == self.top
    return (self.params[g], d['outs'], d['remote'], d['local'], d['heard'],
            states, args['frames'][t] if g == 0 else None,
            args['labels'] if top else None,
            args['weights'][t] if top else None, d['grads'], d['loss'])

  def run(self, args):
    """``(loss, grads per device)`` of one fresh clip (asynchronous)."""
    lay, devs = self.layout, self.devices
    dev = self._fresh(args['frames'][0].shape[0])
    states = list(args['states'])
    for t in range(len(args['frames'])):
      results = [self.ticks[g](*self._operands(g, dev[g], states[g], args, t))
                 for g in range(len(lay.groups))]
      for g, (ys, local, _, st, grads, loss) in enumerate(results):
        dev[g].update(outs=ys, local=local, grads=grads, loss=loss)
        states[g] = st
      for g in range(len(lay.groups)):  # Route this tick's values.
        dev[g]['remote'] = {
            k: jax.device_put(results[lay.device_of[k]][0][k], devs[g])
            for k in lay.reads[g]}
        dev[g]['heard'] = {(h, k): jax.device_put(results[h][2][k], devs[g])
                           for h, k in lay.hears[g]}
    return dev[self.top]['loss'], [d['grads'] for d in dev]

  def grads_tree(self, grads):
    """Per-device gradients as one params-shaped pytree (on the host)."""
    return _tree(jax.device_get(grads))

  def programs(self, args):
    """Each device's compiled tick (lowered with its real operands)."""
    dev = self._fresh(args['frames'][0].shape[0])
    return [self.ticks[g].lower(
        *self._operands(g, dev[g], args['states'][g], args, 0)).compile()
            for g in range(len(self.layout.groups))]


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
  """Max relative difference, over gradient leaves and the loss, of the
  per-device programs against ``engine.loss_and_grads`` (sideways); NaN if
  any is NaN."""
  run = PerDevice(spec, params, groups, jax.devices()[:len(groups)])
  states = spec.init_states(params, clip.shape[0], jnp.float32)
  loss, grads = run.run(run.args(clip, labels, states))
  want_loss, want, _ = engine.loss_and_grads(spec, params, clip, labels,
                                             mode='sideways')
  errors = jax.tree.leaves(jax.tree.map(_rel, run.grads_tree(grads), want))
  return float(np.max(errors + [_rel(loss, want_loss)]))  # (NaN wins.)


def _lines(compiled) -> int:
  return compiled.as_text().count('\n')


def compare(name, spec, params, groups, clip, labels, repeats) -> dict:
  """Gradients, code, bytes and ticks/s: one device, SPMD, MPMD.

  Each runs on its own layout, placed before timing: the single-device and
  mesh engines through ``window_grads`` (the mesh on its stage-sharded
  state and a batch from ``put_batch``), the per-device programs on their
  own params, frames and labels.
  """
  devices = jax.devices()[:len(groups)]
  run = PerDevice(spec, params, groups, devices)
  args = run.args(clip, labels,
                  spec.init_states(params, clip.shape[0], jnp.float32))
  mspec = mesh.place(spec, mesh.make_mesh(1, len(groups), devices=devices),
                     groups=groups, params=params)
  engines = {'single': engine.LocalEngine(spec), 'spmd': mesh.MeshEngine(mspec)}
  operands = {k: (e.to_state(params), *e.put_batch((clip, labels),
                                                   clip.shape[0]))
              for k, e in engines.items()}
  compiled = {k: mesh_bench._compile(mesh_bench.window_grads, e,
                                    *operands[k])
              for k, e in engines.items()}
  start = time.perf_counter()
  per_device = run.programs(args)
  mpmd_compile = time.perf_counter() - start

  rows = [{'device': g, 'stages': list(groups[g]),
           'convolutions': mesh_bench.hlo_counts(c)['convolution'],
           'tick_hlo_lines': _lines(c),
           'param_bytes': sum(x.nbytes
                              for x in jax.tree.leaves(run.params[g])),
           'tick_temp_bytes': c.memory_analysis().temp_size_in_bytes}
          for g, c in enumerate(per_device)]
  spmd, spmd_compile = compiled['spmd']
  spmd_row = {
      'convolutions': mesh_bench.hlo_counts(spmd)['convolution'],
      'clip_hlo_lines': _lines(spmd),
      'param_bytes': operands['spmd'][0].addressable_shards[0].data.nbytes,
      'compile_s': spmd_compile}

  t = mesh_bench._medians({
      'single': (compiled['single'][0], operands['single']),
      'spmd': (spmd, operands['spmd']),
      'mpmd': (lambda: run.run(args), ())}, repeats)
  tps = {k: clip.shape[1] / v for k, v in t.items()}
  heaviest = max(r['param_bytes'] for r in rows)
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
          spmd_row['param_bytes'] / heaviest,
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
