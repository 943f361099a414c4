r"""A homogeneous shard_map Sideways pipeline in plain JAX: the peer.

  python -m experiments.benchmarks.peer --check

The pattern public pipelines use (praxis, MaxText, the JAX shard_map docs)
for identical stages, with the Sideways rule of DESIGN.md §1: the stages'
weights stacked ``[L, ...]`` and sharded over the ``stage`` mesh axis; inside
``jax.shard_map`` every device applies the same stage function to its slice
(no ``lax.switch``, no packing), one ``lax.scan`` over the ticks. Per tick:

- ``ppermute`` shifts last tick's outputs up one device (stage 0 reads the
  frame instead);
- every stage takes one VJP at its current input, its cotangent the message
  it received last tick (the top stage: the head loss gradient of this tick);
- parameter gradients accumulate in the carry, input gradients ``ppermute``
  one device down.

``single`` is the same math on one device: ``jax.vmap`` over the stacked
weights, all stages at once per tick, activations shifted by concatenation.

Network (``skipside``'s ``stages.Conv`` / ``ClassifierHead`` math): ``L``
stages ``relu(conv3x3(x, w) + b)``, ``C -> C``, stride 1, 'SAME', with
``skipside.conv.conv_general_dilated``; head: mean pool, dense, softmax
cross-entropy with a clip label. Fill as skipside's default: the first
``L-1`` ticks are masked, each valid tick weighs ``1 / num_valid``.

Params: ``stack = {'w': (L, 3, 3, C, C), 'b': (L, C)}``, ``head = {'w': (C,
K), 'b': (K,)}``; ``from_skipside`` converts a ``network.split`` params
pytree of such a net. ``--check`` asserts that the peer's gradients on the
mesh and on one device agree, and that both agree with
``skipside.engine.loss_and_grads(..., mode='sideways')`` per stage.
"""

from experiments.benchmarks import host_devices

if __name__ == '__main__':  # 8 CPU devices for --check, before jax loads.
  host_devices.simulate(8)

import argparse  # noqa: E402
import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from skipside import conv, engine, network, stages  # noqa: E402
from skipside import mesh as mesh_lib  # noqa: E402

# (B, H, W, C) inputs, (3, 3, I, O) kernels: the layout of nnx.Conv.
_DN = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def stage(p, x):
  """One stage: ``relu(conv3x3(x) + b)``, ``(B, H, W, C) -> (B, H, W, C)``."""
  y = conv.conv_general_dilated(x, p['w'], (1, 1), 'SAME',
                                dimension_numbers=_DN)
  return jax.nn.relu(y + p['b'])


def head_loss(head, y, labels, weight):
  """``weight *`` mean xent of the head on ``y (B, H, W, C)``; aux: the loss."""
  pooled = y.reshape(y.shape[0], -1, y.shape[-1]).mean(axis=1)
  logits = pooled @ head['w'] + head['b']
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return weight * loss, loss


def tick_weights(num_ticks: int, num_stages: int) -> jax.Array:
  """``(T,)``: 0 for the ``L-1`` fill ticks, ``1 / num_valid`` after."""
  valid = jnp.arange(num_ticks) >= num_stages - 1
  return valid / max(num_ticks - num_stages + 1, 1)


def _frame(clip, t):
  """Frame ``t`` of ``clip (B, T, ...)``, read in place (no time-major copy)."""
  return lax.dynamic_index_in_dim(clip, t, axis=1, keepdims=False)


