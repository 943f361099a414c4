r"""The scan-friendly convolution against ``lax``'s, inside a ``lax.scan``.

  python -m experiments.benchmarks.conv [--out PATH]

Times the gradient (params and input) of one 3x3 convolution layer applied
to every step of an 8-step ``lax.scan`` -- how the engines run a stage, one
frame per tick -- with ``nnx.Conv``'s default ``lax.conv_general_dilated``
and with ``skipside.conv.conv_general_dilated``, side by side in one process
(median of 5 after a warm-up). Shapes: batch 16, the widths and sizes of the
default net's heavier layers. Writes ``experiments/results/conv.json``; the
headline is the worst ``lax_over_skipside`` ratio and the geometric mean.
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.benchmarks import common
from skipside import conv

RESULTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'results')
# (in features, out features, frame side, stride).
LAYERS = ((32, 32, 32, 1), (16, 32, 16, 2), (32, 1, 32, 1), (8, 16, 16, 1))


def _step_seconds(cin, cout, side, stride, impl, batch=16, ticks=8) -> float:
  kwargs = {} if impl is None else {'conv_general_dilated': impl}
  layer = nnx.Conv(cin, cout, (3, 3), strides=stride, padding='SAME',
                   rngs=nnx.Rngs(0), **kwargs)
  graph, params = nnx.split(layer)
  xs = jnp.ones((ticks, batch, side, side, cin))

  def loss(params, xs):
    def body(total, x):
      return total + jnp.mean(nnx.merge(graph, params)(x) ** 2), None
    return jax.lax.scan(body, 0.0, xs)[0]

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  jax.block_until_ready(grad(params, xs))
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    jax.block_until_ready(grad(params, xs))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=os.path.join(RESULTS, 'conv.json'))
  args = parser.parse_args()
  rows = []
  print(f'{"layer (cin, cout, side, stride)":32s} {"lax s":>9s} '
        f'{"skipside s":>10s} {"ratio":>7s}', flush=True)
  for cin, cout, side, stride in LAYERS:
    slow = _step_seconds(cin, cout, side, stride, None)
    fast = _step_seconds(cin, cout, side, stride, conv.conv_general_dilated)
    rows.append({'layer': [cin, cout, side, stride], 'lax_s': slow,
                 'skipside_s': fast, 'lax_over_skipside': slow / fast})
    print(f'{str((cin, cout, side, stride)):32s} {slow:9.5f} {fast:10.5f} '
          f'{slow / fast:7.2f}', flush=True)
  ratios = [r['lax_over_skipside'] for r in rows]
  headline = {'max_lax_over_skipside': round(max(ratios), 2),
              'geomean_lax_over_skipside': round(
                  float(np.exp(np.mean(np.log(ratios)))), 2)}
  print(headline)
  common.write_result(args.out, {
      'benchmark': 'conv', 'batch': 16, 'ticks': 8, 'device':
      common.device_info(), 'rows': rows, 'headline': headline})


if __name__ == '__main__':
  main()