def _device_clip(stack, head, clip, labels, weights, *, num_stages: int):
  """One device's clip (the body of ``shard_map``): its stage, every tick."""
  s, top = lax.axis_index('stage'), num_stages - 1
  num_data = lax.axis_size('data')
  # Varying over both axes once, here: otherwise the transpose of the
  # implicit cast would psum the parameter gradients in every tick.
  p = lax.pcast(jax.tree.map(lambda a: a[0], stack), ('data',), to='varying')
  head = lax.pcast(head, ('data', 'stage'), to='varying')
  zeros = lax.pcast(jnp.zeros_like(_frame(clip, 0)), ('stage',), to='varying')
  up = [(i, i + 1) for i in range(num_stages - 1)]
  down = [(i + 1, i) for i in range(num_stages - 1)]

  def body(c, t):
    out, msg, gp, gh, total = c
    recv = lax.ppermute(out, 'stage', up)  # Stage s-1's output of tick t-1.
    x = jnp.where(s == 0, _frame(clip, t), recv)
    y, vjp = jax.vjp(stage, p, x)
    # Only the top stage's head counts; / num_data: the global batch mean.
    w = jnp.where(s == top, weights[t], 0.0) / num_data
    (_, loss), (dh, dy) = jax.value_and_grad(
        head_loss, argnums=(0, 1), has_aux=True)(head, y, labels, w)
    dp, dx = vjp(msg + dy)  # msg is 0 on the top stage, dy 0 below it.
    msg = lax.ppermute(dx, 'stage', down)
    add = functools.partial(jax.tree.map, jnp.add)
    return (y, msg, add(gp, dp), add(gh, dh), total + w * loss), None

  total = lax.pcast(jnp.zeros(()), ('data', 'stage'), to='varying')
  init = (zeros, zeros, jax.tree.map(jnp.zeros_like, p),
          jax.tree.map(jnp.zeros_like, head), total)
  (_, _, gp, gh, total), _ = lax.scan(body, init, jnp.arange(clip.shape[1]))
  gp = jax.tree.map(lambda a: lax.psum(a, 'data')[None], gp)
  return (lax.psum(total, ('data', 'stage')), gp,
          lax.psum(gh, ('data', 'stage')))


@functools.partial(jax.jit, static_argnames='mesh')
def on_mesh(mesh, stack, head, clip, labels):
  """The peer on a ``('data', 'stage')`` mesh, one stage per ``stage`` device.

  Args:
    mesh: from ``skipside.mesh.make_mesh``; ``stage`` size ``L``.
    stack: ``{'w': (L, 3, 3, C, C), 'b': (L, C)}``; ``head``: ``{'w': (C,
      K), 'b': (K,)}``.
    clip: ``(B, T, H, W, C)``; ``labels``: ``(B,)`` int.

  Returns:
    ``(loss, {'stack': grads like stack, 'head': grads like head})``.
  """
  num_stages = stack['w'].shape[0]
  weights = tick_weights(clip.shape[1], num_stages)
  fn = jax.shard_map(
      functools.partial(_device_clip, num_stages=num_stages), mesh=mesh,
      in_specs=(P('stage'), P(), P('data'), P('data'), P()),
      out_specs=(P(), P('stage'), P()))
  loss, gstack, ghead = fn(stack, head, clip, labels, weights)
  return loss, {'stack': gstack, 'head': ghead}


def _all_stages(stack, ins, unroll: bool):
  """Every stage on its own input, ``ins (L, B, H, W, C)``: ``vmap`` (one
  grouped convolution per conv) or, with ``unroll``, one stage at a time."""
  if not unroll:
    return jax.vmap(stage)(stack, ins)
  return jnp.stack([stage(jax.tree.map(lambda a: a[l], stack), ins[l])
                    for l in range(ins.shape[0])])


@functools.partial(jax.jit, static_argnames='unroll')
def single(stack, head, clip, labels, unroll: bool = False):
  """The same peer on one device: ``vmap`` over the stacked stages.

  ``unroll=True`` applies the stages one by one instead (as skipside's
  engine does): ``vmap`` turns a batched kernel into a grouped convolution,
  which XLA:CPU runs several times slower than ``L`` plain ones.
  """
  num_stages = stack['w'].shape[0]
  weights = tick_weights(clip.shape[1], num_stages)
  apply_all = functools.partial(_all_stages, unroll=unroll)
  zeros = jnp.zeros((num_stages, *_frame(clip, 0).shape), clip.dtype)

  def body(c, t):
    outs, msgs, gp, gh, total = c  # outs, msgs: (L, B, H, W, C)
    # Stage l reads stage l-1's output of the last tick; stage 0 the frame.
    ins = jnp.concatenate([_frame(clip, t)[None], outs[:-1]])
    ys, vjp = jax.vjp(apply_all, stack, ins)
    (_, loss), (dh, dy) = jax.value_and_grad(
        head_loss, argnums=(0, 1), has_aux=True)(head, ys[-1], labels,
                                                 weights[t])
    dp, dx = vjp(jnp.concatenate([msgs[:-1], dy[None]]))
    msgs = jnp.concatenate([dx[1:], jnp.zeros_like(dx[:1])])  # One down.
    add = functools.partial(jax.tree.map, jnp.add)
    return (ys, msgs, add(gp, dp), add(gh, dh),
            total + weights[t] * loss), None

  init = (zeros, zeros, jax.tree.map(jnp.zeros_like, stack),
          jax.tree.map(jnp.zeros_like, head), jnp.zeros(()))
  (_, _, gp, gh, total), _ = lax.scan(body, init, jnp.arange(clip.shape[1]))
  return total, {'stack': gp, 'head': gh}


def from_skipside(params):
  """A ``network.split`` params pytree of ``stages.Conv`` stages and a
  ``ClassifierHead`` -> ``(stack, head)`` in the peer's layout."""
  convs = [p['stage']['conv'] for p in params['blocks']]
  stack = {'w': jnp.stack([c['kernel'] for c in convs]),
           'b': jnp.stack([c['bias'] for c in convs])}
  fc = params['head']['fc']
  return stack, {'w': fc['kernel'], 'b': fc['bias']}


def build(num_stages=8, features=32, side=16, num_classes=10, seed=0):
  """The skipside net the peer mirrors: ``(spec, params)`` of
  ``network.split``, ``num_stages`` stride-1 ``stages.Conv``, no skips."""
  rngs = nnx.Rngs(seed)
  net = network.Network(
      [stages.Conv(features, features, rngs=rngs) for _ in range(num_stages)],
      stages.ClassifierHead(features, num_classes, rngs=rngs),
      frame_shape=(side, side, features), rngs=rngs)
  return network.split(net)


def _rel(a, b) -> float:
  """Max abs error over the max magnitude, of two pytrees."""
  err = max(float(jnp.abs(x - y).max()) for x, y in zip(
      jax.tree.leaves(a), jax.tree.leaves(b)))
  return err / max(float(jnp.abs(y).max()) for y in jax.tree.leaves(b))


def check(batch=8, frames=32, tol=1e-5) -> dict:
  """Peer on the mesh vs on one device vs ``engine.loss_and_grads``.

  Compared: the loss and every gradient (per stage kernel and bias, head),
  the same weights (``from_skipside``) and clip, on the benchmark's 1x8 mesh
  (8 stages) and on a 2x4 mesh (4 stages, the batch split over 'data').
  Errors: max abs difference over the reference's max magnitude, per pytree.
  """
  errors = {}
  for data, num_stages in ((1, 8), (2, 4)):
    spec, params = build(num_stages)
    stack, head = from_skipside(params)
    k1, k2 = jax.random.split(jax.random.key(0))
    clip = jax.random.normal(k1, (batch, frames, *spec.frame_shape))
    labels = jax.random.randint(k2, (batch,), 0, spec.prediction_shape[0])
    loss_m, g_m = on_mesh(mesh_lib.make_mesh(data, num_stages), stack, head,
                          clip, labels)
    loss_s, g_s = single(stack, head, clip, labels)
    _, g_u = single(stack, head, clip, labels, unroll=True)
    loss_e, g_e, _ = engine.loss_and_grads(spec, params, clip, labels,
                                           mode='sideways')
    g_e = dict(zip(('stack', 'head'), from_skipside(g_e)))
    err = {
        'mesh_vs_single_grads': _rel(g_m, g_s),
        'mesh_vs_single_loss': abs(float(loss_m - loss_s) / float(loss_s)),
        'unrolled_vs_vmap_grads': _rel(g_u, g_s),
        'single_vs_skipside_grads': _rel(g_s, g_e),
        'mesh_vs_skipside_loss': abs(float(loss_m - loss_e) / float(loss_e)),
    }
    for l in range(num_stages):  # Per stage: the bottom ones are small.
      err[f'stage{l}_mesh_vs_skipside'] = _rel(
          jax.tree.map(lambda a: a[l], g_m['stack']),
          jax.tree.map(lambda a: a[l], g_e['stack']))
    err['head_mesh_vs_skipside'] = _rel(g_m['head'], g_e['head'])
    errors.update({f'{data}x{num_stages}/{k}': v for k, v in err.items()})
  for k, v in errors.items():
    print(f'{k}: {v:.2e}')
  bad = {k: v for k, v in errors.items() if not v <= tol}
  assert not bad, f'errors above {tol}: {bad}'
  print(f'ok: all {len(errors)} relative errors <= {tol}')
  return errors


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--check', action='store_true',
                      help='self-test: mesh vs one device vs skipside')
  args = parser.parse_args()
  if args.check:
    check()
  else:
    parser.print_help()


if __name__ == '__main__':
  main()
